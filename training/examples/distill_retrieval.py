#!/usr/bin/env python
"""General distillation of an EfficientVLM teacher into a half-depth student on your own image-caption pairs.

EfficientVLM §3.1: the student keeps every other layer of each encoder (initialised from the teacher's) and learns
from the VLP losses (ITC, ITM with hard negatives, MLM) plus attention / hidden-state / logit KD from the frozen
teacher. The data is a `datasets` image folder: images + `metadata.jsonl` with a `file_name` and a caption column
(a string, or a list of strings for several captions per image).

    python distill_retrieval.py --teacher path/to/teacher --data_dir path/to/images --output_dir student \
        --max_steps 10000 --per_device_train_batch_size 64 --learning_rate 1e-4

Every `TrainingArguments` flag works (`--push_to_hub --hub_model_id user/name` uploads the student at the end), as do
the distillation weights of `DistillationArguments` (`--lambda_vlp`, `--alpha_attn`, ...; see `--help`). The student
folder (with its processor and `layer_map.json`) is what `prune_retrieval.py --student` reads.
"""

import logging
import os
import sys
from dataclasses import dataclass, field

from datasets import load_dataset
from transformers import AutoTokenizer, HfArgumentParser

from efficientvlm.training import (
    DistillationArguments,
    EfficientVLMDistillationTrainer,
    RetrievalCollator,
    get_task,
    init_student_from_teacher,
)
from efficientvlm.training.data.files import from_hf_dataset
from modeling_efficientvlm import EfficientVLMForPreTraining
from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor, build_image_processor

logger = logging.getLogger(__name__)


@dataclass
class ScriptArguments:
    """Which teacher to distil, the student's depth and the image-caption folder."""

    teacher: str = field(metadata={"help": "Teacher checkpoint dir (an EfficientVLM model, e.g. from convert-xvlm)."})
    data_dir: str = field(metadata={"help": "Image folder with a metadata.jsonl (or metadata.csv) of captions."})
    caption_column: str = field(default="caption", metadata={"help": "The metadata column holding the caption(s)."})
    tokenizer: str | None = field(
        default=None, metadata={"help": "BERT tokenizer dir (default: the processor saved with the teacher)."}
    )
    vision_layers: int | None = field(default=None, metadata={"help": "Student vision depth (default: half)."})
    text_layers: int | None = field(default=None, metadata={"help": "Student text depth (default: half)."})
    fusion_layers: int | None = field(default=None, metadata={"help": "Student fusion depth (default: half)."})
    max_length: int = field(default=40, metadata={"help": "Maximum caption length in tokens (X-VLM: 40)."})
    mlm_probability: float = field(default=0.25, metadata={"help": "MLM masking probability (0 disables MLM)."})


def load_processor(teacher: str, tokenizer: str | None, image_size: int, max_length: int) -> EfficientVLMProcessor:
    """The teacher's saved processor, or one built from `tokenizer` at the teacher's image size."""
    if tokenizer is None:
        if not os.path.isfile(os.path.join(teacher, "processor_config.json")):
            raise ValueError(f"{teacher} saved no processor: pass --tokenizer (the vocabulary it was trained with)")
        return EfficientVLMProcessor.from_pretrained(teacher)
    return EfficientVLMProcessor(build_image_processor(image_size), AutoTokenizer.from_pretrained(tokenizer),
                                 max_length=max_length)


def main():
    parser = HfArgumentParser((ScriptArguments, DistillationArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        script_args, training_args = parser.parse_json_file(os.path.abspath(sys.argv[1]))
    else:
        script_args, training_args = parser.parse_args_into_dataclasses()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    teacher = EfficientVLMForPreTraining.from_pretrained(script_args.teacher)
    processor = load_processor(script_args.teacher, script_args.tokenizer,
                               teacher.config.vision_config.image_size, script_args.max_length)
    depths = {"vision": script_args.vision_layers, "text": script_args.text_layers,
              "fusion": script_args.fusion_layers}
    student = init_student_from_teacher(teacher, {k: v for k, v in depths.items() if v is not None})

    mlm = training_args.use_mlm and script_args.mlm_probability > 0
    collator = RetrievalCollator(processor, max_length=script_args.max_length,
                                 mlm_probability=script_args.mlm_probability if mlm else 0.0)
    trainer = EfficientVLMDistillationTrainer(
        model=student,
        args=training_args,
        # one row per caption, the image index as `image_id` (captions of one image: ITC positives, never ITM
        # negatives of each other), bad rows named
        train_dataset=from_hf_dataset(load_dataset("imagefolder", data_dir=script_args.data_dir, split="train"),
                                      text_column=script_args.caption_column),
        data_collator=collator,
        processing_class=processor,
        teacher_model=teacher,
        task=get_task("retrieval"),  # the image-caption loss step: VLP losses + KD
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    # the student (safetensors + remote code), its processor and layer_map.json; with --push_to_hub also uploaded
    trainer.save_model()
    logger.info("student saved to %s", training_args.output_dir)


if __name__ == "__main__":
    main()
