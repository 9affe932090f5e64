"""`efficientvlm bench --split structure.json`: per-layer keep fractions, relative-depth layer map, rescale to a
parameter target, old-file fallback, errors, and the per-workload flops_ratio (no timing is asserted)."""

import json

import pytest

from efficientvlm.training.commands.bench import (
    BenchArguments,
    load_learned_split,
    pruned_student_config,
    run_benchmark,
    uniformly_pruned_config,
    xvlm_clip_config,
)
from efficientvlm.training.commands.cli import main
from efficientvlm.training.commands.export import sparsity_report
from efficientvlm.training.method.structure import prunable_parameters, structure_table
from efficientvlm.training.method.student import student_config
from tests.conftest import ragged_config, tiny_config

# a learned 2 / 1 / 1-layer run (the tiny preset's student) with a removed FFN (vision layer 1) and removed text heads;
# its reference has 4 vision layers in the FFN entry (another depth: read at the same relative depth)
LEARNED = {
    "structure": {
        "vision": {"heads": [2, 4], "ffn": [32, 0], "hidden": 16},
        "text": {"heads": [0], "ffn": [16], "hidden": 24},
        "fusion": {"heads": [4], "ffn": [48], "cross_heads": [1], "hidden": 24},
    },
    "reference_structure": {
        "vision": {"heads": [4, 4], "ffn": [64, 64, 32, 32], "hidden": 32},
        "text": {"heads": [4], "ffn": [64], "hidden": 32},
        "fusion": {"heads": [4], "ffn": [64], "cross_heads": [4], "hidden": 32},
    },
}


def write(tmp_path, data, name="structure.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def xvlm_student():
    return student_config(xvlm_clip_config(224))  # 6 / 3 / 3 layers, 12 heads, FFN 3072, width 768


def test_structure_file_maps_onto_xvlm_clip_shapes_by_relative_depth(tmp_path):
    path = write(tmp_path, LEARNED)
    split = load_learned_split(path)
    # vision FFN layer 1 reads reference layer floor(1 * 4 / 2) = 2 (width 32): 0 / 32
    assert split.layers["vision"] == {"heads": [0.5, 1.0], "ffn": [0.5, 0.0]}
    assert split.hidden == {"vision": 0.5, "text": 0.75}
    pruned, info = pruned_student_config(BenchArguments(split=path, split_as_learned=True), xvlm_student())
    # 6 target layers read source layers [0, 0, 0, 1, 1, 1]; 3 text / fusion layers read source layer 0
    vision, text, fusion = pruned.vision_config, pruned.text_config, pruned.fusion_encoder_config
    assert vision.num_attention_heads == [6, 6, 6, 12, 12, 12]
    assert vision.intermediate_size == [1536, 1536, 1536, 0, 0, 0]  # the removed FFN stays removed
    assert text.num_attention_heads == [0, 0, 0] and text.intermediate_size == [768, 768, 768]
    assert fusion.num_attention_heads == [12] * 3 and fusion.num_cross_attention_heads == [3] * 3
    assert fusion.intermediate_size == [2304] * 3
    # residual widths: vision 768 * 0.5, text AND fusion 768 * 0.75; cross-attention reads the vision width
    assert (vision.hidden_size, text.hidden_size, fusion.hidden_size) == (384, 576, 576)
    assert fusion.encoder_hidden_size == 384 and pruned.head_hidden_size == 2 * 768
    assert info["rescale"].startswith("none") and info["read_as"].startswith("per-layer")


def test_rescale_reaches_the_parameter_target_and_keeps_fixed_points(tmp_path):
    data = json.loads(json.dumps(LEARNED))
    for entry in data["structure"].values():  # widths as learned: the rescale acts on heads / FFN only
        entry.pop("hidden")
    path = write(tmp_path, data)
    student = xvlm_student()
    before = prunable_parameters(student)["total"]
    for target in (0.25, 0.5):
        pruned, info = pruned_student_config(BenchArguments(split=path, target_sparsity=target), student)
        assert 1 - prunable_parameters(pruned)["total"] / before == pytest.approx(target, abs=0.01)
        assert info["achieved_sparsity"]["total"] == pytest.approx(target, abs=0.01)
        vision = pruned.vision_config
        assert vision.intermediate_size[3:] == [0, 0, 0] and pruned.text_config.num_attention_heads == [0, 0, 0]
        assert vision.num_attention_heads[3:] == [12, 12, 12]
        assert pruned.fusion_encoder_config.num_attention_heads == [12] * 3
        assert vision.intermediate_size[0] < 3072  # f = 0.5 moves with the exponent, f = 1 does not
    assert 0 < vision.num_attention_heads[0] < 12 and 0 < vision.intermediate_size[0] < 3072
    assert "bisected to target_sparsity 0.5" in info["rescale"] and "NOT reachable" not in info["rescale"]
    # its removed sub-layers alone (vision FFNs of layers 3-5, all text heads) remove about 23 %: 0.1 is out of reach
    pruned, info = pruned_student_config(BenchArguments(split=path, target_sparsity=0.1), student)
    assert info["achieved_sparsity"]["total"] > 0.2
    assert "target NOT reachable: its removed sub-layers (keep fraction 0) alone remove more" in info["rescale"]


def test_old_file_without_reference_structure_falls_back_to_per_encoder_sparsity(tmp_path, capsys):
    ratios = {"vision": 0.1, "text": 0.3, "fusion": 0.5}
    path = write(tmp_path, {"sparsity": {**ratios, "total": 0.3}, "structure": LEARNED["structure"]})
    split = load_learned_split(path)
    assert "no reference_structure" in split.source and split.hidden == {}
    student = xvlm_student()
    as_learned, _ = pruned_student_config(BenchArguments(split=path, split_as_learned=True), student)
    assert structure_table(as_learned) == structure_table(uniformly_pruned_config(student, ratios))
    rescaled, info = pruned_student_config(BenchArguments(split=path, target_sparsity=0.2), student)
    assert info["achieved_sparsity"]["total"] == pytest.approx(0.2, abs=0.01)
    assert info["achieved_sparsity"]["vision"] < info["achieved_sparsity"]["text"] < info["achieved_sparsity"]["fusion"]


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["reference_structure"].pop("fusion"), "reference_structure.'fusion'"),
    (lambda d: d["structure"]["text"].pop("ffn"), "structure.text.'ffn'"),
    (lambda d: d["reference_structure"]["vision"].pop("hidden"), "reference_structure.vision.'hidden'"),
    (lambda d: d.pop("reference_structure") and d.pop("structure"), "'sparsity'"),
    (lambda d: d["structure"]["fusion"].update(cross_heads=[5]), r"structure.fusion.cross_heads\[0\] keeps 5 of"),
    (lambda d: d["structure"]["vision"].update(heads=[]), "structure.vision.heads must be a non-empty"),
])
def test_bad_structure_files_name_the_file_and_the_field(tmp_path, edit, field):
    data = json.loads(json.dumps(LEARNED))
    edit(data)
    path = write(tmp_path, data, "bad_structure.json")
    with pytest.raises(ValueError, match=rf"bad_structure\.json.*{field}"):
        load_learned_split(path)


