
import pytest
import torch

from modeling_efficientvlm import (
    EfficientVLMForImageTextRetrieval,
    EfficientVLMForPreTraining,
    EfficientVLMModel,
)
from tests.conftest import ragged_config, random_pruning_masks, run_clean_python, tiny_config, tiny_inputs
from efficientvlm.training.method.materialize import materialize
from efficientvlm.training.method.structure import (
    PRETRAINING_HEADS, count_parameters, prunable_parameters, unit_groups,
)
from efficientvlm.training.method.cost import Run, encoder_flops
from efficientvlm.training.method.student import default_init_map, init_student_from_teacher


@pytest.mark.parametrize("config_fn", [tiny_config, ragged_config])
@pytest.mark.parametrize(
    "cls, heads",
    [(EfficientVLMModel, ()), (EfficientVLMForImageTextRetrieval, ("itm",)),
     (EfficientVLMForPreTraining, PRETRAINING_HEADS)],
)
def test_parameter_count_matches_brute_force(config_fn, cls, heads):
    model = cls(config_fn())
    assert count_parameters(model.config, heads)["total"] == sum(p.numel() for p in model.parameters())


def test_unit_parameters_brute_force_including_cross_attention_widths():
    """Each unit's parameter count equals the number of weights that removing it deletes."""
    config = tiny_config()  # vision width 32, text width 24: cross-attention k/v read 32
    model = EfficientVLMForImageTextRetrieval(config)
    layer = model.fusion_model.layers[0]
    head_dim = config.fusion_encoder_config.head_dim
    cross = next(g for g in unit_groups(config) if g.kind == "cross_head" and g.layer == 0)
    per_head = sum(p.numel() for n, p in layer.cross_attn.named_parameters() if n != "out_proj.bias") // 4
    assert cross.unit_params == per_head == 24 * head_dim + head_dim + 2 * (32 * head_dim + head_dim) + head_dim * 24
    ffn = next(g for g in unit_groups(config) if g.kind == "ffn" and g.modality == "vision")
    assert ffn.unit_params * 37 == sum(p.numel() for n, p in model.vision_model.layers[0].mlp.named_parameters()) - 32
    assert prunable_parameters(config)["total"] == count_parameters(config)["prunable"]


def test_flops_brute_force_on_tiny_vision():
    """Analytic FLOPs == 2 × multiply-accumulates counted by hooks on every Linear / Conv and the attention matmuls."""
    config = tiny_config(vision=dict(num_attention_heads=[3, 0], intermediate_size=[5, 37]))
    model = EfficientVLMForImageTextRetrieval._from_config(config, attn_implementation="eager").eval()
    macs = []

    def linear_hook(module, inputs, output):
        macs.append(inputs[0].numel() // inputs[0].shape[-1] * module.in_features * module.out_features)

    def conv_hook(module, inputs, output):
        macs.append(output.numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1])

    for module in model.vision_model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(linear_hook)
        elif isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(conv_hook)
    model.encode_image(torch.randn(1, 3, 32, 32))
    tokens = 17
    attention_macs = 2 * tokens * tokens * 3 * config.vision_config.head_dim  # QK^T and PV, layer 0 only
    assert encoder_flops(config, "vision", [Run(1, tokens, tokens)]) == 2 * (sum(macs) + attention_macs)


def test_default_init_map_and_errors():
    assert default_init_map(6, 12) == [1, 3, 5, 7, 9, 11]
    assert default_init_map(3, 6) == [1, 3, 5]
    with pytest.raises(ValueError, match="cannot be deeper"):
        default_init_map(4, 2)
    # depths that do not divide take the last teacher layer of each block (ceil((i+1)·T/S) − 1)
    assert default_init_map(3, 4) == [1, 2, 3]
    assert default_init_map(4, 6) == [1, 2, 4, 5]


