"""Batch collators: items (dicts with images and texts) -> model-ready tensors via an EfficientVLM processor.

The processor is anything with `.tokenizer` (a BERT tokenizer) and `__call__(images=None, text=None, **kwargs)`
returning a mapping with "pixel_values" (for images) and "input_ids"/"attention_mask" (for text); extra keyword
arguments (padding, truncation, max_length, return_tensors) go to the tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .files import load_image


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer: Any, *, probability: float,
                max_masks: int, generator: torch.Generator | None = None,
                min_masks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking for MLM: pick tokens, then 80% [MASK], 10% a random word, 10% unchanged.

    Only real tokens are candidates (attention_mask == 1 and not a special token such as [CLS]/[SEP]/[PAD]).
    Each row masks the candidates that draw below `probability`, capped at `max_masks`; and at least
    `min(min_masks, number of candidates)` so every caption contributes to the loss (short captions at a low
    probability would otherwise often give none). Which candidates are kept is uniformly random.

    Args:
        input_ids: (B, T) token ids.
        attention_mask: (B, T) 1 for real tokens, 0 for padding.
        tokenizer: provides `all_special_ids`, `mask_token_id` and `len(tokenizer)`.
        probability: per-token masking probability (ALBEF/X-VLM: 0.25 or 0.15).
        max_masks: at most this many masked tokens per row.
        generator: random source (None: torch's global RNG, which DataLoader seeds per worker).
        min_masks: at least this many masked tokens per row that has that many candidates.

    Returns:
        (masked_ids, labels): both (B, T); labels are the original ids at masked positions and -100 elsewhere.
    """
    if not 0.0 <= probability <= 1.0 or max_masks < 0 or min_masks < 0:
        raise ValueError(f"need 0 <= probability <= 1 and non-negative mask counts, got {probability}, "
                         f"max_masks={max_masks}, min_masks={min_masks}")
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=input_ids.dtype)
    candidates = attention_mask.bool() & ~torch.isin(input_ids, special)  # (B, T)
    noise = torch.rand(input_ids.shape, generator=generator).masked_fill(~candidates, 2.0)
    n_candidates = candidates.sum(1)
    # the k lowest-noise candidates are exactly those under `probability` when k = their count
    k = (noise < probability).sum(1).clamp(max=max_masks)
    k = torch.maximum(k, n_candidates.clamp(max=min(min_masks, max_masks)))
    rank = noise.argsort(dim=1).argsort(dim=1)  # (B, T) rank of each position's noise within its row
    chosen = candidates & (rank < k[:, None])

    labels = input_ids.masked_fill(~chosen, -100)
    action = torch.rand(input_ids.shape, generator=generator)
    masked = input_ids.clone()
    masked[chosen & (action < 0.8)] = tokenizer.mask_token_id
    # random replacements are drawn from ordinary words so a masked slot never turns into [PAD]/[CLS]/[SEP]
    words = torch.tensor([i for i in range(len(tokenizer)) if i not in set(special.tolist())], dtype=input_ids.dtype)
    replace = chosen & (action >= 0.8) & (action < 0.9)
    picks = torch.randint(len(words), input_ids.shape, generator=generator)
    masked[replace] = words[picks][replace]
    return masked, labels


def _texts(items: list[dict], key: str) -> list[str]:
    texts = []
    for index, item in enumerate(items):
        if key not in item:
            raise ValueError(f"batch item {index} has no {key!r} (keys: {sorted(item)})")
        if not isinstance(item[key], str) or not item[key].strip():
            raise ValueError(f"batch item {index} field {key!r} is an empty or non-string text")
        texts.append(item[key])
    return texts


def _images(items: list[dict], key: str) -> list:
    try:
        return [item[key] for item in items]
    except KeyError as error:
        index = next(i for i, item in enumerate(items) if key not in item)
        raise ValueError(f"batch item {index} has no {key!r} (keys: {sorted(items[index])})") from error


NO_BOX = (0.5, 0.5, 1.0, 1.0)
"""Placeholder target of a row without a region (X-VLM's whole-image box); `has_box` keeps it out of L_BBOX."""


