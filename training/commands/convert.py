"""`efficientvlm convert-xvlm`: the command over `method.initializers.convert_xvlm_checkpoint`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..method.initializers import convert_xvlm_checkpoint


@dataclass
class ConvertXVLMArguments:
    """Arguments of `efficientvlm convert-xvlm`."""

    model: str = field(metadata={"help": "X-VLM / EfficientVLM .pth checkpoint (dict with 'model', or a state dict).",
                                 "aliases": ["--input"]})
    output_dir: str = field(metadata={"help": "Where to write the Hub-ready folder."})
    image_size: int | None = field(
        default=None, metadata={"help": "Target image size; position embeddings are interpolated if it differs."}
    )
    tokenizer_dir: str | None = field(
        default=None, metadata={"help": "BERT tokenizer dir (e.g. bert-base-uncased); saves a processor too."}
    )
    head_dim: int = field(default=64, metadata={"help": "Attention head width of the checkpoint."})
    overwrite: bool = field(default=False, metadata={"help": "Replace output_dir if it exists."})


def run_convert_xvlm(args: ConvertXVLMArguments) -> dict[str, Any]:
    """`efficientvlm convert-xvlm`: converts `args.model` into `args.output_dir`; returns the report as a dict."""
    _, report = convert_xvlm_checkpoint(
        args.model, args.output_dir, args.image_size, args.tokenizer_dir,
        head_dim=args.head_dim, overwrite=args.overwrite, return_report=True,
    )
    return report.to_dict()
