"""The `image-text-retrieval` pipeline (in process and as Hub remote code) and the built-in zero-shot pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_efficientvlm import EfficientVLMForImageTextRetrieval, EfficientVLMModel
from modeling_efficientvlm.pipeline_efficientvlm import ImageTextRetrievalPipeline, save_pipeline_files
from tests.conftest import TINY_TEXTS, run_clean_python, tiny_config, tiny_processor

QUERY = "a red circle"
LABELS = ["red circle", "blue square", "square"]


def tiny_images(count: int = 4, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A tiny retrieval model (wide init, so scores are well separated), its processor, a gallery and saved folders."""
    torch.manual_seed(0)
    model = EfficientVLMForImageTextRetrieval(tiny_config(text=dict(initializer_range=0.3))).eval()
    processor = tiny_processor()
    pipe = ImageTextRetrievalPipeline(model=model, processor=processor, device=-1)
    images = tiny_images()
    root = tmp_path_factory.mktemp("pipeline")
    paths = []
    for i, image in enumerate(images):  # PNG is lossless: paths and PIL images give the same pixels
        paths.append(str(root / f"image{i}.png"))
        image.save(paths[-1])
    saved_by_pipeline = root / "saved_by_pipeline"
    pipe.save_pretrained(saved_by_pipeline)
    saved_by_helper = root / "saved_by_helper"
    model.save_pretrained(saved_by_helper)
    processor.save_pretrained(saved_by_helper)
    save_pipeline_files(saved_by_helper)
    return dict(
        model=model, processor=processor, pipe=pipe, images=images, paths=paths, root=root,
        saved_by_pipeline=saved_by_pipeline, saved_by_helper=saved_by_helper,
    )


@torch.no_grad()
def direct_itc(model, processor, images, texts) -> torch.Tensor:
    """(N_img, N_txt) cosine similarities straight from the model."""
    text = processor(text=texts)
    image_embeds = model.get_image_features(processor(images=images)["pixel_values"])
    return image_embeds @ model.get_text_features(text["input_ids"], text["attention_mask"]).T


@torch.no_grad()
def direct_itm(model, processor, images, texts) -> torch.Tensor:
    """(N_img, N_txt) ITM match-minus-no-match logits straight from the model."""
    pixels, text = processor(images=images)["pixel_values"], processor(text=texts)
    rows = []
    for i in range(len(images)):
        rows.append(model.score_pairs(pixels[i : i + 1].expand(len(texts), -1, -1, -1), text["input_ids"],
                                      text["attention_mask"]))
    return torch.stack(rows)


def indices(result: list[dict]) -> list[int]:
    return [entry["index"] for entry in result]


def scores(result: list[dict], key: str = "score") -> torch.Tensor:
    return torch.tensor([entry[key] for entry in result])


def test_itc_ranking_matches_direct_computation(setup):
    model, processor, pipe, images = setup["model"], setup["processor"], setup["pipe"], setup["images"]
    itc = direct_itc(model, processor, images, TINY_TEXTS)  # (4, 5)

    result = pipe(QUERY, gallery=images, top_k=10)  # top_k above the gallery size: everything
    expected = itc[:, 0].sort(descending=True)
    assert indices(result) == expected.indices.tolist()
    torch.testing.assert_close(scores(result), expected.values, atol=1e-5, rtol=1e-5)
    assert set(result[0]) == {"index", "score", "image"} and result[0]["image"] is images[result[0]["index"]]

    result = pipe(images[1], gallery=TINY_TEXTS, top_k=3)  # image → texts, truncated
    expected = itc[1].sort(descending=True)
    assert indices(result) == expected.indices[:3].tolist()
    torch.testing.assert_close(scores(result), expected.values[:3], atol=1e-5, rtol=1e-5)
    assert [entry["text"] for entry in result] == [TINY_TEXTS[i] for i in indices(result)]

    assert len(pipe(QUERY, gallery=images)) == 4 and len(pipe(QUERY, gallery=images, top_k=1)) == 1
    assert len(pipe(images[0], gallery=TINY_TEXTS)) == 5  # default top_k=5

    scaled = pipe(QUERY, gallery=images, top_k=None, scale_by_temperature=True)
    expected_scaled = itc[:, 0].sort(descending=True).values / model.temperature.detach()
    torch.testing.assert_close(scores(scaled), expected_scaled, atol=1e-4, rtol=1e-5)


