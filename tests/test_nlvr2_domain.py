"""NLVR domain pre-training (`teacher --task nlvr2_domain`): ITC-similarity pair sampling, the 3-way labels by
construction, the held-out items, and the official order pre-train → domain → NLVR2 fine-tune on tiny models."""

import json
import logging

import pytest
import torch

from modeling_efficientvlm import EfficientVLMForPreTraining, EfficientVLMForVisualReasoning
from tests.conftest import tiny_config, tiny_inputs
from tests.conftest import CLI_COMMON
from efficientvlm.training.commands.cli import main
from efficientvlm.training.infra.presets import preset_config
from efficientvlm.training.data.tokenization import synthetic_tokenizer
from efficientvlm.training.tasks import get_task
from efficientvlm.training.tasks.nlvr2_domain import (
    LEFT,
    NEITHER,
    RIGHT,
    domain_eval_items,
    domain_losses,
    num_labels,
    sample_domain_pairs,
)


def _check_pairs(left, right, labels, same_image=None):
    """Every row's pair is what its label says: (x, neg) → 0, (neg, x) → 1, (neg, neg′) → 2, neg never x."""
    same = same_image if same_image is not None else torch.eye(len(labels), dtype=torch.bool)
    for row, (a, b, label) in enumerate(zip(left.tolist(), right.tolist(), labels.tolist())):
        if label == LEFT:
            assert a == row and not same[row, b]
        elif label == RIGHT:
            assert b == row and not same[row, a]
        else:
            assert label == NEITHER and a != b and not same[row, a] and not same[row, b]


def test_pairs_and_labels_are_right_by_construction():
    batch = 600
    similarity = torch.randn(batch, 16)
    similarity = torch.nn.functional.normalize(similarity, dim=-1)
    left, right, labels = sample_domain_pairs(similarity @ similarity.T, torch.Generator().manual_seed(0))
    _check_pairs(left, right, labels)
    shares = torch.bincount(labels, minlength=3).float() / batch
    assert torch.allclose(shares, torch.full((3,), 1 / 3), atol=0.06)  # each label with probability 1/3
    # several captions of one image: the other rows of the same image are never its negative
    image_ids = torch.arange(batch) // 3
    same = image_ids[:, None] == image_ids[None, :]
    left, right, labels = sample_domain_pairs(torch.zeros(batch, batch), torch.Generator().manual_seed(1),
                                              same_image=same)
    _check_pairs(left, right, labels, same)


def test_sampling_picks_the_most_similar_candidates():
    """Row b's two most similar images are b+1 (cosine 1.0) and b+2 (0.75), the rest −0.5: the one-negative pairs take
    b+1 (softmax at 0.07: 97.3 %), the 'neither' pairs exactly {b+1, b+2}; uniform sampling would hit them 1/11."""
    batch = 12
    similarity = torch.full((batch, batch), -0.5)
    rows = torch.arange(batch)
    similarity[rows, (rows + 1) % batch] = 1.0
    similarity[rows, (rows + 2) % batch] = 0.75
    similarity[rows, rows] = 1.0  # the image itself is never a candidate
    top1 = top2 = one_negative = 0
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        left, right, labels = sample_domain_pairs(similarity, generator)
        for row, (a, b, label) in enumerate(zip(left.tolist(), right.tolist(), labels.tolist())):
            if label == NEITHER:
                assert {a, b} == {(row + 1) % batch, (row + 2) % batch}
                top2 += 1
            else:
                negative = b if label == LEFT else a
                one_negative += 1
                top1 += negative == (row + 1) % batch
                assert negative in ((row + 1) % batch, (row + 2) % batch)
    assert top2 > 0 and top1 / one_negative > 0.93


def test_a_row_without_a_partner_image_is_an_error():
    with pytest.raises(ValueError, match="at least 2 distinct images"):
        sample_domain_pairs(torch.zeros(1, 1))
    with pytest.raises(ValueError, match="at least 2 distinct images"):
        sample_domain_pairs(torch.zeros(3, 3), same_image=torch.ones(3, 3, dtype=torch.bool))
    # two images: no 'neither' pair can be drawn, every pair holds x
    _, _, labels = sample_domain_pairs(torch.zeros(2, 2), torch.Generator().manual_seed(0))
    assert set(labels.tolist()) <= {LEFT, RIGHT}


