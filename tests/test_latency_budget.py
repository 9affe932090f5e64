"""Latency-table budget (issue #19): the measured table, its checks, the expected latency of a gated network, snapping,
a short run meeting its budget, and the CLI."""

import json

import pytest
import torch

from efficientvlm.training.method.cost import path_to_json
from efficientvlm.training.method.l0 import ModalL0Module
from efficientvlm.training.method.latency_table import (
    check_latency_table, fit_line, load_latency_table, measure_latency_table, predicted_latency, save_latency_table,
)
from efficientvlm.training.method.structure import unit_groups
from efficientvlm.training.tasks import get_task, task_path
from tests.conftest import tiny_config

FAST = {"points": 2, "repeats": 1, "warmup": 1, "min_seconds": 0.0, "progress": False}


def _table(config, per_unit=None, fixed=None, path=None) -> dict:
    """A hand-written table: per_unit(group) / fixed(group) seconds (no timing)."""
    groups = [g for g in unit_groups(config) if g.size > 0]
    per_unit = per_unit or (lambda g: 1.0)
    fixed = fixed or (lambda g: 10.0)
    path = path or path_to_json(task_path("retrieval", config, "images=4,texts=4,k=2,text_length=9"))
    return {"version": 1, "device": "hand", "cost_path": path,
            "per_unit": {g.name: per_unit(g) for g in groups}, "fixed": {g.name: fixed(g) for g in groups}}


def test_fit_line_recovers_fixed_and_per_unit_seconds():
    assert fit_line([1, 2, 3, 4], [3.0, 5.0, 7.0, 9.0]) == pytest.approx((1.0, 2.0))
    # a negative intercept (timer noise) is refitted through the origin: Σut / Σu² = (2 + 8 + 18) / 14
    assert fit_line([1, 2, 3], [2.0 - 3, 4.0, 6.0]) == pytest.approx((0.0, (-1 + 8 + 18) / 14))
    # a falling curve has no per-unit cost: the mean is the fixed part
    assert fit_line([1, 2], [4.0, 2.0]) == pytest.approx((3.0, 0.0))
    assert fit_line([4], [8.0]) == pytest.approx((0.0, 2.0))


def test_measured_table_prices_every_group_of_the_path_and_round_trips(tmp_path):
    config = tiny_config()
    path = task_path("retrieval", config, "images=4,texts=4,k=2,text_length=9")
    table = measure_latency_table(config, path, **FAST)
    names = {g.name for g in unit_groups(config) if g.size > 0}
    assert set(table["per_unit"]) == set(table["fixed"]) == names
    assert all(v >= 0 for v in (*table["per_unit"].values(), *table["fixed"].values()))
    assert any(v > 0 for v in table["per_unit"].values())
    assert table["cost_path"] == path_to_json(path)
    # the prediction for the student itself: Σ size·per_unit + fixed per group
    predicted = predicted_latency(table, config)
    by_hand = sum(g.size * table["per_unit"][g.name] + table["fixed"][g.name] for g in unit_groups(config) if g.size)
    assert predicted["total"] == pytest.approx(by_hand)
    file = tmp_path / "table.json"
    save_latency_table(table, str(file))
    assert load_latency_table(str(file), config) == json.loads(json.dumps(table))


def test_kv_cached_decoding_runs_are_timed(tmp_path):
    """Captioning's path decodes one token per step against cached keys (`self_keys > tokens`): timed with a fixed
    prefix standing in for the cache."""
    config = tiny_config()
    path = task_path("captioning", config, "images=2,new_tokens=3,beams=2")
    assert any(run.self_keys > run.tokens for run in path["text"])
    table = measure_latency_table(config, path, **FAST)
    assert predicted_latency(table, config)["text"] > 0


