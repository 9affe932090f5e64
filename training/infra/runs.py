"""Atomic folder writes and run ownership.

- `atomic_directory`: build a folder in a temp dir beside the target, then swap it in (nothing half-written, the old
  folder stays complete until the new one is in place).
- `stage_output`: a training stage owns its `--output_dir` (an exclusive lock), writes its final files through a
  staging dir, and records in `efficientvlm_run.json` which stage wrote the folder and whether it finished — written
  last, so readers (`export`) can tell a finished run from an interrupted one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence

logger = logging.getLogger(__name__)

LOCK_FILE = ".efficientvlm.lock"
RUN_FILE = "efficientvlm_run.json"  # the run record: stage, owner, status; "complete" is written last
FINAL_STAGING = ".final-staging"  # the final save is written here, then its files are renamed into output_dir
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")  # either one: single file or sharded
MODEL_FILES: tuple[str | tuple[str, ...], ...] = ("config.json", WEIGHTS)
GATES_FILE = "l0_gates.safetensors"  # a pruning run's gates (log α), written by `method.l0`


def stage_files(stage: str) -> tuple[str | tuple[str, ...], ...]:
    """What a finished `stage` leaves at the top of its output_dir (a tuple entry: any one of its names); a plain
    model folder (config + weights) for an unknown stage."""
    if stage == "prune":
        return (*MODEL_FILES, "processor_config.json", GATES_FILE)
    if stage in ("teacher", "distill"):
        return (*MODEL_FILES, "processor_config.json")
    return MODEL_FILES


class OutputDirInUseError(FileExistsError):
    """Another run owns the output folder (the CLI reports it and exits with status 2)."""


# ----------------------------------------------------------------------------------------------- atomic folders
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


_RENAME_EXCHANGE = 2  # renameat2 flag (Linux >= 3.15): swap two paths in one step


@functools.lru_cache(maxsize=1)
def _renameat2():
    """libc's `renameat2`, or None where it is missing (not Linux, old glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def exchange_paths(first: str, second: str) -> bool:
    """Swaps two existing paths in one atomic step (`renameat2(RENAME_EXCHANGE)`): a reader of either name sees the
    old entry or the new one, never none. Returns False where the system or filesystem cannot (the caller falls back
    to two renames)."""
    function = _renameat2()
    if function is None:
        return False
    import ctypes

    at_fdcwd = -100
    if function(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # unsupported here: fall back
        return False
    raise OSError(error, os.strerror(error), first, None, second)


def replace_path(source: str, target: str) -> None:
    """Moves `source` onto `target`. A file is replaced by one rename (atomic). An existing folder is swapped with
    `source` in one atomic step where Linux's `renameat2(RENAME_EXCHANGE)` works (readers of `target` never find it
    missing), else renamed aside first and then replaced (two renames: a reader may find `target` missing for the
    instant between them); the old version is deleted only once the new one is in place."""
    if not os.path.lexists(target):
        os.replace(source, target)
        return
    if (not os.path.isdir(target) or os.path.islink(target)) and not os.path.isdir(source):
        os.replace(source, target)  # a file or link over a file or link: rename(2) replaces it atomically
        return
    if os.path.isdir(source) and exchange_paths(source, target):
        shutil.rmtree(source, ignore_errors=True)  # `source` now names the old version
        return
    aside = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(target))
    old = os.path.join(aside, os.path.basename(target))
    os.replace(target, old)
    try:
        os.replace(source, target)
    except BaseException:
        os.replace(old, target)  # put the old version back
        os.rmdir(aside)
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(output_dir: str, prefix: str = ".tmp-") -> Iterator[str]:
    """Yields a temp dir on the same filesystem; on success it replaces `output_dir`, on any error it is removed.

    The folder gets the usual permissions (0777 minus the umask, like `os.mkdir`), not `mkdtemp`'s private 0700.

    Args:
        output_dir: the final folder (replaced if it exists, old one deleted only after the new one is in place;
            callers decide beforehand whether replacing is allowed).
        prefix: name prefix of the hidden temp dir.
    """
    output_dir = os.path.abspath(os.fspath(output_dir))
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        replace_path(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_files(staging: str, output_dir: str) -> None:
    """Renames every entry of `staging` into `output_dir` (replacing same-named ones) and removes `staging`."""
    for name in sorted(os.listdir(staging)):
        replace_path(os.path.join(staging, name), os.path.join(output_dir, name))
    os.rmdir(staging)


# ------------------------------------------------------------------------------------------------- run records
def read_run_record(folder: str) -> dict | None:
    """The folder's run record (`efficientvlm_run.json`), or None for a folder no stage wrote (export, checkpoint)."""
    path = os.path.join(folder, RUN_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def missing_files(folder: str, required: Sequence[str | tuple[str, ...]]) -> list[str]:
    """The entries of `required` absent from `folder` (a tuple entry is satisfied by any one of its names)."""
    missing = []
    for entry in required:
        names = (entry,) if isinstance(entry, str) else entry
        if not any(os.path.isfile(os.path.join(folder, name)) for name in names):
            missing.append(" or ".join(names))
    return missing


def _write_atomic(path: str, data: bytes) -> None:
    """Writes `path` through a temp file + rename: readers see the old content or the new, never a part."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, value, indent: int = 2) -> None:
    """Writes `value` as JSON through a temp file + rename (a reader never sees half a file); creates the folder."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _write_atomic(path, json.dumps(value, indent=indent).encode())


# --------------------------------------------------------------------------------------------------------- lock
def _owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_owner(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, 4096)
    try:
        owner = json.loads(data)
    except ValueError:  # empty (its writer died between create and write) or foreign content
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


def _in_use(output_dir: str, owner: dict) -> str:
    return (f"{output_dir} is in use by pid {owner.get('pid')} on host {owner.get('host')} since "
            f"{owner.get('started')}; wait for it to finish or pick another --output_dir")


class _Lock:
    """An exclusive lock on `<folder>/.efficientvlm.lock`: `flock` (released by the kernel however the process ends)
    plus the owner's pid, host and start time in the file, for the message another run gets and for stale locks."""

    def __init__(self, folder: str, path: str | None = None):
        self.path = path or os.path.join(folder, LOCK_FILE)
        self.folder = folder
        self.fd: int | None = None
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                self._take(fd)
            except BaseException:
                os.close(fd)
                raise
            # the previous owner may have unlinked the file between our open and our flock: lock the current file
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
            else:
                os.close(fd)
        owner = _owner()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(owner).encode(), 0)
        os.fsync(self.fd)

    def _take(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputDirInUseError(_in_use(self.folder, _read_owner(fd) or {})) from None
        except OSError as error:  # a filesystem without flock (some network mounts): the recorded owner decides
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            logger.warning("%s: flock unsupported here (%s); relying on the recorded owner only", self.path, error)
        previous = _read_owner(fd)
        if previous is None or (previous.get("pid") == os.getpid() and previous.get("host") == socket.gethostname()):
            return
        if previous.get("host") != socket.gethostname():
            raise OutputDirInUseError(
                f"{_in_use(self.folder, previous)} (another host: if that run has ended, delete {self.path})"
            )
        if _pid_alive(int(previous["pid"])):
            raise OutputDirInUseError(
                f"{_in_use(self.folder, previous)} (if pid {previous['pid']} is not an efficientvlm run, delete "
                f"{self.path})"
            )
        logger.warning("%s: taking over the stale lock of pid %s on host %s (since %s), which is no longer running",
                       self.folder, previous["pid"], previous["host"], previous.get("started"))

    def release(self) -> None:
        """Unlinks the lock file while still holding it, then closes it (idempotent)."""
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


def writer_lock_path(folder: str) -> str:
    """The lock of a folder that is replaced as a whole (`export`): a hidden file beside it, `.<name>.efficientvlm.lock`
    (a lock inside the folder would move away with the old version)."""
    folder = os.path.abspath(os.fspath(folder))
    return os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}{LOCK_FILE}")


@contextlib.contextmanager
def folder_writer(folder: str) -> Iterator[None]:
    """Holds the writer lock of a folder that is written as a whole (`export`, `save_hub_ready`): a second writer gets
    `OutputDirInUseError` naming the first one's pid, host and start time (exit 2), as a second stage run does."""
    folder = os.path.abspath(os.fspath(folder))
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    lock = _Lock(folder, writer_lock_path(folder))
    try:
        yield
    finally:
        lock.release()


# -------------------------------------------------------------------------------------------------- ownership
class OutputDirExistsError(FileExistsError):
    """The output folder holds a finished run or a model that the command was not told to replace (exit 2)."""


def check_output_dir(output_dir: str, command: str, inputs: dict[str, str | None] | None = None,
                     overwrite: bool = False, resume: bool = False) -> None:
    """Refuses an `output_dir` that a run of `command` must not write into, before anything is written.

    Always refused: an output folder that is one of the run's inputs or holds one (realpaths compared: `inputs` maps
    the flag, e.g. "--teacher", to its path). Refused unless `overwrite` (or `resume`: the Trainer's
    `--resume_from_checkpoint` continues the run in place): a folder holding a complete run (its run record says
    "complete") or a model without a run record (config.json + weights: an export, a conversion). An unfinished run
    (record "running" / "failed") may be rerun into its folder.

    Raises:
        ValueError: output_dir is (or contains) an input.
        OutputDirExistsError: output_dir holds a complete run or a model.
    """
    target = os.path.realpath(output_dir)
    for flag, path in (inputs or {}).items():
        if not path:
            continue
        source = os.path.realpath(path)
        if source == target or source.startswith(target + os.sep):
            what = "is" if source == target else "holds"
            raise ValueError(f"{command}: --output_dir {output_dir} {what} the {flag} {path} the run reads; writing "
                             "there would replace its own input: pick another --output_dir")
    if overwrite or resume or not os.path.isdir(output_dir):
        return
    record = read_run_record(output_dir)
    if record is not None and record.get("status") == "complete":
        raise OutputDirExistsError(
            f"{command}: {output_dir} holds a complete `efficientvlm {record.get('stage')}` run (finished "
            f"{record.get('finished')}); pass --overwrite true to replace it (or --resume_from_checkpoint to continue "
            "it), or pick another --output_dir")
    if record is None and not missing_files(output_dir, MODEL_FILES):
        raise OutputDirExistsError(
            f"{command}: {output_dir} holds a model (config.json and weights, no run record); pass --overwrite true "
            "to write over it, or pick another --output_dir")


def _snapshot(folder: str) -> dict[str, tuple[int, int, int]]:
    ours = (LOCK_FILE, RUN_FILE, FINAL_STAGING)
    entries = {}
    for entry in os.scandir(folder):
        if entry.name not in ours and not entry.name.startswith(f"{RUN_FILE}."):
            stat = entry.stat(follow_symlinks=False)
            entries[entry.name] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    return entries


@contextlib.contextmanager
def owned_output_dir(output_dir: str, stage: str, required: Sequence[str | tuple[str, ...]],
                     inputs: dict[str, str | None] | None = None) -> Iterator[None]:
    """Owns `output_dir` for one run of `stage` (callers check beforehand whether it may write there:
    `check_output_dir`). `inputs` ({flag: path}, e.g. the teacher) go into the run record as absolute paths, so
    `export` knows which model the run started from.

    Takes the lock before anything is written (another run gets `OutputDirInUseError`), records the run as
    "running" in `efficientvlm_run.json`, and on success checks `required` and records "complete" with the files
    written — the last write of the run. On failure: a run that wrote nothing leaves the folder as it found it (a
    folder it created is removed); otherwise the record says "failed" and the partial final save is removed. The lock
    is released in every case; if the process is killed, the kernel drops the flock and the next run takes the stale
    lock over with a warning.
    """
    output_dir = os.path.abspath(os.fspath(output_dir))
    os.makedirs(os.path.dirname(output_dir), exist_ok=True)
    try:
        os.mkdir(output_dir)
        created = True
    except FileExistsError:
        created = False
    lock = _Lock(output_dir)
    record_path = os.path.join(output_dir, RUN_FILE)
    try:
        before = _snapshot(output_dir)
        previous = None
        if os.path.isfile(record_path):
            with open(record_path, "rb") as f:
                previous = f.read()
        owner = _owner()
        if inputs:
            owner["inputs"] = {flag: os.path.abspath(path) for flag, path in inputs.items() if path}
        write_json_atomic(record_path, {"stage": stage, "status": "running", **owner})
        try:
            yield
            missing = missing_files(output_dir, required)
            if missing:
                raise RuntimeError(f"{stage} finished but {output_dir} lacks {', '.join(missing)}")
        except BaseException as error:
            shutil.rmtree(os.path.join(output_dir, FINAL_STAGING), ignore_errors=True)
            if _snapshot(output_dir) != before:  # checkpoints or files were written: say the run failed
                write_json_atomic(record_path, {"stage": stage, "status": "failed", **owner,
                                          "error": f"{type(error).__name__}: {error}"[:500]})
            elif previous is None:
                os.remove(record_path)
                if created and set(os.listdir(output_dir)) <= {LOCK_FILE}:
                    lock.release()
                    with contextlib.suppress(OSError):  # another run may have just put its lock in
                        os.rmdir(output_dir)
            else:
                _write_atomic(record_path, previous)  # nothing changed: the earlier run's record stands
            raise
        _remove_stale(output_dir, previous, before)
        files = sorted(e.name for e in os.scandir(output_dir)
                       if e.is_file() and e.name not in (LOCK_FILE, RUN_FILE))
        write_json_atomic(record_path, {"stage": stage, "status": "complete", **owner,
                                  "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "files": files})
    finally:
        lock.release()


def _remove_stale(output_dir: str, previous: bytes | None, before: dict) -> None:
    """After a run that replaced a complete one (`--overwrite`): removes the top-level files the earlier run listed
    that this run left untouched (e.g. its eval_results.json when this run did not evaluate), so nothing in the folder
    describes another model."""
    try:
        old_files = json.loads(previous or b"{}").get("files") or []
    except ValueError:
        return
    now = _snapshot(output_dir)
    for name in old_files:
        if isinstance(name, str) and name in before and now.get(name) == before[name] and os.sep not in name:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(output_dir, name))


@contextlib.contextmanager
def stage_output(args, stage: str, inputs: dict[str, str | None] | None = None) -> Iterator[None]:
    """`owned_output_dir(args.output_dir, stage, stage_files(stage))` on the global main process only, after
    `check_output_dir` (on every process: it only reads) with the stage's `inputs`, `args.overwrite` and
    `args.resume_from_checkpoint`.

    Under DDP only process 0 takes the lock and writes the run record: the other ranks write nothing to output_dir
    outside checkpoints (`should_save` is False there), and if process 0 cannot take the lock it exits with status 2,
    which makes torchrun stop the other ranks — no rank waits on a lock, so nothing can deadlock.
    """
    check_output_dir(args.output_dir, stage, inputs, overwrite=bool(getattr(args, "overwrite", False)),
                     resume=bool(args.resume_from_checkpoint))
    if args.process_index != 0:
        yield
        return
    with owned_output_dir(args.output_dir, stage, stage_files(stage), inputs):
        yield


def owns_output_dir(stage: str, inputs=None):
    """Decorator: runs a stage function (which takes its `TrainingArguments` as `args`) inside `stage_output`.

    `inputs`: fn(**the function's bound arguments) -> {flag: path} of the folders and files the stage reads (an
    output folder that is one of them is refused)."""

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*positional, **keywords):
            bound = signature.bind(*positional, **keywords)
            bound.apply_defaults()
            args = bound.arguments["args"]
            with stage_output(args, stage, inputs(**bound.arguments) if inputs else None):
                return fn(*positional, **keywords)

        return wrapper

    return decorate