def box_in_center_crop(box: Sequence[float], width: int, height: int,
                       min_visible: float = 0.5) -> tuple[float, float, float, float] | None:
    """Maps a box normalised to a `width` x `height` image into the square centre crop the processor takes (short
    side resized to the model's size, then centre-cropped), clipped to the crop.

    Args:
        box: (cx, cy, w, h) normalised to the original image.
        width / height: the original image's size in pixels.
        min_visible: the smallest share of the box's area that must stay inside the crop (X-VLM keeps a region
            cut by its random crop when more than half of it is left).

    Returns:
        (cx, cy, w, h) normalised to the crop, or None when less than `min_visible` of the box is inside it.
    """
    side = min(width, height)
    scale_x, scale_y = width / side, height / side  # original-normalised → crop-normalised
    shift_x, shift_y = (width - side) / 2 / side, (height - side) / 2 / side
    cx, cy, w, h = box
    x0, x1 = (cx - w / 2) * scale_x - shift_x, (cx + w / 2) * scale_x - shift_x
    y0, y1 = (cy - h / 2) * scale_y - shift_y, (cy + h / 2) * scale_y - shift_y
    cx0, cx1, cy0, cy1 = max(x0, 0.0), min(x1, 1.0), max(y0, 0.0), min(y1, 1.0)
    if cx1 <= cx0 or cy1 <= cy0 or (cx1 - cx0) * (cy1 - cy0) < min_visible * (x1 - x0) * (y1 - y0):
        return None
    return (cx0 + cx1) / 2, (cy0 + cy1) / 2, cx1 - cx0, cy1 - cy0