def test_transfer_prices_a_narrow_proxy_at_the_wider_models_shapes():
    """A proxy with 2 heads per layer priced by a source with 4 heads and twice the depth: proxy layer i reads source
    layer 2i, a proxy head costs 4/2 source heads, the fixed seconds carry over; an absent kind is refused."""
    from efficientvlm.training.method.latency_table import transfer_table

    source = tiny_config()
    source.vision_config.num_hidden_layers = 4
    source.vision_config.num_attention_heads = [4] * 4
    source.vision_config.intermediate_size = [37] * 4
    target = tiny_config()
    target.vision_config.num_attention_heads = [2, 2]
    target.vision_config.intermediate_size = [10, 10]
    table = _table(source, per_unit=lambda g: float(g.layer + 1), fixed=lambda g: 0.5 * (g.layer + 1))
    path = task_path("retrieval", target, "k=2,image_tokens=197")
    moved = transfer_table(table, source, target, path, "source")
    assert moved["per_unit"]["vision.head.1"] == pytest.approx(3.0 * 4 / 2)  # source layer 2, 4 heads → 2
    assert moved["per_unit"]["vision.ffn.0"] == pytest.approx(1.0 * 37 / 10)
    assert moved["fixed"]["vision.head.1"] == pytest.approx(1.5)
    assert moved["cost_path"]["vision"][0][1] == 197 and "source" in moved["priced_at"]
    check_latency_table(moved, target)
    no_cross = tiny_config()
    no_cross.fusion_encoder_config.num_cross_attention_heads = [0] * no_cross.fusion_encoder_config.num_hidden_layers
    with pytest.raises(ValueError, match="cannot price fusion.cross_head.0 at src"):
        transfer_table(_table(no_cross), no_cross, tiny_config(), path, "src")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("fixed"), r"missing field\(s\) \['fixed'\]"),
        (lambda t: t.update(version=7), "version 7 is not supported"),
        (lambda t: t["per_unit"].pop("vision.head.0"), r"missing \['vision.head.0'\]"),
        (lambda t: t["fixed"].update({"vision.head.9": 1.0}), r"unexpected \['vision.head.9'\]"),
        (lambda t: t["per_unit"].update({"text.ffn.0": -1.0}), r"per_unit\['text.ffn.0'\] must be a finite"),
        (lambda t: t["fixed"].update({"text.ffn.0": float("nan")}), r"fixed\['text.ffn.0'\] must be a finite"),
        (lambda t: t.update(cost_path={"vision": [[1, 2]]}), "field 'cost_path'"),
        (lambda t: t.update(per_unit={k: 0.0 for k in t["per_unit"]}), "every per_unit latency is 0"),
    ],
)
def test_bad_tables_name_the_field(edit, message):
    config = tiny_config()
    table = _table(config)
    edit(table)
    with pytest.raises(ValueError, match=message):
        check_latency_table(table, config, "t.json")


def test_unreadable_table_files_name_the_file(tmp_path):
    config = tiny_config()
    with pytest.raises(FileNotFoundError, match="no latency table at"):
        load_latency_table(str(tmp_path / "missing.json"), config)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not a JSON latency table"):
        load_latency_table(str(bad), config)


def test_expected_latency_counts_units_and_the_fixed_part_of_running_sub_layers():
    """With 1 s per unit and 10 s per sub-layer: the expected latency is Σ P(unit)·1 + Σ P(sub-layer runs)·10, where
    a sub-layer runs while its gate is on and any unit is left; the deterministic structure pays 10 s only for the
    sub-layers it keeps."""
    config = tiny_config()
    l0 = ModalL0Module(config, target_sparsity=0.3, budget="latency", latency_table=_table(config), layer_gates=True)
    groups = l0.groups
    total = sum(g.size * 1.0 + 10.0 for g in groups)
    assert l0.cost_total == pytest.approx(total)
    with torch.no_grad():
        for gate in l0.gates.values():
            gate.log_alpha.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(0))
    expected = 0.0
    for g in groups:
        unit = l0.gate(g).keep_probability().detach()
        layer = float(l0.layer_gate(g).keep_probability().detach())
        expected += float((unit * layer).sum()) + 10.0 * layer * float(1 - torch.prod(1 - unit))
    assert float(l0.expected_cost()["total"].detach()) == pytest.approx(expected, rel=1e-5)
    masks = l0._gate_values(lambda gate, multiple=1: gate.deterministic().detach())
    kept = sum(float(masks[g.name].sum()) + 10.0 * float(masks[g.name].max()) for g in groups)
    assert float(l0.achieved_sparsity()["budget"]["total"]) == pytest.approx(1 - kept / total)
    # the fixed seconds pull the sub-layer gates: their gradient is far larger than without fixed costs
    loss, logs = l0.lagrangian(step=0)
    assert "expected_latency_sparsity_total" in logs


def test_snap_meets_a_latency_target_and_settings_round_trip(tmp_path):
    config = tiny_config()
    table = _table(config, per_unit=lambda g: 3.0 if g.modality == "fusion" else 0.5, fixed=lambda g: 2.0)
    l0 = ModalL0Module(config, target_sparsity=0.35, budget="latency", latency_table=table, layer_gates=True)
    with torch.no_grad():
        for gate in l0.gates.values():
            gate.log_alpha.normal_(-1.5, 1.0, generator=torch.Generator().manual_seed(1))
    l0.snap_to_target_()
    assert float(l0.achieved_sparsity()["budget"]["total"]) == pytest.approx(0.35, abs=0.03)
    file = str(tmp_path / "gates.safetensors")
    l0.save(file)
    loaded = ModalL0Module.from_file(file, config)
    assert loaded.budget == "latency" and loaded.latency_table == table and loaded.cost_path == table["cost_path"]
    assert float(loaded.achieved_sparsity()["budget"]["total"]) == pytest.approx(0.35, abs=0.03)


