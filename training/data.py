"""Built-in synthetic scene data: rendered shapes with captions that are checked true against the scene.

A scene is a plain description: 2-5 objects, each a (size, color, shape) kind unique within the scene, placed in
distinct cells of a 3x3 grid (plus a small drawing jitter that never leaves the cell). Spatial relations are read from
the grid cells, so "left of" / "above" are never ambiguous.

Everything said about a scene is first built as a structure (`Exists`, `Count`, `Relation`, `Description`,
`PairStatement`), checked with `statement_is_true`, and only then rendered to text. `parse_statement` inverts the
rendering, so the truth of any caption can be re-derived from its text and the scene alone.

Semantics (all existential):
  * `Exists(ref)`: some object matches `ref` (unset attributes match anything).
  * `Count(ref, n)`: exactly `n` objects match `ref`.
  * `Relation(subject, relation, target)`: some object matching `subject` and a *different* object matching
    `target` stand in the relation ("left of": smaller grid column; "above": smaller grid row).
  * `Description(clauses)`: every clause (an `ObjectRef` = existence, or a `Relation`) holds, every ref is a full
    (size, color, shape) ref, and the refs mentioned (each mention counted once) are exactly the scene's objects.
  * `PairStatement(quantifier, statement)` over (left, right) scenes: "left", "right", "both", "exactly_one".

Hard negatives are minimal edits of a true structure (swap a relation's objects, flip a relation, swap colors or
shapes between two objects, change a count, change an attribute) kept only when the checker says they are false.
Swaps keep the bag of words, so bag-of-words models cannot separate captions from their negatives.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Iterator, Union

import torch
from PIL import Image, ImageDraw

GRID = 3
SIZES = ("big", "small")
COLORS = ("red", "green", "blue", "yellow", "purple", "gray")  # none starts with a vowel: the article is always "a"
SHAPES = ("circle", "square", "triangle", "diamond")
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
QUANTIFIERS = ("left", "right", "both", "exactly_one")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
MIN_OBJECTS, MAX_OBJECTS = 2, 5

_COLOR_RGB = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (230, 200, 30), "purple": (140, 60, 180), "gray": (128, 128, 128),
}
_RADIUS = {"big": 0.40, "small": 0.22}  # in cell widths; with jitter <= 0.08 objects stay inside their cell
_MAX_JITTER = 0.08
_ALL_KINDS = tuple((z, c, s) for z in SIZES for c in COLORS for s in SHAPES)
_QUANTIFIER_PREFIX = {
    "left": "the left image has", "right": "the right image has",
    "both": "both images have", "exactly_one": "exactly one image has",
}

SYNTHETIC_WORDS: list[str] = sorted(
    set(SIZES) | set(COLORS) | set(SHAPES) | {s + "s" for s in SHAPES} | set(NUMBER_WORDS[1:])
    | {w for r in RELATIONS for w in r.split()} | {w for p in _QUANTIFIER_PREFIX.values() for w in p.split()}
    | {"a", "and", "there", "is", "are", "exactly", "object", "objects"}
)


# ----------------------------------------------------------------------------------------------------- structures
@dataclass(frozen=True)
class SceneObject:
    """One object: attributes, grid cell (x = column, y = row, 0 at top-left) and a drawing offset within the cell."""

    color: str
    shape: str
    size: str
    x: int
    y: int
    dx: float = 0.0
    dy: float = 0.0

    @property
    def kind(self) -> tuple[str, str, str]:
        return (self.size, self.color, self.shape)


@dataclass(frozen=True)
class Scene:
    """A scene: objects in distinct cells of a `GRID` x `GRID` grid."""

    objects: tuple[SceneObject, ...]


@dataclass(frozen=True)
class ObjectRef:
    """A reference to objects; `None` attributes match anything (shape None renders as "object")."""

    size: str | None = None
    color: str | None = None
    shape: str | None = None

    def matches(self, obj: SceneObject) -> bool:
        return ((self.size is None or self.size == obj.size) and (self.color is None or self.color == obj.color)
                and (self.shape is None or self.shape == obj.shape))

    @property
    def is_full(self) -> bool:
        return None not in (self.size, self.color, self.shape)


@dataclass(frozen=True)
class Exists:
    ref: ObjectRef


@dataclass(frozen=True)
class Count:
    ref: ObjectRef
    n: int


@dataclass(frozen=True)
class Relation:
    subject: ObjectRef
    relation: str
    target: ObjectRef


@dataclass(frozen=True)
class Description:
    clauses: tuple[Union[ObjectRef, Relation], ...]


@dataclass(frozen=True)
class PairStatement:
    quantifier: str
    statement: Union[Exists, Count, Relation]


Statement = Union[Exists, Count, Relation, Description, PairStatement]


# -------------------------------------------------------------------------------------------------------- checker
def _holds(relation: str, a: SceneObject, b: SceneObject) -> bool:
    if relation == "left of":
        return a.x < b.x
    if relation == "right of":
        return a.x > b.x
    if relation == "above":
        return a.y < b.y
    if relation == "below":
        return a.y > b.y
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def _relation_is_true(scene: Scene, rel: Relation) -> bool:
    return any(
        a is not b and rel.subject.matches(a) and rel.target.matches(b) and _holds(rel.relation, a, b)
        for a in scene.objects for b in scene.objects
    )


def _description_is_true(scene: Scene, desc: Description) -> bool:
    mentioned = []
    for clause in desc.clauses:
        refs = (clause,) if isinstance(clause, ObjectRef) else (clause.subject, clause.target)
        for ref in refs:
            if not ref.is_full:
                raise ValueError(f"a Description needs full (size, color, shape) refs, got {ref}")
            mentioned.append((ref.size, ref.color, ref.shape))
    if sorted(mentioned) != sorted(o.kind for o in scene.objects):
        return False
    return all(
        _relation_is_true(scene, c) if isinstance(c, Relation) else any(c.matches(o) for o in scene.objects)
        for c in desc.clauses
    )


def statement_is_true(scene: Scene | tuple[Scene, Scene], statement: Statement) -> bool:
    """Evaluates a structured statement against a scene (or a (left, right) pair for a `PairStatement`).

    Args:
        scene: the scene, or a pair of scenes for `PairStatement`.
        statement: an `Exists`, `Count`, `Relation`, `Description` or `PairStatement`.

    Returns:
        Whether the statement holds (semantics in the module docstring).
    """
    if isinstance(statement, PairStatement):
        if not (isinstance(scene, tuple) and len(scene) == 2):
            raise ValueError("a PairStatement needs a (left, right) pair of scenes")
        left, right = (statement_is_true(s, statement.statement) for s in scene)
        return {"left": left, "right": right, "both": left and right, "exactly_one": left != right}[
            statement.quantifier]
    if isinstance(scene, tuple):
        raise ValueError(f"{type(statement).__name__} is evaluated on one scene, got a pair")
    if isinstance(statement, Exists):
        return any(statement.ref.matches(o) for o in scene.objects)
    if isinstance(statement, Count):
        return sum(statement.ref.matches(o) for o in scene.objects) == statement.n
    if isinstance(statement, Relation):
        return _relation_is_true(scene, statement)
    if isinstance(statement, Description):
        return _description_is_true(scene, statement)
    raise TypeError(f"not a statement structure: {statement!r}")


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
    for quantifier, prefix in _QUANTIFIER_PREFIX.items():
        words = prefix.split()
        if tokens[:len(words)] == words:
            return PairStatement(quantifier, _parse_phrase(tokens[len(words):], text))
    if tokens[:1] == ["there"]:
        verb = tokens[1] if len(tokens) > 1 else ""
        phrase = _parse_phrase(tokens[2:], text)
        plural = isinstance(phrase, Count) and phrase.n != 1
        if verb != ("are" if plural else "is"):
            raise ValueError(f"cannot parse {text!r}: expected 'there {'are' if plural else 'is'}'")
        return phrase
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


# ---------------------------------------------------------------------------------------------- scenes and images
def random_scene(rng: random.Random, min_objects: int = MIN_OBJECTS, max_objects: int = MAX_OBJECTS) -> Scene:
    """Samples a scene: distinct kinds in distinct grid cells, with small drawing jitter."""
    n = rng.randint(min_objects, max_objects)
    return _place(rng, rng.sample(_ALL_KINDS, n))


def _place(rng: random.Random, kinds: list[tuple[str, str, str]]) -> Scene:
    cells = rng.sample(range(GRID * GRID), len(kinds))
    objects = tuple(
        SceneObject(color=c, shape=s, size=z, x=cell % GRID, y=cell // GRID,
                    dx=rng.uniform(-_MAX_JITTER, _MAX_JITTER), dy=rng.uniform(-_MAX_JITTER, _MAX_JITTER))
        for (z, c, s), cell in zip(kinds, cells)
    )
    return Scene(objects)


def rearrange_scene(rng: random.Random, scene: Scene) -> Scene:
    """The same objects in new cells: a twin that only relations can tell apart."""
    return _place(rng, [o.kind for o in scene.objects])


def render_scene(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draws a scene on a white RGB canvas of `image_size` pixels with ImageDraw primitives (cheap: ~0.1 ms)."""
    image = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    cell = image_size / GRID
    for o in scene.objects:
        r = _RADIUS[o.size] * cell
        cx, cy = (o.x + 0.5 + o.dx) * cell, (o.y + 0.5 + o.dy) * cell
        fill = _COLOR_RGB[o.color]
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o.shape == "square":
            h = r * 0.85  # a square of half-side r looks bigger than a circle of radius r
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
        elif o.shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        else:
            raise ValueError(f"unknown shape {o.shape!r}")
    return image


