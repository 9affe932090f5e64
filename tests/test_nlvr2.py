"""NLVR2 model (two images + statement → true/false) and its task / KD losses, on tiny models (CPU)."""

import copy
import json

import pytest
import torch

from modeling_efficientvlm import EfficientVLMForImageTextRetrieval, PruningMasks
from modeling_efficientvlm.modeling_efficientvlm import (
    EfficientVLMForVisualReasoning,
    EfficientVLMVisualReasoningOutput,
    EncoderPruningMasks,
)
from tests.conftest import run_clean_python, tiny_config
from tests.conftest import tiny_processor
from efficientvlm.training.data.collators import NLVR2Collator
from efficientvlm.training.data.nlvr2_dataset import make_nlvr2_eval_set
from efficientvlm.training.method.arguments import DistillationArguments
from efficientvlm.training.method.distillation import layer_maps
from efficientvlm.training.tasks.nlvr2 import NLVR2_LAMBDA, evaluate_nlvr2, nlvr2_losses

BATCH, LENGTH = 3, 7


def _model(seed: int = 0, **overrides) -> EfficientVLMForVisualReasoning:
    torch.manual_seed(seed)
    return EfficientVLMForVisualReasoning(tiny_config(**overrides)).eval()


def _batch(batch: int = BATCH, length: int = LENGTH, seed: int = 0) -> dict:
    """An NLVR2Collator-shaped batch: pixel_values (B, 2, 3, 32, 32), one padded statement, balanced-ish labels."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length - 2 :] = 0
    return {
        "pixel_values": torch.randn(batch, 2, 3, 32, 32, generator=g),
        "input_ids": torch.randint(5, 99, (batch, length), generator=g),
        "attention_mask": mask,
        "labels": torch.arange(batch) % 2,
    }


def _args(tmp_path, **kw) -> DistillationArguments:
    defaults = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, lambda_vlp=NLVR2_LAMBDA,
                    cross_attention_kd=True)
    defaults.update(kw)
    return DistillationArguments(**defaults)


def _forward(model, batch, **kw) -> EfficientVLMVisualReasoningOutput:
    with torch.no_grad():
        return model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                     attention_mask=batch["attention_mask"], **kw)


# ------------------------------------------------------------------------------------------------------ the model
def test_shapes_and_loss():
    model, batch = _model(), _batch()
    out = _forward(model, batch, labels=batch["labels"], output_attentions=True, output_hidden_states=True)
    assert out.logits.shape == (BATCH, 2)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, batch["labels"]))
    assert out.vision_model_output.last_hidden_state.shape == (2 * BATCH, 17, 32)  # one pass over the 2B images
    assert out.text_model_output.last_hidden_state.shape == (BATCH, LENGTH, 24)
    fusion = out.fusion_model_output
    assert fusion.last_hidden_state.shape == (BATCH, LENGTH, 24)  # one text stream through the duplicated fusion
    assert fusion.attentions[0].shape == (BATCH, 4, LENGTH, LENGTH)
    assert fusion.cross_attentions[1].shape == (BATCH, 4, LENGTH, 17)
    assert len(fusion.hidden_states) == 5  # embeddings + 2 fusion layers x 2 copies
    assert model.nlvr_head[0].in_features == 24 and model.nlvr_head[-1].out_features == 2
    assert _forward(model, batch).loss is None
    with pytest.raises(ValueError, match=r"\(B, 2, C, H, W\)"):
        _forward(model, {**batch, "pixel_values": batch["pixel_values"][:, 0]})


def test_copy_2l_reads_image_0_and_copy_2l_plus_1_image_1():
    """Recompute by hand: the statement runs through the fusion layers in order, layer i cross-attending to image
    i mod 2 (X-VLM's (layer_num − fusion_layer) % 2), and the head reads the single [CLS]."""
    model, batch = _model(), _batch()
    left, right = batch["pixel_values"][:, 0], batch["pixel_values"][:, 1]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min

    def by_hand(first, second):
        images = (model.encode_image(first).last_hidden_state, model.encode_image(second).last_hidden_state)
        hidden = model.encode_text(ids, mask).last_hidden_state
        for i, layer in enumerate(model.fusion_model.layers):
            hidden = layer(hidden, additive, images[i % 2])[0]
        return model.nlvr_head(hidden[:, 0])

    with torch.no_grad():
        expected, expected_swapped = by_hand(left, right), by_hand(right, left)
    swapped = {**batch, "pixel_values": batch["pixel_values"].flip(1)}
    torch.testing.assert_close(_forward(model, batch).logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_forward(model, swapped).logits, expected_swapped, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, expected_swapped, atol=1e-4)  # the model does see the order


def test_retrieval_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    retrieval = EfficientVLMForImageTextRetrieval(tiny_config()).eval()
    retrieval.save_pretrained(tmp_path)
    model, info = EfficientVLMForVisualReasoning.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] and all(k.startswith("nlvr_head.") for k in info["missing_keys"])
    assert not info["unexpected_keys"]  # the ITM head is dropped quietly
    assert model.config.fusion_encoder_config.num_hidden_layers == 4  # each fusion layer duplicated
    source = retrieval.state_dict()
    for name, tensor in model.state_dict().items():
        if name.startswith("fusion_model.layers."):
            layer, rest = name[len("fusion_model.layers."):].split(".", 1)
            name = f"fusion_model.layers.{int(layer) // 2}.{rest}"
        if not name.startswith("nlvr_head."):
            torch.testing.assert_close(tensor, source[name], atol=0, rtol=0, msg=name)
    assert torch.isfinite(_forward(model.eval(), _batch()).logits).all()


