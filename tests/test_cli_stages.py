"""The CLI stages chained on tiny models: teacher → distill → prune → export → evaluate (a few steps each)."""

import json

import pytest
import torch

from efficientvlm.training.commands.cli import main
from tests.conftest import CLI_COMMON, cli_teacher_and_student


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    cli_teacher_and_student(root)
    assert main(["prune", "--student", str(root / "student"), "--teacher", str(root / "teacher"),
                 "--output_dir", str(root / "pruned"), "--max_steps", "3", "--target_sparsity", "0.3",
                 "--reg_learning_rate", "0.5", *CLI_COMMON]) == 0
    return root


def test_each_stage_writes_a_loadable_checkpoint_with_metrics(chain):
    for name in ("teacher", "student", "pruned"):
        metrics = json.loads((chain / name / "eval_results.json").read_text())
        assert 0 <= metrics["r_mean"] <= 100
    assert (chain / "pruned" / "l0_gates.safetensors").exists()
    student = json.loads((chain / "student" / "config.json").read_text())
    assert student["vision_config"]["num_hidden_layers"] == 2  # half of the tiny preset's 4


def test_export_materializes_and_evaluate_reads_it(chain, capsys):
    out = chain / "export"
    assert main(["export", "--model", str(chain / "pruned"), "--output_dir", str(out),
                 "--reference", str(chain / "teacher")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params"] < report["reference_params"]
    structure = json.loads((out / "structure.json").read_text())
    assert set(structure["sparsity"]) == {"vision", "text", "fusion", "total"}
    assert (out / "README.md").read_text().count("```python") == 2
    assert main(["evaluate", "--model", str(out), "--image_size", "32", "--eval_images", "8", "--itm_k", "2"]) == 0
    assert "r_mean" in json.loads(capsys.readouterr().out)


def test_evaluate_nlvr2_accuracy_on_synthetic_pairs(chain, capsys):
    assert main(["evaluate", "--model", str(chain / "teacher"), "--task", "nlvr2", "--image_size", "32",
                 "--eval_images", "8"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 100


def test_export_refuses_existing_output_without_overwrite(chain, capsys):
    out = chain / "export2"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["export", "--model", str(chain / "pruned"), "--output_dir", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and (out / "keep.txt").exists()


def test_stage_argument_errors_name_the_cause(capsys, tmp_path):
    assert main(["distill", "--teacher", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "s")]) == 2
    assert "--teacher must be an existing checkpoint dir" in capsys.readouterr().err
    assert main(["prune", "--student", str(tmp_path), "--teacher", str(tmp_path), "--output_dir", str(tmp_path),
                 "--target_sparsity", "1.2"]) == 2
    assert "target_sparsity must lie in [0, 1)" in capsys.readouterr().err


def test_export_names_its_reference_and_counts_it_with_the_same_head(chain, capsys):
    """The card and structure.json name the --reference folder; a teacher exported against itself is 100 % of it
    (its MLM head counted on both sides), and the plot's title names the reference."""
    out = chain / "teacher_export"
    assert main(["export", "--model", str(chain / "teacher"), "--output_dir", str(out),
                 "--reference", str(chain / "teacher")]) == 0
    capsys.readouterr()
    structure = json.loads((out / "structure.json").read_text())
    assert structure["reference_name"] == "teacher"
    assert structure["params"] == structure["reference_params"]
    assert "0.09M (100.0% of teacher: 0.09M)" in (out / "README.md").read_text()


def test_flops_budget_prune_records_budget_and_achieved_fractions(chain, capsys):
    """`prune --budget flops` weighs units by their FLOPs on the retrieval path; the export's structure.json records
    the budget kind, its target and the kept shares of parameters and path FLOPs of the materialized model (a params
    run records its kind too, with the FLOPs on the task's default path)."""
    from efficientvlm.training.method.cost import path_from_json, prunable_flops
    from efficientvlm.training.method.structure import prunable_parameters
    from modeling_efficientvlm import EfficientVLMConfig

    out = chain / "pruned_flops"
    assert main(["prune", "--student", str(chain / "student"), "--teacher", str(chain / "teacher"),
                 "--output_dir", str(out), "--max_steps", "3", "--target_sparsity", "0.3", "--budget", "flops",
                 "--budget_path", "images=100,texts=500,k=16,text_length=12", "--reg_learning_rate", "0.5",
                 *CLI_COMMON]) == 0
    assert main(["export", "--model", str(out), "--output_dir", str(chain / "export_flops")]) == 0
    capsys.readouterr()
    structure = json.loads((chain / "export_flops" / "structure.json").read_text())
    budget = structure["budget"]
    assert budget["kind"] == "flops" and budget["target_sparsity"] == 0.3
    assert budget["path"]["fusion"] == [[(100 + 500) * 16, 12, 12, 1 + (32 // 8) ** 2]]
    student = EfficientVLMConfig.from_pretrained(chain / "student")
    pruned = EfficientVLMConfig.from_pretrained(chain / "export_flops")
    path = path_from_json(budget["path"])
    assert budget["achieved"]["flops"] == prunable_flops(pruned, path)["total"] / prunable_flops(student, path)["total"]
    assert budget["achieved"]["params"] == (
        prunable_parameters(pruned)["total"] / prunable_parameters(student)["total"])
    assert main(["export", "--model", str(chain / "pruned"), "--output_dir", str(chain / "export_params")]) == 0
    params_budget = json.loads((chain / "export_params" / "structure.json").read_text())["budget"]
    assert params_budget["kind"] == "params" and 0 < params_budget["achieved"]["flops"] <= 1


def test_distill_student_init_random_keeps_the_structure_but_not_the_teacher_weights(chain, tmp_path, capsys):
    """`--student_init random` (the initialisation ablation): the same student structure and layer map as the default,
    freshly initialised with --seed (reproducibly), not copied from the teacher's layers."""
    from safetensors.torch import load_file

    common = ["distill", "--teacher", str(chain / "teacher"), "--max_steps", "1", "--learning_rate", "0", "--seed", "3",
              *CLI_COMMON]  # lr 0: the saved weights are the initial ones
    for name, init in (("copied", "teacher_layers"), ("random_a", "random"), ("random_b", "random")):
        assert main([*common, "--output_dir", str(tmp_path / name), "--student_init", init]) == 0
    copied, a, b = (load_file(tmp_path / n / "model.safetensors") for n in ("copied", "random_a", "random_b"))
    teacher = load_file(chain / "teacher" / "model.safetensors")
    key = "vision_model.layers.0.mlp.fc1.weight"  # student layer 0 <- teacher layer 1 by the default map
    assert torch.equal(copied[key], teacher["vision_model.layers.1.mlp.fc1.weight"])
    assert a.keys() == copied.keys() and all(a[k].shape == copied[k].shape for k in a)
    assert not torch.equal(a[key], copied[key]) and torch.equal(a[key], b[key])  # fresh, and seeded
    assert json.loads((tmp_path / "random_a" / "layer_map.json").read_text()) == \
        json.loads((tmp_path / "copied" / "layer_map.json").read_text())
    assert main([*common, "--output_dir", str(tmp_path / "bad"), "--student_init", "zeros"]) == 2
    assert "--student_init must be one of" in capsys.readouterr().err
