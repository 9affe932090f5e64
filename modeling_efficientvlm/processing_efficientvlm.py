"""Processor for EfficientVLM: a CLIP image processor (CLIP normalisation, bicubic resize) + a BERT tokenizer.

It also holds EfficientVLM's one image conversion, `to_rgb` (EXIF orientation, transparency composited on white,
any mode to 8-bit RGB): the processor applies it to every PIL image it is given, the pipeline goes through the
processor, and the training loaders import it from here, so one picture gives the same pixels on every path.
"""

from __future__ import annotations

import logging
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


def to_rgb(image: Image.Image) -> Image.Image:
    """EfficientVLM's image conversion: upright, opaque, 8-bit RGB.

    1. EXIF orientation applied (`ImageOps.exif_transpose`; the tag is cleared, so a second call is a no-op).
    2. 16-bit greyscale (`I;16*`) scaled to 8 bits (Pillow's own conversion would clip everything above 255).
    3. Transparency (an alpha band: RGBA, LA, PA, RGBa; or a `transparency` entry: P, L, RGB) composited onto white.
    4. Any other mode (L, 1, P, CMYK, YCbCr, I, F...) converted with Pillow's `convert("RGB")`.

    An RGB image without an orientation tag is returned as it is (same object).

    Raises:
        ValueError: naming the mode when Pillow cannot convert it.
    """
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
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


def open_image(path: str | os.PathLike) -> Image.Image:
    """Reads a local image file (no URLs) and returns it decoded and converted by `to_rgb`.

    Raises:
        FileNotFoundError: naming `path` when it is not an existing file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {os.fspath(path)!r} (only local files are read, no URLs)")
    with Image.open(path) as image:
        image.load()  # decode now: the file closes when the block ends
        return to_rgb(image)


def prepare_images(images: Any) -> Any:
    """Applies `to_rgb` to every PIL image in `images` (one image or a possibly nested list of images).

    Anything else (numpy arrays, tensors) is returned unchanged: it is already pixels, which the image processor
    takes as they are (channels-last or channels-first; transformers' `convert_rgb` composites 4-channel arrays on
    white).
    """
    if isinstance(images, Image.Image):
        return to_rgb(images)
    if isinstance(images, (list, tuple)):
        return [prepare_images(image) for image in images]
    return images


class EfficientVLMProcessor(ProcessorMixin):
    """Wraps `CLIPImageProcessorPil` and a BERT tokenizer into one callable.

    `processor(images=..., text=..., return_tensors="pt")` returns `pixel_values`, `input_ids` and `attention_mask`;
    texts are truncated to `max_length` tokens (X-VLM: 40) unless the call overrides it. Every PIL image first goes
    through `to_rgb` (EXIF orientation, transparency on white), whatever the image processor's own RGB conversion
    does (it differs across transformers versions and backends).

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
            features.update(self.image_processor(prepare_images(images), return_tensors=return_tensors))
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
        """Loads the saved image processor and tokenizer (standard transformers classes: no remote code needed)."""
        kwargs.setdefault("trust_remote_code", False)  # the sub-processors are built-in classes; never prompt
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

__all__ = ["EfficientVLMProcessor", "build_image_processor", "open_image", "prepare_images", "to_rgb"]
