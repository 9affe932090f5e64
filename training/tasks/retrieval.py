"""Image-text retrieval: the task's loss step (VLP + KD), data, metric, evaluation and inference path.

The loss step is also the pre-training step: `teacher` (no teacher model: VLP losses only) and general distillation
(`distill`) train on image-caption pairs with it; retrieval fine-tuning (`prune --task retrieval`) adds task KD.

Evaluation protocol (ALBEF / X-VLM): ITC cosine similarity for every (image, text) pair; for each query the top-k
candidates by ITC are re-scored by the ITM head (`EfficientVLMForImageTextRetrieval.rerank_blocks`) and every
other candidate keeps its ITC order below them (X-VLM's −100 for all of them would cap R@K at K > k). Text retrieval
(TR) ranks the texts of each image and counts the best-ranked of its ground-truth captions; image retrieval (IR)
ranks the images of each text. R@1/5/10 in percent; r_mean is the mean of the six.
The metric is also a local `evaluate` module (`training/metrics/retrieval`, see `load_retrieval_metric`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from modeling_efficientvlm import EfficientVLMForImageTextRetrieval, EfficientVLMForPreTraining
from modeling_efficientvlm.modeling_efficientvlm import RERANK_BLOCK_SCORES

from ..method import losses as L
from ..method.cost import retrieval_flops, retrieval_path
from ..method.distillation import attention_kd, hidden_kd, itc
from ..metrics.confidence import PerQueryRanks, r_mean_ci
from ..metrics.retrieval_ranks import best_positive_ranks, check_ground_truth, image_of_text, recall_metrics
from .base import ModelCardSpec, Task



# --------------------------------------------------------------------------------------------------------- loss step
def _forward_all(model, inputs, masks, pairs, attn: bool, hidden: bool, mlm: bool, image=None, text=None) -> dict:
    """Runs one model on a batch: encoders (unless given), ITC, ITM on the given (image, text) pairs, MLM."""
    if image is None:
        image = model.encode_image(inputs["pixel_values"], masks, output_attentions=attn, output_hidden_states=hidden)
    if text is None:
        text = model.encode_text(inputs["input_ids"], inputs["attention_mask"], masks, output_attentions=attn,
                                 output_hidden_states=hidden)
    image_feat, text_feat = model.image_itc_embeds(image.last_hidden_state), model.text_itc_embeds(text.last_hidden_state)
    out = {"image": image, "text": text, "image_feat": image_feat, "text_feat": text_feat}
    out["sim_i2t"] = image_feat @ text_feat.t() / model.temperature
    image_idx, text_idx = pairs
    out["itm_logits"], out["fusion"] = model.itm_logits(
        text.last_hidden_state[text_idx],
        inputs["attention_mask"][text_idx],
        image.last_hidden_state[image_idx],
        pruning_masks=masks,
        output_attentions=attn,
        output_hidden_states=hidden,
    )
    if mlm:
        out["mlm_logits"], _, _ = model.mlm_logits(
            inputs["mlm_input_ids"], inputs["attention_mask"], image.last_hidden_state, masks
        )
    return out


def uses_bbox(model, inputs: dict, args) -> bool:
    """Whether a step adds L_BBOX: a positive `args.bbox_weight`, a model with a box head (the pre-training model;
    task models have none) and at least one row of the batch with a box."""
    return (args.bbox_weight > 0 and hasattr(model, "bbox_head") and "has_box" in inputs
            and bool(inputs["has_box"].any()))


def bbox_term(model, inputs: dict, image_tokens: torch.Tensor, masks=None) -> torch.Tensor:
    """X-VLM's L_BBOX = L1 + (1 − GIoU) of the boxes `model.predict_boxes` gives for (image i, phrase i) against
    the regions' boxes, averaged over the rows that have one (`has_box`); the other rows are not fused at all.

    Args:
        model: an `EfficientVLMForPreTraining`.
        inputs: a `RetrievalCollator` batch with box_input_ids / box_attention_mask (B, T), boxes (B, 4), has_box (B,).
        image_tokens: (B, 1 + N, D_vision) the model's vision outputs for the batch's images.
        masks: the model's `PruningMasks`, or None.
    """
    rows = inputs["has_box"].to(image_tokens.device).nonzero().squeeze(1)  # (R,)
    pred = model.predict_boxes(inputs["box_input_ids"][rows], inputs["box_attention_mask"][rows],
                               image_tokens=image_tokens[rows], pruning_masks=masks)
    l1, giou = L.bbox_loss(pred, inputs["boxes"][rows].to(pred.dtype))
    return l1 + giou


def uniform_negative_share(args, step: int) -> float:
    """Share of ITM negatives drawn uniformly at random at `step`: 1 → 0 linearly over
    `args.itm_negatives_warmup_steps` (0 = all hard, drawn from softmax(sim / τ), from the start: ALBEF / X-VLM)."""
    warmup = getattr(args, "itm_negatives_warmup_steps", 0) or 0
    return 0.0 if warmup <= 0 else max(0.0, 1.0 - step / warmup)


def retrieval_losses(
    student, teacher, inputs: dict, args, maps: dict | None, *, masks=None, generator=None, step: int = 0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VLP losses of the student + KD from the teacher on the same batch and the same ITM pairs.

    total = λ·(ITC + ITM [+ MLM] [+ w·BBOX]) + (1 − λ)·(α·L_attn + β·L_hid + γ·L_logits), λ = `args.lambda_vlp`,
    w = `args.bbox_weight`. L_BBOX (X-VLM; `bbox_term`) is added where the student has a box head and the batch has
    boxes (`uses_bbox`): teacher pre-training and general distillation on region-annotated data; the student learns it
    from the ground-truth boxes (no box KD). It is logged as "bbox" (= w·L_BBOX).

    ITM hard negatives are drawn ONCE per step from softmax(sim / τ) of the *student's* ITC similarities (τ = its
    clamped temperature, detached: ALBEF / X-VLM), and the teacher is scored on exactly those (image, text) pairs.
    Without τ the cosine similarities lie in [−1, 1] and the draw is nearly uniform (easy negatives). With
    `args.itm_negatives_warmup_steps` a share `uniform_negative_share` of the negatives is drawn uniformly instead
    (random → hard), so a fusion encoder trained from scratch first learns to tell unrelated pairs apart.

    Args:
        student: an `EfficientVLMForImageTextRetrieval` (or pre-training model, for MLM).
        teacher: the frozen teacher, or None (teacher pre-training: VLP losses only).
        inputs: a `RetrievalCollator` batch.
        args: `DistillationArguments`-like weights.
        maps: `kd_pairs(layer map)` (unused without a teacher).
        masks: the student's `PruningMasks`, or None.
        generator: draws the ITM negatives (checkpointed by the trainer, so a resumed run is exact).
        step: the optimizer step (for the random → hard negatives warm-up).
    """
    use_attn, use_hidden = teacher is not None and args.alpha_attn > 0, teacher is not None and args.beta_hidden > 0
    cross = use_attn and bool(args.cross_attention_kd)  # the fusion maps then carry the cross-attention too
    use_mlm = args.use_mlm and "mlm_input_ids" in inputs and hasattr(student, "mlm_head")
    batch = inputs["input_ids"].shape[0]
    # student ITC first: its similarities choose the negatives
    s_image = student.encode_image(inputs["pixel_values"], masks, output_attentions=use_attn,
                                   output_hidden_states=use_hidden)
    s_text = student.encode_text(inputs["input_ids"], inputs["attention_mask"], masks, output_attentions=use_attn,
                                 output_hidden_states=use_hidden)
    sim = student.image_itc_embeds(s_image.last_hidden_state) @ student.text_itc_embeds(s_text.last_hidden_state).t()
    logits_i2t = sim.detach().float() / student.temperature.detach().float()
    # several captions of one image in the batch (COCO; the synthetic stream's groups): image-id positives for the
    # ITC targets, and no other caption of the same image is ever drawn as an ITM negative (X-VLM)
    image_ids = inputs.get("image_ids")
    if image_ids is not None and image_ids.unique().numel() < 2:
        image_ids = None  # a batch of one image (tiny batches): its captions are each other's only negatives
    image_ids = None if image_ids is None else image_ids.to(sim.device)
    positives = None if image_ids is None else L.same_image_mask(image_ids)
    neg_text, neg_image = L.sample_itm_negatives(logits_i2t, generator=generator, positive_mask=positives,
                                                 uniform_share=uniform_negative_share(args, step))
    image_idx, text_idx, itm_labels = L.build_itm_pairs(neg_text, neg_image, batch)
    pairs = (image_idx.to(sim.device), text_idx.to(sim.device))
    s = _forward_all(student, inputs, masks, pairs, use_attn, use_hidden, use_mlm, s_image, s_text)
    vlp = {
        "itc": itc(s["image_feat"], s["text_feat"], student.temperature, args.itc_global_batch, image_ids),
        "itm": L.itm_loss(s["itm_logits"], itm_labels.to(sim.device)),
    }
    if use_mlm:
        vlp["mlm"] = L.mlm_loss(s["mlm_logits"], inputs["mlm_labels"])
    if uses_bbox(student, inputs, args):
        vlp["bbox"] = args.bbox_weight * bbox_term(student, inputs, s_image.last_hidden_state, masks)
    if teacher is None:
        return L.combine_losses(vlp, {}, lambda_vlp=1.0, alpha_attn=0.0, beta_hidden=0.0, gamma_logits=0.0)
    with torch.no_grad():
        t = _forward_all(teacher, inputs, None, pairs, use_attn, use_hidden, use_mlm)
    kd_logits = L.logit_kd_loss(s["itm_logits"], t["itm_logits"], args.kd_temperature)
    if use_mlm:
        masked = inputs["mlm_labels"] != -100
        kd_logits = kd_logits + L.logit_kd_loss(s["mlm_logits"][masked], t["mlm_logits"][masked], args.kd_temperature)
    if args.distill_itc:
        kd_logits = kd_logits + L.itc_kd_loss(s["sim_i2t"], t["sim_i2t"], args.kd_temperature)
    kd = {"logits": kd_logits}
    if use_attn:
        query_masks = {"image": None, "text": inputs["attention_mask"], "fusion": inputs["attention_mask"][pairs[1]]}
        kd["attn"] = attention_kd(s, t, maps, query_masks=query_masks, cross=cross,
                                  key_length_scale=args.attention_key_length_scale).to(sim.device)
    if use_hidden:
        kd["hidden"] = hidden_kd(s, t, maps, image_weight=args.image_hidden_weight, pruning_masks=masks).to(sim.device)
    return L.combine_losses(vlp, kd, lambda_vlp=args.lambda_vlp, alpha_attn=args.alpha_attn,
                            beta_hidden=args.beta_hidden, gamma_logits=args.gamma_logits)


