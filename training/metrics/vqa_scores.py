"""VQA accuracy as the official VQA evaluation script computes it (`vqaEval.py` of the VQA API,
GT-Vision-Lab/VQA `PythonEvaluationTools/vqaEvaluation/vqaEval.py`), in pure Python.

API::

    vqa_scores(predictions, answers, variant="official") -> list[float]   # per question, in [0, 1]
    vqa_accuracy(predictions, answers, variant="official") -> float       # mean over questions
    official_answer_processing(text) -> str     # the script's processPunctuation + processDigitArticle
    normalize_answer(text) -> str               # the same with a contraction table that can match (variant "corrected")
    VQA_ACCURACY_METRIC_DIR                     # the same metric as a local `evaluate` module

`variant="official"` (the default, the number papers report) is the script's score on every question, quirks included:

- newlines / tabs become spaces and the answers are stripped; then, ONLY when the annotators' answers are not all
  identical, every answer and the prediction go through processPunctuation and processDigitArticle. When all
  annotators agree, the raw strings are compared: "Yes" or "zero" against ten "yes" / "0" scores 0.
- per question: the mean over the n annotators of min(#OTHER annotators whose answer equals the prediction / 3, 1),
  so with 10 annotators k = 1 / 2 / 3 matching score 0.3 / 0.6 / 0.9 (k ≥ 4: 1).
- processPunctuation: each mark of ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! is deleted when the ORIGINAL answer has
  it next to a space (or has a comma between digits), else replaced by a space; then a period not followed by a digit
  is deleted ("2." → "2", "3.5" kept; the script's pattern `(?!<=\\d)` is a look-ahead, not the look-behind it meant),
  at most 32 of them (the script passes `re.UNICODE`, = 32, as the `count` argument).
- processDigitArticle: lower-case, split on whitespace, number words none / zero..ten → digits, drop a / an / the,
  then the script's contraction table (its keys "Im", "Ive", "Id've", "I'dve" never match lower-cased words).

`variant="corrected"` normalises every answer and the prediction always (case, punctuation, numbers, articles) and uses
the contraction table with lower-case keys ("im" → "i'm"); the leave-one-out average is the same. It is an option for
studies, not the reported number.

Questions need at least 2 annotator answers (the script would score a lone annotator's question 0 whatever the
prediction). Papers, reports and cards multiply by 100.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

VQA_ACCURACY_METRIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vqa_accuracy")
VARIANTS = ("official", "corrected")

# ------------------------------------------------------------------------------- the official script's tables, as is
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
"""`VQAEval.contractions`, verbatim (mixed-case keys included)."""
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
              "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
# the script's patterns (Python 2, no re.UNICODE flag: \d is ASCII); `(?!<=\d)` is a look-ahead that always holds
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)", re.ASCII)
_PERIOD_STRIP_COUNT = 32  # `periodStrip.sub("", outText, re.UNICODE)`: re.UNICODE (= 32) lands in `count`
_LOWER_CASE_CONTRACTIONS = {key.lower(): value.lower() for key, value in CONTRACTIONS.items()}


def _clean(text: str) -> str:
    """The script's first step on every answer: newlines and tabs to spaces, strip."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    """`VQAEval.processPunctuation`: the space test reads the original answer, the replacement edits the copy."""
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for mark in PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(text: str, contractions: dict[str, str]) -> str:
    """`VQAEval.processDigitArticle`."""
    words = [MANUAL_MAP.get(word, word) for word in text.lower().split()]
    return " ".join(contractions.get(word, word) for word in words if word not in ARTICLES)


def official_answer_processing(text: str) -> str:
    """processPunctuation then processDigitArticle of the official script (applied there only to questions whose
    annotators disagree; see `vqa_scores`)."""
    return _process_digit_article(_process_punctuation(_clean(text)), CONTRACTIONS)


def normalize_answer(text: str) -> str:
    """The corrected variant's normalisation: the official processing with contraction keys that can match."""
    return _process_digit_article(_process_punctuation(_clean(text)), _LOWER_CASE_CONTRACTIONS)


def _check(predictions: Sequence[str], answers: Sequence[Sequence[str]], variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
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
        if len(refs) < 2:
            raise ValueError(f"answers[{i}] has {len(refs)} annotator answer; VQA accuracy averages over the other "
                             "annotators and needs at least 2 (the official script scores such a question 0)")


def _question_score(prediction: str, refs: Sequence[str], variant: str) -> float:
    if variant == "official":
        refs, prediction = [_clean(ref) for ref in refs], _clean(prediction)
        if len(set(refs)) > 1:  # the script normalises only when the annotators disagree
            refs = [official_answer_processing(ref) for ref in refs]
            prediction = official_answer_processing(prediction)
    else:
        refs, prediction = [normalize_answer(ref) for ref in refs], normalize_answer(prediction)
    # mean over annotators i of min(#{j ≠ i: refs[j] == prediction} / 3, 1)
    matches = [ref == prediction for ref in refs]
    k = sum(matches)
    return sum(min((k - matched) / 3.0, 1.0) for matched in matches) / len(refs)


def vqa_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]],
               variant: str = "official") -> list[float]:
    """Per-question VQA accuracy in [0, 1].

    Args:
        predictions: one predicted answer per question.
        answers: per question, its annotator answers in order (VQA v2: 10; repeats count).
        variant: "official" (the official script, quirks included) or "corrected" (see the module docstring).
    """
    _check(predictions, answers, variant)
    return [_question_score(prediction, refs, variant) for prediction, refs in zip(predictions, answers)]


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]], variant: str = "official") -> float:
    """Mean VQA accuracy over the questions, in [0, 1] (see `vqa_scores`)."""
    scores = vqa_scores(predictions, answers, variant)
    return float(sum(scores) / len(scores))


__all__ = ["ARTICLES", "CONTRACTIONS", "MANUAL_MAP", "PUNCTUATION", "VARIANTS", "VQA_ACCURACY_METRIC_DIR",
           "normalize_answer", "official_answer_processing", "vqa_accuracy", "vqa_scores"]
