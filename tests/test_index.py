"""`efficientvlm index` / `search` and the pipeline on an index: equal to the brute-force pipeline, resumable, sharded,
refusing another model's index; FAISS (when installed) equal to exact search."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from efficientvlm.training.commands.index import IndexArguments, SearchArguments, build_index, run_search
from modeling_efficientvlm.index_efficientvlm import GalleryIndex, faiss_available, model_fingerprint
from modeling_efficientvlm.modeling_efficientvlm import EfficientVLMForImageTextRetrieval
from modeling_efficientvlm.pipeline_efficientvlm import ImageTextRetrievalPipeline
from tests.conftest import run_clean_python, tiny_config, tiny_processor

QUERIES = ["a red circle", "a blue square left of a red circle", "red square"]
N_IMAGES = 23


def _save_model(folder, seed: int):
    torch.manual_seed(seed)
    model = EfficientVLMForImageTextRetrieval(tiny_config(text=dict(initializer_range=0.3))).eval()
    model.save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    rng = np.random.default_rng(0)
    images = root / "images"
    for i in range(N_IMAGES):  # nested folders and two formats; references are the relative paths
        sub = images / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8))
        image.save(sub / f"img{i:02d}.png")
    _save_model(root / "model", 0)
    _save_model(root / "other", 1)
    return root


def _args(root, out, **kwargs) -> IndexArguments:
    return IndexArguments(model=str(root / "model"), images=str(root / "images"), output_dir=str(out),
                          batch_size=4, chunk_size=5, **kwargs)


@pytest.fixture(scope="module")
def index_dir(gallery):
    out = gallery / "idx"
    assert build_index(_args(gallery, out, store_image_tokens=True), progress=False)["finished"]
    return out


def _pipe(root):
    model = EfficientVLMForImageTextRetrieval.from_pretrained(root / "model").eval()
    from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor

    return ImageTextRetrievalPipeline(model=model, processor=EfficientVLMProcessor.from_pretrained(root / "model"))


@pytest.mark.parametrize("stored_tokens", [True, False])
def test_index_search_equals_brute_force_pipeline(gallery, index_dir, stored_tokens, tmp_path):
    folder = index_dir
    if not stored_tokens:
        folder = tmp_path / "idx"
        build_index(_args(gallery, folder), progress=False)
    index = GalleryIndex.load(folder)
    paths = [gallery / "images" / ref for ref in index.references]
    pipe = _pipe(gallery)
    for rerank_k in (0, 6):
        brute = pipe(QUERIES, gallery=paths, top_k=8, rerank_k=rerank_k)
        for use in (folder, index):  # a folder path or a loaded index
            indexed = pipe(QUERIES, gallery=use, top_k=8, rerank_k=rerank_k)
            for b_hits, i_hits in zip(brute, indexed):
                assert [str(h["image"]) for h in b_hits] == [str(gallery / "images" / h["image"]) for h in i_hits]
                np.testing.assert_allclose([h["score"] for h in b_hits], [h["score"] for h in i_hits], atol=1e-4)
                if rerank_k:
                    assert [h["reranked"] for h in b_hits] == [h["reranked"] for h in i_hits]


def test_search_command_and_image_query(gallery, index_dir):
    hits = run_search(SearchArguments(index=str(index_dir), text=QUERIES[0], top_k=4, rerank_k=6))
    assert [h["rank"] for h in hits] == [1, 2, 3, 4] and set(hits[0]) == {"image", "score", "rank"}
    index = GalleryIndex.load(index_dir)
    query = gallery / "images" / index.references[7]
    hits = run_search(SearchArguments(index=str(index_dir), image=str(query), top_k=3))
    assert hits[0]["image"] == index.references[7] and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="ITC alone"):
        run_search(SearchArguments(index=str(index_dir), image=str(query), rerank_k=2))


def test_index_of_another_model_is_refused_naming_both(gallery, index_dir):
    other = EfficientVLMForImageTextRetrieval.from_pretrained(gallery / "other").eval()
    pipe = ImageTextRetrievalPipeline(model=other, processor=tiny_processor())
    with pytest.raises(ValueError, match=r"built with model .*model.* not with .*other"):
        pipe(QUERIES[0], gallery=str(index_dir))
    with pytest.raises(ValueError, match="built with model"):
        run_search(SearchArguments(index=str(index_dir), text="red", model=str(gallery / "other")))


def test_fingerprint_survives_save_and_reload_and_class(gallery):
    reloaded = EfficientVLMForImageTextRetrieval.from_pretrained(gallery / "model")
    from modeling_efficientvlm.modeling_efficientvlm import EfficientVLMForPreTraining

    pretraining = EfficientVLMForPreTraining.from_pretrained(gallery / "model")
    fresh = _save_model(gallery / "model_copy", 0)
    assert model_fingerprint(reloaded) == model_fingerprint(pretraining) == model_fingerprint(fresh)


def test_interrupted_build_resumes_without_recomputing(gallery, index_dir, tmp_path):
    out = tmp_path / "resumed"

    def interrupt(part):
        if part.name == "part-00001.safetensors":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(_args(gallery, out, store_image_tokens=True), on_part=interrupt, progress=False)
    assert not (out / "index.json").exists()
    with pytest.raises(FileNotFoundError, match="has not finished"):
        GalleryIndex.load(out)
    report = build_index(_args(gallery, out, store_image_tokens=True), progress=False)
    assert report["finished"] and report["embedded"] == N_IMAGES - 10  # two parts of 5 were kept
    _assert_same_index(GalleryIndex.load(out), GalleryIndex.load(index_dir))
    with pytest.raises(ValueError, match="other settings"):  # a resume with other options is refused
        build_index(_args(gallery, out), progress=False)


def _assert_same_index(a: GalleryIndex, b: GalleryIndex) -> None:
    assert a.references == b.references
    torch.testing.assert_close(a.embeddings, b.embeddings, atol=1e-6, rtol=0)
    rows = [0, 6, len(a) - 1]
    torch.testing.assert_close(a.image_tokens(rows), b.image_tokens(rows), atol=1e-6, rtol=0)


def test_two_process_build_reads_back_as_one_index(gallery, index_dir, tmp_path, monkeypatch):
    out = tmp_path / "sharded"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert not build_index(_args(gallery, out, store_image_tokens=True), progress=False)["finished"]
    monkeypatch.setenv("RANK", "1")
    assert build_index(_args(gallery, out, store_image_tokens=True), progress=False)["finished"]
    manifest = json.loads((out / "index.json").read_text())
    assert {p.split("/")[0] for p in manifest["parts"]} == {"shard-00000-of-00002", "shard-00001-of-00002"}
    _assert_same_index(GalleryIndex.load(out), GalleryIndex.load(index_dir))


def test_json_and_dataset_sources_keep_their_references(gallery, tmp_path):
    datasets = pytest.importorskip("datasets")
    refs = [f"a/img{i:02d}.png" for i in (1, 3, 5)]
    records = [{"image": r, "caption": "x"} for r in refs] + [{"image": refs[0], "caption": "y"}]  # a repeat
    (tmp_path / "test.json").write_text(json.dumps(records))
    build_index(IndexArguments(model=str(gallery / "model"), images=str(tmp_path / "test.json"),
                               image_root=str(gallery / "images"), output_dir=str(tmp_path / "j")), progress=False)
    by_json = GalleryIndex.load(tmp_path / "j")
    assert by_json.references == refs
    images = [Image.open(gallery / "images" / r).convert("RGB") for r in refs]
    datasets.Dataset.from_dict({"picture": images}, features=datasets.Features({"picture": datasets.Image()})) \
        .save_to_disk(str(tmp_path / "ds"))
    build_index(IndexArguments(model=str(gallery / "model"), images=str(tmp_path / "ds"),
                               output_dir=str(tmp_path / "d")), progress=False)
    by_dataset = GalleryIndex.load(tmp_path / "d")
    assert by_dataset.references == [0, 1, 2] and by_dataset.manifest["source"]["image_column"] == "picture"
    torch.testing.assert_close(by_dataset.embeddings, by_json.embeddings, atol=1e-6, rtol=0)
    hits = _pipe(gallery)("red", gallery=by_dataset, top_k=2, rerank_k=2)  # re-encodes candidates from the rows
    assert {h["image"] for h in hits} <= {0, 1, 2}


def test_faiss_search_equals_exact_search(index_dir):
    if not faiss_available():
        pytest.skip("faiss / datasets not installed (the `faiss` extra)")
    index = GalleryIndex.load(index_dir)
    queries = torch.nn.functional.normalize(torch.randn(4, index.embeddings.shape[1]), dim=-1)
    exact = index.search(queries, 7, use_faiss=False)
    approx = index.search(queries, 7, use_faiss=True)
    assert torch.equal(exact[1], approx[1])
    torch.testing.assert_close(exact[0], approx[0], atol=1e-5, rtol=0)
    assert index.dataset().num_rows == len(index)


def test_index_readable_without_datasets(index_dir):
    code = f"""