def test_loss_step_classifies_the_drawn_pairs():
    """One vision pass over the batch, pairs gathered from it: the same loss as the model's own forward on the drawn
    (left, right) image pairs with their labels; a teacher (KD) is refused."""
    model = EfficientVLMForVisualReasoning(tiny_config(num_labels=3)).eval()
    inputs = tiny_inputs(batch=6)
    _, parts = domain_losses(model, None, inputs, None, None, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"])
    left, right, labels = sample_domain_pairs(features @ features.T, torch.Generator().manual_seed(0))
    pixels = inputs["pixel_values"]
    expected = model(pixel_values=torch.stack([pixels[left], pixels[right]], dim=1), input_ids=inputs["input_ids"],
                     attention_mask=inputs["attention_mask"], labels=labels).loss
    assert torch.allclose(parts["task"], expected, atol=1e-5) and torch.equal(parts["total"], parts["task"])
    with pytest.raises(ValueError, match="without KD"):
        domain_losses(model, model, inputs, None, None)


def test_held_out_items_are_balanced_fixed_and_right():
    held_out = {"images": [f"img{i}" for i in range(30)], "captions": [f"cap{i}" for i in range(30)],
                "img2txt": [[i] for i in range(30)]}
    items = domain_eval_items(held_out, seed=3)
    assert items == domain_eval_items(held_out, seed=3) and items != domain_eval_items(held_out, seed=4)
    assert [sum(item["label"] == k for item in items) for k in range(3)] == [10, 10, 10]
    for x, item in enumerate(items):
        left, right = item["images"]
        assert item["sentence"] == f"cap{x}" and left != right
        assert (left == f"img{x}", right == f"img{x}") == {LEFT: (True, False), RIGHT: (False, True),
                                                           NEITHER: (False, False)}[item["label"]]
    with pytest.raises(ValueError, match="at least 3 images"):
        domain_eval_items({"images": ["a", "b"], "captions": ["a", "b"], "img2txt": [[0], [1]]}, seed=0)


def test_pretrain_then_domain_then_nlvr2_fine_tune(tmp_path, caplog):
    """The official order on tiny models: the domain checkpoint is an NLVR2 model with a 3-way head; NLVR2 fine-tuning
    from it keeps its encoders and starts from a fresh 2-way head (with a log line saying so)."""
    torch.manual_seed(0)  # a tiny pre-training checkpoint (random weights) in the synthetic vocabulary
    EfficientVLMForPreTraining(preset_config("tiny", 32, len(synthetic_tokenizer()))).save_pretrained(
        tmp_path / "pretrained")
    assert main(["teacher", "--task", "nlvr2_domain", "--init_from", str(tmp_path / "pretrained"), "--output_dir",
                 str(tmp_path / "domain"), "--max_steps", "2", *CLI_COMMON]) == 0
    metrics = json.loads((tmp_path / "domain" / "eval_results.json").read_text())
    assert 0 <= metrics["accuracy"] <= 100 and metrics["data"]["items"] == 8  # 3-way accuracy on held-out pairs
    domain = EfficientVLMForVisualReasoning.from_pretrained(str(tmp_path / "domain"))
    assert num_labels(domain) == 3

    model = EfficientVLMForVisualReasoning.from_pretrained(str(tmp_path / "domain"))
    with caplog.at_level(logging.WARNING):
        get_task("nlvr2").prepare_model(model, None)
    assert num_labels(model) == 2 and "3-way NLVR domain pre-training head" in caplog.text
    kept = {k: v for k, v in domain.state_dict().items() if not k.startswith("nlvr_head.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in kept.items())
    assert main(["teacher", "--task", "nlvr2", "--init_from", str(tmp_path / "domain"), "--output_dir",
                 str(tmp_path / "nlvr2"), "--max_steps", "1", *CLI_COMMON]) == 0
    assert num_labels(EfficientVLMForVisualReasoning.from_pretrained(str(tmp_path / "nlvr2"))) == 2
