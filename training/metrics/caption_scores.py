"""Caption metrics as in the COCO caption evaluation toolkit (pycocoevalcap), in pure Python: BLEU-1..4 and CIDEr-D.

API (all inputs are raw caption strings; the functions tokenize them first, as `COCOEvalCap` does)::

    tokenize_caption(text) -> str                       # the toolkit's PTB tokenization + punctuation filter
    bleu(predictions, references, n=4) -> list[float]   # corpus [BLEU-1, ..., BLEU-n], each in [0, 1]
    cider_d(predictions, references) -> float           # corpus CIDEr-D ("CIDEr" in the toolkit), 0 .. ~10
    cider_d_per_image(predictions, references) -> list[float]  # its per-image scores (cider_d = their mean)
    BLEU_METRIC_DIR, CIDER_METRIC_DIR                   # the same metrics as local `evaluate` modules:
                                                        # evaluate.load(BLEU_METRIC_DIR).compute(predictions=...,
                                                        #     references=...) -> {"bleu_1": ..., "bleu_4": ...}

`predictions[i]` is the generated caption of image i, `references[i]` its ground-truth captions (one or more).
Scale: the functions return the toolkit's own scale (BLEU in [0, 1], CIDEr-D with the toolkit's ×10, so a good model
scores about 1.2); papers, the captioning task's reports and model cards multiply both by 100 (BLEU-4 39.0,
CIDEr 120.0). The local `evaluate` modules (`training/metrics/bleu`, `training/metrics/cider`) return these same
numbers. METEOR and SPICE (Java tools in the toolkit) are not computed.

What matches the toolkit exactly (same counts, same constants, same floating-point formulas):
- BLEU (`pycocoevalcap/bleu/bleu_scorer.py`, option "closest"): clipped n-gram counts against the per-n-gram maximum
  over an image's references, summed over the corpus; the brevity penalty exp(1 - r/c) from the corpus candidate
  length c and the sum r of each image's reference length closest to its candidate (ties → the shorter reference);
  the toolkit's smoothing (each precision is (correct + 1e-15) / (guess + 1e-9)), so an order with no candidate
  n-grams contributes a factor 1e-6 rather than zeroing the score.
- CIDEr-D (`pycocoevalcap/cider/cider_scorer.py`): raw-count tf × idf with idf = log(N) - log(max(1, df)), df = the
  number of images of the evaluated set whose references contain the n-gram (the toolkit's "corpus" mode, so scores
  depend on the whole set and a one-image set scores 0); candidate weights clipped by the reference weights; cosine per
  order n = 1..4; Gaussian length penalty with sigma = 6 on the difference of the BIGRAM counts (the toolkit's code
  counts `n == 1`, i.e. bigrams, as the length: the same differences as word counts unless a caption is empty, which
  scores 0 anyway); mean over orders, mean over references, ×10, mean over images.

What is approximated: the toolkit tokenizes with Stanford CoreNLP 3.4.1's PTBTokenizer (Java, `-lowerCase
-preserveLines`) and then drops the tokens '' ' `` ` -LRB- -RRB- -LCB- -RCB- . ? ! , : - -- ... ; — see
`tokenize_caption` for the rules that reproduce it on English captions.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Sequence

BLEU_METRIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bleu")
CIDER_METRIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cider")

# The toolkit's filter list (ptbtokenizer.py). Its bracket entries are upper-case while `-lowerCase` writes "-lrb-",
# so brackets survive the real toolkit as "-lrb-" / "-rrb-" / "-lcb-" / "-rcb-" / "-lsb-" / "-rsb-"; we do the same.
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"])
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}
# PTB3 normalisation of typographic characters (CoreNLP: ptb3Dashes, ptb3Ellipsis, ascii quotes).
_NORMALIZE = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
                            "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2033": '"',
                            "\u2013": " -- ", "\u2014": " -- ", "\u2015": " -- ", "\u2026": " ... "})
# Always split off: brackets, double quotes, backquotes, ";", "...", "--" and runs of "!" / "?" (PTB keeps "!!!" and
# "?!" as one token, which the toolkit's filter then keeps).
_ALWAYS_SPLIT = re.compile(r'(\.\.\.|--|[!?]+|[;"`()\[\]{}])')
# Split off , and : unless between digits ("1,000", "5:30"); $ before a digit; % after one.
_SEPARATORS = re.compile(r"(?<!\d)([,:])|([,:])(?!\d)|(\$)(?=\d)|(?<=\d)(%)")
_CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m")
_CLITIC = re.compile(rf"^(.+?)({'|'.join(_CLITICS)})$")
_ACRONYM = re.compile(r"^(?:[^\W\d_]\.)+$")  # u.s. / p.m.: PTB keeps the final period
_ABBREVIATIONS = frozenset(["mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "mt.", "vs.", "prof.", "inc.", "co."])


def _split_word(chunk: str) -> list[str]:
    """PTB rules for one whitespace-free chunk: peel quotes/periods at both ends, then split a clitic."""
    head: list[str] = []
    while chunk[:1] == "'" and len(chunk) > 1 and chunk not in _CLITICS:
        head.append("`")  # an opening single quote (PTB writes ` ; the toolkit drops it)
        chunk = chunk[1:]
    tail: list[str] = []
    while chunk[-1:] in (".", "'") and len(chunk) > 1:
        if chunk[-1] == "." and (_ACRONYM.match(chunk) or chunk in _ABBREVIATIONS):
            break
        tail.insert(0, chunk[-1])
        chunk = chunk[:-1]
    clitic = _CLITIC.match(chunk)
    middle = [clitic.group(1), clitic.group(2)] if clitic else [chunk]
    return head + middle + tail


def tokenize_caption(text: str) -> str:
    """The toolkit's tokenization of one caption: lower-cased PTB tokens, punctuation tokens removed, space-joined.

    Reproduces Stanford PTBTokenizer 3.4.1 (`-lowerCase -preserveLines`) + pycocoevalcap's filter on English captions:
    typographic quotes / dashes / ellipses are normalised; clitics split ("isn't" → "is n't", "dog's" → "dog 's",
    "can't" → "ca n't"); punctuation split off words (except "," / ":" between digits, periods inside a word such as
    "3.5" or "dog.a", acronyms "u.s." and a few titles "mr." / "st."); "$5" → "$ 5", "50%" → "50 %"; hyphenated
    words, "off/on", "&", "#tag", e-mail-like words stay whole; brackets become "-lrb-" ... (kept, as in the toolkit).
    Not reproduced: PTB's rarer rules (e.g. "'tis" → "'t is", "cannot" → "can not", "5:30pm" → "5:30 pm", URLs,
    abbreviations outside the short list keep no period) — they change token boundaries on both sides equally.

    Args:
        text: one caption (any unicode; newlines count as spaces).

    Returns:
        The tokens joined by single spaces ("" for an empty or all-punctuation caption).
    """
    text = text.lower().translate(_NORMALIZE)
    text = _SEPARATORS.sub(lambda match: f" {next(group for group in match.groups() if group)} ", text)
    text = _ALWAYS_SPLIT.sub(r" \1 ", text)
    tokens: list[str] = []
    for chunk in text.split():
        pieces = [chunk] if chunk in PUNCTUATIONS or chunk[0] in "!?" else _split_word(chunk)
        tokens.extend(_BRACKETS.get(piece, piece) for piece in pieces)
    return " ".join(token for token in tokens if token not in PUNCTUATIONS and token != '"')


def _check_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if isinstance(predictions, str) or len(predictions) != len(references):
        raise ValueError(f"predictions (a list of captions, got {len(predictions)} items) and references "
                         f"({len(references)} lists) must have one entry per image")
    if len(predictions) == 0:
        raise ValueError("caption metrics need at least one image (got empty predictions and references)")
    for i, (prediction, refs) in enumerate(zip(predictions, references)):
        if not isinstance(prediction, str):
            raise TypeError(f"predictions[{i}] must be a caption string, got {type(prediction).__name__}")
        if isinstance(refs, str) or len(refs) == 0 or not all(isinstance(ref, str) for ref in refs):
            raise ValueError(f"references[{i}] must be a non-empty list of caption strings, got {refs!r}")


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    """Counts of all 1..n-grams (tuples) of a token list (the toolkit's `precook`)."""
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def _tokenized(predictions, references, tokenize: bool) -> tuple[list[list[str]], list[list[list[str]]]]:
    prepare = tokenize_caption if tokenize else (lambda caption: caption)
    return ([prepare(p).split() for p in predictions],
            [[prepare(r).split() for r in refs] for refs in references])


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
         tokenize: bool = True) -> list[float]:
    """Corpus BLEU-1..n exactly as pycocoevalcap's `Bleu(4)` (bleu_scorer.py, option "closest").

    Args:
        predictions: one generated caption per image.
        references: per image, its reference captions (at least one).
        n: the highest n-gram order.
        tokenize: apply `tokenize_caption` first (False: captions are already space-separated tokens).

    Returns:
        [BLEU-1, ..., BLEU-n] on the toolkit's scale (0..1); BLEU-k = BP · (p_1 ⋯ p_k)^(1/k).
    """
    _check_inputs(predictions, references)
    small, tiny = 1e-9, 1e-15  # the toolkit's constants: p_k = (correct + tiny) / (guess + small)
    hypotheses, reference_sets = _tokenized(predictions, references, tokenize)
    correct, guess = [0] * n, [0] * n
    test_length = reference_length = 0
    for hypothesis, refs in zip(hypotheses, reference_sets):
        max_counts: Counter = Counter()
        for ref in refs:
            max_counts |= _ngrams(ref, n)  # | keeps the per-n-gram maximum over the references
        for ngram, count in _ngrams(hypothesis, n).items():
            correct[len(ngram) - 1] += min(max_counts[ngram], count)
        for k in range(n):
            guess[k] += max(0, len(hypothesis) - k)
        test_length += len(hypothesis)
        reference_length += min((abs(len(ref) - len(hypothesis)), len(ref)) for ref in refs)[1]
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_length + tiny) / (reference_length + small)
    penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    return [float(score * penalty) for score in scores]