def test_student_copies_exactly_the_mapped_layers():
    torch.manual_seed(0)
    teacher = EfficientVLMForPreTraining(tiny_config(vision=dict(num_hidden_layers=4), text=dict(num_hidden_layers=4),
                                                     fusion=dict(num_hidden_layers=2)))
    student = init_student_from_teacher(teacher)
    assert student.config.vision_config.num_hidden_layers == 2
    assert student.config.fusion_encoder_config.num_hidden_layers == 1
    t, s = teacher.state_dict(), student.state_dict()
    for i, j in enumerate([1, 3]):
        for name in ("self_attn.q_proj.weight", "mlp.fc2.bias", "layer_norm1.weight"):
            assert torch.equal(s[f"vision_model.layers.{i}.{name}"], t[f"vision_model.layers.{j}.{name}"])
            assert torch.equal(s[f"text_model.layers.{i}.{name}"], t[f"text_model.layers.{j}.{name}"])
    assert torch.equal(s["fusion_model.layers.0.cross_attn.k_proj.weight"],
                       t["fusion_model.layers.1.cross_attn.k_proj.weight"])
    for name in ("vision_model.embeddings.position_embedding.weight", "itm_head.0.weight", "mlm_head.dense.weight",
                 "temp"):
        assert torch.equal(s[name], t[name])
    custom = init_student_from_teacher(teacher, layer_map={"vision": [0, 2], "text": [0], "fusion": [0]})
    assert torch.equal(custom.state_dict()["vision_model.layers.1.mlp.fc1.weight"],
                       t["vision_model.layers.2.mlp.fc1.weight"])
    assert custom.config.text_config.num_hidden_layers == 1


def test_student_errors_name_the_cause():
    teacher = EfficientVLMForImageTextRetrieval(tiny_config())
    with pytest.raises(ValueError, match="points outside the teacher: \\[5\\]"):
        init_student_from_teacher(teacher, layer_map={"vision": [0, 5]})
    with pytest.raises(ValueError, match="exceeds the teacher's 2 text layers"):
        init_student_from_teacher(teacher, num_layers={"text": 3})


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_materialize_equivalence_and_size(seed, scaled):
    torch.manual_seed(seed)
    model = EfficientVLMForPreTraining(tiny_config()).eval()
    masks = random_pruning_masks(model.config, seed, scaled)
    masks.vision.head[0] = torch.zeros(4)  # a layer with all heads removed
    masks.text.ffn[1] = torch.zeros(37)  # a layer with all FFN neurons removed
    masks.fusion.cross_head[1] = torch.zeros(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = materialize(model, masks)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
    assert pruned.config.vision_config.num_attention_heads[0] == 0
    assert pruned.config.text_config.intermediate_size[1] == 0
    inputs = tiny_inputs()
    masked = model(**inputs, pruning_masks=masks, compute_itm=True, mlm_input_ids=inputs["input_ids"])
    dense = pruned(**inputs, compute_itm=True, mlm_input_ids=inputs["input_ids"])
    for name in ("logits_per_image", "itm_logits", "mlm_logits"):
        torch.testing.assert_close(getattr(dense, name), getattr(masked, name), atol=1e-5, rtol=1e-5)
    assert pruned.num_parameters() == count_parameters(pruned.config, PRETRAINING_HEADS)["total"]
    assert pruned.num_parameters() < model.num_parameters()


@pytest.mark.slow
def test_materialized_model_loads_as_remote_code(tmp_path):
    torch.manual_seed(0)
    model = EfficientVLMForImageTextRetrieval(tiny_config()).eval()
    pruned = materialize(model, random_pruning_masks(model.config, 3))
    pruned.save_pretrained(tmp_path)
    inputs = tiny_inputs()
    torch.save(inputs, tmp_path / "inputs.pt")
    expected = pruned(**inputs, compute_itm=True).itm_logits
    out = run_clean_python(
        f"""
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        inputs = torch.load({str(tmp_path / "inputs.pt")!r}, weights_only=True)
        with torch.no_grad():
            print(model(**inputs, compute_itm=True).itm_logits.flatten().tolist())
        """
    )
    got = torch.tensor(eval(out.strip().splitlines()[-1]))
    torch.testing.assert_close(got, expected.flatten(), atol=1e-5, rtol=1e-5)