# -------------------------------------------------------------------------------------------------------------- data
def train_data(data, processor, seed: int, mlm: bool):
    """(train dataset, collator): synthetic scenes, or an ALBEF / X-VLM image-caption JSON (one row per caption).

    A JSON given without `--eval_dataset` loses its held-out images (`eval_data`) here: they are never trained on.
    """
    from ..data.collators import RetrievalCollator

    collator = RetrievalCollator(
        processor, max_length=data.max_length, mlm_probability=data.mlm_probability if mlm else 0.0,
        max_masks=data.max_masks,
    )
    from functools import partial

    from ..data.retrieval_dataset import SyntheticRetrievalDataset

    synthetic = partial(SyntheticRetrievalDataset, twin_probability=data.synthetic_twins,
                        max_captions=data.synthetic_captions)
    return caption_pairs(data, seed, synthetic), collator


def caption_pairs(data, seed: int, synthetic: type):
    """The training pairs of an image-caption task: `synthetic(seed=, image_size=)` streaming the built-in scenes, or
    the JSON `--dataset` one row per caption, less its held-out images when there is no `--eval_dataset`."""
    if data.dataset == "synthetic":
        return synthetic(seed=seed, image_size=data.image_size)
    from ..data.files import load_albef_json

    rows = load_albef_json(data.dataset, data.image_root, split_captions=True)
    if not data.eval_dataset:
        from ..data.holdout import held_out_rows

        rows = rows.select(held_out_rows(data, rows["image_id"], keep_held_out=False))
    return rows


