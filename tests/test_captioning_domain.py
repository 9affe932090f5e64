"""Captioning domain pre-training (#31 item 4; EfficientVLM `Captioning_pretrain.py`): LM loss on un-prompted
captions, no KD, then captioning fine-tuning from it."""

import json

import torch

from modeling_efficientvlm import EfficientVLMForConditionalGeneration, EfficientVLMForPreTraining
from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor, build_image_processor
from tests.conftest import CLI_COMMON, tiny_config
from efficientvlm.training.commands.cli import main
from efficientvlm.training.commands.stages import DataArguments
from efficientvlm.training.data.tokenization import synthetic_tokenizer
from efficientvlm.training.infra.presets import preset_config
from efficientvlm.training.method.arguments import DistillationArguments
from efficientvlm.training.tasks import TASKS, get_task


def test_domain_batches_have_no_prompt_and_the_loss_is_the_lm_loss_alone(tmp_path):
    processor = EfficientVLMProcessor(build_image_processor(32), synthetic_tokenizer(), max_length=40)
    task = get_task("captioning_domain")
    assert "captioning_domain" in TASKS and task.prune_defaults == {}
    dataset, collator = task.train_data(DataArguments(task="captioning_domain", image_size=32), processor, 0, False)
    batch = collator([item for item, _ in zip(iter(dataset), range(3))])
    tokenizer = processor.tokenizer
    assert (batch["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    # only [CLS] and padding are out of the loss: the first caption word is predicted (no "a picture of")
    assert (batch["labels"][:, 0] == -100).all() and (batch["labels"][:, 1] == batch["input_ids"][:, 1]).all()
    torch.manual_seed(0)
    model = EfficientVLMForConditionalGeneration(tiny_config())
    args = DistillationArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    total, parts = task.loss_step(model, model, batch, args, None)  # a teacher is ignored: no KD
    assert set(parts) == {"lm", "total"}
    assert torch.allclose(total, model(**batch, label_smoothing=0.0).loss)  # the official pre-training LM loss
    assert not torch.allclose(total, model(**batch).loss)  # captioning fine-tuning smooths by 0.1


def test_pretrain_then_captioning_domain_then_captioning(tmp_path):
    torch.manual_seed(0)
    EfficientVLMForPreTraining(preset_config("tiny", 32, len(synthetic_tokenizer()))).save_pretrained(
        tmp_path / "pretrained")
    assert main(["teacher", "--task", "captioning_domain", "--init_from", str(tmp_path / "pretrained"),
                 "--output_dir", str(tmp_path / "domain"), "--max_steps", "2", *CLI_COMMON]) == 0
    metrics = json.loads((tmp_path / "domain" / "eval_results.json").read_text())
    assert {"bleu4", "cider"} <= set(metrics)
    domain = EfficientVLMForConditionalGeneration.from_pretrained(str(tmp_path / "domain"))
    assert main(["teacher", "--task", "captioning", "--init_from", str(tmp_path / "domain"), "--output_dir",
                 str(tmp_path / "captioning"), "--max_steps", "1", *CLI_COMMON]) == 0
    tuned = EfficientVLMForConditionalGeneration.from_pretrained(str(tmp_path / "captioning"))
    assert tuned.config.caption_prompt_ids and tuned.num_parameters() == domain.num_parameters()
