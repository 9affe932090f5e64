"""Tests for the local Hub server, driven by the real huggingface_hub client and transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import urllib.error
import urllib.request
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

from tests.conftest_hub import local_hub, local_hub_server  # noqa: F401 - fixtures

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "the", "a", "cat", "##s", "dog"]


def _run_py(code: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter with the (monkeypatched) environment: HF_ENDPOINT etc."""
    env = os.environ.copy()
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_upload_info_download_roundtrip(local_hub, tmp_path):
    api = HfApi(endpoint=local_hub.url, token="test")
    repo = "user/roundtrip"
    url = api.create_repo(repo, repo_type="model", exist_ok=True)
    assert url.repo_id == repo
    api.create_repo(repo, exist_ok=True)  # second call: 409 swallowed
    sha0 = api.model_info(repo).sha

    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"a": 1}))
    (folder / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 40)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# card\n")
    info = api.upload_folder(folder_path=folder, repo_id=repo, commit_message="add folder")
    assert len(info.oid) == 40 and info.oid != sha0
    api.upload_file(path_or_fileobj=b"extra", path_in_repo="extra.txt", repo_id=repo, commit_message="one file")

    info = api.model_info(repo)
    assert info.id == repo and info.sha not in (sha0, None)
    names = {s.rfilename for s in info.siblings}
    assert names == {".gitattributes", "config.json", "sub/weights.bin", "README.md", "extra.txt"}
    assert api.repo_info(repo, revision="main").sha == info.sha
    assert sorted(api.list_repo_files(repo)) == sorted(names)
    assert [e.path for e in api.list_repo_tree(repo)] == [".gitattributes", "README.md", "config.json", "extra.txt",
                                                          "sub"]
    assert api.file_exists(repo, "sub/weights.bin") and not api.file_exists(repo, "nope.json")
    assert not api.file_exists("user/missing", "config.json")

    # Re-uploading identical content creates no commit (preupload returns the remote oid).
    assert api.upload_file(path_or_fileobj=b"extra", path_in_repo="extra.txt", repo_id=repo).oid == info.sha

    cache = tmp_path / "cache"
    path = hf_hub_download(repo, "sub/weights.bin", endpoint=local_hub.url, cache_dir=cache)
    assert Path(path).read_bytes() == bytes(range(256)) * 40
    assert f"snapshots/{info.sha}/" in path
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo, "missing.json", endpoint=local_hub.url, cache_dir=cache)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/missing", "config.json", endpoint=local_hub.url, cache_dir=cache)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo, "config.json", revision="f" * 40, endpoint=local_hub.url, cache_dir=cache)

    snap = snapshot_download(repo, endpoint=local_hub.url, cache_dir=cache)
    assert json.loads(Path(snap, "config.json").read_text()) == {"a": 1}
    assert Path(snap, "extra.txt").read_bytes() == b"extra"

    # Older commits stay addressable; deletions work.
    api.delete_file("extra.txt", repo_id=repo, commit_message="rm")
    assert not api.file_exists(repo, "extra.txt")
    assert api.file_exists(repo, "extra.txt", revision=info.sha)
    assert local_hub.read_file(repo, "config.json") == json.dumps({"a": 1}).encode()


def test_in_process_defaults_use_local_hub(local_hub):
    """The fixture patches huggingface_hub's import-time constants: no explicit endpoint needed."""
    api = HfApi(token="test")
    api.create_repo("user/defaults", exist_ok=True)
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="user/defaults")
    assert Path(hf_hub_download("user/defaults", "config.json")).read_text() == "{}"
    assert os.environ["HF_ENDPOINT"] == local_hub.url


def test_unknown_endpoint_is_404_json(local_hub):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{local_hub.url}/api/does-not-exist", timeout=10)
    assert err.value.code == 404 and "unsupported endpoint" in json.load(err.value)["error"]


@pytest.mark.slow
def test_transformers_bert_and_tokenizer_roundtrip(local_hub, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                                 vocab_size=100)).eval()
    folder = tmp_path / "bert"
    model.save_pretrained(folder)
    # transformers 5 tokenizers take the vocab itself (a `vocab_file=` argument is silently ignored).
    BertTokenizerFast(vocab={word: i for i, word in enumerate(VOCAB)}).save_pretrained(folder)
    api = HfApi(endpoint=local_hub.url, token="test")
    api.create_repo("user/tiny-bert", exist_ok=True)
    api.upload_folder(folder_path=folder, repo_id="user/tiny-bert", commit_message="bert")

    with torch.no_grad():
        expected = model(input_ids=torch.tensor([[2, 5, 6, 3]])).last_hidden_state.flatten().tolist()
    proc = _run_py("""
        import json, torch
        from transformers import AutoModel, AutoTokenizer
        tok = AutoTokenizer.from_pretrained("user/tiny-bert")
        ids = tok("hello world")["input_ids"]
        model = AutoModel.from_pretrained("user/tiny-bert").eval()
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids])).last_hidden_state.flatten().tolist()
        print(json.dumps({"ids": ids, "out": out}))
    """)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ids"] == [2, 5, 6, 3]
    assert result["out"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
def test_transformers_remote_code(local_hub, tmp_path):
    pytest.importorskip("torch")
    folder = tmp_path / "foo"
    folder.mkdir()
    (folder / "configuration_foo.py").write_text(textwrap.dedent("""
        from transformers import PretrainedConfig

        class FooConfig(PretrainedConfig):
            model_type = "foo"

            def __init__(self, width=4, **kwargs):
                self.width = width
                super().__init__(**kwargs)
    """))
    (folder / "modeling_foo.py").write_text(textwrap.dedent("""
        import torch
        from transformers import PreTrainedModel
        from .configuration_foo import FooConfig

        class FooModel(PreTrainedModel):
            config_class = FooConfig

            def __init__(self, config):
                super().__init__(config)
                self.proj = torch.nn.Linear(config.width, config.width)
                self.post_init()

            def forward(self, x):
                return self.proj(x)
    """))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "foo", "width": 4, "architectures": ["FooModel"],
        "auto_map": {"AutoConfig": "configuration_foo.FooConfig", "AutoModel": "modeling_foo.FooModel"},
    }))
    api = HfApi(endpoint=local_hub.url, token="test")
    api.create_repo("user/foo", exist_ok=True)
    api.upload_folder(folder_path=folder, repo_id="user/foo", commit_message="code")
    # Save weights through the remote-code classes (in a subprocess), push them, then reload by repo id.
    _run_py(f"""
        from transformers import AutoConfig, AutoModel
        from huggingface_hub import HfApi
        config = AutoConfig.from_pretrained("user/foo", trust_remote_code=True)
        assert type(config).__name__ == "FooConfig" and config.width == 4
        model = AutoModel.from_config(config, trust_remote_code=True)
        model.save_pretrained({str(tmp_path / "weights")!r})
        HfApi(token="test").upload_folder(folder_path={str(tmp_path / "weights")!r}, repo_id="user/foo",
                                          allow_patterns=["*.safetensors"])
    """)
    proc = _run_py("""
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained("user/foo", trust_remote_code=True)
        print(type(model).__name__, model.proj.weight.shape[0])
    """)
    assert proc.stdout.split()[-2:] == ["FooModel", "4"]