def eval_data(data) -> dict:
    """The held-out set {images, captions, img2txt, txt2img}: `--eval_dataset` JSON, else the images of a JSON
    `--dataset` held out from training (`--holdout_fraction`), else held-out synthetic scenes."""
    if data.eval_dataset:
        from ..data.files import load_retrieval_eval_set

        return load_retrieval_eval_set(data.eval_dataset, data.image_root)
    if data.dataset != "synthetic":
        from ..data.files import LazyImageList, load_albef_json
        from ..data.holdout import held_out_rows

        rows = load_albef_json(data.dataset, data.image_root, split_captions=False, check_images=False)
        rows = rows.select(held_out_rows(data, rows["image_id"], keep_held_out=True))
        held_out: dict = {"images": LazyImageList(rows["image"]), "captions": [], "img2txt": [], "txt2img": []}
        for index, captions in enumerate(rows["caption"]):  # images stay on disk until a batch is encoded
            start = len(held_out["captions"])
            held_out["img2txt"].append(list(range(start, start + len(captions))))
            held_out["captions"].extend(captions)
            held_out["txt2img"].extend([index] * len(captions))
        return held_out
    from ..data.retrieval_dataset import make_retrieval_eval_set, make_twin_retrieval_eval_set

    if data.eval_protocol == "twins":
        return make_twin_retrieval_eval_set(data.eval_images, seed=data.eval_seed, image_size=data.image_size)
    return make_retrieval_eval_set(data.eval_images, seed=data.eval_seed, image_size=data.image_size)


