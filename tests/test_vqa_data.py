"""Synthetic VQA (answers from the scene graph, balanced so the question alone does not give the answer away), the
X-VLM VQA JSON / answer-list loaders, the collator's answer weights and VQA accuracy against hand-computed values."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from PIL import Image
from tokenizers import AddedToken

from efficientvlm.training.data.scene_world import (NUMBER_WORDS, Count, Exists, ObjectRef, Relation, Scene,
                                                    SceneObject, statement_is_true)
from efficientvlm.training.data.vqa_dataset import (
    BLIND_ACCURACY, MAJORITY_ACCURACY, QUESTION_WORDS, TEMPLATE_ANSWERS, TEMPLATES, VQA_ANSWERS, Question, VQACollator,
    answer_question, answer_weights, load_answer_list, load_vqa_json, make_vqa_eval_set, make_vqa_item,
    question_only_baseline, scene_for_answer,
)
from efficientvlm.training.metrics.vqa_scores import (ARTICLES, CONTRACTIONS, MANUAL_MAP, VQA_ACCURACY_METRIC_DIR,
                                                      official_answer_processing, vqa_accuracy, vqa_scores)


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


def test_answers_agree_with_the_scene_world_checker(items):
    """A second implementation reads every answer off the scene: `statement_is_true` (the checker the captions, ITM
    negatives and NLVR2 labels use) for exists / count / relation, the named object's attribute for the rest."""
    for item in items:
        scene, question, answer = item["scene"], item["structure"], item["answer"][0]
        if question.template == "exists":
            assert statement_is_true(scene, Exists(question.ref)) == (answer == "yes"), item["question"]
        elif question.template == "relation":
            relation = Relation(question.ref, question.relation, question.target)
            assert statement_is_true(scene, relation) == (answer == "yes"), item["question"]
        elif question.template == "count":
            assert statement_is_true(scene, Count(question.ref, NUMBER_WORDS.index(answer))), item["question"]
        else:
            named = [o for o in scene.objects if question.ref.matches(o)]
            assert len(named) == 1 and getattr(named[0], question.template) == answer, item["question"]


def test_yes_no_answers_are_balanced_within_every_question_form(items):
    """"yes" is half of each yes/no question form (exists by how many attributes its reference names, relation by
    its relation word), so no form of the question text leans to one answer (each within 4.5 σ of n / 2)."""
    forms: dict[tuple, Counter] = {}
    for item in items:
        question = item["structure"]
        if question.template == "exists":
            form = ("exists", sum(v is not None for v in (question.ref.size, question.ref.color, question.ref.shape)))
        elif question.template == "relation":
            form = ("relation", question.relation)
        else:
            continue
        forms.setdefault(form, Counter())[item["answer"][0]] += 1
    assert len(forms) == 3 + 4
    for form, counts in forms.items():
        n = counts["yes"] + counts["no"]
        assert n >= 60 and abs(counts["yes"] - n / 2) < 4.5 * (n / 4) ** 0.5, (form, counts)


def test_every_answer_is_one_token_of_its_own_for_the_first_token_ranking():
    """With the question words added (as the VQA task adds them), every synthetic answer is one whole-word token and
    no two answers share it, so the ranking's first-token scores tell every answer apart; every question word is
    known (no [UNK])."""
    from efficientvlm.training.data.tokenization import synthetic_tokenizer

    tokenizer = synthetic_tokenizer()
    tokenizer.add_tokens([AddedToken(w, single_word=w.isalnum(), normalized=True) for w in QUESTION_WORDS
                          if w not in tokenizer.get_vocab()])
    tokens = [tokenizer.tokenize(answer) for answer in VQA_ANSWERS]
    assert all(len(t) == 1 for t in tokens) and len({t[0] for t in tokens}) == len(VQA_ANSWERS)
    rng = random.Random(2)
    for template in TEMPLATES:
        for _ in range(30):
            question = make_vqa_item(rng, 8, template=template)["question"]
            assert tokenizer.unk_token not in tokenizer.tokenize(question), question


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


