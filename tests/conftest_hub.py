"""Pytest plugin providing ``local_hub``: a local Hugging Face Hub-compatible server.

Enable with ``pytest_plugins = ["tests.conftest_hub"]`` in tests/conftest.py, or
``from tests.conftest_hub import local_hub, local_hub_server  # noqa: F401``.

``local_hub`` (function-scoped) yields the ``LocalHub`` (``local_hub.url`` is the endpoint) and, via
monkeypatch, for the duration of the test:
  * sets ``HF_ENDPOINT=<url>``, ``HF_HUB_DISABLE_TELEMETRY=1``, a fresh temp ``HF_HOME`` (and
    ``HF_HUB_CACHE``) and unsets ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``/``HF_TOKEN`` =>
    subprocesses (``subprocess.run(..., env=os.environ.copy())``) talk to the local hub;
  * patches the in-process values that ``huggingface_hub`` froze at import time
    (``constants.ENDPOINT``, ``constants.HUGGINGFACE_CO_URL_TEMPLATE``, ``constants.HF_HUB_CACHE``,
    offline flag, the module-level ``huggingface_hub.hf_api.api`` instance and transformers' cached
    ``hf_api()``), so ``hf_hub_download(...)``, ``HfApi()`` and ``from_pretrained`` work in-process too.
    Passing ``endpoint=local_hub.url`` explicitly to ``HfApi`` is still the most robust option.

The server itself is session-scoped (``local_hub_server``) and shared, so use unique repo names per
test (e.g. ``f"user/{request.node.name}"``) or ``exist_ok=True``.
"""

from __future__ import annotations

import pytest

from tests.hub_server import LocalHub


@pytest.fixture(scope="session")
def local_hub_server():
    with LocalHub() as hub:
        yield hub


@pytest.fixture
def local_hub(local_hub_server, monkeypatch, tmp_path):
    from huggingface_hub import constants, hf_api

    url = local_hub_server.url
    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_HUB_ENABLE_HF_TRANSFER"):
        monkeypatch.delenv(var, raising=False)

    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True, raising=False)
    monkeypatch.setattr(hf_api.api, "endpoint", url)
    try:  # transformers caches one HfApi instance (created with the endpoint of its first use)
        import transformers.utils.hub as tf_hub

        monkeypatch.setattr(tf_hub, "_hf_api", None, raising=False)
    except ImportError:
        pass
    yield local_hub_server