def test_all_ones_pruning_masks_equal_no_masks():
    model, batch = _model(), _batch()

    def ones(cfg, cross: bool) -> EncoderPruningMasks:
        return EncoderPruningMasks(
            head=[torch.ones(h) for h in cfg.num_attention_heads],
            cross_head=[torch.ones(h) for h in cfg.num_cross_attention_heads] if cross else None,
            ffn=[torch.ones(i) for i in cfg.intermediate_size],
        )

    c = model.config
    masks = PruningMasks(ones(c.vision_config, False), ones(c.text_config, False), ones(c.fusion_encoder_config, True))
    torch.testing.assert_close(_forward(model, batch, pruning_masks=masks).logits, _forward(model, batch).logits)


@pytest.mark.slow
def test_remote_code_round_trip_as_sequence_classification(tmp_path):
    model, batch = _model(), _batch()
    model.save_pretrained(tmp_path)
    inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    torch.save(inputs, tmp_path / "inputs.pt")
    expected = _forward(model, batch).logits
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForSequenceClassification"].endswith("EfficientVLMForVisualReasoning")

    out = run_clean_python(
        f"""
        import json, torch
        from transformers import AutoModelForSequenceClassification
        path = {str(tmp_path)!r}
        model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(model).__name__ == "EfficientVLMForVisualReasoning"
        layers = model.fusion_model.layers  # the remote code shares the pair's cross K/V module too
        assert layers[1].cross_attn.k_proj is layers[0].cross_attn.k_proj
        with torch.no_grad():
            logits = model(**torch.load(path + "/inputs.pt", weights_only=True)).logits
        print(json.dumps(logits.tolist()))
        """
    )
    torch.testing.assert_close(torch.tensor(json.loads(out.strip().splitlines()[-1])), expected, atol=0, rtol=0)


def test_collated_synthetic_batch_and_evaluate_nlvr2(tmp_path):
    """The data path end to end: synthetic items → NLVR2Collator → model / nlvr2_losses / evaluate_nlvr2."""
    model, processor = _model(), tiny_processor()
    items = make_nlvr2_eval_set(4, seed=0)
    batch = NLVR2Collator(processor)(items)
    assert batch["pixel_values"].shape == (4, 2, 3, 32, 32)
    maps = layer_maps(model.config, model.config)
    total, parts = nlvr2_losses(model, copy.deepcopy(model), batch, _args(tmp_path), maps)
    assert torch.isfinite(total) and parts["logits"].item() == 0.0
    accuracy = evaluate_nlvr2(model, items, processor, batch_size=3, show_progress=False)["accuracy"]
    predicted = _forward(model, batch).logits.argmax(-1)
    assert accuracy == 100.0 * (predicted == batch["labels"]).float().mean().item()


# ----------------------------------------------------------------------------------------------------- the losses
def test_kd_is_exactly_zero_when_student_equals_teacher(tmp_path):
    teacher = _model()
    student = copy.deepcopy(teacher)
    args = _args(tmp_path)
    total, parts = nlvr2_losses(student, teacher, _batch(), args, layer_maps(student.config, teacher.config))
    assert set(parts) == {"task", "logits", "attn", "hidden", "total"}
    for name in ("logits", "attn", "hidden"):
        assert parts[name].item() == 0.0, name
    torch.testing.assert_close(total, NLVR2_LAMBDA * parts["task"])
    assert parts["task"] > 0


def test_kd_terms_and_weighting_with_a_different_student(tmp_path):
    teacher, student = _model(0), _model(1)
    args = _args(tmp_path, alpha_attn=0.5, beta_hidden=2.0, gamma_logits=3.0)
    total, parts = nlvr2_losses(student, teacher, _batch(), args, layer_maps(student.config, teacher.config))
    for name in ("logits", "attn", "hidden"):
        assert parts[name].item() > 0, name
    kd = 0.5 * parts["attn"] + 2.0 * parts["hidden"] + 3.0 * parts["logits"]
    torch.testing.assert_close(total, 0.8 * parts["task"] + 0.2 * kd)
    total.backward()
    assert student.nlvr_head[0].weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_without_teacher_only_the_task_loss(tmp_path):
    student = _model()
    total, parts = nlvr2_losses(student, None, _batch(), _args(tmp_path), None)
    assert set(parts) == {"task", "total"}
    torch.testing.assert_close(total, parts["task"])
    with pytest.raises(KeyError, match="labels"):
        nlvr2_losses(student, None, {k: v for k, v in _batch().items() if k != "labels"}, _args(tmp_path), None)


def test_student_fits_a_fixed_batch(tmp_path):
    teacher, student = _model(0), _model(1).train()
    args, batch = _args(tmp_path), _batch(batch=4)
    maps = layer_maps(student.config, teacher.config)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    history = []
    for _ in range(15):
        total, parts = nlvr2_losses(student, teacher, batch, args, maps)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(parts["task"].item())
    assert history[-1] < 0.5 * history[0], history
