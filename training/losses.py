"""Losses as pure functions of tensors: VLP (ITC, ITM, MLM) and knowledge distillation (attention, hidden, logits).

Layer maps are explicit lists of (student index, teacher index) pairs. For attention maps the indices are layers;
for hidden states they index HF-style `hidden_states` tuples, where 0 is the embeddings output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------------------------- VLP
def clamp_temperature(temp: torch.Tensor, min_value: float = 0.001, max_value: float = 0.5) -> torch.Tensor:
    """The learnable ITC temperature clamped to [0.001, 0.5] (X-VLM)."""
    return temp.clamp(min_value, max_value)


def itc_loss(
    image_feat: torch.Tensor, text_feat: torch.Tensor, temperature: torch.Tensor | float,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE: ½[CE(sim_i2t, y) + CE(sim_t2i, y)], sim = img · txtᵀ / τ.

    Args:
        image_feat: (B, E) L2-normalised image embeddings.
        text_feat: (B, E) L2-normalised text embeddings.
        temperature: τ (already clamped).
        labels: (B,) index of each image's text (default: the diagonal).
    """
    sim = image_feat @ text_feat.t() / temperature  # (B, B)
    labels = torch.arange(sim.shape[0], device=sim.device) if labels is None else labels
    return (F.cross_entropy(sim, labels) + F.cross_entropy(sim.t(), labels)) / 2


@torch.no_grad()
def sample_itm_negatives(
    sim_i2t: torch.Tensor, generator: torch.Generator | None = None, positive_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard negatives ∝ softmax of ITC similarity, positives excluded (ALBEF/X-VLM).

    The trainer samples ONCE (from the student's similarity) and scores teacher and student on the same pairs.

    Args:
        sim_i2t: (B, B) image-to-text similarities.
        generator: CPU generator for reproducible sampling.
        positive_mask: (B, B) True where (image i, text j) is a positive (default: the diagonal).

    Returns:
        (neg_text_idx (B,), neg_image_idx (B,)): a negative text for each image, a negative image for each text.
    """
    batch = sim_i2t.shape[0]
    if positive_mask is None:
        positive_mask = torch.eye(batch, dtype=torch.bool, device=sim_i2t.device)
    if batch < 2:
        raise ValueError("ITM hard negatives need a batch of at least 2 pairs")

    def draw(sim: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        weights = sim.float().softmax(dim=1).masked_fill(positives, 0.0)
        # a row whose mass underflowed to 0 falls back to uniform over its negatives
        weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, (~positives).float())
        return torch.multinomial(weights.cpu(), 1, generator=generator).flatten().to(sim.device)

    return draw(sim_i2t, positive_mask), draw(sim_i2t.t(), positive_mask.t())


def build_itm_pairs(
    neg_text_idx: torch.Tensor, neg_image_idx: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index lists of the 3B ITM pairs: B positives (i, i), B (image i, its negative text), B (negative image, text j).

    Returns:
        (image_idx (3B,), text_idx (3B,), labels (3B,)) with label 1 = match.
    """
    arange = torch.arange(batch_size, device=neg_text_idx.device)
    image_idx = torch.cat([arange, arange, neg_image_idx])
    text_idx = torch.cat([arange, neg_text_idx, arange])
    labels = torch.cat([torch.ones(batch_size), torch.zeros(2 * batch_size)]).long().to(neg_text_idx.device)
    return image_idx, text_idx, labels


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE over (N, 2) ITM logits."""
    return F.cross_entropy(logits, labels)


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE over masked positions: logits (B, T, V) or (M, V); labels with −100 at unmasked positions."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


# ----------------------------------------------------------------------------------------------------------- KD
def default_layer_map(
    num_student_layers: int, num_teacher_layers: int, include_embeddings: bool = False
) -> list[tuple[int, int]]:
    """Student layer i ↔ teacher layer (i+1)·step − 1 (6 → 3: [(0,1), (1,3), (2,5)]).

    With `include_embeddings` the indices address hidden-state tuples (0 = embeddings): [(0,0)] + [(i+1, (i+1)·step)].
    """
    if num_student_layers == 0:
        return [(0, 0)] if include_embeddings else []
    if num_student_layers > num_teacher_layers or num_teacher_layers % num_student_layers:
        raise ValueError(
            f"no default layer map from {num_teacher_layers} teacher to {num_student_layers} student layers: "
            "the teacher must be deeper by a whole factor (give an explicit map)"
        )
    step = num_teacher_layers // num_student_layers
    if include_embeddings:
        return [(0, 0)] + [(i + 1, (i + 1) * step) for i in range(num_student_layers)]
    return [(i, (i + 1) * step - 1) for i in range(num_student_layers)]


def _check_pairs(layer_map, num_student: int, num_teacher: int) -> None:
    for s, t in layer_map:
        if not (0 <= s < num_student and 0 <= t < num_teacher):
            raise ValueError(
                f"layer map pair ({s}, {t}) out of range: student indices 0..{num_student - 1}, "
                f"teacher indices 0..{num_teacher - 1}"
            )


def attention_kd_loss(
    student_attns: list[torch.Tensor], teacher_attns: list[torch.Tensor], layer_map: list[tuple[int, int]],
    query_mask: torch.Tensor | None = None, key_length_scale: bool = False,
) -> torch.Tensor:
    """Mean over mapped layers of MSE between post-softmax attention probabilities, all heads.

    Args:
        student_attns / teacher_attns: per layer (B, H, Tq, Tk).
        layer_map: (student layer, teacher layer) pairs.
        query_mask: (B, Tq) 1 for real query tokens; padded query rows are excluded.
        key_length_scale: multiply by Tk as the official code does (MSE mean × key length).
    """
    _check_pairs(layer_map, len(student_attns), len(teacher_attns))
    total = 0.0
    for s, t in layer_map:
        a, b = student_attns[s], teacher_attns[t]
        if a.shape != b.shape:
            raise ValueError(f"attention shapes differ for layer pair ({s}, {t}): {tuple(a.shape)} vs {tuple(b.shape)}")
        sq = (a.float() - b.float()) ** 2  # (B, H, Tq, Tk)
        if query_mask is not None:
            rows = query_mask[:, None, :, None].to(sq.dtype)
            loss = (sq * rows).sum() / (rows.sum() * sq.shape[1] * sq.shape[3]).clamp(min=1)
        else:
            loss = sq.mean()
        total = total + loss * (a.shape[-1] if key_length_scale else 1)
    return total / max(len(layer_map), 1)


def hidden_kd_loss(
    student_hiddens: list[torch.Tensor], teacher_hiddens: list[torch.Tensor], layer_map: list[tuple[int, int]],
    projection: nn.Module | None = None, mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over mapped pairs of MSE(proj(h_s), h_t); hidden states (B, T, D), index 0 = embeddings.

    Raises:
        ValueError: when widths differ and no projection is given.
    """
    _check_pairs(layer_map, len(student_hiddens), len(teacher_hiddens))
    total = 0.0
    for s, t in layer_map:
        a, b = student_hiddens[s], teacher_hiddens[t]
        if projection is not None:
            a = projection(a)
        if a.shape[-1] != b.shape[-1]:
            raise ValueError(
                f"hidden widths differ for pair ({s}, {t}): student {a.shape[-1]} vs teacher {b.shape[-1]}; "
                "pass a projection"
            )
        sq = (a.float() - b.float()) ** 2
        if mask is not None:
            weights = mask[..., None].to(sq.dtype)
            total = total + (sq * weights).sum() / (weights.sum() * sq.shape[-1]).clamp(min=1)
        else:
            total = total + sq.mean()
    return total / max(len(layer_map), 1)


def logit_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)), batchmean over rows (leading dims flattened)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s = student_logits.reshape(-1, student_logits.shape[-1]).float() / temperature
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float() / temperature
    if s.shape[0] == 0:
        return student_logits.sum() * 0.0
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), reduction="batchmean", log_target=True)
    return kl * temperature**2