import sys, builtins
real = builtins.__import__
def guard(name, *a, **k):
    if name.split('.')[0] in ('datasets', 'faiss', 'efficientvlm'):
        raise ImportError(name)
    return real(name, *a, **k)
builtins.__import__ = guard
from modeling_efficientvlm.index_efficientvlm import GalleryIndex
import torch
index = GalleryIndex.load({str(index_dir)!r})
scores, rows = index.search(index.embeddings[:2], 3)
assert rows[:, 0].tolist() == [0, 1], rows
print("ok", len(index))
"""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=os.getcwd())
    assert out.returncode == 0 and out.stdout.startswith("ok 23"), out.stderr


@pytest.mark.slow
def test_remote_code_pipeline_queries_an_index_without_the_package(gallery, index_dir, tmp_path):
    """A user with only transformers: pipeline(trust_remote_code) from a saved folder, gallery = the index folder."""
    from modeling_efficientvlm.pipeline_efficientvlm import save_pipeline_files

    folder = tmp_path / "hub"
    model = EfficientVLMForImageTextRetrieval.from_pretrained(gallery / "model").eval()
    model.save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    save_pipeline_files(folder)
    assert (folder / "index_efficientvlm.py").is_file()
    expected = _pipe(gallery)(QUERIES[0], gallery=str(index_dir), top_k=5, rerank_k=6)
    out = run_clean_python(f"""
        import json
        from transformers import pipeline
        pipe = pipeline("image-text-retrieval", model={str(folder)!r}, trust_remote_code=True)
        hits = pipe({QUERIES[0]!r}, gallery={str(index_dir)!r}, top_k=5, rerank_k=6)
        print(json.dumps([[h["image"], h["score"]] for h in hits]))
    """)
    got = json.loads(out.strip().splitlines()[-1])
    assert [g[0] for g in got] == [h["image"] for h in expected]
    np.testing.assert_allclose([g[1] for g in got], [h["score"] for h in expected], atol=1e-5)