# ------------------------------------------------------------------------------------------ true statements
def describe_scene(rng: random.Random, scene: Scene) -> Description:
    """A full description: every object once, paired up by spatial relations (at least one), the odd one bare."""
    objects = list(scene.objects)
    rng.shuffle(objects)
    clauses: list[Union[ObjectRef, Relation]] = []
    for i in range(0, len(objects) - 1, 2):
        a, b = objects[i], objects[i + 1]
        relation = rng.choice([r for r in RELATIONS if _holds(r, a, b)])  # distinct cells: never empty
        clauses.append(Relation(ObjectRef(*a.kind), relation, ObjectRef(*b.kind)))
    if len(objects) % 2:
        clauses.append(ObjectRef(*objects[-1].kind))
    return Description(tuple(clauses))


def _partial_ref(rng: random.Random, obj: SceneObject, allow_empty: bool = False) -> ObjectRef:
    """A reference to `obj` that drops some attributes (it may then also match other objects)."""
    while True:
        ref = ObjectRef(obj.size if rng.random() < 0.4 else None, obj.color if rng.random() < 0.7 else None,
                        obj.shape if rng.random() < 0.7 else None)
        if allow_empty or ref.size or ref.color or ref.shape:
            return ref


def make_statement(rng: random.Random, scene: Scene, kind: str | None = None) -> Union[Exists, Count, Relation]:
    """A true short statement about `scene`: "exists", "count" or "relation" (random kind if None)."""
    kind = kind or rng.choice(("exists", "count", "relation", "relation"))
    if kind == "exists":
        return Exists(_partial_ref(rng, rng.choice(scene.objects)))
    if kind == "count":
        ref = _partial_ref(rng, rng.choice(scene.objects), allow_empty=True)
        return Count(ref, sum(ref.matches(o) for o in scene.objects))
    if kind == "relation":
        a, b = rng.sample(scene.objects, 2)
        relation = rng.choice([r for r in RELATIONS if _holds(r, a, b)])
        return Relation(_partial_ref(rng, a), relation, _partial_ref(rng, b))
    raise ValueError(f"unknown statement kind {kind!r}; expected 'exists', 'count' or 'relation'")
