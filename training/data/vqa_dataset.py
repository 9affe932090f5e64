"""Visual question answering data: synthetic questions on the built-in scenes, and the X-VLM / ALBEF VQA JSON format.

Synthetic VQA. Six question templates, each answered from the scene graph (`training.data.scene_world`):

    color     "what color is the small circle?"         → one of COLORS     (6 answers)
    shape     "what shape is the big red object?"        → one of SHAPES     (4)
    size      "what size is the green triangle?"         → big / small       (2)
    count     "how many red objects are there?"          → zero .. three     (4)
    exists    "is there a small square?"                 → yes / no          (2)
    relation  "is the blue circle left of the square?"   → yes / no          (2)

"the <ref>" always names exactly one object of the scene. Balance: an item is built question first (template and
references drawn without looking at any answer), then the answer is drawn uniformly from the template's answers, then
a scene is constructed that makes that answer true (and the answer is re-derived from the scene by `answer_question`
as a check). Every (question, answer) pair is constructible, so P(answer | question text) is uniform over the
template's answers: a question-only ("blind") predictor can do no better than the per-template majority rate
`BLIND_ACCURACY` (36.1 % with uniform templates), and the most frequent answer overall ("yes" / "no") is right
`MAJORITY_ACCURACY` (16.7 %) of the time.

Items (synthetic and JSON alike): {"question_id", "image" (PIL | path), "question": str, "answer": [annotator answers]}
(+ "template" and "scene" for synthetic items). A synthetic question has 10 identical annotator answers, as a VQA v2
question with full agreement, so its VQA accuracy is 1 when the answer is right.

JSON (X-VLM `vqa_dataset.py`): a list of {"question_id", "question", "answer": str | [str, ...], "image": relative
path} (training answers weigh count / number of answers, as ALBEF / X-VLM); the answer list (`answer_list.json` in
X-VLM's data folder) is a JSON list of distinct answer strings that evaluation ranks.

The synthetic question words missing from the demo's synthetic vocabulary are `QUESTION_WORDS`; the VQA task adds
them to a tokenizer that lacks them (`training.tasks.vqa.extend_vocabulary`).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Iterator

from .scene_render import render_scene
from .scene_world import COLORS, GRID, NUMBER_WORDS, RELATIONS, SHAPES, SIZES, ObjectRef, Scene, SceneObject, rejitter_scene
from .synthetic_stream import _SyntheticIterable

TEMPLATES = ("color", "shape", "size", "count", "exists", "relation")
COUNT_ANSWERS = tuple(NUMBER_WORDS[:4])  # zero .. three
TEMPLATE_ANSWERS: dict[str, tuple[str, ...]] = {
    "color": COLORS, "shape": SHAPES, "size": SIZES, "count": COUNT_ANSWERS, "exists": ("yes", "no"),
    "relation": ("yes", "no"),
}
VQA_ANSWERS: tuple[str, ...] = tuple(dict.fromkeys(a for answers in TEMPLATE_ANSWERS.values() for a in answers))
"""The synthetic answer list (18 answers): what evaluation ranks and what an exported synthetic model answers from."""
QUESTION_WORDS = ("what", "color", "shape", "size", "how", "many", "yes", "no", "zero", "?")
"""Words of the synthetic questions and answers that the caption vocabulary (`SYNTHETIC_WORDS`) lacks."""
ANNOTATORS = 10
"""Annotator answers per synthetic question (VQA v2 has 10)."""
MAJORITY_ACCURACY = 2 / len(TEMPLATES) * 1 / 2
"""Accuracy of always answering the most frequent answer ("yes"; "no" ties): P(yes/no template) · 1/2."""
BLIND_ACCURACY = sum(1 / len(answers) for answers in TEMPLATE_ANSWERS.values()) / len(TEMPLATES)
"""Expected accuracy of the best question-only predictor (per template its majority answer, 1/|answers|)."""
_ALL_KINDS = tuple((z, c, s) for z in SIZES for c in COLORS for s in SHAPES)
_MAX_OBJECTS = 5
_ATTRIBUTES = ("size", "color", "shape")


# ---------------------------------------------------------------------------------------------------- questions
@dataclass(frozen=True)
class Question:
    """A structured question: `template`, its object reference(s) and (relation) the relation."""

    template: str
    ref: ObjectRef
    relation: str | None = None
    target: ObjectRef | None = None


def _noun(ref: ObjectRef, plural: bool = False) -> str:
    noun = (ref.shape or "object") + ("s" if plural else "")
    return " ".join(w for w in (ref.size, ref.color, noun) if w)


def question_text(question: Question) -> str:
    """Renders a question ("what color is the small circle?")."""
    t, ref = question.template, question.ref
    if t in ("color", "shape", "size"):
        return f"what {t} is the {_noun(ref)}?"
    if t == "count":
        return f"how many {_noun(ref, plural=True)} are there?"
    if t == "exists":
        return f"is there a {_noun(ref)}?"
    if t == "relation":
        return f"is the {_noun(ref)} {question.relation} the {_noun(question.target)}?"
    raise ValueError(f"unknown question template {t!r}; expected one of {TEMPLATES}")


def _kinds_matching(ref: ObjectRef) -> list[tuple[str, str, str]]:
    return [k for k in _ALL_KINDS if ref.matches(SceneObject(color=k[1], shape=k[2], size=k[0], x=0, y=0))]


def _random_ref(rng: random.Random, free: tuple[str, ...], min_kinds: int = 1) -> ObjectRef:
    """A reference using a non-empty random subset of the attributes `free`, matching at least `min_kinds` kinds."""
    values = {"size": SIZES, "color": COLORS, "shape": SHAPES}
    while True:
        ref = ObjectRef(**{a: rng.choice(values[a]) if a in free and rng.random() < 0.6 else None
                           for a in _ATTRIBUTES})
        if any(getattr(ref, a) for a in _ATTRIBUTES) and len(_kinds_matching(ref)) >= min_kinds:
            return ref


def random_question(rng: random.Random, template: str | None = None) -> Question:
    """A question drawn without reference to any scene or answer (uniform template unless given)."""
    template = template or rng.choice(TEMPLATES)
    if template in ("color", "shape", "size"):  # the asked attribute is never part of the reference
        return Question(template, _random_ref(rng, tuple(a for a in _ATTRIBUTES if a != template)))
    if template == "count":  # at least 3 kinds match, so "three" is always constructible
        return Question(template, _random_ref(rng, _ATTRIBUTES, min_kinds=len(COUNT_ANSWERS) - 1))
    if template == "exists":
        return Question(template, _random_ref(rng, _ATTRIBUTES))
    if template == "relation":
        while True:
            subject, target = _random_ref(rng, _ATTRIBUTES), _random_ref(rng, _ATTRIBUTES)
            if _relation_kinds(subject, target) is not None:
                return Question(template, subject, rng.choice(RELATIONS), target)
    raise ValueError(f"unknown question template {template!r}; expected one of {TEMPLATES}")


def _relation_kinds(subject: ObjectRef, target: ObjectRef) -> tuple[list, list] | None:
    """Kinds that match only the subject / only the target (None if either is empty: "the A" and "the B" would not
    name two different objects)."""
    a, b = set(_kinds_matching(subject)), set(_kinds_matching(target))
    only_a, only_b = sorted(a - b), sorted(b - a)
    return (only_a, only_b) if only_a and only_b else None


# ------------------------------------------------------------------------------------------------------- answers
def _holds(relation: str, a: SceneObject, b: SceneObject) -> bool:
    return {"left of": a.x < b.x, "right of": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y}[relation]


def _the(scene: Scene, ref: ObjectRef, what: str) -> SceneObject:
    matches = [o for o in scene.objects if ref.matches(o)]
    if len(matches) != 1:
        raise ValueError(f"'the {_noun(ref)}' ({what}) names {len(matches)} objects of the scene, not exactly one")
    return matches[0]


def answer_question(scene: Scene, question: Question) -> str:
    """The answer to `question` read from the scene graph.

    Raises:
        ValueError: a "the <ref>" that does not name exactly one object, or a count above three.
    """
    t, ref = question.template, question.ref
    if t in ("color", "shape", "size"):
        return getattr(_the(scene, ref, t), t)
    if t == "count":
        n = sum(ref.matches(o) for o in scene.objects)
        if n >= len(COUNT_ANSWERS):
            raise ValueError(f"{n} objects match {_noun(ref)!r}; synthetic counts go up to {COUNT_ANSWERS[-1]}")
        return COUNT_ANSWERS[n]
    if t == "exists":
        return "yes" if any(ref.matches(o) for o in scene.objects) else "no"
    if t == "relation":
        a, b = _the(scene, ref, "subject"), _the(scene, question.target, "target")
        return "yes" if a is not b and _holds(question.relation, a, b) else "no"
    raise ValueError(f"unknown question template {t!r}; expected one of {TEMPLATES}")


# -------------------------------------------------------------------------------------------------------- scenes
def _distractors(rng: random.Random, avoid: list[ObjectRef], taken: list, n: int) -> list:
    """`n` distinct kinds matching none of `avoid` and not in `taken` (fewer if fewer exist)."""
    pool = [k for k in _ALL_KINDS if k not in taken
            and not any(r.matches(SceneObject(color=k[1], shape=k[2], size=k[0], x=0, y=0)) for r in avoid)]
    return rng.sample(pool, min(n, len(pool)))


def _fill(rng: random.Random, ref: ObjectRef, **fixed: str) -> tuple[str, str, str]:
    """A kind matching `ref` with the attributes in `fixed`; free attributes random."""
    values = {"size": SIZES, "color": COLORS, "shape": SHAPES}
    chosen = {a: fixed.get(a) or getattr(ref, a) or rng.choice(values[a]) for a in _ATTRIBUTES}
    return chosen["size"], chosen["color"], chosen["shape"]


def _scene(rng: random.Random, kinds: list, cells: list[int] | None = None) -> Scene:
    """Objects of `kinds` in `cells` (random distinct cells for the rest), with drawing jitter."""
    cells = list(cells or [])
    free = [c for c in range(GRID * GRID) if c not in cells]
    cells += rng.sample(free, len(kinds) - len(cells))
    objects = tuple(SceneObject(color=c, shape=s, size=z, x=cell % GRID, y=cell // GRID)
                    for (z, c, s), cell in zip(kinds, cells))
    return rejitter_scene(rng, Scene(objects))


def scene_for_answer(rng: random.Random, question: Question, answer: str) -> Scene:
    """A random scene (2-5 objects, distinct kinds, distinct cells) on which `question` has answer `answer`.

    Raises:
        ValueError: `answer` is not one of the template's answers.
    """
    t, ref = question.template, question.ref
    if answer not in TEMPLATE_ANSWERS[t]:
        raise ValueError(f"{answer!r} is not an answer of {t!r} questions {TEMPLATE_ANSWERS[t]}")
    if t in ("color", "shape", "size"):
        kind = _fill(rng, ref, **{t: answer})
        return _scene(rng, [kind] + _distractors(rng, [ref], [kind], rng.randint(1, _MAX_OBJECTS - 1)))
    if t == "count":
        n = COUNT_ANSWERS.index(answer)
        kinds = rng.sample(_kinds_matching(ref), n)
        return _scene(rng, kinds + _distractors(rng, [ref], kinds, rng.randint(max(0, 2 - n), _MAX_OBJECTS - n)))
    if t == "exists":
        kinds = [_fill(rng, ref)] if answer == "yes" else []
        return _scene(rng, kinds + _distractors(rng, [ref], kinds, rng.randint(2 - len(kinds), _MAX_OBJECTS
                                                                                 - len(kinds))))
    if t == "relation":
        only_subject, only_target = _relation_kinds(ref, question.target)  # type: ignore[misc, arg-type]
        pair = [rng.choice(only_subject), rng.choice(only_target)]
        cell_pairs = [(p, q) for p in range(GRID * GRID) for q in range(GRID * GRID) if p != q and _holds(
            question.relation, SceneObject("", "", "", p % GRID, p // GRID),
            SceneObject("", "", "", q % GRID, q // GRID)) == (answer == "yes")]
        cells = list(rng.choice(cell_pairs))
        extra = _distractors(rng, [ref, question.target], pair, rng.randint(0, _MAX_OBJECTS - 2))  # type: ignore
        return _scene(rng, pair + extra, cells)
    raise ValueError(f"unknown question template {t!r}; expected one of {TEMPLATES}")


def make_vqa_item(rng: random.Random, image_size: int = 64, question_id: int | str = 0,
                  return_scene: bool = False, template: str | None = None) -> dict:
    """One synthetic VQA item: question first, then a uniform answer, then a scene making it true (checked)."""
    question = random_question(rng, template)
    answer = rng.choice(TEMPLATE_ANSWERS[question.template])
    scene = scene_for_answer(rng, question, answer)
    if answer_question(scene, question) != answer:  # cannot happen: the constructions are exact
        raise AssertionError(f"internal error: {question} answered {answer_question(scene, question)!r} on {scene}, "
                             f"built for {answer!r}")
    item = {"question_id": question_id, "image": render_scene(scene, image_size), "question": question_text(question),
            "answer": [answer] * ANNOTATORS, "template": question.template}
    if return_scene:
        item["scene"], item["structure"] = scene, question
    return item


class SyntheticVQADataset(_SyntheticIterable):
    """Fresh synthetic VQA items (see the module docstring); deterministic per (seed, epoch, DataLoader worker).

    Args: as `SyntheticRetrievalDataset` (`return_scene` also yields "scene" and "structure").
    """

    def _item(self, rng: random.Random) -> dict:
        return make_vqa_item(rng, self.image_size, return_scene=self.return_scene)


class VQAItems(list):
    """A held-out VQA set: a list of items plus `answer_list`, the answers evaluation ranks."""

    def __init__(self, items: Sequence[dict], answer_list: Sequence[str]):
        super().__init__(items)
        self.answer_list = list(answer_list)


def make_vqa_eval_set(n: int, seed: int = 0, image_size: int = 64, return_scenes: bool = False) -> VQAItems:
    """A fixed held-out set of `n` synthetic items (a pure function of its arguments); answer list `VQA_ANSWERS`."""
    if n < 1:
        raise ValueError(f"a VQA evaluation set needs n >= 1 items, got {n}")
    rng = random.Random(f"efficientvlm-vqa-eval-{seed}")
    return VQAItems([make_vqa_item(rng, image_size, i, return_scenes) for i in range(n)], VQA_ANSWERS)


# --------------------------------------------------------------------------------------------- weights, baseline
VG_ANSWER_WEIGHT = 0.5
"""Weight of a Visual Genome answer in VQA training (X-VLM `dataset/vqa_dataset.py`: records with `"dataset": "vg"`
carry one answer, weighted 0.5)."""


def answer_weights(answers: Sequence[str], dataset: str | None = None) -> dict[str, float]:
    """ALBEF / X-VLM training weights: each distinct answer weighs (its count) / (number of annotator answers); for a
    Visual Genome record (`dataset == "vg"`) that share times `VG_ANSWER_WEIGHT` (its one answer: 0.5)."""
    if isinstance(answers, str) or not answers:
        raise ValueError(f"need a non-empty list of annotator answers, got {answers!r}")
    scale = VG_ANSWER_WEIGHT if dataset == "vg" else 1.0
    return {answer: scale * count / len(answers) for answer, count in Counter(answers).items()}


def question_only_baseline(train: Sequence[dict], test: Sequence[dict]) -> float:
    """Accuracy (percent, exact match against the most common annotator answer) of the best question-only predictor
    fitted on `train`: per question text its most frequent answer there, else the most frequent answer of its
    template (items with "template"), else the most frequent answer overall."""
    def target(item: dict) -> str:
        return Counter(item["answer"]).most_common(1)[0][0]

    by_question: dict[str, Counter] = {}
    by_template: dict[str, Counter] = {}
    overall: Counter = Counter()
    for item in train:
        by_question.setdefault(item["question"], Counter())[target(item)] += 1
        by_template.setdefault(item.get("template", ""), Counter())[target(item)] += 1
        overall[target(item)] += 1
    correct = 0
    for item in test:
        counts = by_question.get(item["question"]) or by_template.get(item.get("template", "")) or overall
        correct += counts.most_common(1)[0][0] == target(item)
    return 100.0 * correct / max(len(test), 1)


# ---------------------------------------------------------------------------------------------------------- JSON
def load_answer_list(path: str) -> list[str]:
    """Reads an answer-list file (X-VLM `answer_list.json`): a JSON list of distinct non-empty answer strings.

    Raises:
        ValueError: naming the file and the entry index of the first bad entry (or the duplicate).
    """
    from .files import _read_json_list

    answers = _read_json_list(path)
    if not answers:
        raise ValueError(f"{path!r}: the answer list is empty")
    seen: dict[str, int] = {}
    for index, answer in enumerate(answers):
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError(f"{path!r}: entry {index} must be a non-empty answer string, got {answer!r}")
        if answer.strip() in seen:
            raise ValueError(f"{path!r}: entry {index} {answer!r} repeats entry {seen[answer.strip()]}")
        seen[answer.strip()] = index
    return list(seen)


def load_vqa_json(json_path: str, image_root: str | None, require_answers: bool = True, on_error: str = "raise",
                  check_images: bool = True) -> list[dict]:
    """Loads an X-VLM / ALBEF VQA JSON: a list of {"question_id", "question", "answer": str | [str, ...], "image"}.

    Args:
        json_path: the JSON file.
        image_root: directory the "image" paths are relative to (None: the working directory).
        require_answers: False accepts records without "answer" (a test split scored elsewhere; they get []).
        on_error: "raise" (first bad record raises) or "skip" (drop and warn; reasons in the log).
        check_images: verify that each image exists and is readable (header check, no decode).

    Returns:
        Items {"question_id", "image" (path), "question" (str), "answer" (list of annotator answers)}, plus the
        record's "dataset" when it has one (X-VLM: "vg" marks a Visual Genome question, whose answer weighs 0.5).

    Raises:
        ValueError: naming the file, record index and field of the first bad record (on_error="raise").
    """
    from .files import _captions, _collect, _field, _image_path, _read_json_list

    def parse(record: Any, index: int) -> dict:
        question_id = _field(record, index, "question_id", json_path)
        if isinstance(question_id, bool) or not isinstance(question_id, (int, str)):
            raise ValueError(f"{json_path}: record {index} field 'question_id' must be an int or a string, got "
                             f"{question_id!r}")
        question = _captions(_field(record, index, "question", json_path), index, json_path, "question")
        if len(question) != 1 or not isinstance(record["question"], str):
            raise ValueError(f"{json_path}: record {index} field 'question' must be one string")
        answers: list[str] = []
        if require_answers or "answer" in record:
            answers = _captions(_field(record, index, "answer", json_path), index, json_path, "answer")
        image = _image_path(_field(record, index, "image", json_path), index, json_path, image_root or "",
                            check_images)
        item = {"question_id": question_id, "image": image, "question": question[0], "answer": answers}
        if "dataset" in record:  # X-VLM's source tag: "vqa", "vg" (answers weigh 0.5 in training), "gqa"
            if not isinstance(record["dataset"], str):
                raise ValueError(f"{json_path}: record {index} field 'dataset' must be a string (e.g. \"vqa\", "
                                 f"\"vg\"), got {record['dataset']!r}")
            item["dataset"] = record["dataset"]
        return item

    items, _ = _collect(_read_json_list(json_path), parse, on_error, json_path)
    return items


def answer_list_beside(json_path: str) -> str:
    """Where the answer list of a VQA JSON lives: `answer_list.json` in the same folder (X-VLM's data layout)."""
    import os

    return os.path.join(os.path.dirname(os.path.abspath(json_path)), "answer_list.json")


def iter_questions(items: Sequence[dict]) -> Iterator[tuple[int, dict]]:
    """(index, item) for every item, checking the fields a VQA batch needs (ValueError naming the item and field)."""
    for index, item in enumerate(items):
        for key in ("image", "question"):
            if key not in item:
                raise ValueError(f"VQA item {index} has no {key!r} (keys: {sorted(item)})")
        if not isinstance(item["question"], str) or not item["question"].strip():
            raise ValueError(f"VQA item {index} field 'question' is an empty or non-string question")
        yield index, item


# ------------------------------------------------------------------------------------------------------- collator
class VQACollator:
    """Collates VQA items {"image", "question", "answer": [annotator answers]} for teacher-forced answer training.

    Each question's distinct answers become rows "[CLS] answer [SEP] [PAD]..." weighted by `answer_weights` (ALBEF /
    X-VLM: count / number of annotator answers; × 0.5 for an item with "dataset": "vg"), all questions' answers
    stacked.

    Returns dict: pixel_values (B, C, H, W), input_ids / attention_mask (B, T) (questions), answer_input_ids /
    answer_attention_mask (A, L), answer_weights (A,) float, answer_question_index (A,) long (question row of each
    answer row).

    Args:
        processor: an `EfficientVLMProcessor` (or anything with its call interface and `.tokenizer`).
        max_length: maximum question length in tokens (X-VLM: 40).
        answer_max_length: maximum answer length in tokens, [CLS] and [SEP] included.
    """

    def __init__(self, processor: Any, max_length: int = 40, answer_max_length: int = 10):
        if answer_max_length < 3:
            raise ValueError(f"answer_max_length must be >= 3 ([CLS] answer [SEP]), got {answer_max_length}")
        self.processor, self.max_length, self.answer_max_length = processor, max_length, answer_max_length

    def __call__(self, items: list[dict]) -> dict:
        import torch

        from .files import load_image

        questions, images, answers, weights, rows = [], [], [], [], []
        for index, item in iter_questions(items):
            if "answer" not in item:
                raise ValueError(f"VQA item {index} has no 'answer' (keys: {sorted(item)}); training needs answers")
            try:
                item_weights = answer_weights(item["answer"], item.get("dataset"))
            except ValueError as error:
                raise ValueError(f"VQA item {index} field 'answer': {error}") from error
            questions.append(item["question"])
            images.append(load_image(item["image"]))
            for answer, weight in item_weights.items():
                answers.append(answer)
                weights.append(weight)
                rows.append(index)
        encoded = self.processor(images=images, text=questions, padding="longest", truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
        answer_ids, answer_mask = encode_answers(self.processor.tokenizer, answers, self.answer_max_length)
        return {"pixel_values": encoded["pixel_values"], "input_ids": encoded["input_ids"],
                "attention_mask": encoded["attention_mask"], "answer_input_ids": answer_ids,
                "answer_attention_mask": answer_mask, "answer_weights": torch.tensor(weights, dtype=torch.float),
                "answer_question_index": torch.tensor(rows, dtype=torch.long)}


def encode_answers(tokenizer: Any, answers: Sequence[str], max_length: int = 10) -> tuple[Any, Any]:
    """(ids, mask), both (A, L): "[CLS] answer [SEP] [PAD]..." per answer, right-padded to the longest."""
    encoded = tokenizer(list(answers), padding="longest", truncation=True, max_length=max_length,
                        return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


__all__ = [
    "ANNOTATORS", "BLIND_ACCURACY", "MAJORITY_ACCURACY", "QUESTION_WORDS", "Question", "SyntheticVQADataset",
    "TEMPLATES", "TEMPLATE_ANSWERS", "VG_ANSWER_WEIGHT", "VQACollator", "VQAItems", "VQA_ANSWERS", "answer_list_beside",
    "answer_question", "answer_weights", "encode_answers", "iter_questions", "load_answer_list", "load_vqa_json", "make_vqa_eval_set",
    "make_vqa_item",
    "question_only_baseline", "question_text", "random_question", "scene_for_answer",
]
