"""Retrieval evaluation at scale: re-ranking keeps the ITC order below the top-k (R@K uncapped for K > k), scores and
ranks are computed per block of queries (same metrics as the whole matrix), test-set images are opened lazily."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_efficientvlm import EfficientVLMForImageTextRetrieval
from modeling_efficientvlm.modeling_efficientvlm import rerank_rows
from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor, build_image_processor
from tests.conftest import tiny_config
from efficientvlm.training.data import files
from efficientvlm.training.tasks import retrieval
from efficientvlm.training.metrics.retrieval_ranks import retrieval_metrics
from efficientvlm.training.tasks.retrieval import evaluate_retrieval

WORDS = "a an the red blue green cube ball cone left right of on top is are two one image".split()
N = 12
ITC_RANKS = [6, 0, 2, 9, 11, 1, 5, 0, 3, 7, 4, 8]  # others above each true pair in its row (and its column) by ITC


@pytest.fixture(scope="module")
def processor() -> EfficientVLMProcessor:
    from transformers import BertTokenizer

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, **{w: 5 + i for i, w in enumerate(WORDS)}}
    return EfficientVLMProcessor(build_image_processor(32), BertTokenizer(vocab=vocab))


def _itc_matrix(ranks: list[int]) -> torch.Tensor:
    """(n, n) ITC scores, true pairs on the diagonal, row i's and column i's true pair with ranks[i] others above:
    off-diagonal s[i, j] = −((j − i) mod n), diagonal −ranks[i] − 0.5 (no ties within a row or a column)."""
    n = len(ranks)
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    sim = -((j - i) % n).float()
    sim[torch.arange(n), torch.arange(n)] = -torch.tensor(ranks, dtype=torch.float32) - 0.5
    return sim


def _oracle_model(itm_table: torch.Tensor) -> EfficientVLMForImageTextRetrieval:
    """The real model (its `rerank`, `rerank_blocks`, `itm_pair_scores`) around an ITM head that returns
    match logit itm_table[image, text]; the cached tokens carry their item's index."""
    model = EfficientVLMForImageTextRetrieval(tiny_config()).eval()

    def itm_logits(text_tokens, attention_mask, image_tokens, pruning_masks=None, **kwargs):
        match = itm_table[image_tokens[:, 0, 0].long(), text_tokens[:, 0, 0].long()]
        return torch.stack([torch.zeros_like(match), match], dim=1), None

    model.itm_logits = itm_logits
    return model


def _rerank(model, sim: torch.Tensor, k: int, query_block: int | None = None):
    n_img, n_txt = sim.shape
    image_tokens = torch.arange(n_img, dtype=torch.float32)[:, None, None]
    text_tokens = torch.arange(n_txt, dtype=torch.float32)[:, None, None]
    return model.rerank(sim, k, image_tokens, text_tokens, torch.ones(n_txt, 1, dtype=torch.long), batch_size=5,
                        query_block=query_block, reuse_image_kv=False)  # the oracle head reads tokens, not K/V


def _expected_order(itc: torch.Tensor, itm: torch.Tensor, k: int) -> list[int]:
    """A row's candidates best first: its ITC top-k by ITM score, then every other one by ITC (no ties here)."""
    top = sorted(range(len(itc)), key=lambda c: -float(itc[c]))[:k]
    rest = sorted(set(range(len(itc))) - set(top), key=lambda c: -float(itc[c]))
    return sorted(top, key=lambda c: -float(itm[c])) + rest


@pytest.mark.parametrize("k", [2, 4])
def test_rerank_keeps_itc_order_below_top_k_both_directions(k):
    sim = _itc_matrix(ITC_RANKS)
    itm_table = torch.randn(N, N, generator=torch.Generator().manual_seed(k))
    model = _oracle_model(itm_table)
    i2t, t2i = _rerank(model, sim, k)
    for scores, itc, itm in ((i2t, sim, itm_table), (t2i, sim.t(), itm_table.t())):
        for row in range(N):
            order = scores[row].argsort(descending=True).tolist()
            assert order == _expected_order(itc[row], itm[row], k)  # ITM order in the top-k, ITC order below
            assert len(set(scores[row].tolist())) == N  # distinct ITC values never tie after re-ranking
    blocked = _rerank(model, sim, k, query_block=1)
    assert torch.equal(blocked[0], i2t) and torch.equal(blocked[1], t2i)

    # image 0 / text 0: the true pair is 6th by ITC (6 above it), outside the top-k: rank 6 -> an R@10 hit, not a miss
    assert int((i2t[0] > i2t[0, 0]).sum()) == 6 and int((t2i[0] > t2i[0, 0]).sum()) == 6
    m = retrieval_metrics(i2t, [[i] for i in range(N)], list(range(N)), scores_t2i=t2i)
    for direction, scores in (("txt", i2t), ("img", t2i)):
        ranks = np.array([int((scores[i] > scores[i, i]).sum()) for i in range(N)])
        assert [m[f"{direction}_r{K}"] for K in (1, 5, 10)] == [100 * (ranks < K).mean() for K in (1, 5, 10)]
        assert m[f"{direction}_r1"] <= m[f"{direction}_r5"] < m[f"{direction}_r10"]  # R@10 not capped at R@k


