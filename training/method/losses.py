"""Losses as pure functions of tensors: VLP (ITC, ITM, MLM, X-VLM's box loss L_BBOX) and knowledge distillation
(attention, hidden, logits).

Equations follow EfficientVLM (Wang et al., 2023), §3:

    L_pretrain = λ·L_VLP + (1 − λ)·L_KD,      L_KD = α·L_attn + β·L_hid + γ·L_logits.

Layer maps are explicit lists of ``(student index, teacher index)`` pairs. For attention maps the indices are layers
(0 = first layer); for hidden states they index HF-style ``hidden_states`` tuples, where 0 is the embeddings output
and i ≥ 1 the output of layer i − 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

LayerMap = Sequence[tuple[int, int]]

KD_KEYS = ("attn", "hidden", "logits")


# ---------------------------------------------------------------------------------------------------------- VLP
def clamp_temperature(temp: torch.Tensor, min: float = 0.001, max: float = 0.5) -> torch.Tensor:  # noqa: A002
    """Clamps the learnable ITC temperature τ to [min, max] (X-VLM: [0.001, 0.5]); differentiable inside the range.

    Args:
        temp: scalar tensor τ.
        min: lower bound (same keyword as ``torch.clamp``).
        max: upper bound.

    Returns:
        Scalar tensor clamp(τ, min, max).
    """
    return temp.clamp(min=min, max=max)


def itc_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    temperature: torch.Tensor | float,
    labels: torch.Tensor | None = None,
    positive_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE: L_itc = ½[CE(s_i2t, y) + CE(s_t2i, y)], s_i2t = img · txtᵀ / τ, s_t2i = s_i2tᵀ.

    With several captions per image in the batch (COCO, Flickr30K: 5) the targets are soft, as X-VLM's image-id
    targets: row i of y is uniform over the texts j with positive_mask[i, j] (every caption of image i's image), and
    the t2i rows likewise over the images of the text's image: L = −½[Σ_j y_ij log p_i2t(j) + Σ_i y_ji log p_t2i(i)].

    Args:
        image_feat: (B, E) L2-normalised image embeddings.
        text_feat: (B, E) L2-normalised text embeddings.
        temperature: τ, a scalar (tensor) already clamped by the caller (see `clamp_temperature`).
        labels: (B,) index of the matching text for each image (and image for each text); default the diagonal.
        positive_mask: (B, B) bool, True where image i and text j belong to the same image (e.g. equal image ids,
            `same_image_mask`); overrides `labels`. Its diagonal must be True.

    Returns:
        Scalar loss.
    """
    sim = image_feat @ text_feat.t() / temperature  # (B, B)
    if positive_mask is not None:
        return soft_itc_loss(sim, sim.t(), positive_mask)
    if labels is None:
        labels = torch.arange(sim.shape[0], device=sim.device)
    return (F.cross_entropy(sim, labels) + F.cross_entropy(sim.t(), labels)) / 2