def test_visual_genome_answers_weigh_half(tmp_path):
    """X-VLM `vqa_dataset.py`: a record with "dataset": "vg" trains on its one answer with weight 0.5."""
    from efficientvlm.training.data.tokenization import synthetic_tokenizer
    from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor
    from transformers import CLIPImageProcessor

    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    records = [{"question_id": 1, "question": "what color is the circle?", "answer": "red", "image": "a.png",
                "dataset": "vg"},
               {"question_id": 2, "question": "what shape is it?", "answer": ["square"] * 3 + ["circle"],
                "image": "a.png", "dataset": "vqa"},
               {"question_id": 3, "question": "how many?", "answer": ["2", "2"], "image": "a.png"}]
    items = load_vqa_json(_write(tmp_path / "train.json", records), str(tmp_path))
    assert [item.get("dataset") for item in items] == ["vg", "vqa", None]
    processor = EfficientVLMProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                                         crop_size={"height": 16, "width": 16}),
                                      tokenizer=synthetic_tokenizer())
    batch = VQACollator(processor)(items)
    assert batch["answer_weights"].tolist() == pytest.approx([0.5, 0.75, 0.25, 1.0])
    assert batch["answer_question_index"].tolist() == [0, 1, 1, 2]
    assert answer_weights(["red"], "vg") == {"red": 0.5} and answer_weights(["red"], "vqa") == {"red": 1.0}
    bad = _write(tmp_path / "bad.json", [{**records[0], "dataset": 1}])
    with pytest.raises(ValueError, match="record 0 field 'dataset' must be a string"):
        load_vqa_json(bad, str(tmp_path))


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
# Expected values are the official script's (GT-Vision-Lab/VQA vqaEval.py), worked by hand from its logic: per
# question mean over annotators i of min(#{j != i: answer_j == prediction} / 3, 1), answers processed only when the
# annotators disagree.
def test_vqa_accuracy_is_the_official_leave_one_out_average():
    other = ["w"] * 10
    for k, expected in ((1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)):
        refs = ["x"] * k + other[k:]
        # k matching annotators see k − 1 others, the 10 − k others see k: (k·min((k−1)/3, 1) + (10−k)·min(k/3, 1)) / 10
        assert vqa_scores(["x"], [refs]) == pytest.approx([expected]), k
    ten = ["2"] * 2 + ["3"] * 8
    assert vqa_scores(["two", "3", "4"], [ten, ten, ten]) == pytest.approx([0.6, 1.0, 0.0])
    assert vqa_accuracy(["two", "3", "4"], [ten, ten, ten]) == pytest.approx(1.6 / 3)


def test_official_score_normalises_only_when_annotators_disagree():
    assert vqa_scores(["Yes", "zero", "yes", " yes\n"], [["yes"] * 10, ["0"] * 10, ["yes"] * 10, ["yes"] * 10]) == [
        0.0, 0.0, 1.0, 1.0]  # unanimous: raw strings after newline / tab / strip
    # one dissenting annotator switches the processing on: "Yes" → "yes" matches 9
    assert vqa_scores(["Yes", "zero"], [["yes"] * 9 + ["no"], ["0"] * 9 + ["1"]]) == [1.0, 1.0]
    assert vqa_scores(["Yes", "zero"], [["yes"] * 10, ["0"] * 10], variant="corrected") == [1.0, 1.0]


def test_official_contraction_table_and_period_quirks():
    # "Im" / "Ive" keys never match a lower-cased word: "im" stays "im" against 5 × "i'm" (0); "youll" → "you'll" (k=3)
    assert vqa_scores(["im", "youll", "oclock"], [["i'm"] * 5 + ["no"] * 5, ["you'll"] * 3 + ["no"] * 7,
                                                  ["o'clock"] * 2 + ["no"] * 8]) == pytest.approx([0.0, 0.9, 0.6])
    assert vqa_scores(["im"], [["i'm"] * 5 + ["no"] * 5], variant="corrected") == [1.0]
    # a period not followed by a digit goes, also after a digit: "2." → "2" (k = 2 → 0.6); "3.5" keeps its period
    assert vqa_scores(["2.", "3.5"], [["2"] * 2 + ["3"] * 8, ["3.5"] * 4 + ["3"] * 6]) == pytest.approx([0.6, 1.0])


