"""Processor for EfficientVLM: a CLIP image processor (CLIP normalisation, bicubic resize) + a BERT tokenizer."""

from __future__ import annotations

from transformers import BatchFeature, ProcessorMixin

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class EfficientVLMProcessor(ProcessorMixin):
    """Wraps `CLIPImageProcessorPil` and a BERT tokenizer into one callable.

    `processor(images=..., text=..., return_tensors="pt")` returns `pixel_values`, `input_ids` and `attention_mask`;
    texts are truncated to `max_length` tokens (X-VLM: 40) unless the call overrides it.

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
        if images is not None:
            features.update(self.image_processor(images, return_tensors=return_tensors))
        return BatchFeature(features, tensor_type=return_tensors)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Loads the saved image processor and tokenizer (standard transformers classes: no remote code needed)."""
        kwargs.setdefault("trust_remote_code", False)  # the sub-processors are built-in classes; never prompt
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

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

__all__ = ["EfficientVLMProcessor", "build_image_processor"]