class RetrievalCollator:
    """Collates image-text items for ITC/ITM/MLM(/BBOX) training and retrieval.

    Items: {"image": PIL image | path | datasets.Image dict, "caption": str} and optionally
    "negative_caption" (str; all items or none), "image_id" (int; all items or none) and region annotations for
    X-VLM's L_BBOX: "region_phrases" (list of str) with "region_boxes" (list of (cx, cy, w, h) normalised to the
    image), one box per phrase; an item without them (or with empty lists) has no box.

    Returns dict: pixel_values (B, C, H, W), input_ids / attention_mask (B, T); with mlm_probability > 0 also
    mlm_input_ids / mlm_labels (B, T); with negative captions negative_input_ids / negative_attention_mask (B, T');
    with image ids image_ids (B,) (for ITC targets when an image has several captions); when any item has regions,
    box_input_ids / box_attention_mask (B, T'') (one region per item, drawn at random among its regions after the
    MLM masking; the caption where the item has none), boxes (B, 4) float (cx, cy, w, h) in the processed image's
    coordinates (`box_in_center_crop`; `NO_BOX` where none) and has_box (B,) bool.

    Args:
        processor: an `EfficientVLMProcessor` (or anything with its call interface and `.tokenizer`).
        max_length: maximum caption length in tokens (X-VLM: 40).
        mlm_probability: masking probability; 0 disables the MLM outputs.
        max_masks: maximum masked tokens per caption.
        generator: random source for masking (None: torch's global RNG).
    """

    def __init__(self, processor: Any, max_length: int = 40, mlm_probability: float = 0.0, max_masks: int = 8,
                 generator: torch.Generator | None = None):
        self.processor, self.max_length = processor, max_length
        self.mlm_probability, self.max_masks, self.generator = mlm_probability, max_masks, generator

    def _encode(self, texts: list[str], images: list | None = None) -> Any:
        return self.processor(images=images, text=texts, padding="longest", truncation=True,
                              max_length=self.max_length, return_tensors="pt")

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        images = [load_image(image) for image in _images(items, "image")]
        encoded = self._encode(_texts(items, "caption"), images)
        batch = {key: encoded[key] for key in ("pixel_values", "input_ids", "attention_mask")}
        if self.mlm_probability > 0:
            batch["mlm_input_ids"], batch["mlm_labels"] = mask_tokens(
                batch["input_ids"], batch["attention_mask"], self.processor.tokenizer, probability=self.mlm_probability,
                max_masks=self.max_masks, generator=self.generator)
        for key, build in (("negative_caption", self._negatives), ("image_id", self._image_ids)):
            present = sum(key in item for item in items)
            if 0 < present < len(items):
                raise ValueError(f"{present} of {len(items)} batch items have {key!r}: give it to all or none")
            if present:
                batch.update(build(items))
        if any("region_phrases" in item for item in items):
            batch.update(self._regions(items, [image.size for image in images]))
        return batch

    def _regions(self, items: list[dict], sizes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """One (phrase, box) per item for L_BBOX; the box follows the processor's centre crop."""
        image_processor = getattr(self.processor, "image_processor", None)
        crop = bool(getattr(image_processor, "do_center_crop", True))
        phrases, boxes, has_box = [], [], []
        for index, (item, (width, height)) in enumerate(zip(items, sizes)):
            item_phrases, item_boxes = item.get("region_phrases") or [], item.get("region_boxes") or []
            if len(item_phrases) != len(item_boxes):
                raise ValueError(f"batch item {index}: {len(item_phrases)} region_phrases but {len(item_boxes)} "
                                 "region_boxes (one box per phrase)")
            phrase, box = item["caption"], None
            if item_phrases:
                pick = int(torch.randint(len(item_phrases), (1,), generator=self.generator)) if len(
                    item_phrases) > 1 else 0
                box = item_boxes[pick]
                box = box_in_center_crop(box, width, height) if crop else tuple(box)
                phrase = item_phrases[pick] if box is not None else phrase
            phrases.append(phrase)
            boxes.append(box if box is not None else NO_BOX)
            has_box.append(box is not None)
        encoded = self._encode(phrases)
        return {"box_input_ids": encoded["input_ids"], "box_attention_mask": encoded["attention_mask"],
                "boxes": torch.tensor(boxes, dtype=torch.float32), "has_box": torch.tensor(has_box)}

    def _negatives(self, items: list[dict]) -> dict[str, torch.Tensor]:
        encoded = self._encode(_texts(items, "negative_caption"))
        return {"negative_input_ids": encoded["input_ids"], "negative_attention_mask": encoded["attention_mask"]}

    @staticmethod
    def _image_ids(items: list[dict]) -> dict[str, torch.Tensor]:
        return {"image_ids": torch.tensor([int(item["image_id"]) for item in items], dtype=torch.long)}


class NLVR2Collator:
    """Collates NLVR2 items {"images": [left, right], "sentence": str, "label": int}.

    Returns dict: pixel_values (B, 2, C, H, W) (index 0 = left image), input_ids / attention_mask (B, T),
    labels (B,) long.
    """

    def __init__(self, processor: Any, max_length: int = 40):
        self.processor, self.max_length = processor, max_length

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        images = []
        for index, pair in enumerate(_images(items, "images")):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(f"batch item {index} field 'images' must hold exactly two images")
            images.extend(load_image(image) for image in pair)
        labels = []
        for index, item in enumerate(items):
            if "label" not in item:
                raise ValueError(f"batch item {index} has no 'label' (keys: {sorted(item)})")
            labels.append(int(item["label"]))
        encoded = self.processor(images=images, text=_texts(items, "sentence"), padding="longest", truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
        pixel_values = encoded["pixel_values"]  # (2B, C, H, W), pairs adjacent
        return {"pixel_values": pixel_values.view(len(items), 2, *pixel_values.shape[1:]),
                "input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                "labels": torch.tensor(labels, dtype=torch.long)}


CAPTION_PROMPT = "a picture of "
"""The captioning prompt (X-VLM): every caption is trained and generated after it; its tokens are not in the loss."""


def caption_prompt_ids(tokenizer: Any, prompt: str = CAPTION_PROMPT) -> list[int]:
    """[CLS] + the prompt's tokens (no [SEP]): the ids every caption starts from (`config.caption_prompt_ids`)."""
    return [tokenizer.cls_token_id] + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


class CaptioningCollator:
    """Collates image-caption items {"image": PIL image | path, "caption": str} for teacher-forced captioning.

    Each text is `prompt + caption`, tokenized as "[CLS] <prompt> <caption> [SEP] [PAD]...". Labels are the input
    ids with -100 on [CLS] + the prompt's tokens and on padding (the caption's tokens and its [SEP] are predicted; the
    model shifts them internally).

    Returns dict: pixel_values (B, C, H, W), input_ids / attention_mask / labels (B, T).

    Args:
        processor: an `EfficientVLMProcessor` (or anything with its call interface and `.tokenizer`).
        max_length: maximum length in tokens, prompt included (X-VLM: 40).
        prompt: the caption prompt.
    """

    def __init__(self, processor: Any, max_length: int = 40, prompt: str = CAPTION_PROMPT):
        self.processor, self.max_length, self.prompt = processor, max_length, prompt
        self.prompt_ids = torch.tensor(caption_prompt_ids(processor.tokenizer, prompt))  # (P,)
        if len(self.prompt_ids) + 2 > max_length:  # [SEP] and at least one caption token must fit
            raise ValueError(f"max_length {max_length} leaves no room for a caption after the {len(self.prompt_ids)} "
                             f"prompt tokens of {prompt!r}")

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        images = [load_image(image) for image in _images(items, "image")]
        texts = [self.prompt + caption.strip() for caption in _texts(items, "caption")]
        encoded = self.processor(images=images, text=texts, padding="longest", truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
        input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        n = len(self.prompt_ids)
        if not bool((input_ids[:, :n] == self.prompt_ids).all()):
            # a tokenizer that merges the prompt's last word with the caption's first would shift the labels
            raise ValueError(f"the tokenizer does not keep the prompt {self.prompt!r} as its own tokens "
                             f"{self.prompt_ids.tolist()} before the captions")
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :n] = -100
        return {"pixel_values": encoded["pixel_values"], "input_ids": input_ids, "attention_mask": attention_mask,
                "labels": labels}


__all__ = ["CAPTION_PROMPT", "NO_BOX", "CaptioningCollator", "NLVR2Collator", "RetrievalCollator", "box_in_center_crop",
           "caption_prompt_ids", "mask_tokens"]