def test_rerank_rows_ties_only_equal_itc():
    sim = torch.tensor([[0.5, 0.9, 0.1, 0.5, 0.3, 0.7]])
    scores = rerank_rows(sim, torch.tensor([[1, 5]]), torch.tensor([[2.0, 3.0]]))
    # top-2 (texts 1, 5) keep ITM 2, 3; the rest: min ITM − dense ITC rank: 0.5, 0.5 -> 1; 0.3 -> 0; 0.1 -> −1
    assert scores.tolist() == [[1.0, 2.0, -1.0, 1.0, 0.0, 3.0]]


# ---------------------------------------------------------------------------------------------- blocked evaluation


def _write_test_set(tmp_path, n_images: int, seed: int = 0) -> tuple[str, str]:
    """n_images random PNGs and an ALBEF test JSON with 2 captions each."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        records.append({"image": f"{i}.png", "caption": [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 8))))
                                                          for _ in range(2)]})
    path = tmp_path / "test.json"
    path.write_text(json.dumps(records))
    return str(path), str(tmp_path)


def test_blocked_evaluation_equals_whole_matrix(tmp_path, processor, monkeypatch):
    torch.manual_seed(0)
    model = EfficientVLMForImageTextRetrieval(tiny_config()).eval()
    data = files.load_retrieval_eval_set(*_write_test_set(tmp_path, 7))
    gt = (data["img2txt"], data["txt2img"])
    k, batch = 3, 4
    # the whole-matrix path: one (7, 14) ITC matrix, `rerank` on it, `retrieval_metrics` on both directions
    with torch.no_grad():
        image_tokens, image_embeds = retrieval._encode_images(model, data["images"], processor, batch, None, "cpu",
                                                              torch.float32, False)
        text_tokens, mask, text_embeds = retrieval._encode_texts(model, data["captions"], processor, batch, 40, None,
                                                                 "cpu", False)
    sim = image_embeds @ text_embeds.t()
    i2t, t2i = model.rerank(sim, k, image_tokens, text_tokens, mask, batch_size=batch)
    whole = {**retrieval_metrics(i2t, *gt, scores_t2i=t2i),
             **{f"{key}_itc": value for key, value in retrieval_metrics(sim, *gt).items()}}

    def run(**kwargs) -> dict:  # the bootstrap interval is a function of the same ranks: compared separately
        metrics = evaluate_retrieval(model, data["images"], data["captions"], *gt, processor, k=k, batch_size=batch,
                                     show_progress=False, **kwargs)
        intervals.append(metrics.pop("r_mean_ci95"))
        return metrics

    intervals: list = []

    assert run() == whole
    assert run(query_block=2) == whole  # image and text queries in blocks of 2 (the last one shorter)
    monkeypatch.setattr(retrieval, "RERANK_BLOCK_SCORES", 5)  # ranks one query row at a time
    assert run(query_block=1) == whole
    assert intervals[0] == intervals[1] == intervals[2]
    # ITC only (k = 0) goes through the same blocks
    itc_only = evaluate_retrieval(model, data["images"], data["captions"], *gt, processor, k=0, batch_size=batch,
                                  show_progress=False, query_block=3)
    assert {key: itc_only[key] for key in whole if key.endswith("_itc")} == {
        key: value for key, value in whole.items() if key.endswith("_itc")}


def test_eval_set_images_open_lazily_one_batch_at_a_time(tmp_path, processor, monkeypatch):
    opened: list[str] = []
    load_image = files.load_image

    def counting_load_image(source):
        opened.append(source)
        return load_image(source)

    monkeypatch.setattr(files, "load_image", counting_load_image)
    data = files.load_retrieval_eval_set(*_write_test_set(tmp_path, 7))
    assert opened == [] and len(data["images"]) == 7  # checked, not decoded
    assert data["images"][2].mode == "RGB" and len(opened) == 1
    assert [image.size for image in data["images"][3:6]] == [(40, 40)] * 3 and len(opened) == 4
    opened.clear()
    batches: list[int] = []

    def counting_processor(images=None, **kwargs):
        if images is not None:
            batches.append(len(opened))  # files opened by the time each image batch is processed
        return processor(images=images, **kwargs)

    torch.manual_seed(0)
    model = EfficientVLMForImageTextRetrieval(tiny_config()).eval()
    evaluate_retrieval(model, data["images"], data["captions"], data["img2txt"], data["txt2img"],
                       counting_processor, k=2, batch_size=3, show_progress=False)
    assert sorted(opened) == sorted(data["images"].paths)  # every file opened once
    assert batches == [3, 6, 7]  # ... a batch at a time, just before it is encoded
