"""Synthetic VQA (answers from the scene graph, balanced so the question alone does not give the answer away), the
X-VLM VQA JSON / answer-list loaders, the collator's answer weights and VQA accuracy against hand-computed values."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from PIL import Image

from efficientvlm.training.data.scene_world import Scene, SceneObject
from efficientvlm.training.data.vqa_dataset import (
    BLIND_ACCURACY, MAJORITY_ACCURACY, TEMPLATE_ANSWERS, TEMPLATES, VQA_ANSWERS, Question, VQACollator,
    answer_question, answer_weights, load_answer_list, load_vqa_json, make_vqa_eval_set, make_vqa_item,
    question_only_baseline, scene_for_answer,
)
from efficientvlm.training.data.scene_world import ObjectRef
from efficientvlm.training.metrics.vqa_scores import VQA_ACCURACY_METRIC_DIR, normalize_answer, vqa_accuracy, vqa_scores


@pytest.fixture(scope="module")
def items():
    rng = random.Random(0)
    return [make_vqa_item(rng, 8, i, return_scene=True) for i in range(2400)]


def test_answers_are_read_from_the_scene_graph(items):
    for item in items[:600]:
        scene, question = item["scene"], item["structure"]
        assert item["answer"] == [answer_question(scene, question)] * 10
        assert 2 <= len(scene.objects) <= 5 and len({o.kind for o in scene.objects}) == len(scene.objects)
        assert len({(o.x, o.y) for o in scene.objects}) == len(scene.objects)


def test_hand_built_scene_answers():
    objects = (SceneObject("red", "circle", "big", 0, 0), SceneObject("blue", "square", "small", 2, 1),
               SceneObject("red", "triangle", "small", 1, 2))
    scene = Scene(objects)
    assert answer_question(scene, Question("color", ObjectRef(shape="square"))) == "blue"
    assert answer_question(scene, Question("shape", ObjectRef(size="big"))) == "circle"
    assert answer_question(scene, Question("size", ObjectRef(shape="triangle"))) == "small"
    assert answer_question(scene, Question("count", ObjectRef(color="red"))) == "two"
    assert answer_question(scene, Question("count", ObjectRef(color="gray"))) == "zero"
    assert answer_question(scene, Question("exists", ObjectRef(color="blue", shape="circle"))) == "no"
    left = Question("relation", ObjectRef(shape="circle"), "left of", ObjectRef(shape="square"))
    assert answer_question(scene, left) == "yes"
    assert answer_question(scene, Question("relation", ObjectRef(shape="circle"), "below", ObjectRef(shape="square"))) \
        == "no"
    with pytest.raises(ValueError, match="names 2 objects"):  # "the red object" is ambiguous
        answer_question(scene, Question("shape", ObjectRef(color="red")))


def test_every_answer_of_every_template_is_constructible():
    rng = random.Random(1)
    for template in TEMPLATES:
        for _ in range(20):
            question = make_vqa_item(rng, 16, template=template, return_scene=True)["structure"]
            for answer in TEMPLATE_ANSWERS[template]:
                assert answer_question(scene_for_answer(rng, question, answer), question) == answer


def test_answers_are_uniform_per_template(items):
    """Per template the answer distribution is uniform (each within 4.5 σ of its expected count)."""
    by_template = {t: Counter() for t in TEMPLATES}
    for item in items:
        by_template[item["template"]][item["answer"][0]] += 1
    for template, counts in by_template.items():
        n, answers = sum(counts.values()), TEMPLATE_ANSWERS[template]
        assert set(counts) == set(answers)
        p = 1 / len(answers)
        sigma = (n * p * (1 - p)) ** 0.5
        assert all(abs(counts[a] - n * p) < 4.5 * sigma for a in answers), (template, counts)


def test_a_question_only_predictor_sits_at_the_majority_rate(items):
    """The best question-only ("blind") predictor, fitted per exact question text on 1800 items, scores the
    per-template majority rate (36.1 %) on held-out items, not more; answering "yes" always scores 16.7 %."""
    assert (MAJORITY_ACCURACY, round(BLIND_ACCURACY, 4)) == (1 / 6, 0.3611)
    train, test = items[:1800], items[1800:]
    blind = question_only_baseline(train, test)
    assert abs(blind - 100 * BLIND_ACCURACY) < 6.5  # σ of a rate over 600 items at 0.36 is 2 points
    always_yes = 100 * sum(item["answer"][0] == "yes" for item in test) / len(test)
    assert abs(always_yes - 100 * MAJORITY_ACCURACY) < 5
    # the same questions recur (a few hundred distinct texts), and still their answers are not predictable
    repeated = [item for item in test if item["question"] in {t["question"] for t in train}]
    assert len(repeated) > 250
    assert question_only_baseline(train, repeated) < 100 * BLIND_ACCURACY + 8


def test_eval_set_is_deterministic_and_carries_its_answer_list():
    a, b = make_vqa_eval_set(12, seed=3, image_size=16), make_vqa_eval_set(12, seed=3, image_size=16)
    assert [x["question"] for x in a] == [x["question"] for x in b] and a.answer_list == list(VQA_ANSWERS)
    assert [x["question_id"] for x in a] == list(range(12))
    assert len(VQA_ANSWERS) == 18 and len(set(VQA_ANSWERS)) == 18


def _write(path, records):
    path.write_text(json.dumps(records))
    return str(path)


def test_vqa_json_and_answer_list(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    records = [{"question_id": 7, "question": "what is it?", "answer": ["cat", "cat", "dog"], "image": "a.png",
                "dataset": "vqa"},
               {"question_id": "q2", "question": "how many?", "answer": "2", "image": "a.png"}]
    items = load_vqa_json(_write(tmp_path / "train.json", records), str(tmp_path))
    assert [i["question_id"] for i in items] == [7, "q2"] and items[1]["answer"] == ["2"]
    assert items[0]["image"] == str(tmp_path / "a.png")
    test = load_vqa_json(_write(tmp_path / "test.json", [{"question_id": 1, "question": "q?", "image": "a.png"}]),
                         str(tmp_path), require_answers=False)
    assert test[0]["answer"] == []
    assert load_answer_list(_write(tmp_path / "answer_list.json", ["cat", "dog", "2"])) == ["cat", "dog", "2"]


@pytest.mark.parametrize("record, message", [
    ({"question": "q?", "answer": ["a"], "image": "a.png"}, "record 0 is missing field 'question_id'"),
    ({"question_id": 1, "question": "", "answer": ["a"], "image": "a.png"}, "record 0 field 'question'"),
    ({"question_id": 1, "question": "q?", "answer": [], "image": "a.png"}, "record 0 field 'answer'"),
    ({"question_id": 1, "question": "q?", "answer": ["a"], "image": "missing.png"}, "record 0 field 'image'"),
    ({"question_id": [1], "question": "q?", "answer": ["a"], "image": "a.png"}, "field 'question_id' must be"),
])
def test_vqa_json_errors_name_file_record_and_field(tmp_path, record, message):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = _write(tmp_path / "bad.json", [record])
    with pytest.raises(ValueError, match=message) as info:
        load_vqa_json(path, str(tmp_path))
    assert path in str(info.value)


@pytest.mark.parametrize("answers, message", [([], "empty"), (["a", 3], "entry 1"), (["a", "b", "a"], "entry 2 'a' "
                                                                                     "repeats entry 0"), ({}, "list")])
def test_answer_list_errors(tmp_path, answers, message):
    path = _write(tmp_path / "answer_list.json", answers)
    with pytest.raises(ValueError, match=message):
        load_answer_list(path)


def test_collator_weights_and_question_rows():
    from efficientvlm.training.data.tokenization import synthetic_tokenizer
    from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor
    from transformers import CLIPImageProcessor

    processor = EfficientVLMProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                                         crop_size={"height": 16, "width": 16}),
                                      tokenizer=synthetic_tokenizer())
    image = Image.new("RGB", (16, 16))
    batch = VQACollator(processor)([
        {"image": image, "question": "is there a red circle", "answer": ["red"] * 7 + ["blue"] * 3},
        {"image": image, "question": "there is a square", "answer": ["square"] * 10},
    ])
    assert batch["answer_weights"].tolist() == pytest.approx([0.7, 0.3, 1.0])
    assert batch["answer_question_index"].tolist() == [0, 0, 1]
    tokenizer = processor.tokenizer
    assert batch["answer_input_ids"][:, 0].tolist() == [tokenizer.cls_token_id] * 3
    assert batch["answer_input_ids"][0, 1] == tokenizer.convert_tokens_to_ids("red")
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 2
    assert answer_weights(["a", "b", "a", "a"]) == {"a": 0.75, "b": 0.25}
    with pytest.raises(ValueError, match="VQA item 0 has no 'answer'"):
        VQACollator(processor)([{"image": image, "question": "is there a circle"}])


# ----------------------------------------------------------------------------------------------------- VQA accuracy
def test_vqa_accuracy_against_hand_computed_values():
    ten = ["2"] * 2 + ["3"] * 8
    # min(#agree / 3, 1): "two" = "2" (number words → digits) agrees with 2 annotators → 2/3; "3" with 8 → 1
    assert vqa_scores(["two", "3", "4"], [ten, ten, ten]) == pytest.approx([2 / 3, 1.0, 0.0])
    assert vqa_accuracy(["two", "3", "4"], [ten, ten, ten]) == pytest.approx(5 / 9)
    # official leave-one-out: k = 2 agreeing of 10 → (2·(1/3) + 8·(2/3)) / 10 = 0.6; k = 3 → (3·2/3 + 7) / 10 = 0.9
    assert vqa_scores(["2"], [ten], leave_one_out=True) == pytest.approx([0.6])
    assert vqa_scores(["x"], [["x"] * 3 + ["y"] * 7], leave_one_out=True) == pytest.approx([0.9])
    assert vqa_scores(["yes"], [["yes"] * 10], leave_one_out=True) == [1.0]


@pytest.mark.parametrize("raw, normalised", [
    ("Yes.", "yes"), ("The dog", "dog"), ("a red, (big) circle!", "red big circle"), ("1,000", "1000"),
    ("dont know", "don't know"), ("  two\tcats ", "2 cats"), ("3.5", "3.5"), ("none", "0"),
])
def test_answer_normalisation(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_vqa_accuracy_rejects_malformed_inputs():
    with pytest.raises(ValueError, match="one entry per question"):
        vqa_accuracy(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match=r"answers\[0\] must be a non-empty list"):
        vqa_accuracy(["a"], [[]])
    with pytest.raises(ValueError, match="leave_one_out needs at least 2"):
        vqa_accuracy(["a"], [["a"]], leave_one_out=True)


def test_vqa_accuracy_evaluate_module_loads_by_path():
    import evaluate

    metric = evaluate.load(VQA_ACCURACY_METRIC_DIR)
    result = metric.compute(predictions=["two", "Yes."], references=[["2", "2", "3"], ["yes"] * 10])
    assert result["accuracy"] == pytest.approx((2 / 3 + 1) / 2)