def same_image_mask(image_ids: torch.Tensor, other_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, B') bool: True where row i and column j show the same image (equal ids); `other_ids` defaults to the rows'."""
    other_ids = image_ids if other_ids is None else other_ids
    return image_ids[:, None] == other_ids[None, :]


def soft_itc_loss(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, positive_mask: torch.Tensor) -> torch.Tensor:
    """½ mean over rows of the cross-entropy against targets uniform over each row's positives, both directions.

    Args:
        sim_i2t: (B, C) logits of the local images against C texts.
        sim_t2i: (B, C) logits of the local texts against C images.
        positive_mask: (B, C) bool, positives of each local row among the C candidates (the same mask serves both
            directions: text i's image is image i's image).
    """
    if not bool(positive_mask.any(dim=1).all()):
        raise ValueError("positive_mask must mark at least one positive in every row")
    targets = positive_mask.float() / positive_mask.sum(dim=1, keepdim=True)
    i2t = -(F.log_softmax(sim_i2t.float(), dim=1) * targets).sum(dim=1).mean()
    t2i = -(F.log_softmax(sim_t2i.float(), dim=1) * targets).sum(dim=1).mean()
    return (i2t + t2i) / 2


def _draw_negatives(
    sim: torch.Tensor, positives: torch.Tensor, generator: torch.Generator | None, uniform_share: float = 0.0
) -> torch.Tensor:
    """One index per row of `sim`, drawn from (1 − u)·softmax(row) + u·uniform over the row's negatives (u =
    `uniform_share`), `positives` excluded. sim, positives: (B, B)."""
    if positives.all(dim=1).any():
        row = int(positives.all(dim=1).nonzero()[0])
        raise ValueError(f"row {row} of positive_mask marks every candidate positive: no negative to sample")
    # multinomial normalises each row itself: exp(sim − row max) is softmax without the division
    sim = sim.float()
    weights = (sim - sim.amax(dim=1, keepdim=True)).exp().masked_fill(positives, 0.0)
    # a row whose negative mass underflowed to 0 (one huge positive logit) falls back to uniform over its negatives
    weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, (~positives).float())
    if uniform_share > 0:
        uniform = (~positives).float()
        weights = (1 - uniform_share) * weights / weights.sum(1, keepdim=True) + uniform_share * uniform / uniform.sum(
            1, keepdim=True)
    device = generator.device if generator is not None else weights.device
    return torch.multinomial(weights.to(device), 1, generator=generator).flatten().to(positives.device)



def itc_loss_global(
    image_feat: torch.Tensor, text_feat: torch.Tensor, all_image_feat: torch.Tensor, all_text_feat: torch.Tensor,
    *, temperature: torch.Tensor | float, offset: int, image_ids: torch.Tensor | None = None,
    all_image_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """ITC of a local batch against gathered features of the global batch (multi-process X-VLM).

    Args:
        image_feat / text_feat: (B, E) local normalised embeddings.
        all_image_feat / all_text_feat: (W·B, E) embeddings of every rank, this rank's at rows offset..offset+B−1.
        temperature: τ.
        offset: index of this rank's first pair in the global batch.
        image_ids / all_image_ids: (B,) and (W·B,) image ids of the local and the global batch: then every pair of
            the global batch that shows the same image is a positive (soft targets, `soft_itc_loss`).

    Returns:
        ½[CE(img · all_txtᵀ / τ, offset + i) + CE(txt · all_imgᵀ / τ, offset + i)], the mean over local rows.
    """
    i2t = image_feat @ all_text_feat.t() / temperature
    t2i = text_feat @ all_image_feat.t() / temperature
    if image_ids is not None:
        return soft_itc_loss(i2t, t2i, same_image_mask(image_ids, all_image_ids))
    labels = torch.arange(image_feat.shape[0], device=image_feat.device) + offset
    return (F.cross_entropy(i2t, labels) + F.cross_entropy(t2i, labels)) / 2


@torch.no_grad()
def sample_itm_negatives(
    sim_i2t: torch.Tensor,
    generator: torch.Generator | None = None,
    positive_mask: torch.Tensor | None = None,
    uniform_share: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard negatives for ITM: for image i a text j ~ softmax(s_i2t[i]), for text j an image i ~ softmax(s_t2i[j]),
    positives excluded (ALBEF / X-VLM).

    The trainer samples ONCE per step, from the *student's* ITC similarity, and scores teacher and student on the
    very same pairs (see `build_itm_pairs`): KD on ITM logits only makes sense when both see identical inputs (the
    official code samples them independently).

    Args:
        sim_i2t: (B, B) image-to-text similarities (logits; temperature included or not, the caller's choice).
        generator: generator for reproducible draws (sampling runs on its device).
        positive_mask: (B, B) bool, True where (image i, text j) match; default the diagonal. Useful when a batch
            holds several captions of one image.
        uniform_share: u ∈ [0, 1]: each negative is drawn from (1 − u)·softmax + u·uniform over the negatives
            (a curriculum from random to hard negatives; 0 = ALBEF / X-VLM).

    Returns:
        (neg_text_idx (B,), neg_image_idx (B,)): a negative text for each image, a negative image for each text.

    Raises:
        ValueError: when B < 2 or some row/column of `positive_mask` has no negative.
    """
    batch = sim_i2t.shape[0]
    if sim_i2t.dim() != 2 or sim_i2t.shape[1] != batch:
        raise ValueError(f"sim_i2t must be square (B, B), got {tuple(sim_i2t.shape)}")
    if batch < 2:
        raise ValueError("ITM hard negatives need a batch of at least 2 pairs")
    if positive_mask is None:
        positive_mask = torch.eye(batch, dtype=torch.bool, device=sim_i2t.device)
    positive_mask = positive_mask.bool()
    if not 0.0 <= uniform_share <= 1.0:
        raise ValueError(f"uniform_share must lie in [0, 1], got {uniform_share}")
    neg_text = _draw_negatives(sim_i2t, positive_mask, generator, uniform_share)
    neg_image = _draw_negatives(sim_i2t.t(), positive_mask.t(), generator, uniform_share)
    return neg_text, neg_image


