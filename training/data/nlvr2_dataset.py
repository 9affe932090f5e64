"""Synthetic NLVR2: image pairs with a statement about both, at two levels, the streaming dataset and the evaluation
set."""

import random

from .scene_language import statement_text
from .scene_render import render_scene
from .scene_world import describe_scene, make_statement, PairStatement, perturb_scene, QUANTIFIERS, random_scene, rearrange_scene, rejitter_scene, Scene, statement_is_true
from .synthetic_stream import _SyntheticIterable


# -------------------------------------------------------------------------------------------------------- NLVR2
# Per-image truth patterns (left image, right image) of the inner statement that give each (quantifier, label).
_NLVR2_PATTERNS = {
    ("left", 1): ((True, True), (True, False)), ("left", 0): ((False, True), (False, False)),
    ("right", 1): ((True, True), (False, True)), ("right", 0): ((True, False), (False, False)),
    ("both", 1): ((True, True),), ("both", 0): ((True, False), (False, True), (False, False)),
    ("exactly_one", 1): ((True, False), (False, True)), ("exactly_one", 0): ((True, True), (False, False)),
}
NLVR2_LEVELS = ("easy", "hard")
"""Synthetic NLVR2 difficulty. easy: the statement describes a whole scene ("both images show a big red circle left
of ..."), true images are that scene, false ones unrelated random scenes; hard: existence, count and relation
statements on images from one scene's family (rearranged twins, one-object perturbations)."""


def _scene_with_truth(rng: random.Random, source: Scene, statement, truth: bool, level: str = "hard",
                      tries: int = 40) -> Scene | None:
    """A scene on which `statement` is `truth`: from `source`'s family (hard); easy: `source` re-jittered (true) or a
    fresh random scene (false)."""
    for _ in range(tries):
        if level == "easy":
            scene = rejitter_scene(rng, source) if truth else random_scene(rng)
        else:
            scene = rearrange_scene(rng, source) if rng.random() < 0.5 else perturb_scene(rng, source)
        if statement_is_true(scene, statement) == truth:
            return scene
    return None


def _nlvr2_example(rng: random.Random, label: int, level: str = "hard") -> tuple[Scene, Scene, PairStatement]:
    """Two scenes and a pair statement whose truth equals `label` (checked).

    The statement (inner statement + quantifier) is drawn independently of the label, and only statements that can be
    both true and false on such scenes are kept, so P(label | statement) = 1/2: the text alone predicts nothing.
    level "hard": both images come from the same source scene (rearranged twins and one-object perturbations), so
    whether the two images look related does not give the label away either; level "easy": the statement describes
    the source scene, true images are re-jittered copies of it, false ones random scenes (a false pair is two copies of
    one random scene half the time, so "the two images look alike" does not mean "both true"). Either way the model has
    to check the statement on each image.
    """
    if level not in NLVR2_LEVELS:
        raise ValueError(f"NLVR2 level must be one of {NLVR2_LEVELS}, got {level!r}")
    while True:
        source = random_scene(rng)
        inner = describe_scene(rng, source) if level == "easy" else make_statement(rng, source)
        # one scene of each truth value, drawn before the label is looked at: rejection cannot depend on the label
        found = {truth: _scene_with_truth(rng, source, inner, truth, level) for truth in (True, False)}
        if found[True] is None or found[False] is None:
            continue
        quantifier = rng.choice(QUANTIFIERS)
        pattern = rng.choice(_NLVR2_PATTERNS[(quantifier, int(label))])
        left, right = (_scene_with_truth(rng, source, inner, truth, level) or found[truth] for truth in pattern)
        if level == "easy" and pattern == (False, False) and rng.random() < 0.5:
            right = rejitter_scene(rng, left)  # two photos of one scene are not a give-away for "both true"
        statement = PairStatement(quantifier, inner)
        if statement_is_true((left, right), statement) != bool(label):  # cannot happen: the patterns are exact
            raise AssertionError(f"NLVR2 generator produced a wrong label for {statement}")
        return left, right, statement


def make_nlvr2_item(rng: random.Random, label: int, image_size: int = 64, return_scenes: bool = False,
                    level: str = "hard") -> dict:
    """One NLVR2-style item: {"images": [left, right], "sentence", "label"} (+ "scenes" if asked)."""
    left, right, statement = _nlvr2_example(rng, label, level)
    item = {"images": [render_scene(left, image_size), render_scene(right, image_size)],
            "sentence": statement_text(statement), "label": int(label)}
    if return_scenes:
        item["scenes"] = (left, right)
    return item


class SyntheticNLVR2Dataset(_SyntheticIterable):
    """Fresh NLVR2-style pairs: {"images": [PIL, PIL], "sentence", "label"}; labels are fair coin flips.

    Args: as `SyntheticRetrievalDataset` (`return_scene` yields "scenes"), plus `level` (see `NLVR2_LEVELS`).
    """

    def __init__(self, *args, level: str = "hard", **kwargs):
        super().__init__(*args, **kwargs)
        if level not in NLVR2_LEVELS:
            raise ValueError(f"NLVR2 level must be one of {NLVR2_LEVELS}, got {level!r}")
        self.level = level

    def _item(self, rng: random.Random) -> dict:
        return make_nlvr2_item(rng, int(rng.random() < 0.5), self.image_size, self.return_scene, self.level)


def make_nlvr2_eval_set(n: int, seed: int = 0, image_size: int = 64, return_scenes: bool = False,
                        level: str = "hard") -> list[dict]:
    """A fixed NLVR2-style set of `n` items with exactly balanced labels (n // 2 true, in shuffled order).

    Returns:
        list of {"images": [PIL, PIL], "sentence": str, "label": int} (+ "scenes" if asked).
    """
    rng = random.Random(f"efficientvlm-nlvr2-eval-{seed}")
    labels = [i % 2 for i in range(n)]
    rng.shuffle(labels)
    return [make_nlvr2_item(rng, label, image_size, return_scenes, level) for label in labels]