def itc_kd_loss(student_sim: torch.Tensor, teacher_sim: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Logit KD on the (B, B) ITC similarity logits, image→text rows and text→image columns, averaged."""
    return (logit_kd_loss(student_sim, teacher_sim, temperature)
            + logit_kd_loss(student_sim.t(), teacher_sim.t(), temperature)) / 2


def combine_losses(
    vlp: dict[str, torch.Tensor], kd: dict[str, torch.Tensor], lambda_vlp: float, alpha_attn: float,
    beta_hidden: float, gamma_logits: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """total = λ·Σ VLP + (1 − λ)·(α·L_attn + β·L_hid + γ·L_logits); returns (total, every part incl. "total")."""
    if not 0.0 <= lambda_vlp <= 1.0:
        raise ValueError(f"lambda_vlp must lie in [0, 1], got {lambda_vlp}")
    for name, value in (("alpha_attn", alpha_attn), ("beta_hidden", beta_hidden), ("gamma_logits", gamma_logits)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    vlp_sum = sum(vlp.values()) if vlp else torch.zeros(())
    kd_sum = (alpha_attn * kd.get("attn", 0.0) + beta_hidden * kd.get("hidden", 0.0)
              + gamma_logits * kd.get("logits", 0.0))
    total = lambda_vlp * vlp_sum + (1 - lambda_vlp) * kd_sum if kd else vlp_sum
    parts = {**vlp, **kd, "total": total}
    return total, parts
