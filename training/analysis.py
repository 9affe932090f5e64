"""Module sensitivity: prune one encoder at increasing ratios (no retraining) and watch the task metric.

Importance criteria (say which in every report):
  * "gates": the keep probability P(z > 0) of a gated (L0) checkpoint's units;
  * "magnitude": RMS of the weights a unit owns (a head's q/k/v rows and out_proj columns; a neuron's fc1 row and fc2
    column) — a standard data-free criterion.
Units of one encoder are removed in ascending importance until the removed share of that encoder's prunable
parameters reaches the ratio (the last unit may overshoot by at most one unit's parameters).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from modeling_efficientvlm import PruningMasks

from .l0 import masks_from_values
from .structure import ENCODER_CONFIG_KEYS, MODALITIES, UnitGroup, prunable_parameters, unit_groups
from .student import ENCODER_MODULES

_ATTRS = {"head": "self_attn", "cross_head": "cross_attn", "ffn": "mlp"}


@torch.no_grad()
def magnitude_importance(model, group: UnitGroup) -> torch.Tensor:
    """RMS of the weights each unit of `group` owns, (size,)."""
    module = getattr(getattr(model, ENCODER_MODULES[group.modality]).layers[group.layer], _ATTRS[group.kind])
    if group.kind == "ffn":
        squares = module.fc1.weight.pow(2).sum(1) + module.fc2.weight.pow(2).sum(0)  # (I,)
    else:
        def per_head(weight: torch.Tensor) -> torch.Tensor:  # rows of one head → (H,)
            return weight.reshape(group.size, group.head_dim, -1).pow(2).sum((1, 2))

        out = module.out_proj.weight.t()  # (H·Dh, D): columns of out_proj per head
        squares = per_head(module.q_proj.weight) + per_head(module.k_proj.weight) + per_head(module.v_proj.weight)
        squares = squares + per_head(out)
    return (squares / group.unit_params).sqrt()


def unit_importance(model, method: str = "magnitude", l0=None) -> dict[str, torch.Tensor]:
    """Importance of every unit, keyed by group name ("vision.head.0", ...)."""
    if method not in ("magnitude", "gates"):
        raise ValueError(f"importance method must be 'magnitude' or 'gates', got {method!r}")
    if method == "gates" and l0 is None:
        raise ValueError("importance 'gates' needs a gated checkpoint (an l0_gates.safetensors beside the model)")
    scores = {}
    for group in unit_groups(model.config):
        if group.size == 0:
            continue
        if method == "gates":
            scores[group.name] = l0.gate(group).keep_probability().detach().float()
        else:
            scores[group.name] = magnitude_importance(model, group).float()
    return scores


def encoder_masks(config, modality: str, ratio: float, importance: dict[str, torch.Tensor]) -> PruningMasks:
    """Masks removing `ratio` of one encoder's prunable parameters (least important units first); others untouched."""
    if modality not in MODALITIES:
        raise ValueError(f"encoder must be one of {list(MODALITIES)}, got {modality!r}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must lie in [0, 1), got {ratio}")
    groups = [g for g in unit_groups(config) if g.size > 0]
    values = {g.name: torch.ones(g.size) for g in groups}
    candidates = [(float(importance[g.name][i]), g.name, i, g.unit_params)
                  for g in groups if g.modality == modality for i in range(g.size)]
    budget = ratio * sum(g.size * g.unit_params for g in groups if g.modality == modality)
    removed = 0
    for _, name, index, params in sorted(candidates):
        if removed >= budget:
            break
        values[name][index] = 0.0
        removed += params
    num_layers = {m: getattr(config, key).num_hidden_layers for m, key in ENCODER_CONFIG_KEYS.items()}
    return masks_from_values(groups, num_layers, values)


@dataclass
class AnalyzeArguments:
    """Arguments of `efficientvlm analyze-modules`."""

    model: str = field(default="", metadata={"help": "Task checkpoint dir (a pruning dir with gates enables 'gates')."})
    task: str = field(default="retrieval", metadata={"help": "'retrieval' (metric r_mean) or 'nlvr2' (accuracy)."})
    ratios: str = field(default="0.1,0.2,0.3,0.4,0.5,0.6", metadata={"help": "Comma-separated pruning ratios."})
    importance: str = field(default="magnitude", metadata={"help": "'magnitude' (weight RMS) or 'gates' (P(z>0))."})
    output_dir: str = field(default="module_analysis", metadata={"help": "Where analysis.json and the PNG go."})

    def parsed_ratios(self) -> list[float]:
        try:
            ratios = [float(r) for r in self.ratios.split(",") if r.strip()]
        except ValueError as error:
            raise ValueError(f"--ratios must be comma-separated numbers, got {self.ratios!r}") from error
        bad = [r for r in ratios if not 0 <= r < 1]
        if bad:
            raise ValueError(f"--ratios must lie in [0, 1), got {bad}")
        return ratios


def analyze_modules(model, evaluate, ratios: list[float], importance: dict[str, torch.Tensor]) -> dict:
    """{"baseline": metric, "curves": {encoder: [[ratio, metric, removed_fraction], ...]}} (no retraining).

    Args:
        model: the task model (left unchanged: pruning is applied through masks).
        evaluate: callable(pruning_masks or None) → the task metric.
        ratios: fractions of each encoder's prunable parameters to remove.
        importance: per-unit scores from `unit_importance`.
    """
    from .materialize import pruned_config

    total = prunable_parameters(model.config)
    out = {"baseline": evaluate(None), "curves": {}}
    for modality in MODALITIES:
        curve = []
        for ratio in ratios:
            masks = encoder_masks(model.config, modality, ratio, importance)
            kept = prunable_parameters(pruned_config(model.config, masks))[modality]
            curve.append([ratio, evaluate(masks), 1 - kept / total[modality]])
        out["curves"][modality] = curve
    return out


def plot_analysis(result: dict, path: str, metric: str) -> None:
    """Metric vs ratio, one line per encoder, PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for modality, curve in result["curves"].items():
        ax.plot([0.0] + [c[0] for c in curve], [result["baseline"]] + [c[1] for c in curve], marker="o", label=modality)
    ax.set_xlabel("fraction of the encoder's prunable parameters removed")
    ax.set_ylabel(metric)
    ax.set_title(f"module sensitivity ({result.get('importance', '')} importance, no retraining)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_analysis(result: dict, output_dir: str, metric: str) -> str:
    """Writes analysis.json + sensitivity.png; returns a readable table."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "analysis.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot_analysis(result, os.path.join(output_dir, "sensitivity.png"), metric)
    ratios = [c[0] for c in next(iter(result["curves"].values()))]
    lines = [f"{metric} without retraining; importance: {result.get('importance')}; baseline {result['baseline']:.2f}",
             f"{'encoder':<8}" + "".join(f"{r:>8.2f}" for r in ratios)]
    for modality, curve in result["curves"].items():
        lines.append(f"{modality:<8}" + "".join(f"{c[1]:>8.2f}" for c in curve))
    return "\n".join(lines)