def test_latency_budget_argument_errors():
    from efficientvlm.training import PruningArguments

    config = tiny_config()
    with pytest.raises(ValueError, match="latency_table .* is required by budget='latency'"):
        ModalL0Module(config, budget="latency")
    with pytest.raises(ValueError, match="and only by it"):
        ModalL0Module(config, budget="flops", cost_path=_table(config)["cost_path"], latency_table=_table(config))
    with pytest.raises(ValueError, match="hidden_gates need a width-linear cost model"):
        ModalL0Module(config, budget="latency", latency_table=_table(config), hidden_gates=True)
    from efficientvlm.training.method.trainers import make_gated_model
    from modeling_efficientvlm import EfficientVLMForImageTextRetrieval

    with pytest.raises(ValueError, match="--latency_table is the cost table of a latency budget"):
        make_gated_model(EfficientVLMForImageTextRetrieval(config), PruningArguments(output_dir="x",
                                                                                    latency_table="t.json"),
                  get_task("retrieval"))
    with pytest.raises(ValueError, match="budget must be 'params', 'flops' or 'latency'"):
        PruningArguments(output_dir="x", budget="seconds")


def test_latency_budget_without_a_table_measures_one_on_the_training_device(tmp_path):
    from efficientvlm.training import PruningArguments
    from efficientvlm.training.method.trainers import make_gated_model
    from modeling_efficientvlm import EfficientVLMForImageTextRetrieval
    from tests.conftest import training_args

    student = EfficientVLMForImageTextRetrieval(tiny_config())
    args = training_args(PruningArguments, tmp_path, budget="latency", budget_path="images=4,texts=4,k=2,text_length=7")
    gated = make_gated_model(student, args, get_task("retrieval"))
    saved = load_latency_table(str(tmp_path / "latency_table.json"), student.config)
    assert gated.l0.budget == "latency" and gated.l0.latency_table == saved
    assert saved["cost_path"]["fusion"] == [[(4 + 4) * 2, 7, 7, 17]] and saved["device"].startswith("cpu")


def test_short_latency_run_meets_its_budget(tmp_path):
    """A 40-step pruning run with a latency budget (a table file as `efficientvlm latency-table` writes it: fusion
    units dear, every sub-layer with a fixed part) and sub-layer gates: the frozen structure removes the target share
    of the table's seconds within 0.03, which is what the table predicts for the materialized model."""
    from efficientvlm.training import EfficientVLMPruningTrainer, PruningArguments, init_student_from_teacher
    from efficientvlm.training.method.materialize import materialize
    from efficientvlm.training.method.trainers import make_gated_model
    from modeling_efficientvlm import EfficientVLMForImageTextRetrieval
    from tests.conftest import training_args, tiny_batches, stack_batch, tiny_teacher

    teacher = tiny_teacher()
    student = EfficientVLMForImageTextRetrieval(init_student_from_teacher(teacher).config)
    student.load_state_dict(init_student_from_teacher(teacher).state_dict(), strict=False)
    table = _table(student.config, per_unit=lambda g: (3e-4 if g.modality == "fusion" else 1e-4) / (g.size / 4),
                   fixed=lambda g: 5e-5)
    save_latency_table(table, str(tmp_path / "table.json"))
    args = training_args(PruningArguments, tmp_path / "run", max_steps=40, target_sparsity=0.4, reg_learning_rate=0.1,
                 sparsity_warmup_steps=10, freeze_masks_step=30, learning_rate=5e-4, budget="latency",
                 latency_table=str(tmp_path / "table.json"), layer_gates=True)
    gated = make_gated_model(student, args, get_task("retrieval"))
    trainer = EfficientVLMPruningTrainer(model=gated, args=args, train_dataset=tiny_batches(10),
                                         data_collator=stack_batch,
                                         teacher_model=teacher, task=get_task("retrieval"))
    trainer.train()
    assert bool(gated.l0.frozen)
    achieved = float(gated.l0.achieved_sparsity()["budget"]["total"])
    assert achieved == pytest.approx(0.4, abs=0.03)
    pruned = materialize(student.eval(), gated.l0.deterministic_masks())
    kept = predicted_latency(table, pruned.config)["total"] / predicted_latency(table, student.config)["total"]
    assert 1 - kept == pytest.approx(achieved, abs=1e-6)
