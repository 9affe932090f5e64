"""Bootstrap confidence intervals of the metrics that are means of per-item scores (VQA accuracy, NLVR2 accuracy,
captioning CIDEr-D), per-image CIDEr-D, and the tasks' `evaluate(..., return_per_item=True)` on tiny models (CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from efficientvlm.training.commands.stages import DataArguments
from efficientvlm.training.data.captioning_dataset import make_captioning_eval_set
from efficientvlm.training.data.collators import NLVR2Collator
from efficientvlm.training.data.nlvr2_dataset import make_nlvr2_eval_set
from efficientvlm.training.data.tokenization import synthetic_tokenizer
from efficientvlm.training.data.vqa_dataset import make_vqa_eval_set
from efficientvlm.training.metrics import confidence
from efficientvlm.training.metrics.caption_scores import cider_d, cider_d_per_image
from efficientvlm.training.metrics.confidence import mean_ci95, paired_mean_difference
from efficientvlm.training.metrics.vqa_scores import vqa_scores
from efficientvlm.training.tasks import captioning as C
from efficientvlm.training.tasks import get_task
from efficientvlm.training.tasks import vqa as V

from modeling_efficientvlm import (
    EfficientVLMForConditionalGeneration,
    EfficientVLMForQuestionAnswering,
    EfficientVLMForVisualReasoning,
)
from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor, build_image_processor
from tests.conftest import tiny_config, tiny_processor


def _width(interval: list[float]) -> float:
    return interval[1] - interval[0]


# ------------------------------------------------------------------------------------------------ the intervals
def test_interval_of_a_constant_is_the_constant():
    assert mean_ci95(np.full(50, 100.0)) == [100.0, 100.0]
    assert mean_ci95([0.0, 0.0, 0.0]) == [0.0, 0.0]
    assert mean_ci95(np.full(7, 0.1)) == pytest.approx([0.1, 0.1], rel=1e-12)


def test_interval_of_a_proportion_brackets_it_and_narrows_with_more_items():
    """A 0/100 array (NLVR2's per-item scores) with 30 % correct: the interval holds 30 and its width is close to the
    normal approximation 2 · 1.96 · 100 √(p(1 - p) / n), so 100 times the items give about a tenth of the width."""
    widths = {}
    for n in (40, 4000):
        scores = 100.0 * (np.arange(n) % 10 < 3)
        lo, hi = mean_ci95(scores)
        assert scores.mean() == pytest.approx(30.0) and 0.0 <= lo < 30.0 < hi <= 100.0
        widths[n] = hi - lo
        assert widths[n] == pytest.approx(2 * 1.96 * 100 * math.sqrt(0.3 * 0.7 / n), rel=0.2)
    assert widths[4000] < widths[40] / 5
    assert mean_ci95(scores, seed=1) != mean_ci95(scores) and mean_ci95(scores) == mean_ci95(scores)  # seeded
    assert _width(mean_ci95(scores, level=0.5)) < widths[4000]


def test_resampling_in_blocks_draws_the_same_resamples(monkeypatch):
    """Weights are drawn in blocks (bounded memory for 10^5 questions); the blocks come from one stream, so the
    interval does not depend on the block size."""
    scores = np.random.default_rng(0).uniform(0, 100, size=37)
    whole = mean_ci95(scores, resamples=301)
    monkeypatch.setattr(confidence, "_BLOCK_ENTRIES", 37 * 16)  # 16 resamples per block, the last one partial
    assert mean_ci95(scores, resamples=301) == whole
    weights = confidence._resample_weights(37, 301, 0)  # and they are the module's single-draw resamples
    means = np.sort(weights @ scores / 37)
    assert whole == confidence._interval(means, confidence.CI_LEVEL)


def test_paired_difference_of_identical_scores_is_exactly_zero():
    scores = np.random.default_rng(1).uniform(0, 100, size=25)
    assert paired_mean_difference(scores, scores.copy()) == {"mean": 0.0, "ci95": [0.0, 0.0],
                                                             "resamples": confidence.BOOTSTRAP_RESAMPLES}


def test_paired_interval_removes_the_shared_item_difficulty():
    """Two models on the same items whose scores mostly follow the items' difficulty: b = a − 2 ± 1. The paired
    interval of the difference is far narrower than the spread of two independent intervals and holds 2."""
    rng = np.random.default_rng(2)
    difficulty = rng.uniform(0, 100, size=200)
    a, b = difficulty + 2.0 + rng.normal(0, 1, size=200), difficulty + rng.normal(0, 1, size=200)
    paired = paired_mean_difference(a, b)
    assert paired["mean"] == pytest.approx(a.mean() - b.mean(), rel=1e-12)
    assert paired["ci95"][0] < paired["mean"] < paired["ci95"][1] and paired["ci95"][0] > 1.5
    unpaired = math.hypot(_width(mean_ci95(a, seed=1)), _width(mean_ci95(b, seed=2)))
    assert _width(paired["ci95"]) < unpaired / 10
    assert paired_mean_difference(a, b, seed=5)["mean"] == paired["mean"]


@pytest.mark.parametrize("call, message", [
    (lambda: mean_ci95([50.0]), "at least 2 items"),
    (lambda: mean_ci95([]), "at least 2 items"),
    (lambda: mean_ci95(np.ones((3, 2))), "1-D"),
    (lambda: mean_ci95([1.0, float("nan")]), "finite"),
    (lambda: mean_ci95([1.0, 2.0], resamples=0), "at least 1 resample"),
    (lambda: paired_mean_difference([1.0, 2.0, 3.0], [1.0, 2.0]), "same items, got lengths \\[3, 2\\]"),
    (lambda: paired_mean_difference([1.0], [2.0]), "at least 2 items"),
])
def test_bad_input_is_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------------------------- per-image CIDEr-D
def test_per_image_cider_is_what_the_corpus_score_averages():
    """Per-image scores use the document frequencies of ALL references (a one-image subset scores differently)."""
    predictions = ["A dog runs.", "a black cat", "birds birds birds", "an old red bus"]
    references = [["a dog runs", "a dog plays"], ["a cat sleeps here"], ["two birds fly"],
                  ["an old red bus parked outside", "a red bus"]]
    per_image = cider_d_per_image(predictions, references)
    assert len(per_image) == 4 and all(score >= 0 for score in per_image) and len(set(per_image)) == 4
    assert 100 * (sum(per_image) / len(per_image)) == 100 * cider_d(predictions, references)
    assert 100 * np.mean(per_image) == pytest.approx(100 * cider_d(predictions, references), rel=1e-12)
    assert per_image[0] != pytest.approx(cider_d_per_image(predictions[:2], references[:2])[0])
    exact = cider_d_per_image(["a dog runs", "a cat sleeps"], [["a dog runs"], ["a cat sleeps"]])
    assert exact == pytest.approx([10.0 * 3 / 4, 10.0 * 3 / 4])  # cosine 1 for orders 1-3, no 4-grams


# ----------------------------------------------------------------------------------- the tasks' per-item scores
def _caption_processor() -> EfficientVLMProcessor:
    return EfficientVLMProcessor(build_image_processor(32), synthetic_tokenizer(), max_length=40)


@pytest.fixture(scope="module")
def vqa_model():
    torch.manual_seed(0)
    model = EfficientVLMForQuestionAnswering(tiny_config(text={"vocab_size": len(synthetic_tokenizer())})).eval()
    processor = _caption_processor()
    V.prepare_answerer(model, processor.tokenizer)
    return model, processor


def test_vqa_per_item_scores(vqa_model):
    model, processor = vqa_model
    held_out = make_vqa_eval_set(7, seed=1, image_size=32)
    metrics, per_item = get_task("vqa").evaluate(model, processor, DataArguments(task="vqa"), held_out,
                                                 show_progress=False, return_per_item=True)
    assert per_item.dtype == np.float64 and per_item.shape == (7,) and metrics["questions"] == 7
    assert per_item.mean() == pytest.approx(metrics["accuracy"], rel=1e-12, abs=1e-12)
    predictions = V.predict_answers(model, held_out, processor, held_out.answer_list, show_progress=False)
    np.testing.assert_array_equal(per_item, 100.0 * np.asarray(vqa_scores(predictions, [i["answer"] for i in held_out])))
    assert metrics == get_task("vqa").evaluate(model, processor, DataArguments(task="vqa"), held_out,
                                               show_progress=False)


def test_vqa_per_item_scores_of_partly_right_answers(vqa_model, monkeypatch):
    """Answers right on questions 0, 2, 4: per item 100 / 0, mean = accuracy (not a trivial all-zero case)."""
    model, processor = vqa_model
    held_out = make_vqa_eval_set(6, seed=2, image_size=32)
    right = [item["answer"][0] if index % 2 == 0 else "no such answer" for index, item in enumerate(held_out)]
    monkeypatch.setattr(V, "predict_answers", lambda *args, **kwargs: right)
    metrics, per_item = V.evaluate_vqa(model, held_out, processor, held_out.answer_list, show_progress=False,
                                       return_per_item=True)
    np.testing.assert_array_equal(per_item, [100.0, 0.0] * 3)
    assert metrics["accuracy"] == pytest.approx(50.0) == per_item.mean()


def test_nlvr2_per_item_scores():
    torch.manual_seed(0)
    model, processor = EfficientVLMForVisualReasoning(tiny_config()).eval(), tiny_processor()
    items = make_nlvr2_eval_set(10, seed=0, image_size=32)
    metrics, per_item = get_task("nlvr2").evaluate(model, processor, DataArguments(task="nlvr2"), items,
                                                   show_progress=False, return_per_item=True)
    assert per_item.dtype == np.float64 and per_item.shape == (10,) and set(per_item) <= {0.0, 100.0}
    assert per_item.mean() == pytest.approx(metrics["accuracy"], rel=1e-12, abs=1e-12)
    batch = NLVR2Collator(processor)(items)
    with torch.no_grad():
        predicted = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                          attention_mask=batch["attention_mask"]).logits.argmax(-1)
    np.testing.assert_array_equal(per_item, 100.0 * (predicted == batch["labels"]).numpy())
    assert 0.0 < metrics["accuracy"] < 100.0  # balanced labels: a constant classifier is half right


def test_captioning_per_item_scores():
    torch.manual_seed(0)
    model, processor = EfficientVLMForConditionalGeneration(tiny_config()).eval(), _caption_processor()
    held_out = make_captioning_eval_set(3, seed=0, image_size=32)
    data = DataArguments(task="captioning")
    metrics, per_item = get_task("captioning").evaluate(model, processor, data, held_out, show_progress=False,
                                                        return_per_item=True)
    assert per_item.dtype == np.float64 and per_item.shape == (3,) and metrics["captions"] == 3
    assert per_item.mean() == pytest.approx(metrics["cider"], rel=1e-12, abs=1e-12)
    captions = C.generate_captions(model, held_out["images"], processor, show_progress=False,
                                   **C.generation_settings(data))
    np.testing.assert_array_equal(per_item, 100.0 * np.asarray(cider_d_per_image(captions, C.references_of(held_out))))
    assert metrics["cider"] == 100.0 * cider_d(captions, C.references_of(held_out))


def test_captioning_per_item_scores_of_partly_right_captions(monkeypatch):
    """Images 0 and 2 captioned with one of their references, image 1 with nothing: the per-image scores differ and
    average to the reported CIDEr-D exactly as `cider_d` computes it."""
    held_out = make_captioning_eval_set(4, seed=1, image_size=32)
    references = C.references_of(held_out)
    captions = [refs[0] if index % 2 == 0 else "" for index, refs in enumerate(references)]
    monkeypatch.setattr(C, "generate_captions", lambda *args, **kwargs: captions)
    metrics, per_item = C.evaluate_captioning(None, held_out["images"], references, None, return_per_item=True)
    assert per_item[0] > 0 and per_item[2] > 0 and per_item[1] == per_item[3] == 0.0
    assert metrics["cider"] == 100.0 * cider_d(captions, references)
    assert per_item.mean() == pytest.approx(metrics["cider"], rel=1e-12)
