"""Processor for EfficientVLM: a CLIP image processor (CLIP normalisation, bicubic resize) + a BERT tokenizer.

It also holds EfficientVLM's one image conversion, `to_rgb` (EXIF orientation, transparency composited on white,
any mode to 8-bit RGB): the processor applies it to every PIL image it is given, the pipeline goes through the
processor, and the training loaders import it from here, so one picture gives the same pixels on every path.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps
from transformers import BatchFeature, ProcessorMixin

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BACKGROUND = (255, 255, 255)  # transparent pixels become white (stamps, icons and logos are drawn on alpha)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
UNKNOWN_SHARE = 0.5  # more than this share of a text's tokens unknown: the processor warns (once)
logger = logging.getLogger(__name__)
REDUCE_MARGIN = 3
"""An image whose short side is more than 2 x REDUCE_MARGIN x the model's input side is first resized to a short side
of REDUCE_MARGIN x that side (JPEG: decoded at a reduced scale first, `draft`), by Pillow's bicubic resize with
`reducing_gap=3` (an integer box reduction, then bicubic; Pillow: indistinguishable from resampling the full image).
The processor's own resize then gives the same pixels within a grey level, and a 12000-px photo costs one decoded
image for a moment, not a float copy per image of the batch."""
REDUCE_FIRST_MODES = ("L", "RGB", "CMYK", "YCbCr", "I", "F")  # no alpha: reducing before the conversion is exact


def reduce_image(image: Image.Image, min_side: int | None) -> Image.Image:
    """`image` resized to a short side of REDUCE_MARGIN x `min_side` when it is more than twice that (else, or when
    `min_side` is None, the same object)."""
    scale = REDUCE_MARGIN * min_side / min(image.size) if min_side else 1.0
    if scale > 0.5:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=REDUCE_MARGIN)


def to_rgb(image: Image.Image, min_side: int | None = None) -> Image.Image:
    """EfficientVLM's image conversion: upright, opaque, 8-bit RGB (and no larger than needed, with `min_side`).

    1. EXIF orientation applied (`ImageOps.exif_transpose`; the tag is cleared, so a second call is a no-op).
    2. With `min_side` (the model's input side): reduced by `reduce_image` (before the conversion unless the image
       has transparency or a mode `Image.reduce` lacks; after it otherwise).
    3. 16-bit greyscale (`I;16*`) scaled to 8 bits (Pillow's own conversion would clip everything above 255).
    4. Transparency (an alpha band: RGBA, LA, PA, RGBa; or a `transparency` entry: P, L, RGB) composited onto white.
    5. Any other mode (L, 1, P, CMYK, YCbCr, I, F...) converted with Pillow's `convert("RGB")`.

    An RGB image without an orientation tag that needs no reduction is returned as it is (same object).

    Raises:
        ValueError: naming the mode when Pillow cannot convert it.
    """
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in REDUCE_FIRST_MODES and "transparency" not in image.info:
        image = reduce_image(image, min_side)
    return reduce_image(_convert_rgb(image), min_side)


def _convert_rgb(image: Image.Image) -> Image.Image:
    """Steps 3-5 of `to_rgb`."""
    mode = image.mode
    try:
        if mode in SIXTEEN_BIT_MODES:  # (H, W) uint16 → uint8, rounding v / 257 (65535 → 255)
            pixels = np.asarray(image).astype(np.float64) / 257.0
            return Image.fromarray(np.rint(pixels).astype(np.uint8)).convert("RGB")
        if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
            rgba = image.convert("RGBA")
            canvas = Image.new("RGB", rgba.size, BACKGROUND)
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            return canvas
        return image if mode == "RGB" else image.convert("RGB")
    except ValueError as error:  # Pillow: "conversion from X to Y not supported"
        raise ValueError(f"cannot convert a {mode!r} image to RGB: {error}") from error


def open_image(path: str | os.PathLike, min_side: int | None = None) -> Image.Image:
    """Reads a local image file (no URLs) and returns it decoded and converted by `to_rgb` (with `min_side`: reduced
    right away, a JPEG already while decoding).

    Raises:
        FileNotFoundError: naming `path` when it is not an existing file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {os.fspath(path)!r} (only local files are read, no URLs)")
    with Image.open(path) as image:
        scale = REDUCE_MARGIN * min_side / min(image.size) if min_side else 1.0
        if scale <= 0.5:  # JPEG: DCT scaling to the smallest 1/2, 1/4, 1/8 no smaller than this (others: no-op)
            image.draft(image.mode, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
        image.load()  # decode now: the file closes when the block ends
        return to_rgb(image, min_side)


def array_to_image(array: np.ndarray) -> Image.Image:
    """A numpy image as a PIL image: (H, W) greyscale, or (H, W, C) / (C, H, W) with C = 1, 3 or 4 (RGBA).

    Values: uint8 0-255; uint16 0-65535 (scaled to 8 bits); bool; other integers within 0-255; floats in [0, 1] (how
    matplotlib, scikit-image and torchvision hold images), scaled by 255.

    Raises:
        ValueError: naming the shape and dtype (and the value range) of an array that is none of these.
    """
    a = np.asarray(array)
    what = f"shape {tuple(a.shape)}, dtype {a.dtype}"
    if a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # channels-first
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.size == 0 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise ValueError(f"an image array must be (H, W), (H, W, C) or (C, H, W) with C = 1, 3 or 4; got {what}")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = np.rint(a / 257.0).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError(f"the image array holds NaN or infinite values ({what})")
        if a.min() < 0 or a.max() > 1:
            raise ValueError(f"a float image array must hold values in [0, 1], got {a.min():.4g} to {a.max():.4g} "
                             f"({what}); pass uint8 for 0-255 pixels")
        a = np.rint(a * 255.0).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer) and a.dtype != np.uint8:
        if a.min() < 0 or a.max() > 255:
            raise ValueError(f"an integer image array must hold values in 0-255, got {a.min()} to {a.max()} "
                             f"({what}); pass uint16 for 16-bit pixels or floats in [0, 1]")
        a = a.astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ValueError(f"an image array must hold integers or floats, got {what}")
    return Image.fromarray(np.ascontiguousarray(a), "L" if a.ndim == 2 else ("RGB" if a.shape[-1] == 3 else "RGBA"))


def prepare_images(images: Any, min_side: int | None = None) -> Any:
    """Applies `to_rgb` (with `min_side`) to every PIL image and numpy array in `images` (one image, a (B, ...) array
    of images or a possibly nested list of them); arrays are read by `array_to_image` first.

    Anything else (tensors) is returned unchanged: it is already pixels, which the image processor takes as they are.
    """
    if isinstance(images, Image.Image):
        return to_rgb(images, min_side)
    if isinstance(images, np.ndarray):
        if images.ndim == 4:  # a batch
            return [to_rgb(array_to_image(image), min_side) for image in images]
        return to_rgb(array_to_image(images), min_side)
    if isinstance(images, (list, tuple)):
        return [prepare_images(image, min_side) for image in images]
    return images


def input_side(image_processor: Any) -> int | None:
    """The side of the square the image processor feeds the model (its crop, else its resize target), or None."""
    for name, key in (("crop_size", "height"), ("size", "shortest_edge"), ("size", "height")):
        sizes = getattr(image_processor, name, None)
        value = sizes.get(key) if isinstance(sizes, dict) else getattr(sizes, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class EfficientVLMProcessor(ProcessorMixin):
    """Wraps `CLIPImageProcessorPil` and a BERT tokenizer into one callable.

    `processor(images=..., text=..., return_tensors="pt")` returns `pixel_values`, `input_ids` and `attention_mask`;
    texts are truncated to `max_length` tokens (X-VLM: 40) unless the call overrides it. Every PIL image and numpy
    array (`array_to_image`: greyscale, floats in [0, 1]...) first goes through `to_rgb` (EXIF orientation,
    transparency on white, a large image reduced near the input size), whatever the image processor's own RGB
    conversion does (it differs across transformers versions and backends).

    Args:
        image_processor: a `CLIPImageProcessorPil` (resize to the model's image size, bicubic, CLIP mean/std).
        tokenizer: a BERT WordPiece tokenizer.
        max_length: default maximum text length in tokens.
    """


    def __init__(self, image_processor=None, tokenizer=None, max_length: int = 40, **kwargs):
        self.max_length = max_length
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(self, images=None, text=None, return_tensors: str | None = "pt", **kwargs):
        """Processes images and/or texts; extra keyword arguments go to the tokenizer (padding, max_length...)."""
        if images is None and text is None:
            raise ValueError("EfficientVLMProcessor needs `images`, `text`, or both")
        kwargs.pop("images_kwargs", None)
        features = {}
        if text is not None:
            text_kwargs = {"padding": "longest", "truncation": True, "max_length": self.max_length}
            text_kwargs.update({k: v for k, v in kwargs.items() if k in ("padding", "truncation", "max_length")})
            encoded = self.tokenizer(text, return_tensors=return_tensors, **text_kwargs)
            features.update({k: encoded[k] for k in ("input_ids", "attention_mask")})
            if not getattr(self, "_warned_unknown", False):
                self._warn_unknown(text, encoded["input_ids"])
        if images is not None:
            images = prepare_images(images, input_side(self.image_processor))
            features.update(self.image_processor(images, return_tensors=return_tensors))
        return BatchFeature(features, tensor_type=return_tensors)

    def _warn_unknown(self, text, input_ids) -> None:
        """Logs one warning per processor when more than UNKNOWN_SHARE of a text's tokens are the tokenizer's unknown
        token: the model then scores words it has never seen (a vocabulary built for other data)."""
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if unk is None:
            return
        special = set(getattr(self.tokenizer, "all_special_ids", ())) - {unk}
        rows = input_ids.tolist() if hasattr(input_ids, "tolist") else list(input_ids)
        rows = [rows] if rows and isinstance(rows[0], int) else rows
        for row, words in zip(rows, [text] if isinstance(text, str) else list(text)):
            tokens = [token for token in row if token not in special]
            unknown = sum(token == unk for token in tokens)
            if tokens and unknown > UNKNOWN_SHARE * len(tokens):
                self._warned_unknown = True
                logger.warning(
                    "%d of %d tokens of %r are unknown to this model's tokenizer (%s, %d tokens): results on such texts "
                    "mean little; use words of the model's training data (warned once)", unknown, len(tokens),
                    words, self.tokenizer.unk_token, len(self.tokenizer))
                return

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Loads the saved image processor and tokenizer (standard transformers classes: no remote code needed).

        Raises:
            FileNotFoundError: a local folder lacks the tokenizer's vocabulary (tokenizer.json or vocab.txt) or the
                image processor's settings, naming the files (transformers would build a tokenizer without a
                vocabulary, or ask for sentencepiece).
        """
        kwargs.setdefault("trust_remote_code", False)  # the sub-processors are built-in classes; never prompt
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            folder = pretrained_model_name_or_path
            if kwargs.get("subfolder"):
                folder = os.path.join(folder, kwargs["subfolder"])
            if os.path.isdir(folder):
                _check_processor_files(folder)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def _load_tokenizer_from_pretrained(cls, sub_processor_type, pretrained_model_name_or_path, subfolder="", **kwargs):
        """tokenizer_config.json names the tokenizer class, so AutoTokenizer gets a placeholder model config instead of
        reading config.json: without remote code it cannot build our `efficientvlm` config and falls back to a bare
        one, logging "You are using a model of type `efficientvlm` to instantiate a model of type ``" on every load.
        (transformers' per-sub-processor hook; were it renamed, loading still works and only the notice returns.)"""
        from transformers import PretrainedConfig

        kwargs.setdefault("config", PretrainedConfig())
        return super()._load_tokenizer_from_pretrained(sub_processor_type, pretrained_model_name_or_path, subfolder,
                                                       **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "input_ids", "attention_mask"]


PROCESSOR_FILES = {
    "tokenizer": ("tokenizer.json", "vocab.txt"),
    "image processor": ("processor_config.json", "preprocessor_config.json"),
}
"""Per part of the processor, the files of a saved folder any one of which holds it."""


def _check_processor_files(folder: str | os.PathLike) -> None:
    """Raises FileNotFoundError naming the files a local processor folder lacks (see `PROCESSOR_FILES`)."""
    for part, names in PROCESSOR_FILES.items():
        if not any(os.path.isfile(os.path.join(folder, name)) for name in names):
            raise FileNotFoundError(
                f"{os.fspath(folder)}: the {part} is missing: no {' or '.join(names)} (copy it from the folder the "
                "checkpoint was saved to, or save the processor there again)"
            )


def build_image_processor(image_size: int):
    """A CLIP image processor (PIL backend: no torchvision needed) for square `image_size` inputs: bicubic resize of the short side, centre crop, CLIP norm."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        resample=3,  # PIL bicubic
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )


# Hub remote code: `save_pretrained` copies this file and writes `auto_map` for AutoProcessor.
EfficientVLMProcessor.register_for_auto_class()

__all__ = ["EfficientVLMProcessor", "array_to_image", "build_image_processor", "input_side", "open_image",
           "prepare_images", "reduce_image", "to_rgb"]
