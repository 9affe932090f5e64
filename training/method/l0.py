"""Modal-adaptive L0 pruning: hard-concrete gates on heads and FFN neurons of all three encoders + a Lagrangian.

One global (λ1, λ2) pair holds the *expected total* sparsity at the target, so how much each modality loses is
learned (modal-adaptive). Per-modality targets (each with its own multipliers) and TinyCLIP's one-sided form are
options.

Sparsity ŝ = 1 − expected prunable parameters / prunable parameters, where a unit's expected contribution is
P(z > 0)·params(unit) (see `training.structure`).
"""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from modeling_efficientvlm import EncoderPruningMasks, PruningMasks

from ..infra.runs import GATES_FILE  # noqa: F401  (re-exported: the gates file of a pruning run)
from .cost import path_from_json, path_to_json, unit_flops, width_terms
from .gates import HardConcreteGate
from .latency_table import check_latency_table
from .materialize import pruned_config
from .structure import (
    ENCODER_CONFIG_KEYS, STREAMS, UnitGroup, count_parameters, modalities, unit_groups, unit_kinds,
    unit_parameter_count,
)

"""Gates + multipliers of a pruning run, saved beside the student (checkpoints and the final folder)."""
SETTINGS_KEY = "efficientvlm_l0"
"""Metadata key of a gate file that holds the module's settings (JSON)."""
SETTINGS_TYPES: dict[str, type | tuple[type, ...]] = {
    "target_sparsity": (int, float), "modality_targets": dict, "one_sided": bool, "warmup_steps": int,
    "budget": str, "cost_path": dict, "layer_gates": bool, "hidden_gates": bool, "latency_table": dict,
    "head_init_log_alpha": (int, float),
}
"""The settings `save` writes (the keyword arguments of `ModalL0Module`) and their JSON types."""
BUDGETS = ("params", "flops", "latency")
"""What a sparsity target is a fraction of (`ModalL0Module(budget=...)`, `prune --budget`)."""
HIDDEN_MULTIPLE = 8
"""Deterministic hidden masks keep a multiple of 8 channels: a ragged residual width (e.g. 763) would cost every
matmul of the stream a remainder tile; heads / FFN widths stay exact (they measured no such penalty, see bench)."""
HEAD_INIT_LOG_ALPHA = 10.0  # heads start (almost surely) kept: the paper's init
FFN_DROP_RATE = 0.5  # FFN neurons: log α = log(1 − p) − log p = 0


