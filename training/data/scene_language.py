"""The language of the synthetic world: statements rendered to captions, the parser that inverts the rendering (so
the truth of any caption can be re-derived from its text and the scene alone), the vocabulary, a scene's captions."""

import random
from typing import Union

from .scene_world import COLORS, Count, Description, _distinguishing_description, Exists, NUMBER_WORDS, ObjectRef, PairStatement, Relation, RELATIONS, Scene, SceneObject, SHAPES, SIZES, Statement, statement_is_true


_QUANTIFIER_PREFIX = {
    "left": "the left image has", "right": "the right image has",
    "both": "both images have", "exactly_one": "exactly one image has",
}
# pair statements about a whole scene (a `Description`): "shows" keeps them apart from "has" + a relation
_DESCRIPTION_PREFIX = {
    "left": "the left image shows", "right": "the right image shows",
    "both": "both images show", "exactly_one": "exactly one image shows",
}
SYNTHETIC_WORDS: list[str] = sorted(
    set(SIZES) | set(COLORS) | set(SHAPES) | {s + "s" for s in SHAPES} | set(NUMBER_WORDS[1:])
    | {w for r in RELATIONS for w in r.split()} | {w for p in _QUANTIFIER_PREFIX.values() for w in p.split()}
    | {w for p in _DESCRIPTION_PREFIX.values() for w in p.split()}
    | {"a", "and", "there", "is", "are", "exactly", "object", "objects"}
)


# ------------------------------------------------------------------------------------------------- text rendering
def _noun(ref: ObjectRef, plural: bool) -> str:
    noun = (ref.shape or "object") + ("s" if plural else "")
    return " ".join(w for w in (ref.size, ref.color, noun) if w)


def _ref_text(ref: ObjectRef) -> str:
    return "a " + _noun(ref, plural=False)


def _phrase(statement: Union[ObjectRef, Exists, Count, Relation]) -> str:
    """The noun phrase shared by "there is ...", "... image has ..." and description clauses."""
    if isinstance(statement, ObjectRef):
        return _ref_text(statement)
    if isinstance(statement, Exists):
        return _ref_text(statement.ref)
    if isinstance(statement, Count):
        return f"exactly {NUMBER_WORDS[statement.n]} {_noun(statement.ref, plural=statement.n != 1)}"
    if isinstance(statement, Relation):
        return f"{_ref_text(statement.subject)} {statement.relation} {_ref_text(statement.target)}"
    raise TypeError(f"no phrase for {statement!r}")


def statement_text(statement: Statement) -> str:
    """Renders a structure as a caption; `parse_statement` inverts it exactly."""
    if isinstance(statement, Description):
        return " and ".join(_phrase(c) for c in statement.clauses)
    if isinstance(statement, PairStatement):
        if isinstance(statement.statement, Description):
            return f"{_DESCRIPTION_PREFIX[statement.quantifier]} {statement_text(statement.statement)}"
        return f"{_QUANTIFIER_PREFIX[statement.quantifier]} {_phrase(statement.statement)}"
    if isinstance(statement, Count) and statement.n != 1:
        return "there are " + _phrase(statement)
    return "there is " + _phrase(statement)


# ------------------------------------------------------------------------------------------------------- parsing
def _parse_noun(tokens: list[str], i: int, plural: bool, text: str) -> tuple[ObjectRef, int]:
    size = tokens[i] if i < len(tokens) and tokens[i] in SIZES else None
    i += size is not None
    color = tokens[i] if i < len(tokens) and tokens[i] in COLORS else None
    i += color is not None
    if i >= len(tokens):
        raise ValueError(f"cannot parse {text!r}: missing a noun at the end")
    word = tokens[i]
    suffix = "s" if plural else ""
    shapes = {s + suffix: s for s in SHAPES}
    if word in shapes:
        return ObjectRef(size, color, shapes[word]), i + 1
    if word == "object" + suffix:
        return ObjectRef(size, color, None), i + 1
    raise ValueError(f"cannot parse {text!r}: expected a {'plural ' if plural else ''}noun at word {i}, got {word!r}")


def _parse_ref(tokens: list[str], i: int, text: str) -> tuple[ObjectRef, int]:
    if i >= len(tokens) or tokens[i] != "a":
        raise ValueError(f"cannot parse {text!r}: expected 'a' at word {i}")
    return _parse_noun(tokens, i + 1, plural=False, text=text)