# -------------------------------------------------------------------------------------------------------- evaluation
def _model_device_dtype(model: torch.nn.Module, device: torch.device | str | None) -> tuple[torch.device, Any]:
    parameter = next(model.parameters())
    return torch.device(device) if device is not None else parameter.device, parameter.dtype


def _encode_images(model, images: Sequence, processor, batch_size: int, pruning_masks, device, dtype,
                   show_progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Image tokens (N_img, 1 + N, D_vision) and ITC embeddings (N_img, E), both on `device`.

    `images` is sliced one batch at a time, so a lazy sequence (`training.data.files.LazyImageList`, what
    `load_retrieval_eval_set` returns) opens and decodes only one batch of files at a time.
    """
    tokens, embeds = [], []
    for start in tqdm(range(0, len(images), batch_size), desc="Encoding images", disable=not show_progress):
        pixel_values = processor(images=list(images[start : start + batch_size]))["pixel_values"]
        out = model.encode_image(pixel_values.to(device=device, dtype=dtype), pruning_masks=pruning_masks)
        tokens.append(out.last_hidden_state)
        embeds.append(model.image_itc_embeds(out.last_hidden_state))
    return torch.cat(tokens), torch.cat(embeds)


def _encode_texts(model, captions: list[str], processor, batch_size: int, max_length: int, pruning_masks, device,
                  show_progress: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text tokens (N_txt, T, D_text), attention mask (N_txt, T) and ITC embeddings (N_txt, E), on `device`."""
    # one tokenizer call pads every caption to the same T, so the cache is a single tensor to gather from
    encoded = processor(text=list(captions), padding="longest", truncation=True, max_length=max_length)
    input_ids, mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
    tokens, embeds = [], []
    for start in tqdm(range(0, len(captions), batch_size), desc="Encoding texts", disable=not show_progress):
        ids, m = input_ids[start : start + batch_size], mask[start : start + batch_size]
        length = int(m.sum(1).max())  # trim to this batch's longest caption (right padding)
        out = model.encode_text(ids[:, :length], m[:, :length], pruning_masks=pruning_masks).last_hidden_state
        tokens.append(torch.nn.functional.pad(out, (0, 0, 0, mask.shape[1] - length)))
        embeds.append(model.text_itc_embeds(out))
    return torch.cat(tokens), mask, torch.cat(embeds)


def _itc_rows(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> Callable[[str, int, int], torch.Tensor]:
    """The `rerank_blocks` row source: blocks of ITC cosine similarities computed from the embeddings on demand."""
    image_embeds, text_embeds = image_embeds.float(), text_embeds.float()

    def rows(direction: str, start: int, stop: int) -> torch.Tensor:
        if direction == "i2t":
            return image_embeds[start:stop] @ text_embeds.t()  # (B, N_txt)
        return (image_embeds @ text_embeds[start:stop].t()).t()  # (B, N_img): the same products as the i2t rows

    return rows


def _score_blocks(model, image_embeds: torch.Tensor, text_embeds: torch.Tensor, k: int, query_block: int | None,
                  **rerank_kwargs: Any) -> Iterator[tuple[str, int, torch.Tensor, torch.Tensor]]:
    """(direction, first query, ITC block, re-ranked block) for blocks of image and of text queries: the model's
    `rerank_blocks`, or (k = 0, a model without an ITM head fits) the ITC blocks themselves."""
    rows, shape = _itc_rows(image_embeds, text_embeds), (image_embeds.shape[0], text_embeds.shape[0])
    if k > 0:
        yield from model.rerank_blocks(rows, shape, k, query_block=query_block, **rerank_kwargs)
        return
    for direction, (n_queries, n_candidates) in (("i2t", shape), ("t2i", shape[::-1])):
        step = query_block or max(1, RERANK_BLOCK_SCORES // max(n_candidates, 1))
        for start in range(0, n_queries, step):
            sim = rows(direction, start, min(start + step, n_queries))
            yield direction, start, sim, sim


def evaluate_retrieval(
    model: torch.nn.Module,
    images: Sequence,
    captions: Sequence[str],
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
    processor: Any,
    *, k: int = 16,
    batch_size: int = 32,
    pruning_masks: Any = None,
    device: torch.device | str | None = None,
    show_progress: bool = True,
    max_length: int = 40,
    itm_score: str = "match_logit",
    query_block: int | None = None,
    twins: Sequence[Sequence[int]] | None = None,
    twin_kinds: Sequence[str] | None = None,
    return_ranks: bool = False,
    reuse_image_kv: bool = True,
) -> dict[str, float] | tuple[dict[str, float], PerQueryRanks]:
    """Image-text retrieval with ITC ranking and ITM re-ranking of each query's top-k (X-VLM protocol).

    Image and text tokens are encoded once and cached on `device`; re-ranking (`model.rerank_blocks`) gathers them
    by index and runs only the fusion encoder + ITM head (at most N_img * k + N_txt * k pairs). Scores exist one
    block of queries at a time and are reduced to ranks at once: no (N_img, N_txt) matrix is ever held, so memory
    beyond the model is the token caches plus a few block-sized temporaries.

    Args:
        model: an `EfficientVLMForImageTextRetrieval` (an `EfficientVLMModel` suffices when k = 0).
        images: N_img PIL images, or a lazy sequence of them (opened one batch at a time).
        captions: N_txt captions.
        img2txt / txt2img: ground truth (see `retrieval_metrics`).
        processor: an `EfficientVLMProcessor` (images → pixel_values, texts → input_ids / attention_mask).
        k: ITM candidates per query (COCO 256, Flickr 128 in the paper); 0 = ITC only.
        batch_size: images / texts / pairs per forward.
        pruning_masks: optional `PruningMasks` applied to every encoder (a gated model at its masks).
        device: where to run; default the model's device.
        show_progress: tqdm bars.
        max_length: caption truncation length in tokens (X-VLM: 40).
        itm_score: how re-ranked pairs are scored (`modeling_efficientvlm.ITM_SCORES`; X-VLM: "match_logit").
        query_block: queries scored per block (None: blocks of about `RERANK_BLOCK_SCORES` scores); the metrics
            do not depend on it.
        twins: per image, its twins in the set (`make_twin_retrieval_eval_set`): adds "twin_accuracy", the share of
            (caption, twin of its image) pairs where the caption scores its own image above the twin under the
            re-rank score (ITM; ITC when k = 0), and "twin_accuracy_itc" under ITC alone (50 = chance); the first
            caption of every image against each of its twins.
        twin_kinds: per image, how it was made ("original" or a `TWIN_KINDS` entry): adds "twin_accuracy_<kind>"
            per kind of pair — "swapped" when either image of the pair is an attribute-swapped twin (the pair
            differs in which object has which attribute), else "rearranged" (only the objects' places differ).
        return_ranks: also return the per-query ranks of the re-ranked scores (for paired comparisons).
        reuse_image_kv: the re-rank engine (`itm_pair_scores`): each image's cross-attention keys / values projected
            once for all its candidate texts (default), or False: one full fusion pass per pair, as the official
            X-VLM code runs it (same scores to float rounding).

    Returns:
        `retrieval_metrics` of the re-ranked scores, plus the same keys suffixed `_itc` for ITC-only ranking and
        "r_mean_ci95" ([lo, hi], percentile bootstrap over query images, `metrics.confidence.r_mean_ci`; from 2
        images on); with
        `return_ranks` a tuple (metrics, `PerQueryRanks`).
    """
    if len(images) != len(img2txt) or len(captions) != len(txt2img):
        raise ValueError(f"{len(images)} images / {len(captions)} captions do not match img2txt ({len(img2txt)}) / "
                         f"txt2img ({len(txt2img)})")
    if k > 0 and not hasattr(model, "rerank_blocks"):
        raise ValueError(f"k={k} needs a model with an ITM head (rerank_blocks); use k=0 for ITC-only retrieval")
    if k < 0 or batch_size < 1:
        raise ValueError(f"need k >= 0 and batch_size >= 1, got k={k}, batch_size={batch_size}")
    check_ground_truth(img2txt, txt2img, len(images), len(captions))  # before the encoding, not after it
    positives = {"i2t": img2txt, "t2i": image_of_text(txt2img)}
    ranks = {(direction, kind): np.empty(len(positives[direction]), dtype=np.int64)
             for direction in positives for kind in ("itc", "rerank")}
    device, dtype = _model_device_dtype(model, device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            image_tokens, image_embeds = _encode_images(model, images, processor, batch_size, pruning_masks,
                                                        device, dtype, show_progress)
            text_tokens, text_mask, text_embeds = _encode_texts(model, list(captions), processor, batch_size,
                                                                max_length, pruning_masks, device, show_progress)
            progress = None if not show_progress else (lambda it: tqdm(it, desc="ITM re-ranking"))
            for direction, start, sim, scores in _score_blocks(
                model, image_embeds, text_embeds, k, query_block, image_tokens=image_tokens,
                text_tokens=text_tokens, attention_mask=text_mask, pruning_masks=pruning_masks, itm_score=itm_score,
                batch_size=batch_size, progress=progress, reuse_image_kv=reuse_image_kv,
            ):
                stop = start + sim.shape[0]
                itc = best_positive_ranks(sim.cpu().numpy(), positives[direction][start:stop],
                                          f"ITC {direction} similarities")
                ranks[direction, "itc"][start:stop] = itc
                ranks[direction, "rerank"][start:stop] = itc if scores is sim else best_positive_ranks(
                    scores.cpu().numpy(), positives[direction][start:stop], f"re-ranked {direction} scores")
            if twins is not None:
                twin_metrics = _twin_accuracy(model, twins, txt2img, image_embeds, text_embeds, k > 0,
                                              image_tokens=image_tokens, text_tokens=text_tokens,
                                              attention_mask=text_mask, pruning_masks=pruning_masks,
                                              itm_score=itm_score, batch_size=batch_size,
                                              reuse_image_kv=reuse_image_kv, twin_kinds=twin_kinds)
    finally:
        model.train(was_training)
    metrics = recall_metrics(ranks["i2t", "rerank"], ranks["t2i", "rerank"])
    itc_only = recall_metrics(ranks["i2t", "itc"], ranks["t2i", "itc"])
    per_query = PerQueryRanks(ranks["i2t", "rerank"], ranks["t2i", "rerank"], np.asarray(txt2img, dtype=np.int64))
    metrics = {**metrics, **{f"{key}_itc": value for key, value in itc_only.items()}}
    if len(img2txt) > 1:  # one query image has no spread to resample
        metrics["r_mean_ci95"] = r_mean_ci(per_query)
    if twins is not None:
        metrics.update(twin_metrics)
    return (metrics, per_query) if return_ranks else metrics


def _twin_accuracy(model, twins: Sequence[Sequence[int]], txt2img: Sequence[int], image_embeds: torch.Tensor,
                   text_embeds: torch.Tensor, use_itm: bool, twin_kinds: Sequence[str] | None = None,
                   **pair_kwargs: Any) -> dict[str, float]:
    """{"twin_accuracy", "twin_accuracy_itc"}: % of (caption, twin of its image) pairs where the caption scores its
    own image higher than the twin (ties count half), under the re-rank score (`itm_pair_scores`; ITC without ITM)
    and under ITC alone; one caption per image (its first), every twin; with `twin_kinds` also
    "twin_accuracy_<kind>" per kind of pair under the re-rank score (see `evaluate_retrieval`)."""
    first = {}  # the first caption of every image: 1 + m fusion passes per image, not per caption
    for text, image in enumerate(txt2img):
        first.setdefault(int(image), text)
    triples = [(text, image, twin) for image, text in sorted(first.items()) for twin in twins[image]]
    if not triples:
        return {}
    device = image_embeds.device
    texts, own_idx, other_idx = torch.tensor(triples, device=device).t()
    # each distinct (image, text) pair scored once: a caption's own image appears once per twin
    pairs, inverse = torch.unique(torch.stack([torch.cat([own_idx, other_idx]), torch.cat([texts, texts])]), dim=1,
                                  return_inverse=True)
    pair_itc = (image_embeds[pairs[0]].float() * text_embeds[pairs[1]].float()).sum(-1)
    n = len(triples)
    itc = pair_itc[inverse]
    out = {"twin_accuracy_itc": _win_rate(itc[:n], itc[n:])}
    scores = itc if not use_itm else model.itm_pair_scores(image_idx=pairs[0], text_idx=pairs[1], itc=pair_itc,
                                                           **pair_kwargs)[inverse]
    out["twin_accuracy"] = _win_rate(scores[:n], scores[n:])
    if twin_kinds is not None:
        kinds = ["swapped" if "swapped" in (twin_kinds[image], twin_kinds[twin]) else "rearranged"
                 for _, image, twin in triples]
        for kind in sorted(set(kinds)):
            chosen = torch.tensor([k == kind for k in kinds], device=device)
            out[f"twin_accuracy_{kind}"] = _win_rate(scores[:n][chosen], scores[n:][chosen])
    return out


def _win_rate(own: torch.Tensor, other: torch.Tensor) -> float:
    """% of pairs with own > other, ties counted half."""
    return float(100.0 * ((own > other).float() + 0.5 * (own == other).float()).mean())


def evaluate(model, processor, data, held_out, show_progress: bool = True, pruning_masks=None,
             return_ranks: bool = False) -> dict | tuple[dict, PerQueryRanks]:
    """The task's metrics on `held_out` (see `eval_data`), with the data arguments' k, ITM score and max length;
    "twin_accuracy" where the set names each image's twins; with `return_ranks` also the per-query ranks."""
    return evaluate_retrieval(
        model, held_out["images"], held_out["captions"], held_out["img2txt"], held_out["txt2img"], processor,
        k=data.itm_k, show_progress=show_progress, pruning_masks=pruning_masks, max_length=data.max_length,
        itm_score=data.itm_score, twins=held_out.get("twins"), twin_kinds=held_out.get("twin_kinds"),
        return_ranks=return_ranks,
        reuse_image_kv=data.reuse_image_kv,
    )


# ---------------------------------------------------------------------------------------------------- inference path
def retrieval_step(model, pixel_values, input_ids, attention_mask, k: int, itm_score: str = "match_logit", *,
                   reuse_image_kv: bool = True):
    """The timed retrieval path: encode all, ITC for all pairs, ITM re-ranking of every query's top-k (re-rank engine
    `reuse_image_kv`, see `EfficientVLMForImageTextRetrieval.itm_pair_scores`)."""
    image = model.encode_image(pixel_values).last_hidden_state
    text = model.encode_text(input_ids, attention_mask).last_hidden_state
    sim = model.image_itc_embeds(image) @ model.text_itc_embeds(text).t()
    if k == 0:
        return sim
    return model.rerank(sim, k, image, text, attention_mask, itm_score=itm_score, reuse_image_kv=reuse_image_kv)


def workload(model, processor, data, held_out, batch: int) -> Callable[[], Any]:
    """Encode `batch` held-out images and captions, ITC for all pairs, ITM on the top-k per query (k = data.itm_k),
    re-ranked by the engine of `data.reuse_image_kv`."""
    n = min(batch, len(held_out["images"]))
    pixels = processor(images=held_out["images"][:n])["pixel_values"]
    text = processor(text=held_out["captions"][:n], padding="max_length", max_length=data.max_length)
    return lambda: retrieval_step(model, pixels, text["input_ids"], text["attention_mask"], data.itm_k, data.itm_score,
                                  reuse_image_kv=data.reuse_image_kv)


def workload_text(data, batch: int) -> str:
    engine = ("each image's cross-attention K/V projected once for its candidates" if data.reuse_image_kv
              else "one fusion pass per pair, as the official X-VLM code")
    return (f"retrieval path on {batch} held-out images × {batch} captions: encode all, ITC all pairs, ITM on the "
            f"top-{data.itm_k} per query ({engine})")


USAGE = """import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{repo}", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)
images = [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")]
inputs = processor(images=images, text=["a big red circle", "a small blue square"])
with torch.no_grad():
    out = model(**inputs, compute_itm=True)
print(out.logits_per_image.softmax(dim=-1))  # ITC: each image against each text
print(out.itm_logits.softmax(dim=-1)[:, 1])  # ITM: match probability of (image i, text i)"""

USAGE_PIPELINE = """Retrieval pipeline (ranks a gallery for a query; `rerank_k` re-scores the ITC top candidates with the ITM
head):

```python
from PIL import Image
from transformers import pipeline

pipe = pipeline("image-text-retrieval", model="{repo}", trust_remote_code=True)
gallery = [Image.new("RGB", (64, 64), color) for color in ("red", "green", "blue")]
print(pipe("a big red circle", gallery, top_k=2, rerank_k=3))
```

A `str` is always a text; pass images as PIL images, `pathlib.Path` objects or numpy arrays, or give image file paths
as strings together with `gallery_type="image"` / `query_type="image"`."""

TASK = Task(
    name="retrieval",
    model_class=EfficientVLMForImageTextRetrieval,
    teacher_class=EfficientVLMForPreTraining,
    metric="r_mean",
    loss_step=retrieval_losses,
    # official retrieval config: 0.5·(KD + ITC + ITM), reg lr 0.01, cross-attention maps in task KD
    prune_defaults={"lambda_vlp": 0.5, "reg_learning_rate": 0.01, "cross_attention_kd": True, "target_sparsity": 0.25},
    train_data=train_data,
    eval_data=eval_data,
    eval_size=lambda held_out: len(held_out["images"]),
    evaluate=evaluate,
    workload=workload,
    workload_text=workload_text,
    # the paper's sensitivity finding: vision is the most sensitive encoder here, so it is pruned least
    manual_split="vision={half},text=auto,fusion=auto",
    card=ModelCardSpec(
        task_type="image-text-retrieval", pipeline_tag="zero-shot-image-classification", tag="image-text-retrieval",
        heads="ITC + ITM heads", speed_name="retrieval", usage=USAGE, usage_pipeline=USAGE_PIPELINE,
        metric_keys=("txt_r1", "img_r1", "r_mean"),
        report_keys=("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"), title="Retrieval",
    ),
    description="image-caption pairs; R@K, r_mean (ITC ranking, ITM re-ranking of the top-k)",
    # the COCO 5k test protocol: every image and text encoded once, ITM on the top k = 256 of every query
    path_sizes={"images": 5000, "texts": 25000, "k": 256, "text_length": 40},
    cost_path=retrieval_path,
    flops=retrieval_flops,
    # the re-rank engines: the model's (image K/V once per image) and the official code's (K/V per pair)
    engines=({"reuse_image_kv": True}, {"reuse_image_kv": False}),
)
