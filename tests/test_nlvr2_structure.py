"""X-VLM's NLVR2 structure: duplicated fusion layers (copy 2l reads image 0, 2l + 1 image 1) sharing cross K/V.

Covers the config checks, one shared K/V tensor before and after save / load, the by-value duplication of a
single-fusion checkpoint, the old-format error, tied cross-head gates, the exact size model, materialize == masked
with differently pruned copies, the pair-wise layer maps / student init, and `convert-xvlm` on NLVR2 layouts.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modeling_efficientvlm import (
    EfficientVLMForImageTextRetrieval,
    EfficientVLMForVisualReasoning,
    EncoderPruningMasks,
    PruningMasks,
)
from tests.conftest import tiny_config
from efficientvlm.training.method.initializers import convert_xvlm_checkpoint
from efficientvlm.training.method.distillation import layer_maps
from efficientvlm.training.method.l0 import ModalL0Module
from efficientvlm.training.method.materialize import materialize
from efficientvlm.training.method.structure import count_parameters, unit_groups
from efficientvlm.training.method.student import init_student_from_teacher

BATCH, LENGTH = 3, 7


def _nlvr(seed: int = 0, **overrides) -> EfficientVLMForVisualReasoning:
    torch.manual_seed(seed)
    return EfficientVLMForVisualReasoning(tiny_config(**overrides)).eval()


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    mask[0, -2:] = 0
    return {"pixel_values": torch.randn(BATCH, 2, 3, 32, 32, generator=g),
            "input_ids": torch.randint(5, 99, (BATCH, LENGTH), generator=g), "attention_mask": mask}


def _kv_modules(model, layer: int):
    cross = model.fusion_model.layers[layer].cross_attn
    return cross.k_proj, cross.v_proj


def _assert_pairs_share(model) -> None:
    fusion = model.fusion_model
    for even in range(0, len(fusion.layers), 2):
        if fusion.layers[even].num_cross_heads:
            for a, b in zip(_kv_modules(model, even), _kv_modules(model, even + 1)):
                assert a is b and a.weight.data_ptr() == b.weight.data_ptr() and a.bias.data_ptr() == b.bias.data_ptr()
        assert fusion.layers[even].cross_attn.q_proj is not fusion.layers[even + 1].cross_attn.q_proj


def _saved(model, path):
    model.save_pretrained(path)
    return path


def _real_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())  # shared tensors once


# ------------------------------------------------------------------------------------------------------ config
def test_config_shared_cross_kv_validation():
    fusion = dict(num_hidden_layers=4, shared_cross_kv=True, num_cross_attention_heads=[4, 4, 2, 2])
    assert tiny_config(fusion=fusion).fusion_encoder_config.shared_cross_kv is True
    with pytest.raises(ValueError, match=r"shared_cross_kv = True needs an even .*num_hidden_layers"):
        tiny_config(fusion=dict(num_hidden_layers=3, shared_cross_kv=True))
    with pytest.raises(ValueError, match=r"num_cross_attention_heads\[2\] = 2 and \[3\] = 3 differ.*layers 2 and 3"):
        tiny_config(fusion=dict(fusion, num_cross_attention_heads=[4, 4, 2, 3]))
    with pytest.raises(ValueError, match="shared_cross_kv must be a bool"):
        tiny_config(fusion=dict(fusion, shared_cross_kv="yes"))
    # the NLVR2 class duplicates a single-fusion config: 2 layers -> 4, sizes per copy
    model = _nlvr(fusion=dict(num_attention_heads=[4, 2]))
    fused = model.config.fusion_encoder_config
    assert fused.shared_cross_kv and fused.num_hidden_layers == 4 and fused.num_attention_heads == [4, 4, 2, 2]
    assert model.nlvr_head[0].in_features == 24 and model.nlvr_head[-1].out_features == 2
    assert _nlvr(num_labels=3).nlvr_head[-1].out_features == 3


# ------------------------------------------------------------------------------------------- shared K/V tensor
def test_shared_kv_is_one_tensor_before_and_after_save_load(tmp_path):
    model, batch = _nlvr(), _batch()
    _assert_pairs_share(model)
    assert count_parameters(model.config, ("nlvr",))["total"] == _real_parameters(model)
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    kv = {k for k in keys if re.search(r"cross_attn\.[kv]_proj", k)}
    # the even copies own the shared K/V; the odd copies' names are dropped as tied
    assert kv == {f"fusion_model.layers.{i}.cross_attn.{p}_proj.{w}"
                  for i in (0, 2) for p in "kv" for w in ("weight", "bias")}
    loaded, info = EfficientVLMForVisualReasoning.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _assert_pairs_share(loaded)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=0, rtol=0)
    # training moves both copies together: one gradient step changes the one tensor seen by both
    loaded.train()
    loaded(**batch, labels=torch.tensor([0, 1, 1])).loss.backward()
    torch.optim.SGD(loaded.parameters(), lr=0.1).step()
    torch.testing.assert_close(_kv_modules(loaded, 0)[0].weight, _kv_modules(loaded, 1)[0].weight, atol=0, rtol=0)


# ------------------------------------------------------------------------------------ duplication by value
def _identity_copies(config, odd: bool) -> PruningMasks:
    """Masks that remove every sub-layer of the odd (or even) copies: those layers become exact identities."""
    fusion = config.fusion_encoder_config

    def masks(sizes):
        return [torch.zeros(n) if i % 2 == int(odd) else None for i, n in enumerate(sizes)]

    return PruningMasks(fusion=EncoderPruningMasks(
        head=masks(fusion.num_attention_heads), cross_head=masks(fusion.num_cross_attention_heads),
        ffn=masks(fusion.intermediate_size),
    ))


def test_retrieval_checkpoint_is_duplicated_by_value(tmp_path):
    torch.manual_seed(0)
    retrieval = EfficientVLMForImageTextRetrieval(tiny_config()).eval()
    retrieval.save_pretrained(tmp_path)
    model, info = EfficientVLMForVisualReasoning.from_pretrained(tmp_path, output_loading_info=True)
    assert not model.training and info["missing_keys"] and all(k.startswith("nlvr_head.") for k in info["missing_keys"])
    source, state = retrieval.state_dict(), model.state_dict()
    for name, tensor in state.items():
        if name.startswith("fusion_model.layers."):
            layer, rest = name[len("fusion_model.layers."):].split(".", 1)
            name = f"fusion_model.layers.{int(layer) // 2}.{rest}"  # copies 2l and 2l + 1 <- layer l
        if not name.startswith("nlvr_head."):
            torch.testing.assert_close(tensor, source[name], atol=0, rtol=0, msg=name)
    _assert_pairs_share(model)
    # copy 2l IS layer l on image 0 and copy 2l + 1 IS layer l on image 1: with the other copies switched off
    # (identities), the duplicated fusion reproduces the single-image fusion of either image
    batch = _batch()
    with torch.no_grad():
        text = retrieval.encode_text(batch["input_ids"], batch["attention_mask"]).last_hidden_state
        images = [retrieval.encode_image(batch["pixel_values"][:, i]).last_hidden_state for i in (0, 1)]
        for index, odd_off in ((0, True), (1, False)):
            single = retrieval.fuse(text, batch["attention_mask"], images[index]).last_hidden_state
            _, fused = model.pair_logits(text, batch["attention_mask"], images[0], images[1],
                                         pruning_masks=_identity_copies(model.config, odd=odd_off))
            torch.testing.assert_close(fused.last_hidden_state, single, atol=1e-6, rtol=1e-6)
        full = model(**batch, output_hidden_states=True)
        assert full.fusion_model_output.last_hidden_state.shape == (BATCH, LENGTH, 24)  # B rows, one text stream
        assert len(full.fusion_model_output.hidden_states) == 5  # embeddings + 2 x 2 copies
        assert full.vision_model_output.last_hidden_state.shape[0] == 2 * BATCH
    # the in-memory helper gives the same weights, and a 3-class head for domain pre-training
    three = EfficientVLMForVisualReasoning.from_single_fusion(retrieval, num_labels=3)
    assert three.nlvr_head[-1].out_features == 3 and three.config.num_labels == 3
    torch.testing.assert_close(three.fusion_model.layers[3].mlp.fc1.weight,
                               retrieval.fusion_model.layers[1].mlp.fc1.weight)


def test_old_format_nlvr2_checkpoint_raises_a_clear_error(tmp_path):
    torch.manual_seed(0)
    retrieval = EfficientVLMForImageTextRetrieval(tiny_config())
    state = {k: v.contiguous() for k, v in retrieval.state_dict().items() if not k.startswith("itm_head.")}
    width = 2 * 24  # the former head read [CLS_left ; CLS_right]
    state.update({"nlvr_head.0.weight": torch.zeros(width, width), "nlvr_head.0.bias": torch.zeros(width),
                  "nlvr_head.3.weight": torch.zeros(2, width), "nlvr_head.3.bias": torch.zeros(2)})
    for folder, architectures in (("named", ["EfficientVLMForVisualReasoning"]), ("unnamed", None)):
        path = tmp_path / folder
        config = tiny_config()
        config.architectures = architectures
        config.save_pretrained(path)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        message = r"former EfficientVLM design.*concatenated.*re-run .*teacher --task nlvr2"
        with pytest.raises(ValueError, match=message):
            EfficientVLMForVisualReasoning.from_pretrained(path)


# ------------------------------------------------------------------------------------- gates and size model
def test_cross_gates_are_tied_and_the_size_model_is_exact():
    model = _nlvr()
    groups = {g.name: g for g in unit_groups(model.config)}
    odd, even = groups["fusion.cross_head.1"], groups["fusion.cross_head.0"]
    assert odd.kv_shared_with == 0 and even.kv_shared_with is None and groups["fusion.head.1"].kv_shared_with is None
    hd, kv = 6, 32
    assert even.unit_params - odd.unit_params == 2 * (kv * hd + hd)  # K/V rows counted once, in the even copy
    l0 = ModalL0Module(model.config)
    assert "fusion_cross_head_1" not in l0.gates and l0.gate(odd) is l0.gate(even)
    assert "fusion_head_1" in l0.gates and "fusion_ffn_1" in l0.gates
    masks = l0.sample_masks(torch.Generator().manual_seed(0))
    assert masks.fusion.cross_head[0] is masks.fusion.cross_head[1]
    assert not torch.equal(masks.fusion.ffn[0], masks.fusion.ffn[1])  # the copies' FFN gates are their own
    # prunable units of the real model: q/k/v/out rows of every head (shared K/V once) + fc1/fc2 of every neuron
    prunable = sum(p.numel() for n, p in model.named_parameters() if re.search(r"_attn\.[qkvo]\w*_proj|mlp\.fc", n))
    prunable -= sum(p.numel() for n, p in model.named_parameters() if re.search(r"out_proj\.bias|fc2\.bias", n))
    assert l0.prunable_total == count_parameters(model.config, ("nlvr",))["prunable"] == prunable
    assert count_parameters(model.config, ("nlvr",))["total"] == _real_parameters(model)


# ------------------------------------------------------------------------------------------- materialize
def test_materialize_equals_masked_with_different_copy_masks(tmp_path):
    model, batch = _nlvr(fusion=dict(num_attention_heads=4, intermediate_size=37)), _batch(1)
    l0 = ModalL0Module(model.config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for gate in l0.gates.values():
            gate.log_alpha.copy_(torch.randn(gate.log_alpha.shape, generator=g) * 3)
    masks = l0.deterministic_masks()
    fusion = masks.fusion
    assert not torch.equal(fusion.head[0], fusion.head[1]) and not torch.equal(fusion.ffn[2], fusion.ffn[3])
    assert torch.equal(fusion.cross_head[0], fusion.cross_head[1]) and 0 < fusion.cross_head[0].sum() < 4
    pruned = materialize(model, masks)  # verifies masked == materialized on tokens with different images per copy
    _assert_pairs_share(pruned)
    with torch.no_grad():
        torch.testing.assert_close(pruned(**batch).logits, model(**batch, pruning_masks=masks).logits,
                                   atol=1e-5, rtol=1e-5)
    sizes = pruned.config.fusion_encoder_config
    heads, widths = sizes.num_attention_heads, sizes.intermediate_size
    assert heads[0] != heads[1] or widths[2] != widths[3]  # the copies were pruned differently
    assert _real_parameters(pruned) == count_parameters(pruned.config, ("nlvr",))["total"]
    assert _real_parameters(pruned) == l0.predicted_parameters(model.config, ("nlvr",))
    reloaded = EfficientVLMForVisualReasoning.from_pretrained(_saved(pruned, tmp_path))
    _assert_pairs_share(reloaded)
    torch.testing.assert_close(reloaded.fusion_model.layers[1].cross_attn.k_proj.weight,
                               pruned.fusion_model.layers[0].cross_attn.k_proj.weight, atol=0, rtol=0)
    # copies that keep different cross heads cannot share one K/V: refused, naming the pair
    cross = [torch.tensor([1.0, 1, 0, 0]), torch.tensor([1.0, 0, 1, 0]), None, None]
    bad = PruningMasks(fusion=EncoderPruningMasks(cross_head=cross))
    with pytest.raises(ValueError, match="layers 0 and 1 keep different heads"):
        materialize(model, bad)


# ----------------------------------------------------------------------------------- layer maps and student
def test_student_takes_every_other_pair_and_kd_pairs_copies():
    teacher = _nlvr(fusion=dict(num_hidden_layers=6, num_attention_heads=[4, 3, 2, 1, 4, 4]))
    student = init_student_from_teacher(teacher)
    config = student.config.fusion_encoder_config
    assert config.shared_cross_kv and config.num_hidden_layers == 6  # 3 pairs of the teacher's 6
    assert config.num_attention_heads == [3, 3, 1, 1, 4, 4]  # pairs 1, 3, 5
    _assert_pairs_share(student)
    torch.testing.assert_close(student.fusion_model.layers[3].self_attn.q_proj.weight,
                               teacher.fusion_model.layers[7].self_attn.q_proj.weight, atol=0, rtol=0)
    maps = layer_maps(student.config, teacher.config)["fusion"]
    assert maps["attn"] == [(0, 2), (1, 3), (2, 6), (3, 7), (4, 10), (5, 11)]
    assert maps["hidden"][:3] == [(0, 0), (1, 3), (2, 4)]
    # a general-distillation map (one teacher layer per pair) gives the same pairs; a split pair is refused
    assert layer_maps(student.config, teacher.config, {"fusion": [1, 3, 5]})["fusion"] == maps
    with pytest.raises(ValueError, match="splits NLVR2 copy pairs"):
        layer_maps(student.config, teacher.config, {"fusion": [3, 2, 6, 7, 10, 11]})
    with pytest.raises(ValueError, match="shared_cross_kv"):
        layer_maps(tiny_config(), teacher.config)  # a single-fusion student against the NLVR2 teacher


# ------------------------------------------------------------------------------------------- convert-xvlm
def _nlvr_checkpoint(layout: str, head: str = "cls_head", seed: int = 0) -> tuple[dict, int]:
    """An X-VLM / EfficientVLM NLVR2 state dict with the real key names (shrunk widths), built the way X-VLM's
    NLVR `load_pretrained` builds it from a retrieval checkpoint: fusion layer l → layers n + 2l and n + 2l + 1,
    cross-attention key / value shared (one tensor), `cls_head` = build_mlp(d → 2d → 2) (or `ta_head` = Linear(d, 3)
    of the domain pre-training, which keeps `vision_proj`)."""
    from tests.conftest import synthetic_xvlm_checkpoint

    state = synthetic_xvlm_checkpoint(layout, seed)
    cross = r"text_encoder\.encoder\.layer\.(\d+)\.crossattention"
    n_text = min(int(m.group(1)) for k in state if (m := re.match(cross, k)))
    g = torch.Generator().manual_seed(seed + 1)
    out = {}
    for key, tensor in state.items():
        no_itc = key.startswith("vision_proj.") and head == "cls_head"  # X-VLM's NLVR2 model has no ITC at all
        if key == "temp" or key.startswith(("text_proj.", "itm_head.")) or no_itc:
            continue
        m = re.match(r"text_encoder\.encoder\.layer\.(\d+)\.(.+)$", key)
        if not m or int(m.group(1)) < n_text:
            out[key] = tensor
            continue
        first = (int(m.group(1)) - n_text) * 2 + n_text
        out[f"text_encoder.encoder.layer.{first}.{m.group(2)}"] = tensor
        shared = re.match(r"crossattention\.self\.(key|value)\.", m.group(2))
        # fine-tuning moved the copies apart, except the one shared K/V tensor
        moved = tensor if shared else tensor + 0.01 * torch.randn(tensor.shape, generator=g)
        out[f"text_encoder.encoder.layer.{first + 1}.{m.group(2)}"] = moved
    if head == "cls_head":
        d = 32
        shapes = {"0.weight": (2 * d, d), "0.bias": (2 * d,), "1.weight": (2 * d,), "1.bias": (2 * d,),
                  "3.weight": (2, 2 * d), "3.bias": (2,)}
        for name, shape in shapes.items():
            out[f"cls_head.{name}"] = torch.randn(shape, generator=g)
    else:
        out.update({"ta_head.weight": torch.randn(3, 32, generator=g), "ta_head.bias": torch.randn(3, generator=g)})
    return out, n_text


@pytest.mark.parametrize("layout, head", [("teacher_retrieval384", "cls_head"),  # X-VLM layout, 2 x 6 fusion
                                          ("student_eff_retrieval384", "cls_head"),  # EfficientVLM, 2 x 3 + l0_module
                                          ("student_eff_retrieval384", "ta_head")])  # NLVR domain pre-training
def test_convert_xvlm_nlvr2_round_trip(layout, head, tmp_path):
    from tests.conftest import XVLM_HEAD_DIM, expected_xvlm_target

    state, n_text = _nlvr_checkpoint(layout, head)
    hub = layout.startswith("student")  # the Hub-folder round trip on the small layouts (the teacher's is 4x larger)
    model, report = convert_xvlm_checkpoint(state, tmp_path / "out" if hub else None, head_dim=XVLM_HEAD_DIM,
                                            return_report=True)
    assert type(model) is EfficientVLMForVisualReasoning and report.layout == "nlvr2"
    fusion = model.config.fusion_encoder_config
    assert fusion.shared_cross_kv and fusion.num_hidden_layers == 2 * (6 if layout.startswith("teacher") else 3)
    _assert_pairs_share(model)
    own = model.state_dict()
    covered = set()
    for key, tensor in state.items():  # every source key: converted by value, or ignored with a reason
        target = expected_xvlm_target(key, n_text)
        if key.startswith("cls_head."):
            target = "nlvr_head." + key[len("cls_head."):]
        if target is None or key.startswith("ta_head."):
            assert key in report.ignored, key
            continue
        torch.testing.assert_close(own[target], tensor.reshape(own[target].shape), atol=0, rtol=0, msg=key)
        covered.add(target)
    fresh = {k for k in own if k not in covered}
    allowed = r"(vision_proj\.|text_proj\.|temp$" + (r"|nlvr_head\.)" if head == "ta_head" else ")")
    assert fresh and all(re.match(allowed, k) for k in fresh), fresh
    if layout.startswith("student_eff"):
        assert report.gate_tensors and set(report.gate_tensors) == {k for k in state if k.startswith("l0_module.")}
    if not hub:
        return
    # the Hub folder loads back with the one shared tensor and the same weights
    reloaded = EfficientVLMForVisualReasoning.from_pretrained(tmp_path / "out")
    _assert_pairs_share(reloaded)
    for name, tensor in own.items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["fusion_encoder_config"]["shared_cross_kv"]


def test_convert_xvlm_nlvr2_refuses_unshared_kv():
    from tests.conftest import XVLM_HEAD_DIM

    state, n_text = _nlvr_checkpoint("student_eff_retrieval384")
    key = f"text_encoder.encoder.layer.{n_text + 1}.crossattention.self.key.weight"
    state[key] = state[key] + 1.0
    with pytest.raises(ValueError, match=rf"layer\.{n_text}/{n_text + 1}\.crossattention\.self\.key\.weight differ"):
        convert_xvlm_checkpoint(state, head_dim=XVLM_HEAD_DIM)
