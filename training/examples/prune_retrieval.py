#!/usr/bin/env python
"""Modal-adaptive pruning of a distilled EfficientVLM student on your own image-caption pairs, then export.

EfficientVLM §3.2: retrieval fine-tuning with task KD from the teacher, while hard-concrete gates on every attention
head and FFN neuron learn which units to keep under ONE global target sparsity (a Lagrangian holds the expected
sparsity to it), so the split between vision, text and fusion is learned. At the end the gates are binarized and
`materialize` builds a physically smaller dense model, saved Hub-ready (weights, config with per-layer sizes, remote
code, processor, pipeline, model card): `AutoModel.from_pretrained(folder, trust_remote_code=True)` loads it.

    python prune_retrieval.py --student student --teacher path/to/teacher --data_dir path/to/images \
        --output_dir pruning --target_sparsity 0.6 --max_steps 5000 --per_device_train_batch_size 32

The data is the image folder of `distill_retrieval.py`. `--output_dir` receives the Trainer's checkpoints and the
gated student (student + `l0_gates.safetensors`); the dense model goes to `--export_dir` (default
`<output_dir>/pruned`), which `--push_to_hub --hub_model_id user/name` uploads.
"""

import logging
import os
import sys
from dataclasses import dataclass, field

from datasets import load_dataset
from transformers import HfArgumentParser

from efficientvlm.training import (
    EfficientVLMPruningTrainer,
    PruningArguments,
    PushArguments,
    RetrievalCollator,
    get_task,
    load_layer_map,
    make_gated_model,
    materialize,
    push_folder,
    save_hub_ready,
)
from efficientvlm.training.data.files import from_hf_dataset
from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor

logger = logging.getLogger(__name__)


@dataclass
class ScriptArguments:
    """The student to prune, its task teacher, the image-caption folder and where the dense model goes."""

    student: str = field(metadata={"help": "Distilled student dir (from distill_retrieval.py)."})
    teacher: str = field(metadata={"help": "Retrieval teacher dir for task KD (the sizes are reported against it)."})
    data_dir: str = field(metadata={"help": "Image folder with a metadata.jsonl (or metadata.csv) of captions."})
    caption_column: str = field(default="caption", metadata={"help": "The metadata column holding the caption(s)."})
    max_length: int = field(default=40, metadata={"help": "Maximum caption length in tokens (X-VLM: 40)."})
    export_dir: str | None = field(
        default=None, metadata={"help": "Where the dense pruned model is written (default: <output_dir>/pruned)."}
    )


def main():
    parser = HfArgumentParser((ScriptArguments, PruningArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        script_args, training_args = parser.parse_json_file(os.path.abspath(sys.argv[1]))
    else:
        script_args, training_args = parser.parse_args_into_dataclasses()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # the Trainer's own hub sync would upload the gated checkpoints; the dense export is pushed at the end instead
    push, training_args.push_to_hub = training_args.push_to_hub, False
    if push and not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id user/name (the repo the pruned model goes to)")

    task = get_task("retrieval")
    processor = EfficientVLMProcessor.from_pretrained(script_args.student)  # saved by distill_retrieval.py
    student = task.model_class.from_pretrained(script_args.student)  # the retrieval model (ITC + ITM heads)
    teacher = task.model_class.from_pretrained(script_args.teacher)
    task.prepare_model(student, processor)
    gated = make_gated_model(student, training_args, task)  # student + hard-concrete gates + Lagrange multipliers

    trainer = EfficientVLMPruningTrainer(
        model=gated,
        args=training_args,
        # one row per caption, the image index as `image_id` (captions of one image: ITC positives, never ITM
        # negatives of each other), bad rows named
        train_dataset=from_hf_dataset(load_dataset("imagefolder", data_dir=script_args.data_dir, split="train"),
                                      text_column=script_args.caption_column),
        data_collator=RetrievalCollator(processor, max_length=script_args.max_length),  # no MLM in task fine-tuning
        processing_class=processor,
        teacher_model=teacher,
        task=task,
        layer_map=load_layer_map(script_args.student),  # the teacher layer each student layer was distilled from
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()  # the gated student + its gates (`efficientvlm export --checkpoint` re-exports it)
    if not training_args.should_save:
        return

    # gates → deterministic keep masks → a fresh model with per-layer sizes (checked against the masked forward)
    pruned = materialize(gated.student.eval(), gated.l0.deterministic_masks())
    export_dir = script_args.export_dir or os.path.join(training_args.output_dir, "pruned")
    name = training_args.hub_model_id.split("/")[-1] if push else os.path.basename(os.path.abspath(export_dir))
    report = save_hub_ready(pruned, processor, export_dir, model_name=name, reference_config=teacher.config,
                            extra={"how_made": "distilled and pruned with EfficientVLM's prune_retrieval.py"})
    logger.info("pruned model saved to %s: %d parameters (student: %d); sparsity vs the teacher: %s", export_dir,
                pruned.num_parameters(), student.num_parameters(),
                ", ".join(f"{k} {v:.1%}" for k, v in report["sparsity"].items()))
    if push:
        url = push_folder(PushArguments(model=export_dir, repo_id=training_args.hub_model_id,
                                        private=bool(training_args.hub_private_repo), token=training_args.hub_token))
        logger.info("pushed to %s", url)


if __name__ == "__main__":
    main()
