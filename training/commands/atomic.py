"""Atomic folder writes: build everything in a temp dir beside the target, then rename (nothing half-written)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_directory(output_dir: str, prefix: str = ".tmp-") -> Iterator[str]:
    """Yields a temp dir on the same filesystem; on success it replaces `output_dir`, on any error it is removed.

    Args:
        output_dir: the final folder (replaced if it exists; callers decide beforehand whether that is allowed).
        prefix: name prefix of the hidden temp dir.
    """
    output_dir = os.path.abspath(os.fspath(output_dir))
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