def test_paths_and_path_objects_as_images(setup):
    """`pathlib.Path` is an image; a `str` path is an image only when declared with `gallery_type` / `query_type`."""
    pipe, images, paths = setup["pipe"], setup["images"], setup["paths"]
    from_pil = pipe(QUERY, gallery=images, top_k=None)
    for from_paths in (pipe(QUERY, gallery=paths, gallery_type="image", top_k=None),
                       pipe(QUERY, gallery=[Path(p) for p in paths], top_k=None)):
        assert indices(from_paths) == indices(from_pil)
        torch.testing.assert_close(scores(from_paths), scores(from_pil))
    assert pipe(QUERY, gallery=paths, gallery_type="image")[0]["image"] == paths[indices(from_pil)[0]]
    from_image = scores(pipe(images[2], gallery=TINY_TEXTS))
    torch.testing.assert_close(scores(pipe(Path(paths[2]), gallery=TINY_TEXTS)), from_image)
    torch.testing.assert_close(scores(pipe(paths[2], gallery=TINY_TEXTS, query_type="image")), from_image)


def test_rerank_reorders_by_direct_itm_scores(setup):
    model, processor, pipe, images = setup["model"], setup["processor"], setup["pipe"], setup["images"]
    itc, itm = direct_itc(model, processor, images, TINY_TEXTS), direct_itm(model, processor, images, TINY_TEXTS)

    # Text query over images: the top-3 ITC candidates are re-ordered by ITM; the last keeps its ITC score below them.
    itc_order = itc[:, 0].argsort(descending=True).tolist()
    head = sorted(itc_order[:3], key=lambda i: -itm[i, 0].item())
    result = pipe(QUERY, gallery=images, top_k=4, rerank_k=3)
    assert indices(result) == head + itc_order[3:]
    assert head != itc_order[:3], "fixture should make the ITM head disagree with ITC (else the test is weak)"
    assert [entry["reranked"] for entry in result] == [True, True, True, False]
    torch.testing.assert_close(scores(result)[:3], itm[head, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores(result)[3:], itc[itc_order[3:], 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores(result, "itc_score"), itc[indices(result), 0], atol=1e-5, rtol=1e-5)

    # Re-ranking the whole gallery: the order is the direct ITM order, for both directions.
    result = pipe(QUERY, gallery=images, top_k=None, rerank_k=10)
    assert indices(result) == itm[:, 0].argsort(descending=True).tolist()
    torch.testing.assert_close(scores(result), itm[:, 0].sort(descending=True).values, atol=1e-5, rtol=1e-5)
    result = pipe(images[3], gallery=TINY_TEXTS, top_k=3, rerank_k=5, batch_size=2)
    assert indices(result) == itm[3].argsort(descending=True)[:3].tolist()
    torch.testing.assert_close(scores(result), itm[3].sort(descending=True).values[:3], atol=1e-5, rtol=1e-5)

    probs = pipe(images[3], gallery=TINY_TEXTS, top_k=3, rerank_k=5, itm_score="probability")
    assert indices(probs) == indices(result)
    torch.testing.assert_close(scores(probs), torch.sigmoid(scores(result)), atol=1e-5, rtol=1e-5)


def test_batch_of_queries_and_batch_sizes(setup):
    pipe, images = setup["pipe"], setup["images"]
    queries = [QUERY, "blue square", "a"]
    batched = pipe(queries, gallery=images, top_k=3, rerank_k=2, batch_size=2)
    assert isinstance(batched, list) and len(batched) == 3
    for query, result in zip(queries, batched):
        single = pipe(query, gallery=images, top_k=3, rerank_k=2, batch_size=1)
        assert indices(result) == indices(single)
        torch.testing.assert_close(scores(result), scores(single), atol=1e-5, rtol=1e-5)
    by_image = pipe(images[:2], gallery=TINY_TEXTS, top_k=2)
    assert [len(r) for r in by_image] == [2, 2]
    assert pipe([], gallery=images) == []


def test_errors(setup):
    pipe, images, processor = setup["pipe"], setup["images"], setup["processor"]
    with pytest.raises(ValueError, match="both texts"):
        pipe(QUERY, gallery=TINY_TEXTS)
    with pytest.raises(ValueError, match="both images"):
        pipe(images[0], gallery=images)
    with pytest.raises(ValueError, match="mixes texts and images"):
        pipe(QUERY, gallery=[images[0], "a red circle"])
    with pytest.raises(ValueError, match="empty"):
        pipe(QUERY, gallery=[])
    with pytest.raises(ValueError, match="needs a `gallery`"):
        pipe(QUERY)
    with pytest.raises(TypeError, match="list of images or a list of texts"):
        pipe(QUERY, gallery=images[0])
    with pytest.raises(ValueError, match="top_k"):
        pipe(QUERY, gallery=images, top_k=0)
    with pytest.raises(ValueError, match="itm_score"):
        pipe(QUERY, gallery=images, rerank_k=1, itm_score="bogus")
    with pytest.raises(TypeError, match="Unknown argument"):
        pipe(QUERY, gallery=images, topk=2)

    torch.manual_seed(0)
    dual_encoder = ImageTextRetrievalPipeline(model=EfficientVLMModel(tiny_config()).eval(), processor=processor,
                                              device=-1)
    assert len(dual_encoder(QUERY, gallery=images, top_k=2)) == 2  # ITC works without an ITM head
    with pytest.raises(ValueError, match="no `rerank`"):
        dual_encoder(QUERY, gallery=images, rerank_k=2)
    with pytest.raises(ValueError, match="processor"):
        ImageTextRetrievalPipeline(model=setup["model"], device=-1)


def test_saved_folders_carry_pipeline_and_zero_shot_entries(setup):
    for folder in (setup["saved_by_pipeline"], setup["saved_by_helper"]):
        config = json.loads((folder / "config.json").read_text())
        assert config["custom_pipelines"]["image-text-retrieval"] == {
            "impl": "pipeline_efficientvlm.ImageTextRetrievalPipeline", "pt": ["AutoModel"], "type": "multimodal"}
        assert config["auto_map"]["AutoModelForZeroShotImageClassification"] == config["auto_map"]["AutoModel"]
        for name in ("pipeline_efficientvlm.py", "modeling_efficientvlm.py", "processing_efficientvlm.py",
                     "processor_config.json", "model.safetensors"):
            assert (folder / name).is_file(), (folder, name)


def test_push_to_hub_uploads_a_pipeline_ready_folder(setup, tmp_path, monkeypatch):
    """`push_to_hub` = `save_pretrained(tmp, max_shard_size=...)` + upload; the upload is replaced by a copy."""
    import shutil

    import transformers.utils.hub as hub

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

    class FakeCard:
        def save(self, path):
            Path(path).write_text("card")

    pipe = setup["pipe"]
    monkeypatch.setattr(hub, "hf_api", lambda: FakeApi())
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *args, **kwargs: FakeCard())
    uploaded = tmp_path / "uploaded"
    monkeypatch.setattr(pipe, "_upload_modified_files", lambda work_dir, *a, **k: shutil.copytree(work_dir, uploaded),
                        raising=False)
    pipe.push_to_hub("someone/efficientvlm-tiny")
    config = json.loads((uploaded / "config.json").read_text())
    assert "image-text-retrieval" in config["custom_pipelines"]
    assert (uploaded / "pipeline_efficientvlm.py").is_file() and (uploaded / "processor_config.json").is_file()


@pytest.mark.slow
def test_remote_code_pipelines_in_clean_interpreter(setup):
    """Both saved folders load `image-text-retrieval` and `zero-shot-image-classification` without our package."""
    model, processor, pipe, images, paths = (setup[k] for k in ("model", "processor", "pipe", "images", "paths"))
    folders = [str(setup["saved_by_pipeline"]), str(setup["saved_by_helper"])]
    out = run_clean_python(
        f"""
        import json
        from pathlib import Path
        from transformers import pipeline
        folders, paths, texts = {folders!r}, {paths!r}, {TINY_TEXTS!r}
        results = []
        for folder in folders:
            pipe = pipeline("image-text-retrieval", model=folder, trust_remote_code=True)
            assert type(pipe).__module__.startswith("transformers_modules"), type(pipe).__module__
            assert type(pipe.model).__name__ == "EfficientVLMForImageTextRetrieval", type(pipe.model)
            assert type(pipe.processor).__name__ == "EfficientVLMProcessor", type(pipe.processor)
            zero_shot = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
            def strip(ranked):
                return [{{k: v for k, v in e.items() if k not in ("image", "text")}} for e in ranked]
            results.append({{
                "text_query": strip(pipe({QUERY!r}, gallery=paths, gallery_type="image", top_k=4)),
                "text_query_rerank": strip(pipe({QUERY!r}, gallery=[Path(p) for p in paths], top_k=4, rerank_k=3)),
                "image_query_rerank": strip(pipe(paths[1], gallery=texts, top_k=5, rerank_k=5, batch_size=2,
                                                 query_type="image")),
                "batch": [strip(r) for r in pipe([{QUERY!r}, "blue"], gallery=paths, gallery_type="image", top_k=2)],
                "zero_shot": zero_shot(paths[0], candidate_labels={LABELS!r}),
            }})
        print(json.dumps(results))
        """
    )
    remote = json.loads(out.strip().splitlines()[-1])

    def strip(ranked: list[dict]) -> list[dict]:
        return [{k: v for k, v in entry.items() if k not in ("image", "text")} for entry in ranked]

    expected = {
        "text_query": strip(pipe(QUERY, gallery=images, top_k=4)),
        "text_query_rerank": strip(pipe(QUERY, gallery=images, top_k=4, rerank_k=3)),
        "image_query_rerank": strip(pipe(images[1], gallery=TINY_TEXTS, top_k=5, rerank_k=5)),
        "batch": [strip(r) for r in pipe([QUERY, "blue"], gallery=images, top_k=2)],
    }
    itc = direct_itc(model, processor, images, TINY_TEXTS)
    assert [e["index"] for e in expected["text_query"]] == itc[:, 0].argsort(descending=True).tolist()
    with torch.no_grad():  # the zero-shot pipeline: softmax over logits_per_image with its default template
        text = processor.tokenizer([f"This is a photo of {label}." for label in LABELS], padding=True,
                                   return_tensors="pt")
        logits = model(processor(images=images[:1])["pixel_values"], text["input_ids"], text["attention_mask"])
        probs = logits.logits_per_image[0].softmax(-1)

    for result in remote:
        for key, value in expected.items():
            got, want = (result[key], value) if key != "batch" else (sum(result[key], []), sum(value, []))
            assert [e["index"] for e in got] == [e["index"] for e in want], key
            assert [e.get("reranked") for e in got] == [e.get("reranked") for e in want], key
            torch.testing.assert_close(scores(got), scores(want), atol=1e-5, rtol=1e-5)
        zero_shot = result["zero_shot"]
        assert sorted(entry["label"] for entry in zero_shot) == sorted(LABELS)
        assert abs(sum(entry["score"] for entry in zero_shot) - 1.0) < 1e-5
        by_label = {entry["label"]: entry["score"] for entry in zero_shot}
        torch.testing.assert_close(torch.tensor([by_label[label] for label in LABELS]), probs, atol=1e-5, rtol=1e-5)
