"""Retrieval metrics, ITM re-ranking, evaluate_retrieval on a tiny model, the local `evaluate` module, NLVR2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from modeling_efficientvlm import EfficientVLMForImageTextRetrieval
from modeling_efficientvlm.modeling_efficientvlm import PruningMasks
from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor, build_image_processor
from tests.conftest import tiny_config
from efficientvlm.training.tasks.nlvr2 import evaluate_nlvr2
from efficientvlm.training.metrics.retrieval_ranks import METRIC_DIR, make_retrieval_compute_metrics, retrieval_metrics
from efficientvlm.training.tasks.retrieval import evaluate_retrieval

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "a an the red blue green cube ball cone left right of on top is are two one image".split()
KEYS = {f"{d}_r{k}" for d in ("txt", "img") for k in (1, 5, 10)} | {"txt_r_mean", "img_r_mean", "r_mean"}


@pytest.fixture(scope="module")
def processor() -> EfficientVLMProcessor:
    from transformers import BertTokenizer

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, **{w: 5 + i for i, w in enumerate(WORDS)}}
    return EfficientVLMProcessor(build_image_processor(32), BertTokenizer(vocab=vocab))


def _ranked_matrix(ranks: list[int]) -> np.ndarray:
    """(N, N) scores, ground truth on the diagonal, where row i's (and column i's) true pair has exactly ranks[i]
    others scoring above it: off-diagonal s[i, j] = -((j - i) mod N), diagonal -ranks[i] - 0.5."""
    n = len(ranks)
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    scores = -((j - i) % n).astype(float)
    scores[np.arange(n), np.arange(n)] = -np.asarray(ranks) - 0.5
    return scores


# ---------------------------------------------------------------------------------------------------- R@K by hand


def test_recall_several_captions_best_one_counts():
    # image 0 owns texts 0 and 2, image 1 texts 1 and 3
    scores = np.array([[0.1, 0.9, 0.8, 0.2],    # image 0: t1 > t2 > t3 > t0: best own caption t2 at rank 1
                       [0.7, 0.3, 0.6, 0.95]])  # image 1: t3 first: rank 0
    img2txt, txt2img = [[0, 2], [1, 3]], [0, 1, 0, 1]
    m = retrieval_metrics(scores, img2txt, txt2img)
    assert set(m) == KEYS
    # TR ranks (1, 0); IR ranks: t0 -> 1, t1 -> 1, t2 -> 0, t3 -> 0
    assert (m["txt_r1"], m["txt_r5"], m["txt_r10"]) == (50.0, 100.0, 100.0)
    assert (m["img_r1"], m["img_r5"], m["img_r10"]) == (50.0, 100.0, 100.0)
    assert m["r_mean"] == pytest.approx(250 / 3)
    assert retrieval_metrics(torch.tensor(scores), img2txt, txt2img) == m  # tensors too


def test_recall_at_1_5_10_known_ranks():
    ranks = [0, 0, 0, 0, 1, 3, 4, 5, 8, 9, 10, 11]  # <1: 4, <5: 7, <10: 10 of 12
    m = retrieval_metrics(_ranked_matrix(ranks), [[i] for i in range(12)], list(range(12)))
    for direction in ("txt", "img"):
        assert m[f"{direction}_r1"] == pytest.approx(100 * 4 / 12)
        assert m[f"{direction}_r5"] == pytest.approx(100 * 7 / 12)
        assert m[f"{direction}_r10"] == pytest.approx(100 * 10 / 12)
    assert m["r_mean"] == pytest.approx(100 * 7 / 12)


def test_separate_t2i_scores_and_ties_count_against_ground_truth():
    gt = ([[0], [1], [2]], [0, 1, 2])
    constant = retrieval_metrics(np.zeros((3, 3)), *gt)  # an uninformative model earns no hits
    assert constant["txt_r1"] == constant["img_r1"] == 0.0 and constant["txt_r5"] == 100.0
    m = retrieval_metrics(np.zeros((3, 3)), *gt, scores_t2i=np.eye(3))
    assert m["txt_r1"] == 0.0 and m["img_r1"] == 100.0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="txt2img"):
        retrieval_metrics(np.eye(2), [[0], [1]], [1, 0])
    with pytest.raises(ValueError, match="img2txt"):
        retrieval_metrics(np.eye(2), [[0, 1]], [0, 0])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.full((2, 2), np.nan), [[0], [1]], [0, 1])


def test_trainer_compute_metrics():
    from transformers import EvalPrediction

    scores = _ranked_matrix([0, 2, 5, 11] + [0] * 8)
    gt = ([[i] for i in range(12)], list(range(12)))
    fn = make_retrieval_compute_metrics(*gt)
    assert fn(EvalPrediction(predictions=scores, label_ids=np.zeros(12))) == retrieval_metrics(scores, *gt)


# ------------------------------------------------------------------------------------------------------ re-ranking


def _oracle_reranker(calls: list[int]):
    """The model's `rerank` over an ITM oracle: match logit 5 for a true (diagonal) pair, 0 otherwise (tokens carry
    their item's index); records each fusion call's batch size. Returns fn(sim, k, batch_size) -> (i2t, t2i)."""

    def itm_logits(text_tokens, attention_mask, image_tokens, pruning_masks=None, **kwargs):
        calls.append(image_tokens.shape[0])
        match = (image_tokens[:, 0, 0] == text_tokens[:, 0, 0]).float() * 5
        return torch.stack([torch.zeros_like(match), match], dim=1), None

    oracle = EfficientVLMForImageTextRetrieval(tiny_config())
    oracle.itm_logits = itm_logits  # the model's own rerank / itm_pair_scores around an oracle ITM head

    def rerank(sim: torch.Tensor, k: int, batch_size: int | None = None):
        n_img, n_txt = sim.shape
        image_tokens = torch.arange(n_img, dtype=torch.float32)[:, None, None]
        text_tokens = torch.arange(n_txt, dtype=torch.float32)[:, None, None]
        return oracle.rerank(
            sim, k, image_tokens, text_tokens, torch.ones(n_txt, 1, dtype=torch.long), batch_size=batch_size,
            reuse_image_kv=False,  # the oracle head reads the tokens, not the cross-attention K/V
        )

    return rerank


def test_itm_reranking_fixes_top_k_only():
    sim = torch.tensor([[0.8, 0.9, 0.1, 0.0],   # image 0: ITC puts text 1 first, its caption second (in top-2)
                        [0.9, 0.1, 0.8, 0.7],   # image 1: its caption is last (outside top-2)
                        [0.0, 0.2, 0.9, 0.1],
                        [0.1, 0.0, 0.2, 0.9]])
    gt = ([[0], [1], [2], [3]], [0, 1, 2, 3])
    assert retrieval_metrics(sim, *gt)["txt_r1"] == 50.0
    calls: list[int] = []
    i2t, t2i = _oracle_reranker(calls)(sim, k=2, batch_size=3)
    assert i2t.argmax(1).tolist() == [0, 0, 2, 3]  # image 0 fixed; image 1 cannot be
    assert i2t[1].tolist() == [0.0, -2.0, 0.0, -1.0]  # outside the top-2: ITC order (text 3, text 1) below the ITM
    assert t2i.shape == (4, 4)
    for scores, itc in ((i2t, sim), (t2i, sim.t())):  # the ITC top-2 stay the top-2 of every row
        assert torch.equal(scores.topk(2).indices.sort().values, itc.topk(2).indices.sort().values)
    # each unique pair scored once, in batches of <= 3, fewer than the 2 * N * k = 16 directed pairs
    assert max(calls) <= 3 and sum(calls) == len({(i, j) for i in range(4) for j in i2t[i].topk(2).indices.tolist()}
                                                 | {(i, j) for j in range(4) for i in t2i[j].topk(2).indices.tolist()})
    assert retrieval_metrics(i2t, *gt, scores_t2i=t2i)["txt_r1"] == 75.0


def test_k0_is_itc_and_k_clamps_to_gallery():
    sim = torch.tensor(_ranked_matrix([0, 2, 1, 3]), dtype=torch.float32)
    calls: list[int] = []
    i2t, t2i = _oracle_reranker(calls)(sim, k=0)
    assert calls == [] and torch.equal(i2t, sim) and torch.equal(t2i, sim.t())
    i2t, t2i = _oracle_reranker(calls)(sim, k=100, batch_size=64)
    assert sum(calls) == 16 and torch.equal(i2t, torch.eye(4) * 5) and torch.equal(t2i, torch.eye(4) * 5)


# ------------------------------------------------------------------------------------------------ tiny model e2e


def _retrieval_set(n: int, seed: int = 0) -> tuple[list, list[str]]:
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
    captions = [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 8)))) for _ in range(n)]
    return images, captions


def test_evaluate_retrieval_tiny_model_counts_itm_pairs(processor):
    torch.manual_seed(0)
    model = EfficientVLMForImageTextRetrieval(tiny_config()).train()
    images, captions = _retrieval_set(6)
    gt = ([[i] for i in range(6)], list(range(6)))
    calls: list[int] = []
    itm_logits = model.itm_logits

    def counting_itm(text_tokens, attention_mask, image_tokens, pruning_masks=None, **kwargs):
        calls.append(text_tokens.shape[0])
        return itm_logits(text_tokens, attention_mask, image_tokens, pruning_masks, **kwargs)

    model.itm_logits = counting_itm
    m = evaluate_retrieval(model, images, captions, *gt, processor, k=2, batch_size=4, show_progress=False,
                           pruning_masks=PruningMasks())
    assert set(m) == KEYS | {f"{key}_itc" for key in KEYS} | {"r_mean_ci95"}
    lo, hi = m.pop("r_mean_ci95")
    assert 0.0 <= lo <= m["r_mean"] <= hi <= 100.0
    assert all(0.0 <= v <= 100.0 for v in m.values())
    assert model.training  # mode restored
    assert max(calls) <= 4 and 6 * 2 <= sum(calls) <= 2 * 6 * 2 < 6 * 6  # O(N k) pairs, never N^2

    # k >= gallery: every pair re-scored from the cached tokens = ITM of each pair encoded from scratch
    full = evaluate_retrieval(model, images, captions, *gt, processor, k=6, batch_size=4, show_progress=False)
    pixels = processor(images=images)["pixel_values"]
    text = processor(text=captions, padding="longest", truncation=True, max_length=40)
    scores = torch.stack([model.score_pairs(pixels[i].expand(6, -1, -1, -1), text["input_ids"], text["attention_mask"])
                          for i in range(6)])
    assert {k: v for k, v in full.items() if not k.endswith(("_itc", "_ci95"))} == retrieval_metrics(scores, *gt)


# --------------------------------------------------------------------------------------------- evaluate module


@pytest.mark.slow
def test_evaluate_module_loads_by_path_offline(tmp_path):
    scores = _ranked_matrix([0, 0, 0, 0, 1, 3, 4, 5, 8, 9, 10, 11])
    img2txt = [[i] for i in range(12)]
    code = textwrap.dedent(f"""
        import json, socket
        def _no_network(*args, **kwargs):
            raise RuntimeError("network access attempted")
        socket.socket.connect = _no_network
        import evaluate
        metric = evaluate.load({METRIC_DIR!r})
        rows = {scores.tolist()!r}
        a = metric.compute(predictions=rows, references={img2txt!r})
        from efficientvlm.training.metrics.retrieval_ranks import load_retrieval_metric
        other = load_retrieval_metric()
        other.add_batch(predictions=rows[:5], references={img2txt[:5]!r})
        b = other.compute(predictions=rows[5:], references={img2txt[5:]!r}, txt2img=list(range(12)),
                          scores_t2i=[list(r) for r in zip(*rows)])
        print(json.dumps([a, b]))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HOME": str(tmp_path / "hf")}
    env.pop("PYTHONPATH", None)  # the module must find `training` on its own (cwd is not the repo)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = json.loads(result.stdout.strip().splitlines()[-1])
    expected = retrieval_metrics(scores, img2txt, list(range(12)))
    assert a == pytest.approx(expected) and b == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------------------ NLVR2


class _BrighterLeft(nn.Module):
    """NLVR2 stand-in: predicts "true" when the left image is brighter than the right one."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, pixel_values, input_ids, attention_mask):
        assert pixel_values.dim() == 5 and pixel_values.shape[1] == 2 and input_ids.shape == attention_mask.shape
        margin = pixel_values[:, 0].mean((1, 2, 3)) - pixel_values[:, 1].mean((1, 2, 3))
        return SimpleNamespace(logits=torch.stack([torch.zeros_like(margin), margin], dim=-1) + self.anchor)


def test_evaluate_nlvr2_accuracy(processor):
    grey = lambda v: Image.new("RGB", (40, 32), (v, v, v))  # noqa: E731
    pairs = [(200, 50, 1), (10, 90, 0), (120, 30, 1), (60, 61, 0), (250, 0, 0)]  # the last one is wrong
    items = [{"images": [grey(a), grey(b)], "sentence": "the left image is red", "label": y} for a, b, y in pairs]
    assert evaluate_nlvr2(_BrighterLeft(), items, processor, batch_size=2, show_progress=False) == {"accuracy": 80.0}
