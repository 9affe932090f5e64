"""Training-core defects that bent the method: tempered ITM negatives, a mask freeze that freezes, one layer map,
the official task-KD defaults, and a training/ tree without import cycles."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_efficientvlm import EfficientVLMForImageTextRetrieval, EfficientVLMForPreTraining
from tests.conftest import tiny_config
from tests.conftest import training_args, tiny_batches, stack_batch, tiny_teacher
from efficientvlm.training.method import losses as L
from efficientvlm.training.method.arguments import DistillationArguments, PruningArguments, default_sparsity_warmup
from efficientvlm.training.method.distillation import layer_maps
from efficientvlm.training.method.l0 import GATES_FILE, ModalL0Module
from efficientvlm.training.method.student import LAYER_MAP_FILE, init_student_from_teacher, load_layer_map
from efficientvlm.training.method.trainers import EfficientVLMDistillationTrainer, EfficientVLMPruningTrainer, make_gated_model
from efficientvlm.training.tasks import get_task
from efficientvlm.training.tasks.retrieval import retrieval_losses

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ 1. tempered negatives
def test_itm_negatives_are_drawn_from_similarity_over_temperature(tmp_path, monkeypatch):
    """The sampler sees exactly sim / τ (τ = the student's clamped temperature), not the raw cosines."""
    student = tiny_teacher().eval()
    with torch.no_grad():
        student.temp.fill_(0.05)
    seen = []
    original = L.sample_itm_negatives

    def spy(sim_i2t, *args, **kwargs):
        seen.append(sim_i2t.clone())
        return original(sim_i2t, *args, **kwargs)

    monkeypatch.setattr(L, "sample_itm_negatives", spy)
    batch = stack_batch(tiny_batches(1)[:4])
    retrieval_losses(student, None, batch, training_args(DistillationArguments, tmp_path), None,
                     generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        image = student.image_itc_embeds(student.encode_image(batch["pixel_values"]).last_hidden_state)
        text = student.text_itc_embeds(student.encode_text(batch["input_ids"],
                                                           batch["attention_mask"]).last_hidden_state)
    expected = image @ text.t() / 0.05
    assert len(seen) == 1 and not seen[0].requires_grad
    torch.testing.assert_close(seen[0], expected, rtol=1e-5, atol=1e-5)
    assert seen[0].abs().max() > 1.5  # cosines alone never leave [-1, 1]


def test_hardest_negative_is_drawn_at_its_softmax_probability():
    """On a constructed batch of 32, the hardest negative of image 0 is drawn ~ softmax(sim / τ) of its row."""
    batch, tau = 32, 0.07
    sim = torch.full((batch, batch), 0.1)
    sim.fill_diagonal_(0.9)
    sim[0, 1] = 0.6  # the hardest negative of image 0
    logits = sim / tau
    negatives = logits[0].clone()
    negatives[0] = float("-inf")
    p_hard = float(negatives.softmax(0)[1])  # ≈ 0.95 with τ; ≈ 0.04 on the raw cosines
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([L.sample_itm_negatives(logits, generator=g)[0][0] for _ in range(2000)])
    freq = float((draws == 1).float().mean())
    assert freq == pytest.approx(p_hard, abs=4 * math.sqrt(p_hard * (1 - p_hard) / 2000))
    assert p_hard > 0.9
    raw = torch.stack([L.sample_itm_negatives(sim, generator=g)[0][0] for _ in range(500)])
    assert float((raw == 1).float().mean()) < 0.2  # the old, untempered draw: nearly uniform


# ------------------------------------------------------------------------------------------ 2. a freeze that freezes
def _pruning_run(out, freeze: int | None, resume: str | None = None, steps: int = 6):
    teacher = tiny_teacher()
    student = EfficientVLMForImageTextRetrieval(init_student_from_teacher(teacher).config)
    student.load_state_dict(init_student_from_teacher(teacher).state_dict(), strict=False)
    args = training_args(PruningArguments, out, max_steps=steps, target_sparsity=0.5, reg_learning_rate=0.5,
                 sparsity_warmup_steps=0, freeze_masks_step=freeze, save_strategy="steps", save_steps=1)
    gated = make_gated_model(student, args, get_task("retrieval"))
    trainer = EfficientVLMPruningTrainer(model=gated, args=args, train_dataset=tiny_batches(steps),
                                         data_collator=stack_batch,
                                         teacher_model=teacher, task=get_task("retrieval"))
    trainer.train(resume_from_checkpoint=resume)
    return gated, trainer


def test_after_the_freeze_masks_log_alpha_and_lambdas_stay_fixed(tmp_path):
    gated, trainer = _pruning_run(tmp_path, freeze=2)
    states = {step: load_file(tmp_path / f"checkpoint-{step}" / GATES_FILE) for step in range(1, 7)}
    assert not bool(states[1]["frozen"]) and all(bool(states[s]["frozen"]) for s in range(2, 7))
    for step in range(3, 7):
        for key, value in states[2].items():
            assert torch.equal(states[step][key], value), f"{key} moved at step {step}"
    masks = [ModalL0Module.from_file(str(tmp_path / f"checkpoint-{s}" / GATES_FILE), gated.student.config)
             .deterministic_masks() for s in range(2, 7)]
    for later in masks[1:]:
        for modality in ("vision", "text", "fusion"):
            for kind in ("head", "ffn"):
                for a, b in zip(getattr(getattr(masks[0], modality), kind), getattr(getattr(later, modality), kind)):
                    assert a is b is None or torch.equal(a, b)
    # before the freeze the gates did move (the test would be empty otherwise); weights still train after it
    assert any(not torch.equal(states[1][k], states[2][k]) for k in states[1] if k.startswith("gates."))
    after = [e for e in trainer.state.log_history if e.get("masks_frozen")]
    assert after and all("loss_lagrangian" not in e for e in after)
    w3 = load_file(tmp_path / "checkpoint-3" / "model.safetensors")
    w6 = load_file(tmp_path / "checkpoint-6" / "model.safetensors")
    assert any(not torch.equal(w3[k], w6[k]) for k in w3)


def test_resume_across_the_freeze_point_is_exact(tmp_path):
    straight, _ = _pruning_run(tmp_path / "a", freeze=3)
    resumed, _ = _pruning_run(tmp_path / "b", freeze=3, resume=str(tmp_path / "a" / "checkpoint-2"))
    a, b = straight.state_dict(), resumed.state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


# ---------------------------------------------------------------------------------------------------- 3. one layer map
def _deep_teacher(vision_layers: int = 4):
    torch.manual_seed(0)
    config = tiny_config(vision=dict(num_hidden_layers=vision_layers), text=dict(num_hidden_layers=3),
                         fusion=dict(num_hidden_layers=3))
    return EfficientVLMForPreTraining._from_config(config, attn_implementation="sdpa")


def test_the_initialisation_map_is_the_kd_map_and_is_saved(tmp_path, monkeypatch):
    """A non-default map (vision 4 → 2 from layers 0 and 3; text / fusion 3 → 2, not a divisor) drives init, every
    KD term, and travels beside the student."""
    teacher = _deep_teacher()
    chosen = {"vision": [0, 3], "text": [0, 2], "fusion": [1, 2]}
    student = init_student_from_teacher(teacher, layer_map=chosen)
    assert torch.equal(student.vision_model.layers[1].mlp.fc1.weight, teacher.vision_model.layers[3].mlp.fc1.weight)
    assert torch.equal(student.fusion_model.layers[0].mlp.fc1.weight, teacher.fusion_model.layers[1].mlp.fc1.weight)
    used = []
    original = L.attention_kd_loss

    def spy(s, t, layer_map, *args, **kwargs):
        used.append(list(layer_map))
        return original(s, t, layer_map, *args, **kwargs)

    monkeypatch.setattr(L, "attention_kd_loss", spy)
    args = training_args(DistillationArguments, tmp_path, max_steps=2)
    trainer = EfficientVLMDistillationTrainer(model=student, args=args, train_dataset=tiny_batches(2),
                                              data_collator=stack_batch, teacher_model=teacher, layer_map=chosen,
                                              task=get_task("retrieval"))
    assert trainer.maps["vision"]["attn"] == [(0, 0), (1, 3)]
    assert trainer.maps["text"]["hidden"] == [(0, 0), (1, 1), (2, 3)]
    trainer.train()
    assert [(0, 0), (1, 3)] in used and [(0, 1), (1, 2)] in used  # vision and fusion pairs reached the loss
    trainer.save_model(str(tmp_path / "student"))
    assert load_layer_map(str(tmp_path / "student")) == chosen


def test_default_map_covers_any_depth():
    teacher = _deep_teacher(vision_layers=6)
    student = init_student_from_teacher(teacher, {"vision": 4, "text": 2, "fusion": 2})
    maps = layer_maps(student.config, teacher.config)
    assert maps["vision"]["attn"] == [(0, 1), (1, 2), (2, 4), (3, 5)]  # ceil((i+1)·6/4) − 1
    assert maps["text"]["attn"] == [(0, 1), (1, 2)]
    # the student's layers are those teacher layers
    for i, t in maps["vision"]["attn"]:
        assert torch.equal(student.vision_model.layers[i].mlp.fc1.weight, teacher.vision_model.layers[t].mlp.fc1.weight)
    with pytest.raises(ValueError, match=r"layer_map\['vision'\] points outside the teacher"):
        layer_maps(student.config, teacher.config, {"vision": [0, 1, 2, 9]})


def test_prune_stage_reads_the_students_map(tmp_path, monkeypatch):
    from efficientvlm.training.commands import stages

    (tmp_path / "student").mkdir()
    chosen = {"vision": [0, 3], "text": [0, 2], "fusion": [1, 2]}
    (tmp_path / "student" / LAYER_MAP_FILE).write_text(json.dumps(chosen))
    captured = {}

    def fake_train(trainer_cls, model, teacher, processor, data, args, seed_offset, eval_data, layer_map=None):
        captured["layer_map"] = layer_map
        return model, {}

    monkeypatch.setattr(stages, "_train_and_evaluate", fake_train)
    monkeypatch.setattr(stages, "load_task_model", lambda path, task: EfficientVLMForImageTextRetrieval(tiny_config()))
    monkeypatch.setattr(stages, "load_processor", lambda data, path=None: None)
    args = training_args(PruningArguments, tmp_path / "out")
    run_prune = stages.run_prune.__wrapped__  # the stage body, without output-dir ownership (nothing is saved)
    run_prune(stages.PruneModelsArguments(student=str(tmp_path / "student"), teacher=str(tmp_path / "student")),
              stages.DataArguments(), args)
    assert captured["layer_map"] == chosen


# ----------------------------------------------------------------------------------------- 4. official task defaults
@pytest.mark.parametrize("task, lam, reg", [("retrieval", 0.5, 0.01), ("nlvr2", 0.8, 0.1)])
def test_unset_task_kd_settings_take_the_official_values(tmp_path, task, lam, reg):
    teacher = tiny_teacher()
    model_cls = get_task(task).model_class
    student = model_cls(init_student_from_teacher(teacher).config)
    args = training_args(PruningArguments, tmp_path)
    assert args.lambda_vlp is None and args.reg_learning_rate is None and args.cross_attention_kd is None
    EfficientVLMPruningTrainer(model=make_gated_model(student, args, get_task(task)), args=args,
                               train_dataset=tiny_batches(1), data_collator=stack_batch,
                               teacher_model=model_cls(teacher.config), task=get_task(task))
    assert (args.lambda_vlp, args.reg_learning_rate, args.cross_attention_kd) == (lam, reg, True)
    explicit = training_args(PruningArguments, tmp_path, lambda_vlp=0.3, reg_learning_rate=0.02,
                             cross_attention_kd=False)
    EfficientVLMPruningTrainer(model=make_gated_model(student, explicit, get_task(task)), args=explicit,
                               train_dataset=tiny_batches(1), data_collator=stack_batch,
                               teacher_model=model_cls(teacher.config), task=get_task(task))
    assert (explicit.lambda_vlp, explicit.reg_learning_rate, explicit.cross_attention_kd) == (0.3, 0.02, False)


def test_sparsity_warmup_defaults_to_one_epoch(tmp_path):
    assert default_sparsity_warmup(10, 100) == 10  # one epoch of ten
    assert default_sparsity_warmup(None, 400) == 40 and default_sparsity_warmup(300, 400) == 40  # stream / short
    teacher = tiny_teacher()
    student = EfficientVLMForImageTextRetrieval(init_student_from_teacher(teacher).config)
    args = training_args(PruningArguments, tmp_path, max_steps=8)  # 2 batches per epoch, 4 epochs
    gated = make_gated_model(student, args, get_task("retrieval"))
    trainer = EfficientVLMPruningTrainer(model=gated, args=args, train_dataset=tiny_batches(2),
                                         data_collator=stack_batch,
                                         teacher_model=teacher, task=get_task("retrieval"))
    trainer.train()
    assert args.sparsity_warmup_steps == 2 and gated.l0.warmup_steps == 2
    targets = [e["target_global"] for e in trainer.state.log_history if "target_global" in e]
    assert targets[0] == pytest.approx(0.0) and targets[-1] == pytest.approx(0.25)


def test_task_kd_distils_cross_attention_when_on(tmp_path):
    teacher = tiny_teacher().eval()
    student = init_student_from_teacher(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch = stack_batch(tiny_batches(1)[:4])
    maps = layer_maps(student.config, teacher.config)
    parts = {}
    for cross in (False, True):
        args = training_args(DistillationArguments, tmp_path, cross_attention_kd=cross)
        _, parts[cross] = retrieval_losses(student, teacher, batch, args, maps,
                                           generator=torch.Generator().manual_seed(0))
    # attention KD averages encoder terms: with cross on there is one more (fusion cross-attention) term
    assert float(parts[True]["attn"].detach()) != pytest.approx(float(parts[False]["attn"].detach()), rel=1e-6)
    torch.testing.assert_close(parts[True]["hidden"], parts[False]["hidden"])


def test_help_names_the_task_defaults():
    from efficientvlm.training.commands.cli import main

    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(out.getvalue().split())
    assert "retrieval 0.5, nlvr2 0.8" in text and "retrieval 0.01, nlvr2 0.1" in text and "one epoch" in text


# ------------------------------------------------------------------------------------------------------- 5. layout
def _imports(path: Path, package_root: Path) -> set[str]:
    """Modules of the `training` package that `path` imports (relative imports resolved, function-level too)."""
    module = ".".join(path.relative_to(package_root.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    if path.name == "__init__.py":
        module = package
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            target = target.removeprefix("efficientvlm.")
            if target.split(".")[0] == "training":
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(n for a in node.names if (n := a.name.removeprefix("efficientvlm.")).split(".")[0] == "training")
    return found


def test_training_has_no_import_cycle_and_modeling_never_imports_it():
    root = ROOT / "training"
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for p in root.rglob("*.py") if "assets" not in p.parts}  # assets: shipped Hub folders (remote code)
    graph = {name: {t for t in _imports(path, root) if t in modules and t != name} for name, path in modules.items()}
    # a package's own __init__ importing its submodules is not a cycle of roles: drop edges into ancestors' __init__
    graph = {n: {t for t in targets if not n.startswith(t + ".")} for n, targets in graph.items()}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack + [node, nxt])}")
            if not state.get(nxt):
                visit(nxt, stack + [node])
        state[node] = 2

    for name in graph:
        if not state.get(name):
            visit(name, [])
    for path in (ROOT / "modeling_efficientvlm").glob("*.py"):
        assert "training" not in {n.split(".")[0] for n in _imports(path, ROOT / "modeling_efficientvlm")}
        text = path.read_text()
        assert "efficientvlm.training" not in text and "import training" not in text and "from training" not in text


def test_method_layer_never_imports_tasks_or_commands(tmp_path):
    """Layers only look down: training/method (losses, gates, cost model, trainers) imports no module of
    training/tasks or training/commands, at module level or inside a function, nor the package root (whose lazy
    exports lead there); the commands resolve `--task` and pass the `Task` on. The no-cycle test above still holds."""
    root = ROOT / "training"

    def upward(path: Path, package_root: Path) -> list[str]:
        return sorted(t for t in _imports(path, package_root)
                      if t == "training" or t.split(".")[1] in ("tasks", "commands"))

    method = sorted((root / "method").rglob("*.py"))
    assert len(method) > 5
    for path in method:
        assert not upward(path, root), (str(path.relative_to(ROOT)), upward(path, root))
        text = path.read_text()  # a dynamic import would hide the edge from the walk
        assert "import_module" not in text and "__import__" not in text, path.relative_to(ROOT)
    # the walk sees function-level imports: a lazy `from ..tasks import get_task` in method/ is an edge
    probe = tmp_path / "training" / "method" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("def f():\n    from ..tasks import get_task\n    from ..commands.cli import main\n")
    assert upward(probe, tmp_path / "training") == ["training.commands.cli", "training.commands.cli.main",
                                                    "training.tasks", "training.tasks.get_task"]


def test_a_task_is_one_module_and_one_registry_line():
    from efficientvlm.training.tasks import TASKS

    assert set(TASKS) == {"retrieval", "nlvr2", "nlvr2_domain", "captioning", "captioning_domain", "vqa"}
    for name in TASKS:
        assert (ROOT / "training" / "tasks" / f"{name}.py").is_file()
    # nothing outside tasks/ dispatches on a task's name or on tensor shapes
    for path in (ROOT / "training").rglob("*.py"):
        if "tasks" in path.parts or "assets" in path.parts:
            continue
        text = path.read_text()
        for dispatch in ('== "nlvr2"', '!= "nlvr2"', "== 'nlvr2'", '"nlvr2" if', "dim() == 5", '== "captioning"',
                         '!= "captioning"', "== 'captioning'"):
            assert dispatch not in text, (path, dispatch)


# each role imports only the roles below it; data, infra and metrics are the floor and import none of the others
ROLE_LEVEL = {"commands": 3, "tasks": 2, "method": 1, "data": 0, "infra": 0, "metrics": 0}


def test_every_role_only_looks_down():
    root = ROOT / "training"
    upward = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if len(parts) < 2 or parts[0] not in ROLE_LEVEL:
            continue  # the package root (lazy exports), assets/ (shipped Hub folders), examples/ (user scripts)
        role = parts[0]
        for target in _imports(path, root):
            other = target.split(".")[1] if "." in target else "training"
            if other == "training" or (other in ROLE_LEVEL and other != role
                                       and ROLE_LEVEL[other] >= ROLE_LEVEL[role]):
                upward.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not upward, upward
