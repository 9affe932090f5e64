"""Module sensitivity: prune one encoder at increasing ratios (no retraining) and watch the task metric.

Importance criteria (say which in every report):
  * "gates": the keep probability P(z > 0) of a gated (L0) checkpoint's units;
  * "magnitude": RMS of the weights a unit owns (a head's q/k/v rows and out_proj columns; a neuron's fc1 row and fc2
    column) — a standard data-free criterion.
Units of one encoder are removed in ascending importance until the removed share of that encoder's prunable
parameters reaches the ratio (the last unit may overshoot by at most one unit's parameters).

Each point is evaluated without retraining (through masks), and optionally again after a short recovery fine-tune of
the materialized (physically pruned) model with the task loss (`--recovery_steps`); the unpruned model gets the same
fine-tune, so the recovered curves start from a comparable baseline.
"""

from __future__ import annotations

import torch

from modeling_efficientvlm import PruningMasks

from .l0 import masks_from_values
from .structure import (
    ENCODER_CONFIG_KEYS,
    ENCODER_MODULES,
    UNIT_KINDS,
    UnitGroup,
    modalities,
    prunable_parameters,
    unit_groups,
)

_ATTRS = {kind.name: kind.module for kind in UNIT_KINDS}


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
    if modality not in modalities(config):
        raise ValueError(f"encoder must be one of {list(modalities(config))}, got {modality!r}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must lie in [0, 1), got {ratio}")
    groups = [g for g in unit_groups(config) if g.size > 0]
    values = {g.name: torch.ones(g.size) for g in groups}
    # an NLVR2 pair's cross heads read one K/V (`kv_shared_with`): they go together (one mask, joint size and score)
    partner = {g.gate_name: g for g in groups if g.kv_shared_with is not None}
    for g in partner.values():
        values[g.name] = values[g.gate_name]

    def unit(g, i: int) -> tuple[float, str, int, int]:
        other = partner.get(g.name)
        if other is None:
            return float(importance[g.name][i]), g.name, i, g.unit_params
        score = (float(importance[g.name][i]) + float(importance[other.name][i])) / 2
        return score, g.name, i, g.unit_params + other.unit_params

    candidates = [unit(g, i) for g in groups if g.modality == modality and g.kv_shared_with is None
                  for i in range(g.size)]
    budget = ratio * sum(g.size * g.unit_params for g in groups if g.modality == modality)
    removed = 0
    for _, name, index, params in sorted(candidates):
        if removed >= budget:
            break
        values[name][index] = 0.0
        removed += params
    num_layers = {m: getattr(config, ENCODER_CONFIG_KEYS[m]).num_hidden_layers for m in modalities(config)}
    return masks_from_values(groups, num_layers, values)


def analyze_modules(
    model, evaluate, *, ratios: list[float], importance: dict[str, torch.Tensor], recover=None, show_progress=False
) -> dict:
    """Sensitivity of the task metric to pruning each encoder alone.

    Args:
        model: the task model (left unchanged: pruning is applied through masks, recovery works on copies).
        evaluate: callable(model, pruning_masks or None) → the task metric.
        ratios: fractions of each encoder's prunable parameters to remove.
        importance: per-unit scores from `unit_importance`.
        recover: optional callable(model) → a fine-tuned copy (the recovery fine-tune); it receives the unpruned model
            once (for "baseline_recovered") and the materialized model of every point.
        show_progress: a tqdm bar over the (encoder, ratio) points.

    Returns:
        {"baseline": metric, "curves": {encoder: [[ratio, metric, removed_fraction], ...]}} (no retraining); with
        `recover` also "baseline_recovered" and "recovered_curves": {encoder: [[ratio, metric after recovery], ...]}.
    """
    from tqdm.auto import tqdm

    from ..method.materialize import materialize, pruned_config

    total = prunable_parameters(model.config)
    stacks = modalities(model.config)  # the three encoders (+ the VQA answer decoder)
    bar = tqdm(total=len(stacks) * len(ratios), desc="analyze-modules", disable=not show_progress)
    out = {"baseline": evaluate(model, None), "curves": {}}
    if recover is not None:
        out["baseline_recovered"] = evaluate(recover(model), None)
        out["recovered_curves"] = {}
    for modality in stacks:
        curve, recovered = [], []
        for ratio in ratios:
            bar.set_postfix(encoder=modality, ratio=ratio)
            masks = encoder_masks(model.config, modality, ratio, importance)
            kept = prunable_parameters(pruned_config(model.config, masks))[modality]
            curve.append([ratio, evaluate(model, masks), 1 - kept / total[modality]])
            if recover is not None:
                recovered.append([ratio, evaluate(recover(materialize(model, masks)), None)])
            bar.update()
        out["curves"][modality] = curve
        if recover is not None:
            out["recovered_curves"][modality] = recovered
    bar.close()
    return out