def _tfidf(counts: Counter, document_frequency: Counter, log_n_images: float, n: int
           ) -> tuple[list[dict], list[float], int]:
    """tf-idf vector per order, its norm per order, and the toolkit's "length" (the number of bigrams)."""
    vectors: list[dict] = [{} for _ in range(n)]
    squares = [0.0] * n
    for ngram, term_frequency in counts.items():
        weight = float(term_frequency) * (log_n_images - math.log(max(1.0, document_frequency[ngram])))
        vectors[len(ngram) - 1][ngram] = weight
        squares[len(ngram) - 1] += weight ** 2
    length = sum(count for ngram, count in counts.items() if len(ngram) == 2)
    return vectors, [math.sqrt(square) for square in squares], length


def cider_d_per_image(predictions: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
                      sigma: float = 6.0, tokenize: bool = True) -> list[float]:
    """Per-image CIDEr-D as pycocoevalcap's `Cider()` (cider_scorer.py), document frequencies from ALL `references`.

    The scores depend on the whole set (the idf corpus), not on each image alone: image i's score is the toolkit's
    score of image i within this evaluation; `cider_d` is their mean.

    Args:
        predictions: one generated caption per image.
        references: per image, its reference captions (at least one); they are also the idf corpus.
        n: the highest n-gram order.
        sigma: the Gaussian length penalty's standard deviation (in bigram counts, as the toolkit measures length).
        tokenize: apply `tokenize_caption` first (False: captions are already space-separated tokens).

    Returns:
        Per image, 10 · mean_refs mean_orders [clipped-cosine · exp(-Δlen² / 2σ²)] (toolkit scale).
    """
    _check_inputs(predictions, references)
    hypotheses, reference_sets = _tokenized(predictions, references, tokenize)
    reference_counts = [[_ngrams(ref, n) for ref in refs] for refs in reference_sets]
    document_frequency: Counter = Counter()
    for counts in reference_counts:  # an n-gram counts once per image, however many of its references hold it
        document_frequency.update(set().union(*counts))
    log_n_images = math.log(float(len(reference_sets)))
    image_scores = []
    for hypothesis, counts in zip(hypotheses, reference_counts):
        vec, norm, length = _tfidf(_ngrams(hypothesis, n), document_frequency, log_n_images, n)
        total = 0.0
        for ref_counts in counts:
            vec_ref, norm_ref, length_ref = _tfidf(ref_counts, document_frequency, log_n_images, n)
            penalty = math.exp(-((length - length_ref) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                dot = sum(min(weight, vec_ref[k].get(ngram, 0.0)) * vec_ref[k].get(ngram, 0.0)
                          for ngram, weight in vec[k].items())
                if norm[k] != 0 and norm_ref[k] != 0:
                    dot /= norm[k] * norm_ref[k]
                total += dot * penalty
        image_scores.append(10.0 * total / n / len(counts))
    return image_scores


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0,
            tokenize: bool = True) -> float:
    """Corpus CIDEr-D exactly as pycocoevalcap's `Cider()` (cider_scorer.py), document frequencies from `references`.

    Args:
        predictions, references, n, sigma, tokenize: as in `cider_d_per_image`.

    Returns:
        The mean over images of `cider_d_per_image` (toolkit scale).
    """
    image_scores = cider_d_per_image(predictions, references, n=n, sigma=sigma, tokenize=tokenize)
    return float(sum(image_scores) / len(image_scores))
