"""Caption metrics (BLEU-1..4, CIDEr-D) against hand computation, the COCO toolkit's tokenization, and `evaluate`.

Every expected number below is written out by hand from n-gram counts; the same examples were also run through the
real pycocoevalcap 1.2 (`Bleu(4)`, `Cider()`, Stanford PTBTokenizer 3.4.1) once, outside the test suite, and agreed to
within 3e-16 relative (the toolkit is not a dependency: it needs Java).
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

from efficientvlm.training.metrics.caption_scores import (BLEU_METRIC_DIR, CIDER_METRIC_DIR, bleu, cider_d,
                                                       tokenize_caption)

# The toolkit's smoothing: p_k = (correct_k + 1e-15) / (guess_k + 1e-9); so compare with a relative tolerance.
REL = 1e-8


# ------------------------------------------------------------------------------------------------------ tokenization
@pytest.mark.parametrize("caption, expected", [
    # Expected strings are the real toolkit's output (PTBTokenizer -lowerCase -preserveLines, then its filter).
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ("The cat's sleeping on the sofa, isn't it?", "the cat 's sleeping on the sofa is n't it"),
    ("Two dogs' toys; can't won't I'm we're they've you'll he'd",
     "two dogs toys ca n't wo n't i 'm we 're they 've you 'll he 'd"),
    ('"Stop" sign at the corner of 5th St. and Main.', "stop sign at the corner of 5th st. and main"),
    ("It's a black-and-white photo of 3.5 cats... and 1,000 dogs; yes: no - maybe -- ok!",
     "it 's a black-and-white photo of 3.5 cats and 1,000 dogs yes no maybe ok"),
    ("An old-fashioned clock (with a flag) {x} [y]", "an old-fashioned clock -lrb- with a flag -rrb- -lcb- x -rcb- "
                                                     "-lsb- y -rsb-"),  # the toolkit's filter misses "-lrb-"
    ("pepperoni & cheese for $5 or 50% off at 10:15, wow!!! ok?!", "pepperoni & cheese for $ 5 or 50 % off at 10:15 "
                                                                   "wow !!! ok ?!"),
    ("The U.S. flag; a dog.a cat end.", "the u.s. flag a dog.a cat end"),
    ("Isn\u2019t it the dog\u2019s \u201ctoy\u201d \u2014 yes\u2013no\u2026 'hi' it`s",
     "is n't it the dog 's toy yes no hi it s"),
    ("A caf\u00e9, na\u00efve \u00dcN\u00cfC\u00d6D\u00c9\n\u00c9COLE",
     "a caf\u00e9 na\u00efve \u00fcn\u00efc\u00f6d\u00e9 \u00e9cole"),
    ("", ""),
    (" . , ! ? ... -- ; : ' \" ", ""),
])
def test_tokenize_caption_reproduces_the_toolkit(caption, expected):
    assert tokenize_caption(caption) == expected


# ------------------------------------------------------------------------------------------------------------ BLEU
def test_bleu_against_hand_computation():
    predictions = ["A cat sat on the mat.", "a dog runs"]
    references = [["the cat sat on the mat", "A cat is on the mat"], ["a dog runs fast", "the dog is running"]]
    # Image 1, "a cat sat on the mat" (6 tokens), clipped by the max count over its two references:
    #   1-grams a cat sat on the mat: all present          -> 6 / 6
    #   2-grams a_cat cat_sat sat_on on_the the_mat         -> 5 / 5
    #   3-grams a_cat_sat (absent) cat_sat_on sat_on_the on_the_mat -> 3 / 4
    #   4-grams a_cat_sat_on (absent) cat_sat_on_the sat_on_the_mat -> 2 / 3
    #   closest reference length to 6: 6
    # Image 2, "a dog runs" (3 tokens): 3 / 3, 2 / 2, 1 / 1, 0 / 0; closest reference length to 3: 4
    # Corpus: correct (9, 7, 4, 2), guess (9, 7, 5, 3); c = 9, r = 10 -> BP = exp(1 - 10 / 9) = exp(-1 / 9)
    bp = math.exp(-1 / 9)
    expected = [1.0 * bp, math.sqrt(1.0 * 1.0) * bp, (1.0 * 1.0 * 4 / 5) ** (1 / 3) * bp,
                (1.0 * 1.0 * 4 / 5 * 2 / 3) ** (1 / 4) * bp]
    assert bleu(predictions, references) == pytest.approx(expected, rel=REL)
    assert expected[3] == pytest.approx(0.7647064, abs=1e-7)  # the toolkit prints 0.764706425539046
    assert bleu(predictions, references, n=2) == pytest.approx(expected[:2], rel=REL)


def test_bleu_closest_reference_length_breaks_ties_towards_the_shorter():
    # Candidate of 5 tokens, references of 4 and 6: both 1 away, the toolkit takes 4 -> c >= r -> no brevity penalty.
    # Every candidate n-gram is in the 6-token reference, so all precisions are 1 and every BLEU-k is 1.
    # (Taking 6 would give BP = exp(1 - 6 / 5) = 0.8187.)
    assert bleu(["a b c d e"], [["a b c d", "a b c d e f"]]) == pytest.approx([1.0] * 4, rel=REL)


def test_identical_predictions_score_bleu_one():
    references = [["A dog runs on the grass.", "a brown dog running"], ["two birds fly over the lake"]]
    predictions = [refs[0] for refs in references]
    assert bleu(predictions, references) == pytest.approx([1.0] * 4, rel=REL)


def test_bleu_empty_and_short_predictions_follow_the_toolkit_smoothing():
    # Image 1 "a dog runs" matches its reference exactly: correct = guess = (3, 2, 1, 0); image 2 is empty.
    # c = 3, r = 3 + 3 (the closest reference length to 0 is 3) -> BP = exp(1 - 6 / 3) = exp(-1).
    # No 4-gram anywhere: p_4 = (0 + 1e-15) / (0 + 1e-9) = 1e-6, so BLEU-4 = (1e-6)^(1/4) * exp(-1), not 0.
    scores = bleu(["a dog runs", ""], [["a dog runs"], ["a cat sleeps"]])
    assert scores[:3] == pytest.approx([math.exp(-1)] * 3, rel=REL)
    assert scores[3] == pytest.approx(1e-6 ** 0.25 * math.exp(-1), rel=1e-6)
    # All predictions empty: c = 0 -> ratio 1e-15 / 6 -> BP = exp(1 - 6e15) = 0.
    assert bleu(["", "..."], [["a dog runs"], ["a cat sleeps"]]) == [0.0] * 4


def test_bleu_unicode_captions():
    # "ÉCOLE" lower-cases to "école"; "café" and "l'école" stay single tokens (as in PTBTokenizer): 5 tokens, all
    # matching -> 1.0.
    assert bleu(["Une CAFÉ près de l'ÉCOLE"], [["une café près de l'école"]]) == pytest.approx([1.0] * 4, rel=REL)


# ----------------------------------------------------------------------------------------------------------- CIDEr-D
def test_cider_d_against_hand_computation():
    predictions = ["A dog runs.", "a black cat", "birds birds birds"]
    references = [["a dog runs", "a dog plays"], ["a cat sleeps here"], ["two birds fly"]]
    # N = 3 images. Document frequency = number of IMAGES whose references hold the n-gram: "a" -> 2 (images 1, 2);
    # "a dog" is in both references of image 1 but counts once -> 1; every other reference n-gram -> 1; n-grams
    # seen in no reference ("black", "a black", "birds birds", ...) -> max(1, 0) = 1 as well.
    a_idf, b_idf = math.log(3) - math.log(2), math.log(3) - math.log(1)  # idf("a"), idf(anything else)
    aa, bb = a_idf ** 2, b_idf ** 2
    # Image 1, "a dog runs": 1-gram vector (a: A, dog: B, runs: B), 2-grams (B, B), 3-gram (B), no 4-gram.
    #   vs "a dog runs": identical -> cosines (1, 1, 1, 0) (no 4-grams: norm 0 -> 0).
    #   vs "a dog plays": 1-grams dot A² + B² over |A² + 2B²| -> (A² + B²) / (A² + 2B²); 2-grams: a_dog shared,
    #   dot B² / (√2 B)² = 1/2; 3-grams 0. Lengths (the toolkit counts bigrams): 2 vs 2 -> penalty 1.
    #   score = 10 · (mean over 4 orders, summed over refs) / 2 refs.
    image1 = 10 * (3 + (aa + bb) / (aa + 2 * bb) + 0.5) / 4 / 2
    # Image 2, "a black cat" (a: A, black: B, cat: B) vs "a cat sleeps here" (a: A, cat: B, sleeps: B, here: B):
    #   1-grams dot A² + B², norms √(A² + 2B²) and √(A² + 3B²); no shared 2-/3-grams.
    #   Bigram lengths 2 vs 3 -> penalty exp(-1² / (2 · 6²)) = exp(-1/72).
    image2 = 10 * math.exp(-1 / 72) * ((aa + bb) / math.sqrt((aa + 2 * bb) * (aa + 3 * bb))) / 4
    # Image 3, "birds birds birds" (birds: tf 3 -> 3B) vs "two birds fly" (two, birds, fly: B each):
    #   clipped dot min(3B, B) · B = B², norms 3B and √3 B -> 1 / (3√3) (unclipped would be 1/√3);
    #   2-gram birds_birds not in the reference -> 0. Bigram lengths 2 vs 2 -> penalty 1.
    image3 = 10 * (1 / (3 * math.sqrt(3))) / 4
    expected = (image1 + image2 + image3) / 3
    assert expected == pytest.approx(2.2010885, abs=1e-7)  # the toolkit prints 2.2010884860822144
    assert cider_d(predictions, references) == pytest.approx(expected, rel=1e-12)


def test_identical_predictions_score_the_expected_cider():
    # One reference per image and no n-gram shared between images: every n-gram has idf log 3, the prediction's
    # vector equals the reference's -> cosine 1 for each of the 4 orders, no length difference -> 10 per image.
    references = [["a dog runs on the grass"], ["two birds fly over water"], ["an old red bus parked outside"]]
    assert cider_d([refs[0] for refs in references], references) == pytest.approx(10.0, rel=1e-12)
    # One image alone: idf = log 1 - log 1 = 0 for every n-gram -> the toolkit's CIDEr is 0 (corpus-mode idf).
    assert cider_d(["a dog runs on the grass"], [["a dog runs on the grass"]]) == 0.0


def test_cider_d_empty_short_and_unicode_predictions():
    references = [["a dog runs"], ["a cat sleeps"]]
    # Empty prediction: zero vector -> 0 for that image; the exact copy "a dog runs": 1-grams (a: 0, dog: L,
    # runs: L) with L = log 2 ("a" is in both images), cosine 1; 2-grams (L, L) cosine 1; 3-gram cosine 1;
    # 4-grams none -> 0. Image score 10 · 3/4; corpus mean (7.5 + 0) / 2.
    assert cider_d(["a dog runs", ""], references) == pytest.approx(3.75, rel=1e-12)
    assert cider_d(["", "!"], references) == 0.0
    # Unicode: upper-case accented letters lower-case to the references' tokens.
    unicode_refs = [["un café près de l'école"], ["zwei vögel über dem see"]]
    assert cider_d(["Un CAFÉ près de l'ÉCOLE.", "ZWEI VÖGEL über dem See"], unicode_refs) == pytest.approx(10.0)


@pytest.mark.parametrize("predictions, references, message", [
    (["a dog"], [["a dog"], ["a cat"]], "one entry per image"),
    ([], [], "at least one image"),
    (["a dog"], [[]], "non-empty list"),
    (["a dog"], ["a dog"], "non-empty list"),
])
def test_caption_metrics_reject_malformed_inputs(predictions, references, message):
    for metric in (bleu, cider_d):
        with pytest.raises(ValueError, match=message):
            metric(predictions, references)


# ---------------------------------------------------------------------------------------------- evaluate modules
@pytest.mark.slow
def test_caption_evaluate_modules_load_by_path_offline(tmp_path):
    predictions = ["A cat sat on the mat.", "a dog runs", "birds birds birds"]
    references = [["the cat sat on the mat", "A cat is on the mat"], ["a dog runs fast", "the dog is running"],
                  ["two birds fly"]]
    code = textwrap.dedent(f"""
        import json, socket
        def _no_network(*args, **kwargs):
            raise RuntimeError("network access attempted")
        socket.socket.connect = _no_network
        import evaluate
        bleu = evaluate.load({BLEU_METRIC_DIR!r})
        cider = evaluate.load({CIDER_METRIC_DIR!r})
        predictions, references = {predictions!r}, {references!r}
        cider.add_batch(predictions=predictions[:1], references=references[:1])
        print(json.dumps([bleu.compute(predictions=predictions, references=references),
                          cider.compute(predictions=predictions[1:], references=references[1:])]))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HOME": str(tmp_path / "hf")}
    env.pop("PYTHONPATH", None)  # the modules must find `efficientvlm.training` on their own (cwd is not the repo)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    bleu_scores, cider_scores = json.loads(result.stdout.strip().splitlines()[-1])
    expected_bleu = bleu(predictions, references)
    assert bleu_scores == {f"bleu_{k + 1}": pytest.approx(expected_bleu[k], rel=1e-12) for k in range(4)}
    # add_batch + compute covers all three images: document frequencies over the whole set, as in one call.
    assert cider_scores == {"cider": pytest.approx(cider_d(predictions, references), rel=1e-12)}
    assert cider_scores["cider"] != pytest.approx(cider_d(predictions[1:], references[1:]))