def test_unreadable_structure_files_name_the_file(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match=r"broken\.json: cannot read it as JSON"):
        load_learned_split(str(broken))
    with pytest.raises(ValueError, match=r"absent\.json: cannot read it as JSON"):
        load_learned_split(str(tmp_path / "absent.json"))


def test_exported_structure_round_trips_into_bench(tmp_path):
    """export's structure.json carries reference_structure; bench reads keep = structure / reference per layer."""
    report = sparsity_report(ragged_config(), tiny_config())
    assert report["reference_structure"] == structure_table(tiny_config())
    split = load_learned_split(write(tmp_path, report))
    assert split.layers["vision"] == {"heads": [0.75, 0.0], "ffn": [0.0, 21 / 37]}
    assert split.layers["fusion"]["cross_heads"] == [0.0, 0.75]


def test_tiny_bench_with_a_structure_file_reports_split_and_flops_ratio(tmp_path):
    path = write(tmp_path, LEARNED)
    result = run_benchmark(BenchArguments(preset="tiny", split=path, repeats=1, warmup=0, eval_images=2, num_texts=2,
                                          itm_k=1))
    split = result["protocol"]["split"]
    assert split["file"] == path and split["achieved_sparsity"]["total"] == pytest.approx(0.25, abs=0.05)
    for entry in result["models"].values():
        assert entry["flops_ratio"] == pytest.approx(entry["speedup"] / entry["flops_speedup"])
        for enc in entry["encoders"].values():
            assert enc["flops_ratio"] == pytest.approx(enc["speedup"] / enc["flops_speedup"])
    assert result["models"]["pruned"]["encoders"]["vision"]["flops_speedup"] > 1


def test_bench_cli_reports_bad_split_files_and_flags(tmp_path, capsys):
    path = write(tmp_path, {"structure": LEARNED["structure"]}, "no_reference.json")
    assert main(["bench", "--preset", "tiny", "--split", path]) == 2
    assert "no_reference.json: missing field 'sparsity'" in capsys.readouterr().err
    assert main(["bench", "--preset", "tiny", "--split", "vision=0.2", "--split_as_learned", "true"]) == 2
    assert "--split_as_learned applies to a structure.json" in capsys.readouterr().err