class ModalL0Module(nn.Module):
    """Gates for every prunable group of an EfficientVLM config, plus the Lagrange multipliers.

    The groups are those of `modalities(config)`: the three encoders and, for a VQA config, the answer decoder (its
    self-attention heads, cross-attention heads and FFN neurons), which is a modality of its own in the size model.

    Args:
        config: the (student) EfficientVLMConfig whose per-layer sizes define the gates.
        target_sparsity: global target in [0, 1) (ignored for modalities with their own target).
        modality_targets: optional {"vision": t_v, "text": t_t, "fusion": t_f}: each listed modality is held to its
            own target by its own multipliers; unlisted ones follow the global target (if any remain).
        one_sided: use λ1·max(t − ŝ, 0) + λ2·max(t − ŝ, 0)² (never pushes sparsity above the target).
        warmup_steps: the target ramps linearly from 0 over this many optimizer steps, then stays.
        budget: what the targets are fractions of: "params" (the paper: prunable parameters), "flops" (the cost of
            the task's inference path `cost_path`) or "latency" (seconds on that path by a measured `latency_table`);
            sparsity ŝ = 1 − Σ P(z>0)·w(unit) / Σ w(unit) with w the unit's parameters, its FLOPs on that path or its
            measured seconds (+ each sub-layer's fixed seconds times P(the sub-layer runs)).
        cost_path: "flops" budget: the task's inference path, {modality: [[count, tokens, self_keys, cross_keys],
            ...]} (`training.method.cost.Run`s as lists, so it is saved with the gates).
        latency_table: "latency" budget: a table of `training.method.latency_table.measure_latency_table` (its own
            `cost_path` is the path it was measured on); saved with the gates.
        layer_gates: CoFi's sub-layer gates: one more hard-concrete gate per attention / cross-attention / FFN
            sub-layer multiplies all of its unit masks, so a whole sub-layer can go (an all-zero mask makes it an exact
            identity); its expected cost is P(sub-layer kept)·Σ P(unit kept)·w(unit).
        hidden_gates: CoFi's hidden-dimension gates: one gate per residual channel of the vision stream and of the
            text stream (text + fusion encoders), `PruningMasks.vision.hidden` / `.text.hidden`; a unit's weight is then
            linear in the expected kept widths, c0 + c_d·E[d] + c_kv·E[kv] (`cost.width_terms`), as in CoFi.
            Retrieval / NLVR2 models only (the VQA decoder's stream is not gated); not with a latency budget (a
            measured table has no width terms).
        head_init_log_alpha: initial log α of the attention / cross-attention head gates (the paper: 10, i.e.
            clamped to log 100 ≈ 4.6 after the first step, P(z>0) = 0.998; FFN neurons start at 0, P(z>0) = 0.83).
            In short runs heads that start at 10 never reach the cut and only FFN neurons are pruned; 0 starts them
            where the FFN neurons start (CoFi's own code starts every mask from one drop rate), so the budget's
            prices — not the init — decide between heads and neurons. Sub-layer and hidden gates start at 10.
    """

    def __init__(
        self,
        config,
        target_sparsity: float = 0.25,
        modality_targets: dict[str, float] | None = None,
        one_sided: bool = False,
        warmup_steps: int = 0,
        budget: str = "params",
        cost_path: dict[str, list] | None = None,
        layer_gates: bool = False,
        hidden_gates: bool = False,
        latency_table: dict | None = None,
        head_init_log_alpha: float = HEAD_INIT_LOG_ALPHA,
    ):
        super().__init__()
        _check_target("target_sparsity", target_sparsity)
        if not math.isfinite(head_init_log_alpha):
            raise ValueError(f"head_init_log_alpha must be a finite number, got {head_init_log_alpha}")
        if budget not in BUDGETS:
            raise ValueError(f"budget must be one of {list(BUDGETS)}, got {budget!r}")
        if (budget == "flops") != (cost_path is not None):
            raise ValueError("a cost_path (the task's inference path) is required by budget='flops' and only by it")
        if (budget == "latency") != (latency_table is not None):
            raise ValueError("a latency_table (measured per-unit seconds) is required by budget='latency' and only by "
                             "it")
        if latency_table is not None:
            check_latency_table(latency_table, config, "latency_table")
            if hidden_gates:
                raise ValueError("hidden_gates need a width-linear cost model (params or flops budget); a measured "
                                 "latency table has none: prune with --budget flops or without --hidden_gates")
            cost_path = latency_table["cost_path"]
        modality_targets = dict(modality_targets or {})
        for modality, target in modality_targets.items():
            if modality not in modalities(config):
                raise ValueError(
                    f"modality_targets has unknown encoder {modality!r}; allowed: {list(modalities(config))}"
                )
            _check_target(f"modality_targets[{modality!r}]", target)
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.groups = [g for g in unit_groups(config) if g.size > 0]
        self.gates = nn.ModuleDict()
        for group in self.groups:
            if group.kv_shared_with is not None:  # an NLVR2 pair's odd copy uses the even copy's cross-head gate
                continue
            init = head_init_log_alpha if group.kind != "ffn" else None
            drop = FFN_DROP_RATE if group.kind == "ffn" else None
            self.gates[group.name.replace(".", "_")] = HardConcreteGate((group.size,), init_mean=init, drop_rate=drop)
            if layer_gates:
                self.gates[_layer_key(group)] = HardConcreteGate((1,), init_mean=HEAD_INIT_LOG_ALPHA)
        if hidden_gates and "decoder" in modalities(config):
            raise ValueError("hidden_gates: the VQA answer decoder's residual stream has no hidden-dimension gates yet "
                             "(retrieval and NLVR2 models only); prune without --hidden_gates")
        if hidden_gates:
            for stream in sorted(set(STREAMS.values())):
                width = getattr(config, ENCODER_CONFIG_KEYS[stream]).hidden_size
                self.gates[_hidden_key(stream)] = HardConcreteGate((width,), init_mean=HEAD_INIT_LOG_ALPHA)
        self.layer_gates = layer_gates
        self.hidden_gates = hidden_gates
        self.head_init_log_alpha = float(head_init_log_alpha)
        self.target_sparsity = target_sparsity
        self.modality_targets = modality_targets
        self.one_sided = one_sided
        self.warmup_steps = warmup_steps
        # the config's prunable stacks: the three encoders, plus the VQA answer decoder when the config has one
        self.modalities = modalities(config)
        self.num_layers = {m: getattr(config, ENCODER_CONFIG_KEYS[m]).num_hidden_layers for m in self.modalities}
        self.prunable_total = sum(g.size * g.unit_params for g in self.groups)
        self.prunable_by_modality = {
            m: sum(g.size * g.unit_params for g in self.groups if g.modality == m) for m in self.modalities
        }
        self.budget = budget
        self.cost_path = None if cost_path is None else path_to_json(path_from_json(cost_path))
        self.latency_table = latency_table
        runs = None if budget != "flops" else path_from_json(cost_path)
        self.unit_costs = None
        if runs is not None:
            self.unit_costs = _checked_costs(
                {g.name: unit_flops(g, runs.get(g.modality, [])) for g in self.groups}, self.groups
            )
        elif latency_table is not None:
            self.unit_costs = _checked_costs(latency_table["per_unit"], self.groups)
        # latency: the seconds a sub-layer costs while any of its units is left (0 for parameters and FLOPs)
        self.fixed_costs = {g.name: float(latency_table["fixed"][g.name]) if latency_table else 0.0
                            for g in self.groups}
        # hidden gates: each unit's parameters / budget cost as c0 + c_d·d + c_kv·kv of the widths it reads
        self.param_terms = {g.name: width_terms(unit_parameter_count, g) for g in self.groups}
        self.cost_terms = self.param_terms if runs is None else {
            g.name: width_terms(lambda h, m=g.modality: unit_flops(h, runs.get(m, [])), g) for g in self.groups
        }
        full = {g.name: g.size * self._weight(g) + self.fixed_costs[g.name] for g in self.groups}
        self.cost_total = sum(full.values())
        self.cost_by_modality = {m: sum(full[g.name] for g in self.groups if g.modality == m) for m in self.modalities}
        # one (λ1, λ2) pair per constraint: "global" and/or each modality with its own target
        names = list(modality_targets)
        if set(self.modalities) - set(modality_targets):
            names.insert(0, "global")
        self.constraints = names
        self.lambdas = nn.ParameterDict({name: nn.Parameter(torch.zeros(2)) for name in names})
        self.register_buffer("frozen", torch.tensor(False))

    def _weight(self, group: UnitGroup) -> float:
        """What one unit of `group` weighs in the budget: its parameters, its FLOPs on the task path or its measured
        seconds there."""
        return group.unit_params if self.unit_costs is None else self.unit_costs[group.name]

    def gate(self, group: UnitGroup) -> HardConcreteGate:
        """The gate of `group` (the cross heads of an NLVR2 pair share one: they read the same K/V heads)."""
        return self.gates[group.gate_name.replace(".", "_")]

    def layer_gate(self, group: UnitGroup) -> HardConcreteGate | None:
        """The sub-layer gate of `group` (`layer_gates`; shared by an NLVR2 pair's cross-attention), else None."""
        return self.gates[_layer_key(group)] if self.layer_gates else None

    def _keep(self, group: UnitGroup) -> torch.Tensor:
        """P(unit kept) per unit of `group`, times P(sub-layer kept) with layer gates (differentiable)."""
        keep = self.gate(group).keep_probability()
        layer = self.layer_gate(group)
        return keep if layer is None else keep * layer.keep_probability()

    def _runs(self, group: UnitGroup) -> torch.Tensor:
        """P(the sub-layer of `group` runs) = P(sub-layer gate kept) · P(at least one unit kept) (differentiable):
        what its fixed latency is weighted by (a sub-layer without units is an identity)."""
        any_unit = 1 - torch.prod(1 - self.gate(group).keep_probability())
        layer = self.layer_gate(group)
        return any_unit if layer is None else any_unit * layer.keep_probability().squeeze()

    def _gate_values(self, draw) -> dict[str, torch.Tensor]:
        """`draw(gate)` once per gate (a shared gate gives both copies the same mask), unit × sub-layer value; hidden
        gates get `draw(gate, HIDDEN_MULTIPLE)` (their deterministic masks keep a multiple of 8 channels)."""
        values = {}
        for g in self.groups:
            if g.gate_name not in values:
                value = draw(self.gate(g))
                layer = self.layer_gate(g)
                values[g.gate_name] = value if layer is None else value * draw(layer)
        out = {g.name: values[g.gate_name] for g in self.groups}
        if self.hidden_gates:
            for stream in set(STREAMS.values()):
                out[_hidden_key(stream)] = draw(self.gates[_hidden_key(stream)], HIDDEN_MULTIPLE)
        return out

    # ---------------------------------------------------------------------------------------------------- masks
    def _masks(self, values: dict[str, torch.Tensor]) -> PruningMasks:
        masks = masks_from_values(self.groups, self.num_layers, values)
        for stream in set(STREAMS.values()) if self.hidden_gates else ():
            getattr(masks, stream).hidden = values[_hidden_key(stream)]
        return masks

    def sample_masks(self, generator: torch.Generator | None = None) -> PruningMasks:
        """One hard-concrete sample per gate (shared by the batch); differentiable w.r.t. log α."""
        if bool(self.frozen):
            return self.deterministic_masks()
        return self._masks(self._gate_values(lambda gate, multiple=1: gate.sample(generator)))

    def deterministic_masks(self) -> PruningMasks:
        """Exact 0/1 masks: per layer keep the round(Σ P(z>0)) gates with the highest scores."""
        return self._masks(self._gate_values(_deterministic))

    @torch.no_grad()
    def _kept_at_deterministic(self, budget: bool) -> dict[str, torch.Tensor]:
        """Kept parameters (or budget cost) per modality and "total" of the structure the deterministic masks keep."""
        values = self._gate_values(_deterministic)
        return self._expected(budget, keep=lambda g: values[g.name], width=lambda s: values[_hidden_key(s)].sum(),
                              runs=lambda g: values[g.name].amax())

    def achieved_sparsity(self) -> dict[str, dict[str, torch.Tensor]]:
        """Sparsity of the deterministic masks (what materialize keeps), in parameters and in the budget's unit:
        {"params": {"total", modality...}, "budget": {...}} (FLOPs of the cost path with budget="flops", the latency
        table's seconds with budget="latency")."""
        params, cost = self._kept_at_deterministic(budget=False), self._kept_at_deterministic(budget=True)
        return {"params": self._sparsity(params, self.prunable_total, self.prunable_by_modality),
                "budget": self._sparsity(cost, self.cost_total, self.cost_by_modality)}

    @torch.no_grad()
    def snap_to_target_(self) -> dict[str, float]:
        """Shifts the log α of each constraint's gates by one δ (bisection) so that the DETERMINISTIC masks remove
        the constraint's target share of its budget; returns {constraint: δ}.

        The Lagrangian holds the *expected* sparsity at the target only on average: in a short run its multipliers
        overshoot (Adam moves λ by ~lr per step whatever the gap), and the deterministic masks round per layer and
        drop sub-layers with P(kept) < 0.5. One common shift keeps the learned ranking of every gate (the split between
        encoders, layers and units) and only moves the cut to the target, so runs compared "at a budget" really are.
        Called once when the structure is frozen (`L0Callback`); the gates then stop training.
        """
        deltas = {}
        for name in self.constraints:
            members = [m for m in self.modalities if m not in self.modality_targets] if name == "global" else [name]
            groups = [g for g in self.groups if g.modality in members]
            gates = {id(self.gate(g)): self.gate(g) for g in groups}
            gates.update({id(self.layer_gate(g)): self.layer_gate(g) for g in groups if self.layer_gates})
            if self.hidden_gates:  # a stream's channels follow the constraint of its first encoder
                hidden = [self.gates[_hidden_key(s)] for s in set(STREAMS.values()) if s in members]
                gates.update({id(gate): gate for gate in hidden})
            gates = list(gates.values())
            originals = [gate.log_alpha.detach().clone() for gate in gates]
            target = self.target_sparsity if name == "global" else self.modality_targets[name]
            full = sum(self.cost_by_modality[m] for m in members)

            def sparsity_at(delta: float) -> float:
                for gate, original in zip(gates, originals):
                    gate.log_alpha.copy_(original + delta)
                cost = self._kept_at_deterministic(budget=True)
                return 1 - float(sum(cost[m] for m in members)) / full

            low, high = -40.0, 40.0  # sparsity falls as δ grows (every P(z>0) rises)
            for _ in range(40):
                mid = (low + high) / 2
                low, high = (mid, high) if sparsity_at(mid) > target else (low, mid)
            deltas[name] = min((low, high), key=lambda d: abs(sparsity_at(d) - target))
            sparsity_at(deltas[name])
        return deltas

    @torch.no_grad()
    def snap_uniform_(self) -> dict[str, int]:
        """The uniform baseline's structure: every layer of every encoder loses the same share of its prunable
        parameters (its encoder's target, else the global one); returns {group name: units removed}.

        Per layer, each attention sub-layer removes round(t · heads) heads and the FFN the neurons that bring the
        layer's removed parameters closest to t · its prunable parameters (heads are coarse, neurons fine), so the
        share per layer, and therefore in total, is t up to one neuron. Which units go is the gates' learned ranking
        (each group's log α shifted by its own δ until its deterministic mask keeps the count). Sub-layer and hidden
        gates are not part of this baseline.
        """
        if self.layer_gates or self.hidden_gates:
            raise ValueError("the uniform split snaps heads and FFN neurons only: no layer or hidden gates")
        layers: dict[tuple[str, int], list[UnitGroup]] = {}
        for g in self.groups:
            layers.setdefault((g.modality, g.layer), []).append(g)
        removed: dict[str, int] = {}
        for (modality, _), groups in layers.items():
            target = self.modality_targets.get(modality, self.target_sparsity)
            budget = target * sum(g.size * g.unit_params for g in groups)
            for g in sorted(groups, key=lambda g: g.kind == "ffn"):  # attention first: the FFN takes the rest
                count = round(target * g.size) if g.kind != "ffn" else round(budget / g.unit_params)
                removed[g.name] = min(max(count, 0), g.size)
                budget -= removed[g.name] * g.unit_params
        for g in self.groups:
            _keep_exactly(self.gate(g), g.size - removed[g.name])
        return removed

    def freeze(self) -> None:
        """Stops pruning: from now on forwards use the deterministic masks (training continues on the weights)."""
        self.frozen.fill_(True)

    # ------------------------------------------------------------------------------------------------ size model
    def _expected(self, budget: bool, keep=None, width=None, runs=None) -> dict[str, torch.Tensor]:
        """Σ keep(unit)·weight(unit) per modality and "total" (differentiable): keep = P(z>0) (default) or a 0/1
        mask; weight = parameters, or the budget's cost (`budget`); with hidden gates a unit's weight is
        c0 + c_d·E[d] + c_kv·E[kv] at the kept widths `width(stream)` (default Σ P(channel kept)). A latency budget
        adds each sub-layer's fixed seconds times `runs(group)` (default P(it runs), see `_runs`)."""
        keep = keep or self._keep
        runs = runs or self._runs
        width = width or (lambda stream: self.gates[_hidden_key(stream)].keep_probability().sum())
        widths = {s: width(s) for s in set(STREAMS.values())} if self.hidden_gates else {}
        out = {m: torch.zeros(()) for m in self.modalities}
        for group in self.groups:
            if self.hidden_gates:
                c0, c_d, c_kv = (self.cost_terms if budget else self.param_terms)[group.name]
                d = widths[STREAMS[group.modality]]
                kv = widths["vision"] if group.kind == "cross_head" else d
                weight = c0 + c_d * d + c_kv * kv
            else:
                weight = self._weight(group) if budget else group.unit_params
            kept = keep(group).sum() * weight
            if budget and self.fixed_costs[group.name]:
                kept = kept + runs(group) * self.fixed_costs[group.name]
            out[group.modality] = out[group.modality].to(kept.device) + kept
        out["total"] = sum(out[m] for m in self.modalities)
        return out

    def _sparsity(self, expected: dict[str, torch.Tensor], total: float, by_modality: dict) -> dict[str, torch.Tensor]:
        """1 − expected / full, overall ("total") and per modality (each against its own full amount)."""
        out = {"total": 1 - expected["total"] / total}
        for m in self.modalities:
            out[m] = 1 - expected[m] / by_modality[m] if by_modality[m] else torch.zeros(())
        return out

    def expected_parameters(self) -> dict[str, torch.Tensor]:
        """Expected kept prunable parameters Σ P(z>0)·params(unit), per modality and "total" (differentiable)."""
        return self._expected(budget=False)

    def expected_cost(self) -> dict[str, torch.Tensor]:
        """Expected kept budget Σ P(z>0)·w(unit) (parameters or FLOPs, see `budget`), per modality and "total"."""
        return self._expected(budget=True)

    def expected_budget_sparsity(self) -> dict[str, torch.Tensor]:
        """ŝ in the budget's unit (= `expected_sparsity` for the params budget), overall and per modality."""
        return self._sparsity(self.expected_cost(), self.cost_total, self.cost_by_modality)

    def expected_sparsity(self) -> dict[str, torch.Tensor]:
        """ŝ overall ("total") and per modality (each against its own prunable parameters)."""
        return self._sparsity(self.expected_parameters(), self.prunable_total, self.prunable_by_modality)

    def current_target(self, step: int) -> float:
        """Global target at optimizer step `step` (linear warm-up carried across epochs by the global step)."""
        return _ramp(self.target_sparsity, step, self.warmup_steps)

    def lagrangian(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Σ over constraints of λ1·(ŝ − t) + λ2·(ŝ − t)² (or the one-sided form). Minimised by the gates and
        maximised by the λs (their optimizer group has `maximize=True`)."""
        sparsity = self.expected_budget_sparsity()
        expected = self.expected_cost()
        loss = torch.zeros((), device=self.lambdas[self.constraints[0]].device)
        logs = {}
        for name in self.constraints:
            if name == "global":
                free = [m for m in self.modalities if m not in self.modality_targets]
                kept = sum(expected[m] for m in free)
                total = sum(self.cost_by_modality[m] for m in free)
                s_hat, target = 1 - kept / total, self.current_target(step)
            else:
                s_hat = sparsity[name]
                target = _ramp(self.modality_targets[name], step, self.warmup_steps)
            gap = (target - s_hat).clamp(min=0) if self.one_sided else s_hat - target
            lam = self.lambdas[name]
            loss = loss + lam[0] * gap + lam[1] * gap**2
            logs[f"target_{name}"] = target
            logs[f"lambda1_{name}"] = lam[0].item()
            logs[f"lambda2_{name}"] = lam[1].item()
        for key, value in self.expected_sparsity().items():
            logs[f"expected_sparsity_{key}"] = value.item()
        if self.hidden_gates:
            for stream in sorted(set(STREAMS.values())):
                gate = self.gates[_hidden_key(stream)]
                logs[f"expected_hidden_{stream}"] = gate.expected_l0().item() / gate.log_alpha.numel()
        if self.unit_costs is not None:
            for key, value in sparsity.items():
                logs[f"expected_{self.budget}_sparsity_{key}"] = value.item()
        return loss, logs

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamps every log α to [log 0.01, log 100] (after each optimizer step)."""
        for gate in self.gates.values():
            gate.clamp_()

    def gate_parameters(self) -> list[nn.Parameter]:
        return [gate.log_alpha for gate in self.gates.values()]

    def lambda_parameters(self) -> list[nn.Parameter]:
        return list(self.lambdas.values())

    # ---------------------------------------------------------------------------------------------- persistence
    def save(self, path: str) -> None:
        """Gates, multipliers and the frozen flag as safetensors; the constraint set goes into the metadata."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        settings = {"target_sparsity": self.target_sparsity, "modality_targets": self.modality_targets,
                    "one_sided": self.one_sided, "warmup_steps": self.warmup_steps, "budget": self.budget,
                    "layer_gates": self.layer_gates, "hidden_gates": self.hidden_gates,
                    "head_init_log_alpha": self.head_init_log_alpha}
        if self.latency_table is not None:
            settings["latency_table"] = self.latency_table
        elif self.cost_path is not None:
            settings["cost_path"] = self.cost_path
        save_file(state, path, metadata={"format": "pt", SETTINGS_KEY: json.dumps(settings)})

    @classmethod
    def from_file(cls, path: str, config) -> "ModalL0Module":
        """Rebuilds the module saved by `save` (or by an older trainer: the constraints are read off the keys).

        The file is untrusted: its settings, tensor names, shapes and values are checked before anything is loaded.

        Raises:
            FileNotFoundError / ValueError: naming the file when it is missing, malformed or does not fit `config`.
        """
        settings, state = read_gates_file(path)
        if not settings:  # no metadata: constraint names from the multiplier keys (targets only matter for training)
            names = {key.split(".", 1)[1] for key in state if key.startswith("lambdas.")}
            settings = {"modality_targets": {m: 0.0 for m in modalities(config) if m in names}}
        try:
            module = cls(config, **settings)
        except ValueError as error:
            raise ValueError(f"{path}: invalid gate settings (metadata {SETTINGS_KEY!r}): {error}") from error
        module.load_checked_state(state, path)
        return module

    def load_checked_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """`load_state_dict` for a state read from a file: names, shapes, dtypes and finiteness are checked first.

        Args:
            state: tensors as read from `source` (e.g. by `read_gates_file`).
            source: the file they came from, named in every error.

        Raises:
            ValueError: a missing / unexpected gate, a shape that differs from the config's, a non-float gate or
                multiplier, or a NaN / inf value (NaN log α would prune everything).
        """
        expected = self.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{source} does not match the model's config (gates per prunable group): missing {missing or 'none'}, "
                f"unexpected {unexpected or 'none'}"
            )
        groups = {f"gates.{g.name.replace('.', '_')}.log_alpha": g for g in self.groups if g.kv_shared_with is None}
        for key, want in expected.items():
            got = state[key]
            what = f"gate {groups[key].name} ({key})" if key in groups else key
            if tuple(got.shape) != tuple(want.shape):
                raise ValueError(
                    f"{source} does not match the model's config: {what} has shape {tuple(got.shape)} in the file but "
                    f"the config gives {tuple(want.shape)}"
                )
            if want.is_floating_point() and not got.is_floating_point():
                raise ValueError(f"{source}: {what} must be a floating-point tensor, got {got.dtype}")
            if got.is_floating_point() and not bool(torch.isfinite(got).all()):
                bad = int((~torch.isfinite(got)).sum())
                kind = "Lagrange multipliers" if key.startswith("lambdas.") else "values"
                raise ValueError(
                    f"{source}: {what} holds {bad} non-finite {kind} (NaN / inf) of {got.numel()}: the file is "
                    "corrupt or the run diverged"
                )
        self.load_state_dict(state)

    # ------------------------------------------------------------------------------------------------ reporting
    def predicted_parameters(self, config, heads: tuple[str, ...] = ("itm",)) -> int:
        """Exact parameter count of the model materialized with `deterministic_masks()` from `config`."""
        return count_parameters(pruned_config(config, self.deterministic_masks()), heads)["total"]


def read_gates_file(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Reads a gate file written by `ModalL0Module.save`: (settings from its metadata, tensors).

    Settings are checked for JSON syntax, known keys and value types; the tensors are checked against a config by
    `ModalL0Module.load_checked_state`. A file without settings (older trainers) gives ``{}``.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: naming `path`, when the file is not a safetensors file or its settings are malformed.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no L0 gate file at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get(SETTINGS_KEY, "{}")
            state = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors gate file: {error}") from error
    try:
        settings = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: gate settings (metadata {SETTINGS_KEY!r}) are not valid JSON: {error}") from error
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: gate settings (metadata {SETTINGS_KEY!r}) must be a JSON object, got {raw[:80]!r}")
    for key, value in settings.items():
        if key not in SETTINGS_TYPES:
            raise ValueError(f"{path}: unknown gate setting {key!r}; allowed: {sorted(SETTINGS_TYPES)}")
        expected = SETTINGS_TYPES[key]
        if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
            raise ValueError(f"{path}: gate setting {key!r} has the wrong type: {value!r}")
    for modality, target in settings.get("modality_targets", {}).items():
        if isinstance(target, bool) or not isinstance(target, (int, float)):
            raise ValueError(f"{path}: gate setting modality_targets[{modality!r}] must be a number, got {target!r}")
    return settings, state


def masks_from_values(
    groups: list[UnitGroup], num_layers: dict[str, int], values: dict[str, torch.Tensor]
) -> PruningMasks:
    """`PruningMasks` holding `values[group.name]` for every group; layers without a group stay None (keep all)."""
    encoders = {m: EncoderPruningMasks() for m in ENCODER_CONFIG_KEYS}
    for modality in num_layers:  # the config's stacks (`modalities(config)`); absent ones stay empty
        for kind in unit_kinds(modality):
            setattr(encoders[modality], kind.name, [None] * num_layers[modality])
    for group in groups:  # a sub-layer of size 0 in the config has no group: its entry stays None
        getattr(encoders[group.modality], group.kind)[group.layer] = values[group.name]
    return PruningMasks(**encoders)


def _keep_exactly(gate: HardConcreteGate, kept: int) -> None:
    """Shifts `gate`'s log α by one δ (bisection) so that its deterministic mask keeps exactly `kept` gates; the
    ranking of the gates is unchanged."""
    original = gate.log_alpha.detach().clone()
    low, high = -60.0, 60.0  # kept count rises with δ
    for _ in range(60):
        mid = (low + high) / 2
        gate.log_alpha.copy_(original + mid)
        count = int(gate.deterministic().sum())
        if count == kept:
            return
        low, high = (mid, high) if count < kept else (low, mid)
    raise RuntimeError(f"internal error: no shift of log α keeps exactly {kept} of {original.numel()} gates")


def _deterministic(gate: HardConcreteGate, multiple: int = 1) -> torch.Tensor:
    """A gate's deterministic mask (`_gate_values` passes `multiple` to the hidden-dimension gates)."""
    return gate.deterministic(multiple=multiple).detach()


def _hidden_key(stream: str) -> str:
    """ModuleDict key of a residual stream's hidden-dimension gate ("vision_hidden", "text_hidden")."""
    return f"{stream}_hidden"


def _layer_key(group: UnitGroup) -> str:
    """ModuleDict key of the sub-layer gate of `group` (an NLVR2 pair's cross-attention shares the even copy's)."""
    return group.gate_name.replace(".", "_") + "_sublayer"


def _checked_costs(unit_costs: dict[str, float], groups: list[UnitGroup]) -> dict[str, float]:
    """The per-unit costs of the gated groups; a path that runs none of the prunable units is refused."""
    out = {g.name: float(unit_costs[g.name]) for g in groups}
    if not any(out[g.name] * g.size for g in groups):
        raise ValueError("the cost path runs none of the prunable units: a FLOPs budget would be 0 / 0")
    return out


def _ramp(target: float, step: int, warmup_steps: int) -> float:
    if warmup_steps <= 0:
        return target
    return target * min(1.0, step / warmup_steps)


def _check_target(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