def test_official_punctuation_test_reads_the_original_answer():
    # "x/-y-z": "/" has no space beside it → " " ("x -y-z"); "-" has none in the ORIGINAL → " " too → "x y z"
    # (testing the edited text would see " -" and delete every "-": "x yz", scoring 0)
    assert official_answer_processing("x/-y-z") == "x y z"
    assert vqa_scores(["x/-y-z"], [["x y z"] * 3 + ["w"] * 7]) == pytest.approx([0.9])
    # a mark beside a space, or any comma between digits, is deleted everywhere; otherwise it becomes a space
    assert official_answer_processing("a red, (big) circle!") == "red big circle"
    assert official_answer_processing("1,000 (approx)") == "1000 approx"
    assert official_answer_processing("black-white") == "black white"


@pytest.mark.parametrize("raw, processed", [
    ("Yes.", "yes"), ("The dog", "dog"), ("dont know", "don't know"), ("  two\tcats ", "2 cats"), ("3.5", "3.5"),
    ("none", "0"), ("Ive", "ive"), ("2.", "2"), ("ten.", "10"),
])
def test_official_answer_processing(raw, processed):
    assert official_answer_processing(raw) == processed


def _script(prediction: str, refs: list[str]) -> float:
    """vqaEval.py's per-question loop transcribed line by line (answers as dicts with answer ids, as in the API)."""
    import re

    punct = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
             "!"]
    period_strip, comma_strip = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII), re.compile(r"(\d)(\,)(\d)", re.ASCII)

    def process_punctuation(in_text):
        out_text = in_text
        for p in punct:
            if (p + " " in in_text or " " + p in in_text) or (re.search(comma_strip, in_text) is not None):
                out_text = out_text.replace(p, "")
            else:
                out_text = out_text.replace(p, " ")
        return period_strip.sub("", out_text, count=re.UNICODE)

    manual_map = dict(MANUAL_MAP)

    def process_digit_article(in_text):
        out_text = []
        for word in in_text.lower().split():
            word = manual_map.setdefault(word, word)
            if word not in ARTICLES:
                out_text.append(word)
        for word_id, word in enumerate(out_text):
            if word in CONTRACTIONS:
                out_text[word_id] = CONTRACTIONS[word]
        return " ".join(out_text)

    answers = [{"answer": a.replace("\n", " ").replace("\t", " ").strip(), "answer_id": i + 1}
               for i, a in enumerate(refs)]
    res = prediction.replace("\n", " ").replace("\t", " ").strip()
    if len({a["answer"] for a in answers}) > 1:
        for a in answers:
            a["answer"] = process_digit_article(process_punctuation(a["answer"]))
        res = process_digit_article(process_punctuation(res))
    accs = []
    for gt in answers:
        others = [item for item in answers if item != gt]
        accs.append(min(1, float(len([item for item in others if item["answer"] == res])) / 3))
    return sum(accs) / len(accs)


def test_official_score_equals_the_script_transcription_on_random_questions():
    rng = random.Random(0)
    pool = ["yes", "Yes", "no", "2", "two", "2.", "3.5", "the dog", "dog", "Dog.", "black-white", "black/white",
            "x/-y-z", "x y z", "im", "i'm", "youll", "you'll", "1,000", "1000", "none", "0", "a (red) car", "red car"]
    for _ in range(400):
        refs = [rng.choice(pool[:rng.randint(2, len(pool))]) for _ in range(rng.choice((3, 10)))]
        if rng.random() < 0.2:
            refs = [refs[0]] * len(refs)
        prediction = rng.choice(pool)
        assert vqa_scores([prediction], [refs]) == pytest.approx([_script(prediction, refs)]), (prediction, refs)


def test_vqa_accuracy_rejects_malformed_inputs():
    with pytest.raises(ValueError, match="one entry per question"):
        vqa_accuracy(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match=r"answers\[0\] must be a non-empty list"):
        vqa_accuracy(["a"], [[]])
    with pytest.raises(ValueError, match="needs at least 2"):
        vqa_accuracy(["a"], [["a"]])
    with pytest.raises(ValueError, match="variant must be one of"):
        vqa_accuracy(["a"], [["a", "a"]], variant="paper")


def test_vqa_accuracy_evaluate_module_loads_by_path():
    import evaluate

    metric = evaluate.load(VQA_ACCURACY_METRIC_DIR)
    result = metric.compute(predictions=["two", "Yes."], references=[["2", "2", "3"], ["yes"] * 9 + ["no"]])
    assert result["accuracy"] == pytest.approx((4 / 9 + 1) / 2)