def _parse_phrase(tokens: list[str], text: str) -> Union[Exists, Count, Relation]:
    if tokens and tokens[0] == "exactly":
        if len(tokens) < 2 or tokens[1] not in NUMBER_WORDS[1:]:
            raise ValueError(f"cannot parse {text!r}: expected a number word after 'exactly'")
        n = NUMBER_WORDS.index(tokens[1])
        ref, end = _parse_noun(tokens, 2, plural=n != 1, text=text)
        result: Union[Exists, Count, Relation] = Count(ref, n)
    else:
        ref, i = _parse_ref(tokens, 0, text)
        if i == len(tokens):
            return Exists(ref)
        relation = next((r for r in RELATIONS if tokens[i:i + len(r.split())] == r.split()), None)
        if relation is None:
            raise ValueError(f"cannot parse {text!r}: expected a relation at word {i}, got {tokens[i]!r}")
        target, end = _parse_ref(tokens, i + len(relation.split()), text)
        result = Relation(ref, relation, target)
    if end != len(tokens):
        raise ValueError(f"cannot parse {text!r}: unexpected words {' '.join(tokens[end:])!r}")
    return result


def parse_statement(text: str) -> Statement:
    """Parses a caption produced by `statement_text` back into its structure.

    Args:
        text: a description, a "there is/are ..." statement, or an NLVR2-style pair statement.

    Returns:
        The structure (`Description`, `Exists`, `Count`, `Relation` or `PairStatement`).

    Raises:
        ValueError: if the text is not in the synthetic grammar.
    """
    tokens = text.lower().split()
    for prefixes, parse in ((_DESCRIPTION_PREFIX, _parse_description), (_QUANTIFIER_PREFIX, _parse_phrase)):
        for quantifier, prefix in prefixes.items():
            words = prefix.split()
            if tokens[:len(words)] == words:
                return PairStatement(quantifier, parse(tokens[len(words):], text))
    if tokens[:1] == ["there"]:
        verb = tokens[1] if len(tokens) > 1 else ""
        phrase = _parse_phrase(tokens[2:], text)
        plural = isinstance(phrase, Count) and phrase.n != 1
        if verb != ("are" if plural else "is"):
            raise ValueError(f"cannot parse {text!r}: expected 'there {'are' if plural else 'is'}'")
        return phrase
    return _parse_description(tokens, text)


def _parse_description(tokens: list[str], text: str) -> Description:
    clauses: list[list[str]] = [[]]
    for token in tokens:
        if token == "and":
            clauses.append([])
        else:
            clauses[-1].append(token)
    parsed = []
    for clause in clauses:
        phrase = _parse_phrase(clause, text)
        if isinstance(phrase, Count):
            raise ValueError(f"cannot parse {text!r}: a description clause cannot be a count")
        parsed.append(phrase.ref if isinstance(phrase, Exists) else phrase)
    return Description(tuple(parsed))


def object_phrase(obj: SceneObject) -> str:
    """A phrase naming exactly `obj` ("the small red circle"): kinds are unique within a scene."""
    return f"the {obj.size} {obj.color} {obj.shape}"


def _distinct_descriptions(rng: random.Random, scene: Scene, others: list[Scene], n: int,
                           tries: int = 40) -> list[Description]:
    """Up to `n` distinct descriptions true of `scene` (checked: RuntimeError otherwise, an internal error of
    `describe_scene`) and false of every scene in `others`, in the order first drawn."""
    found: dict[str, Description] = {}
    for _ in range(tries):
        desc = _distinguishing_description(rng, scene, others, tries=1)
        if desc is None:
            continue
        if not statement_is_true(scene, desc):
            raise RuntimeError(f"internal error: describe_scene gave a false description {desc} of {scene}")
        found.setdefault(statement_text(desc), desc)
        if len(found) == n:
            break
    return list(found.values())


CAPTION_REFERENCES = 5
"""References per held-out captioning scene (COCO has about five)."""


def scene_captions(rng: random.Random, scene: Scene, n: int = CAPTION_REFERENCES, tries: int = 40) -> list[str]:
    """Up to `n` distinct full descriptions of `scene` (other pairings, orders and true relations), each checked true.

    A 2-object scene has 2-4 distinct descriptions, a 3-object scene 6-12, so fewer than `n` may come back (never 0).

    Raises:
        RuntimeError: a description the checker finds false (an internal error of `describe_scene`).
    """
    return [statement_text(d) for d in _distinct_descriptions(rng, scene, [], n, tries)]