def build_itm_pairs(
    neg_text_idx: torch.Tensor, neg_image_idx: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index lists of the 3B ITM pairs, used to gather embeddings so teacher and student see identical pairs.

    Layout: rows 0..B−1 are the positives (i, i) with label 1; rows B..2B−1 are (image i, text neg_text[i]) with
    label 0; rows 2B..3B−1 are (image neg_image[j], text j) with label 0.

    Args:
        neg_text_idx: (B,) a negative text for each image.
        neg_image_idx: (B,) a negative image for each text.
        batch_size: B.

    Returns:
        (image_idx (3B,), text_idx (3B,), labels (3B,) long, 1 = match).
    """
    if neg_text_idx.shape != (batch_size,) or neg_image_idx.shape != (batch_size,):
        raise ValueError(
            f"negative indices must have shape ({batch_size},), got {tuple(neg_text_idx.shape)} and "
            f"{tuple(neg_image_idx.shape)}"
        )
    device = neg_text_idx.device
    arange = torch.arange(batch_size, device=device)
    image_idx = torch.cat([arange, arange, neg_image_idx.to(device)])
    text_idx = torch.cat([arange, neg_text_idx, arange])
    labels = torch.zeros(3 * batch_size, dtype=torch.long, device=device)
    labels[:batch_size] = 1
    return image_idx, text_idx, labels


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_itm = CE(logits, labels).

    Args:
        logits: (N, 2) ITM logits (index 1 = match).
        labels: (N,) long, 1 = match.

    Returns:
        Scalar loss.
    """
    return F.cross_entropy(logits, labels)


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_mlm = CE over masked positions.

    Args:
        logits: (B, T, V) over all positions, or (M, V) at the masked positions only.
        labels: (B, T) or (M,), −100 where a position is not masked.

    Returns:
        Scalar loss; an exact 0 (still attached to the graph) when no position is masked, instead of CE's NaN.
    """
    flat_labels = labels.reshape(-1)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    # sum / count instead of mean: same value, but 0 (not NaN) without masks and no host sync to check for that
    ce = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum")
    return ce / (flat_labels != -100).sum().clamp(min=1)


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(…, 4) boxes (centre x, centre y, width, height) → (…, 4) corners (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """GIoU of aligned box pairs (the diagonal of DETR's pairwise matrix, which X-VLM's L_BBOX reads).

    GIoU = IoU − |C \\ (A ∪ B)| / |C|, C the smallest box enclosing A and B (Rezatofighi et al. 2019); in [−1, 1].

    Args:
        boxes1: (N, 4) corners (x0, y0, x1, y1) with x1 ≥ x0, y1 ≥ y0.
        boxes2: (N, 4) corners, pair i = (boxes1[i], boxes2[i]).

    Returns:
        (N,) GIoU per pair.

    Raises:
        ValueError: a box with x1 < x0 or y1 < y0, naming the tensor and the row.
    """
    for name, boxes in (("boxes1", boxes1), ("boxes2", boxes2)):
        bad = (boxes[:, 2:] < boxes[:, :2]).any(-1)
        if bool(bad.any()):
            raise ValueError(f"{name} row {int(bad.nonzero()[0])} is degenerate (x1 < x0 or y1 < y0): "
                             f"{boxes[bad][0].tolist()}")
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    inter_wh = (torch.minimum(boxes1[:, 2:], boxes2[:, 2:]) - torch.maximum(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    inter = inter_wh[:, 0] * inter_wh[:, 1]
    union = area1 + area2 - inter
    hull_wh = torch.maximum(boxes1[:, 2:], boxes2[:, 2:]) - torch.minimum(boxes1[:, :2], boxes2[:, :2])
    hull = hull_wh[:, 0] * hull_wh[:, 1]
    return inter / union - (hull - union) / hull


def bbox_loss(pred: torch.Tensor, target: torch.Tensor,
              mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """X-VLM's L_BBOX parts: L1 = Σ_coords |b̂ − b| and GIoU loss = 1 − GIoU(b̂, b), each averaged over the boxes.

    L_BBOX = L1 + L_GIoU (X-VLM weighs both by 1). Boxes are (cx, cy, w, h) normalised to [0, 1].

    Args:
        pred: (N, 4) predicted boxes (the sigmoid output of the box head).
        target: (N, 4) ground-truth boxes.
        mask: (N,) bool, True where row i has a box (X-VLM's 1 − is_image); None = every row.

    Returns:
        (l1, giou) scalars; both an exact 0 (still attached to the graph) when no row has a box.
    """
    if mask is None:
        mask = torch.ones(pred.shape[0], dtype=torch.bool, device=pred.device)
    weight = mask.to(pred.dtype)
    count = weight.sum().clamp(min=1)
    l1 = (F.l1_loss(pred, target, reduction="none").sum(-1) * weight).sum() / count
    # rows without a box may hold any placeholder target: give them a valid one so GIoU stays finite
    safe_target = torch.where(mask[:, None], target, pred.detach())
    giou = generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(safe_target))
    return l1, ((1 - giou) * weight).sum() / count


# ------------------------------------------------------------------------------------------------- layer maps
def default_layer_map(
    num_student_layers: int, num_teacher_layers: int, include_embeddings: bool = False
) -> list[tuple[int, int]]:
    """The paper's map: each student layer ↔ the last teacher layer of its block of `step = teacher // student`.

    * attention (``include_embeddings=False``), layer indices: student layer i ↔ teacher layer (i+1)·step − 1,
      e.g. 6 → 3: [(0, 1), (1, 3), (2, 5)] (teacher layer 2i+1).
    * hidden states (``include_embeddings=True``), HF ``hidden_states`` indices (0 = embeddings, k = output of layer
      k−1): [(0, 0)] + [(i+1, (i+1)·step)], e.g. 6 → 3: [(0, 0), (1, 2), (2, 4), (3, 6)] — the same layers as above.

    Args:
        num_student_layers: student depth (≥ 0).
        num_teacher_layers: teacher depth, a whole multiple of the student depth.
        include_embeddings: hidden-state indexing (see above).

    Returns:
        List of (student index, teacher index).

    Raises:
        ValueError: negative depths, or teacher depth not a whole multiple (give an explicit map then).
    """
    if num_student_layers < 0 or num_teacher_layers < 0:
        raise ValueError(f"layer counts must be >= 0, got student {num_student_layers}, teacher {num_teacher_layers}")
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


def validate_layer_map(layer_map: LayerMap, num_student: int, num_teacher: int) -> None:
    """Checks every pair indexes existing entries.

    Args:
        layer_map: (student index, teacher index) pairs.
        num_student: number of student entries (layers, or hidden states incl. embeddings).
        num_teacher: number of teacher entries.

    Raises:
        ValueError: naming the first bad pair and the valid ranges.
    """
    for s, t in layer_map:
        if not (0 <= s < num_student and 0 <= t < num_teacher):
            raise ValueError(
                f"layer map pair ({s}, {t}) out of range: student indices 0..{num_student - 1}, "
                f"teacher indices 0..{num_teacher - 1}"
            )


# ----------------------------------------------------------------------------------------------------------- KD
def _masked_mean(sq: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of `sq` over the entries whose broadcast `weights` are 1 (weights broadcast against sq)."""
    if weights is None:
        return sq.mean()
    weights = weights.to(sq.dtype).expand_as(sq)
    return (sq * weights).sum() / weights.sum().clamp(min=1)


def _zero(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A scalar 0 on the device of the inputs (an empty layer map contributes nothing)."""
    return torch.zeros((), device=tensors[0].device) if len(tensors) else torch.zeros(())


def attention_kd_loss(
    student_attns: Sequence[torch.Tensor],
    teacher_attns: Sequence[torch.Tensor],
    layer_map: LayerMap,
    query_mask: torch.Tensor | None = None,
    key_length_scale: bool = False,
) -> torch.Tensor:
    """L_attn = 1/|map| · Σ_(s,t) MSE(A_s, A_t) over post-softmax attention probabilities, all heads.

    Works for self- and cross-attention (keys from the other modality). Same head count assumed.

    Args:
        student_attns: per student layer, (B, H, Tq, Tk) probabilities.
        teacher_attns: per teacher layer, (B, H, Tq, Tk).
        layer_map: (student layer, teacher layer) pairs.
        query_mask: (B, Tq), 1 for real query tokens: padded query rows are excluded from the mean (padded keys need
            no mask: both models give them ~0 probability).
        key_length_scale: multiply each pair's mean by Tk, as the official code does.

    Returns:
        Scalar loss (0 for an empty map).

    Raises:
        ValueError: a pair out of range, or student/teacher shapes differ (naming the pair).
    """
    validate_layer_map(layer_map, len(student_attns), len(teacher_attns))
    if not layer_map:
        return _zero(student_attns)
    weights = None if query_mask is None else query_mask[:, None, :, None]  # (B, 1, Tq, 1)
    total = 0.0
    for s, t in layer_map:
        a, b = student_attns[s], teacher_attns[t]
        if a.shape != b.shape:
            raise ValueError(
                f"attention shapes differ for layer pair ({s}, {t}): student {tuple(a.shape)} vs teacher "
                f"{tuple(b.shape)}"
            )
        loss = _masked_mean((a.float() - b.float()) ** 2, weights)  # fp32: squared diffs of probabilities underflow
        total = total + (loss * a.shape[-1] if key_length_scale else loss)
    return total / len(layer_map)


def hidden_kd_loss(
    student_hiddens: Sequence[torch.Tensor],
    teacher_hiddens: Sequence[torch.Tensor],
    layer_map: LayerMap,
    projection: nn.Module | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_hid = 1/|map| · Σ_(s,t) MSE(W·H_s, H_t) over mapped hidden states (W = `projection` or identity).

    Args:
        student_hiddens: HF-style tuple, index 0 = embeddings; each (B, T, D_s).
        teacher_hiddens: same for the teacher; each (B, T, D_t).
        layer_map: (student index, teacher index) pairs, e.g. `default_layer_map(..., include_embeddings=True)`.
        projection: maps D_s → D_t (needed when widths differ), applied to the student.
        mask: (B, T), 1 for real tokens: padded positions are excluded from the mean.

    Returns:
        Scalar loss (0 for an empty map).

    Raises:
        ValueError: a pair out of range, widths differ without a projection, or other shapes differ.
    """
    validate_layer_map(layer_map, len(student_hiddens), len(teacher_hiddens))
    if not layer_map:
        return _zero(student_hiddens)
    weights = None if mask is None else mask[..., None]  # (B, T, 1)
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
        if a.shape != b.shape:
            raise ValueError(f"hidden shapes differ for pair ({s}, {t}): {tuple(a.shape)} vs {tuple(b.shape)}")
        total = total + _masked_mean((a.float() - b.float()) ** 2, weights)
    return total / len(layer_map)


def logit_kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """L_logits = T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)), batchmean over rows.

    The T² factor (absent from the official code, which uses T = 1) keeps gradient magnitudes independent of T.

    Args:
        student_logits: (..., C); leading dims are flattened into rows.
        teacher_logits: (..., C), same shape.
        temperature: T > 0.

    Returns:
        Scalar loss; 0 (attached to the student's graph) when there are no rows.

    Raises:
        ValueError: T ≤ 0 or shapes differ.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"logit shapes differ: student {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}"
        )
    s = student_logits.reshape(-1, student_logits.shape[-1]).float() / temperature  # (N, C)
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float() / temperature
    if s.shape[0] == 0:  # e.g. a batch without masked tokens
        return student_logits.sum() * 0.0
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), reduction="batchmean", log_target=True)
    return kl * temperature**2


def itc_kd_loss(
    student_sim_i2t: torch.Tensor, teacher_sim_i2t: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Logit KD on the ITC similarity matrix (TinyCLIP-style affinity mimicking), both directions averaged:
    ½[L_logits(S_s, S_t) + L_logits(S_sᵀ, S_tᵀ)].

    Args:
        student_sim_i2t: (B, B) student image-to-text logits (with the student's temperature).
        teacher_sim_i2t: (B, B) teacher logits.
        temperature: KD temperature T (see `logit_kd_loss`).

    Returns:
        Scalar loss.
    """
    i2t = logit_kd_loss(student_sim_i2t, teacher_sim_i2t, temperature)
    t2i = logit_kd_loss(student_sim_i2t.t(), teacher_sim_i2t.t(), temperature)
    return (i2t + t2i) / 2


def combine_losses(
    vlp: Mapping[str, torch.Tensor],
    kd: Mapping[str, torch.Tensor],
    *, lambda_vlp: float,
    alpha_attn: float,
    beta_hidden: float,
    gamma_logits: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """total = λ·Σ L_VLP + (1 − λ)·(α·L_attn + β·L_hid + γ·L_logits).

    Args:
        vlp: VLP terms by name (e.g. "itc", "itm", "mlm"), all summed.
        kd: KD terms under the keys "attn", "hidden", "logits"; a missing key counts as 0.
        lambda_vlp: λ ∈ [0, 1].
        alpha_attn: α ≥ 0.
        beta_hidden: β ≥ 0.
        gamma_logits: γ ≥ 0.

    Returns:
        (total scalar, parts): parts holds every unweighted input term by name plus "total", for logging.

    Raises:
        ValueError: λ outside [0, 1], a negative weight, an unknown KD key, or a name used in both dicts.
    """
    if not 0.0 <= lambda_vlp <= 1.0:
        raise ValueError(f"lambda_vlp must lie in [0, 1], got {lambda_vlp}")
    for name, value in (("alpha_attn", alpha_attn), ("beta_hidden", beta_hidden), ("gamma_logits", gamma_logits)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    unknown = set(kd) - set(KD_KEYS)
    if unknown:
        raise ValueError(f"unknown KD terms {sorted(unknown)}; allowed: {list(KD_KEYS)}")
    if set(vlp) & set(kd):
        raise ValueError(f"terms named in both vlp and kd: {sorted(set(vlp) & set(kd))}")
    zero = torch.zeros(())
    vlp_sum = sum(vlp.values(), zero)
    weights = {"attn": alpha_attn, "hidden": beta_hidden, "logits": gamma_logits}
    kd_sum = sum((weights[k] * v for k, v in kd.items()), zero)
    total = lambda_vlp * vlp_sum + (1 - lambda_vlp) * kd_sum
    return total, {**vlp, **kd, "total": total}
