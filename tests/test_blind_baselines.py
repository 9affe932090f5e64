"""The blind baselines a task teacher must beat: the best predictor that never looks at the image (VQA: question
only; NLVR2: statement only; captioning: one constant caption), fitted on a fresh sample of the training stream."""

import pytest

from efficientvlm.training.commands.stages import DataArguments, eval_set
from efficientvlm.training.metrics.caption_scores import cider_d
from efficientvlm.training.tasks import get_task
from efficientvlm.training.tasks.captioning import references_of


def _held_out(task: str, n: int = 200):
    data = DataArguments(task=task, eval_images=n, image_size=16, nlvr2_level="easy")
    return data, eval_set(data)


def test_nlvr2_statement_only_is_at_chance_on_balanced_statements():
    data, held_out = _held_out("nlvr2")
    blind = get_task("nlvr2").blind_baseline(data, held_out)
    assert 40 <= blind["accuracy"] <= 60 and "statement only" in blind["what"]


def test_vqa_question_only_is_fitted_on_training_answers():
    data, held_out = _held_out("vqa")
    blind = get_task("vqa").blind_baseline(data, held_out)
    # answers are drawn uniformly per template: a question-only predictor is far from perfect but above zero
    assert 10 <= blind["accuracy"] <= 60 and "question only" in blind["what"]


def test_captioning_constant_caption_is_scored_like_a_model():
    data, held_out = _held_out("captioning", 50)
    blind = get_task("captioning").blind_baseline(data, held_out)
    caption = blind["what"].split("'")[1]
    assert blind["cider"] == pytest.approx(100 * cider_d([caption] * 50, references_of(held_out)))
    assert 0 <= blind["bleu4"] <= 100


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "captioning"])
def test_no_blind_baseline_for_data_files(task, tmp_path):
    data, held_out = _held_out(task, 8)
    data.eval_dataset = str(tmp_path / "held_out.json")  # a user's file: no synthetic stream to fit on
    assert get_task(task).blind_baseline(data, held_out) is None
