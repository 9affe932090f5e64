"""VQA accuracy as in the official VQA evaluation (`vqaEval.py` of the VQA v2 API), in pure Python.

API::

    normalize_answer(text) -> str                          # the official punctuation / number / article processing
    vqa_accuracy(predictions, answers) -> float            # mean over questions, in [0, 1]
    vqa_scores(predictions, answers) -> list[float]        # per question
    VQA_ACCURACY_METRIC_DIR                                # the same metric as a local `evaluate` module:
                                                           # evaluate.load(VQA_ACCURACY_METRIC_DIR).compute(
                                                           #     predictions=[...], references=[[...], ...])

Per question: acc = min(#annotators whose answer equals the prediction / 3, 1) after normalising both sides
("2" = "two", "a dog" = "dog", "yes." = "yes"). `leave_one_out=True` gives the official script's exact form: the mean
of that quantity over the n subsets of n − 1 annotators (with 10 annotators and k agreeing: k = 3 scores 0.9, not 1).
Papers, reports and cards multiply by 100.

Normalisation (official `processPunctuation` + `processDigitArticle`): newlines / tabs to spaces, strip; the
punctuation marks ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! are removed when they touch a space or the answer has a
comma between digits, else replaced by a space; a period not between digits is removed; lower-case; number words
zero..ten (and "none") become digits; the articles a / an / the are dropped; common contractions without the
apostrophe get it back ("dont" → "don't"; a subset of the official table).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

VQA_ACCURACY_METRIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vqa_accuracy")

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!")
_PERIOD = re.compile(r"(?<!\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset(("a", "an", "the"))
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't",
    "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hes": "he's",
    "im": "i'm", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "ive": "i've", "shouldnt": "shouldn't",
    "thats": "that's", "theres": "there's", "theyre": "they're", "wasnt": "wasn't", "werent": "weren't",
    "whats": "what's", "wont": "won't", "wouldnt": "wouldn't", "youre": "you're",
}


def normalize_answer(text: str) -> str:
    """The official VQA answer normalisation (see the module docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in _PUNCTUATION:
        if f"{mark} " in text or f" {mark}" in text or has_digit_comma:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = _PERIOD.sub("", text)
    words = [_NUMBERS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def _check(predictions: Sequence[str], answers: Sequence[Sequence[str]], leave_one_out: bool) -> None:
    if isinstance(predictions, str) or len(predictions) != len(answers):
        raise ValueError(f"predictions ({len(predictions)} items) and answers ({len(answers)} lists) must have one "
                         "entry per question")
    if not len(predictions):
        raise ValueError("VQA accuracy needs at least one question (got empty predictions and answers)")
    for i, (prediction, refs) in enumerate(zip(predictions, answers)):
        if not isinstance(prediction, str):
            raise TypeError(f"predictions[{i}] must be an answer string, got {type(prediction).__name__}")
        if isinstance(refs, str) or not len(refs) or not all(isinstance(ref, str) for ref in refs):
            raise ValueError(f"answers[{i}] must be a non-empty list of annotator answer strings, got {refs!r}")
        if leave_one_out and len(refs) < 2:
            raise ValueError(f"answers[{i}] has {len(refs)} annotator answer; leave_one_out needs at least 2")


def vqa_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]],
               leave_one_out: bool = False) -> list[float]:
    """Per-question VQA accuracy in [0, 1].

    Args:
        predictions: one predicted answer per question.
        answers: per question, its annotator answers (VQA v2: 10; repeats count).
        leave_one_out: the official script's averaging over the subsets of n − 1 annotators.
    """
    _check(predictions, answers, leave_one_out)
    scores = []
    for prediction, refs in zip(predictions, answers):
        predicted = normalize_answer(prediction)
        agree = sum(normalize_answer(ref) == predicted for ref in refs)
        if not leave_one_out:
            scores.append(min(agree / 3.0, 1.0))
            continue
        # removing an agreeing annotator leaves agree − 1, removing another one leaves agree
        n = len(refs)
        scores.append((agree * min((agree - 1) / 3.0, 1.0) + (n - agree) * min(agree / 3.0, 1.0)) / n)
    return scores


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]], leave_one_out: bool = False) -> float:
    """Mean VQA accuracy over the questions, in [0, 1] (see `vqa_scores`)."""
    scores = vqa_scores(predictions, answers, leave_one_out)
    return float(sum(scores) / len(scores))


__all__ = ["VQA_ACCURACY_METRIC_DIR", "normalize_answer", "vqa_accuracy", "vqa_scores"]
