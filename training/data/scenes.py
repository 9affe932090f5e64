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
_SQUARE_HALF_SIDE = 0.85  # in radii: a square of half-side r looks bigger than a circle of radius r
_TRIANGLE_BASE = 0.8  # in radii below the centre (the apex is r above it)
_ALL_KINDS = tuple((z, c, s) for z in SIZES for c in COLORS for s in SHAPES)
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
    statement: Union[Exists, Count, Relation, "Description"]


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


# ---------------------------------------------------------------------------------------------- scenes and images
def random_scene(rng: random.Random, min_objects: int = MIN_OBJECTS, max_objects: int = MAX_OBJECTS) -> Scene:
    """Samples a scene: distinct kinds in distinct grid cells, with small drawing jitter."""
    n = rng.randint(min_objects, max_objects)
    return _place(rng, rng.sample(_ALL_KINDS, n))


def _jitter(rng: random.Random) -> dict[str, float]:
    """A random drawing offset within the cell."""
    return {"dx": rng.uniform(-_MAX_JITTER, _MAX_JITTER), "dy": rng.uniform(-_MAX_JITTER, _MAX_JITTER)}


def _place(rng: random.Random, kinds: list[tuple[str, str, str]]) -> Scene:
    cells = rng.sample(range(GRID * GRID), len(kinds))
    objects = tuple(
        SceneObject(color=c, shape=s, size=z, x=cell % GRID, y=cell // GRID, **_jitter(rng))
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
            h = r * _SQUARE_HALF_SIDE
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif o.shape == "triangle":
            base = cy + r * _TRIANGLE_BASE
            draw.polygon([(cx, cy - r), (cx + r, base), (cx - r, base)], fill=fill)
        elif o.shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        else:
            raise ValueError(f"unknown shape {o.shape!r}")
    return image


def object_box(obj: SceneObject) -> tuple[float, float, float, float]:
    """The box `render_scene` draws `obj` in: (cx, cy, w, h) normalised by the image side (X-VLM's L_BBOX target).

    Exact for the drawn geometry (circle/diamond: ±r; square: ±0.85·r; triangle: apex r above the centre, base
    0.8·r below), so the box holds every pixel of the object up to the rasteriser's rounding (< 1 pixel).
    """
    r = _RADIUS[obj.size] / GRID
    cx, cy = (obj.x + 0.5 + obj.dx) / GRID, (obj.y + 0.5 + obj.dy) / GRID
    half = r * _SQUARE_HALF_SIDE if obj.shape == "square" else r
    top, bottom = cy - half, cy + (r * _TRIANGLE_BASE if obj.shape == "triangle" else half)
    return cx, (top + bottom) / 2, 2 * half, bottom - top


def object_phrase(obj: SceneObject) -> str:
    """A phrase naming exactly `obj` ("the small red circle"): kinds are unique within a scene."""
    return f"the {obj.size} {obj.color} {obj.shape}"


def scene_regions(scene: Scene) -> dict[str, list]:
    """Region annotations of a scene for L_BBOX: {"region_phrases": [phrase], "region_boxes": [[cx, cy, w, h]]}.

    One region per scene, its first object: object kinds and cells are drawn at random (`_place`), so it is a
    uniformly random object of the image, and no random number is consumed (the caption stream stays as it was).
    """
    obj = scene.objects[0]
    return {"region_phrases": [object_phrase(obj)], "region_boxes": [list(object_box(obj))]}


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


# ------------------------------------------------------------------------------------------------ hard negatives
def _swap_attribute(a: ObjectRef, b: ObjectRef, field: str) -> tuple[ObjectRef, ObjectRef]:
    return replace(a, **{field: getattr(b, field)}), replace(b, **{field: getattr(a, field)})


def _edit_relation(rng: random.Random, rel: Relation) -> Relation:
    edit = rng.choice(("swap_objects", "flip", "swap_color", "swap_shape"))
    if edit == "swap_objects":
        return Relation(rel.target, rel.relation, rel.subject)
    if edit == "flip":
        return replace(rel, relation=OPPOSITE[rel.relation])
    subject, target = _swap_attribute(rel.subject, rel.target, "color" if edit == "swap_color" else "shape")
    return Relation(subject, rel.relation, target)


def _edit_description(rng: random.Random, desc: Description) -> Description:
    relation_idx = [i for i, c in enumerate(desc.clauses) if isinstance(c, Relation)]
    if rng.random() < 0.5:  # edit inside one relation clause (swap objects, flip, swap attributes)
        i = rng.choice(relation_idx)
        clauses = list(desc.clauses)
        clauses[i] = _edit_relation(rng, clauses[i])  # type: ignore[arg-type]
        return Description(tuple(clauses))
    # swap an attribute between two objects mentioned anywhere in the description
    refs: list[ObjectRef] = []
    for c in desc.clauses:
        refs.extend((c,) if isinstance(c, ObjectRef) else (c.subject, c.target))
    i, j = rng.sample(range(len(refs)), 2)
    refs[i], refs[j] = _swap_attribute(refs[i], refs[j], rng.choice(("color", "shape", "size")))
    clauses, k = [], 0
    for c in desc.clauses:
        if isinstance(c, ObjectRef):
            clauses.append(refs[k])
            k += 1
        else:
            clauses.append(Relation(refs[k], c.relation, refs[k + 1]))
            k += 2
    return Description(tuple(clauses))


def _edit(rng: random.Random, statement: Statement) -> Statement:
    if isinstance(statement, Description):
        return _edit_description(rng, statement)
    if isinstance(statement, Relation):
        return _edit_relation(rng, statement)
    if isinstance(statement, Count):
        n = statement.n + rng.choice((-1, 1))
        return replace(statement, n=n if 1 <= n <= MAX_OBJECTS else statement.n - (n - statement.n))
    if isinstance(statement, Exists):
        field = rng.choice(("color", "shape", "size"))
        values = {"color": COLORS, "shape": SHAPES, "size": SIZES}[field]
        current = getattr(statement.ref, field)
        return Exists(replace(statement.ref, **{field: rng.choice([v for v in values if v != current])}))
    if isinstance(statement, PairStatement):
        return replace(statement, statement=_edit(rng, statement.statement))  # type: ignore[arg-type]
    raise TypeError(f"not a statement structure: {statement!r}")


def hard_negative(rng: random.Random, scene: Scene | tuple[Scene, Scene], statement: Statement,
                  max_tries: int = 20) -> Statement | None:
    """A minimal edit of `statement` that the checker finds false on `scene`, or None if none was found."""
    for _ in range(max_tries):
        candidate = _edit(rng, statement)
        if not statement_is_true(scene, candidate):
            return candidate
    return None


# ---------------------------------------------------------------------------------------------------- retrieval
def _distinguishing_description(rng: random.Random, scene: Scene, others: list[Scene],
                                tries: int = 20) -> Description | None:
    """A description true of `scene` and false of every scene in `others` (None if none found in `tries`)."""
    for _ in range(tries):
        desc = describe_scene(rng, scene)
        if not any(statement_is_true(o, desc) for o in others):
            return desc
    return None


def make_retrieval_item(rng: random.Random, image_size: int = 64,
                        return_scene: bool = False) -> dict:
    """One training item: {"image", "caption", "negative_caption", "region_phrases", "region_boxes"} (+ "scene" if
    asked); the regions (one object's phrase and box, `scene_regions`) feed L_BBOX."""
    while True:
        scene = random_scene(rng)
        desc = describe_scene(rng, scene)
        negative = hard_negative(rng, scene, desc)
        if negative is not None:  # swapping a relation's objects always works, so this rarely loops
            break
    return _retrieval_item(scene, desc, negative, image_size, return_scene)


def _retrieval_item(scene: Scene, desc: Description, negative: Statement, image_size: int,
                    return_scene: bool) -> dict:
    item = {"image": render_scene(scene, image_size), "caption": statement_text(desc),
            "negative_caption": statement_text(negative), **scene_regions(scene)}
    if return_scene:
        item["scene"] = scene
    return item


def swap_attributes_scene(rng: random.Random, scene: Scene, tries: int = 20) -> Scene | None:
    """A twin with one attribute (color, shape or size) swapped between two objects, cells kept: the same bag of
    words in any description, a different set of objects. None when no swap changes the set (e.g. two objects that
    differ in one attribute only: swapping it just exchanges their places)."""
    kinds = sorted(o.kind for o in scene.objects)
    for _ in range(tries):
        i, j = rng.sample(range(len(scene.objects)), 2)
        a, b = scene.objects[i], scene.objects[j]
        field = rng.choice(("color", "shape", "size"))
        if getattr(a, field) == getattr(b, field):
            continue
        objects = list(scene.objects)
        objects[i], objects[j] = replace(a, **{field: getattr(b, field)}), replace(b, **{field: getattr(a, field)})
        new_kinds = [o.kind for o in objects]
        if len(set(new_kinds)) == len(new_kinds) and sorted(new_kinds) != kinds:
            return Scene(tuple(objects))
    return None


TWIN_KINDS = ("rearranged", "swapped")
"""How a twin differs from its scene: the same objects in other cells, or one attribute swapped between two objects
(`swap_attributes_scene`). Either way a bag-of-words model sees the same words in both scenes' descriptions."""


def make_twin(rng: random.Random, scene: Scene, kind: str) -> Scene | None:
    """A twin of `scene` of the given `TWIN_KINDS` kind (None when a swap cannot change the object set)."""
    if kind == "rearranged":
        return rearrange_scene(rng, scene)
    if kind == "swapped":
        return swap_attributes_scene(rng, scene)
    raise ValueError(f"unknown twin kind {kind!r}; expected one of {TWIN_KINDS}")


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


def make_retrieval_group(rng: random.Random, image_size: int = 64, twin_probability: float = 0.5,
                         max_captions: int = 2, return_scene: bool = False) -> list[dict]:
    """Training items of one scene and (with `twin_probability`) one twin of it (`TWIN_KINDS`, drawn evenly), as a
    COCO-style group: each image with 1..`max_captions` distinct captions (one item each, the same "image_id" within
    an image, `make_retrieval_item`'s fields otherwise), every caption checked false on the other image.

    In one batch the twin is the hardest negative there is for ITC and for the ITM negatives drawn from it: only
    relations and attribute binding tell the two apart. "image_id" is 0 for the scene and 1 for its twin; the dataset
    makes them unique across the stream.
    """
    while True:
        base = random_scene(rng)
        twin = make_twin(rng, base, rng.choice(TWIN_KINDS)) if rng.random() < twin_probability else None
        scenes = [base] if twin is None else [base, twin]
        groups = [_distinct_descriptions(rng, s, [o for o in scenes if o is not s], rng.randint(1, max_captions))
                  for s in scenes]
        if all(groups):
            break
    items = []
    for image_id, (scene, descriptions) in enumerate(zip(scenes, groups)):
        for desc in descriptions:
            negative = hard_negative(rng, scene, desc)
            if negative is None:  # rare (no minimal edit found false): the caption is left out
                continue
            items.append({**_retrieval_item(scene, desc, negative, image_size, return_scene), "image_id": image_id})
    return items


def _worker_rng(seed: int, epoch: int) -> tuple[random.Random, int, int]:
    """A generator per DataLoader worker, so workers never yield the same stream; returns (rng, worker, workers)."""
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return random.Random(f"efficientvlm-synthetic-{seed}-{epoch}-{worker}"), worker, workers


class _SyntheticIterable(torch.utils.data.IterableDataset):
    """Shared machinery: fresh items per step, deterministic per (seed, epoch, worker)."""

    def __init__(self, image_size: int = 64, seed: int = 0, num_samples: int | None = None,
                 return_scene: bool = False):
        super().__init__()
        self.image_size, self.seed, self.num_samples, self.return_scene = image_size, seed, num_samples, return_scene
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Changes the stream for the next pass (called by Trainer/accelerate between epochs)."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError(f"{type(self).__name__} is infinite; pass num_samples to give it a length")
        return self.num_samples

    def __iter__(self) -> Iterator[dict]:
        rng, worker, workers = _worker_rng(self.seed, self.epoch)
        # with num_samples, workers split the total; without, each worker streams forever
        count = None if self.num_samples is None else len(range(worker, self.num_samples, workers))
        produced = 0
        while count is None or produced < count:
            for item in self._items(rng):
                if count is not None and produced == count:
                    return
                yield item
                produced += 1

    def _items(self, rng: random.Random) -> list[dict]:
        """The next item(s) of the stream: one by default; a group (several captions of an image, twins) stays
        together so it lands in one batch."""
        return [self._item(rng)]

    def _item(self, rng: random.Random) -> dict:
        raise NotImplementedError


class SyntheticRetrievalDataset(_SyntheticIterable):
    """Fresh synthetic scenes for image-text training: {"image": PIL RGB, "caption", "negative_caption",
    "region_phrases", "region_boxes"} (one object's phrase and normalised (cx, cy, w, h) box, for L_BBOX), and with
    twins or several captions per image (`make_retrieval_group`) an "image_id" shared by the captions of one image.

    Args:
        image_size: rendered image side in pixels.
        seed: base seed; the stream is deterministic per (seed, epoch, DataLoader worker).
        num_samples: total items per pass (split across workers); None streams forever (use max_steps).
        return_scene: also yield the `Scene` under "scene" (for checks; not collatable).
        twin_probability: share of scenes that come with a twin right after them (0: independent scenes).
        max_captions: each image yields 1..max_captions distinct captions, one item each (1: one caption per image).
    """

    def __init__(self, *args, twin_probability: float = 0.0, max_captions: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0.0 <= twin_probability <= 1.0 or max_captions < 1:
            raise ValueError(f"need twin_probability in [0, 1] and max_captions >= 1, got {twin_probability} and "
                             f"{max_captions}")
        self.twin_probability, self.max_captions = twin_probability, max_captions
        self._next_id = 0

    def _items(self, rng: random.Random) -> list[dict]:
        if self.twin_probability == 0 and self.max_captions == 1:
            return [self._item(rng)]
        items = make_retrieval_group(rng, self.image_size, self.twin_probability, self.max_captions,
                                     self.return_scene)
        for item in items:  # unique ids along the stream: only ids within one batch are compared
            item["image_id"] += self._next_id
        self._next_id += 2
        return items

    def _item(self, rng: random.Random) -> dict:
        return make_retrieval_item(rng, self.image_size, self.return_scene)


def make_retrieval_eval_set(n_images: int, seed: int = 0, image_size: int = 64, twin_fraction: float = 0.5,
                            return_scenes: bool = False) -> dict:
    """A fixed held-out retrieval set with one unique caption per image.

    Scenes have pairwise distinct object sets except "twins": with probability `twin_fraction` a scene comes with a
    rearrangement of the same objects, and each twin's caption is checked false on the other, so only relations
    separate them. Every caption is therefore true of exactly its own image.

    Args:
        n_images: number of images (= captions).
        seed: seed; the set is a pure function of (n_images, seed, image_size, twin_fraction).
        image_size: image side in pixels.
        twin_fraction: probability that a scene gets a rearranged twin.
        return_scenes: also return the scenes under "scenes".

    Returns:
        dict(images=list[PIL], captions=list[str], img2txt=list[list[int]], txt2img=list[int]).
    """
    rng = random.Random(f"efficientvlm-retrieval-eval-{seed}")
    scenes: list[Scene] = []
    captions: list[str] = []
    seen_object_sets: set[tuple] = set()
    while len(scenes) < n_images:
        base = random_scene(rng)
        key = tuple(sorted(o.kind for o in base.objects))
        if key in seen_object_sets:
            continue  # a description fixes the object set, so distinct sets keep captions unambiguous
        group = [base]
        if len(scenes) + 1 < n_images and rng.random() < twin_fraction:
            group.append(rearrange_scene(rng, base))
        descs = [_distinguishing_description(rng, s, [o for o in group if o is not s]) for s in group]
        if any(d is None for d in descs):
            group, descs = [base], [describe_scene(rng, base)]  # the twin's layout was indistinguishable
        seen_object_sets.add(key)
        scenes.extend(group)
        captions.extend(statement_text(d) for d in descs)  # type: ignore[arg-type]
    if len(set(captions)) != len(captions):
        raise RuntimeError("internal error: duplicate captions in the synthetic retrieval set")
    result = {"images": [render_scene(s, image_size) for s in scenes], "captions": captions,
              "img2txt": [[i] for i in range(n_images)], "txt2img": list(range(n_images))}
    if return_scenes:
        result["scenes"] = scenes
    return result


EVAL_PROTOCOLS = ("twins", "scenes")
"""Held-out synthetic retrieval sets. "twins" (the default): COCO-style, 5 distinct captions per image, and every
image has twins in the gallery (`make_twin_retrieval_eval_set`), so ranking needs binding and relations; "scenes":
the earlier set, one caption per image, some rearranged twins (`make_retrieval_eval_set`)."""


def make_twin_retrieval_eval_set(n_images: int = 1000, seed: int = 0, image_size: int = 64, captions_per_image: int = 5,
                                 twins_per_image: int = 3, return_scenes: bool = False) -> dict:
    """A held-out retrieval set that does not saturate: groups of 1 + `twins_per_image` scenes, 5 captions each.

    A group is a scene of 3-5 objects and its twins (`TWIN_KINDS` in turn: rearranged, swapped, rearranged, ...).
    Every image has exactly `captions_per_image` distinct descriptions, each checked true of it and false of every
    other image of its group; groups have pairwise distinct object sets (twins included), so a description is false
    of every image outside its group too. Scenes of 2 objects have at most 4 distinct descriptions: they are not
    drawn; a group whose twins leave some image fewer distinguishing descriptions is drawn again. As COCO / Flickr30K:
    text retrieval counts the best-ranked of an image's captions, image retrieval is per caption.

    Args:
        n_images: number of images; a multiple of 1 + twins_per_image keeps every group whole (else the last
            group has fewer twins).
        seed: seed; the set is a pure function of its arguments.
        image_size: image side in pixels.
        captions_per_image: distinct captions per image.
        twins_per_image: other images of each image's group.
        return_scenes: also return the scenes under "scenes".

    Returns:
        dict(images, captions, img2txt, txt2img) as `make_retrieval_eval_set`, plus twins=list[list[int]] (the
        other images of each image's group) and twin_kinds=list[str] ("original" or a `TWIN_KINDS` entry).
    """
    group = 1 + twins_per_image
    if n_images < 1 or captions_per_image < 1 or twins_per_image < 0:
        raise ValueError(f"need n_images >= 1, captions_per_image >= 1 and twins_per_image >= 0, got {n_images}, "
                         f"{captions_per_image} and {twins_per_image}")
    rng = random.Random(f"efficientvlm-twin-retrieval-eval-{seed}")
    seen: set[tuple] = set()
    out: dict = {"images": [], "captions": [], "img2txt": [], "txt2img": [], "twins": [], "twin_kinds": []}
    scenes: list[Scene] = []
    while len(scenes) < n_images:
        base = random_scene(rng, 3, MAX_OBJECTS)
        kinds = ["original"] + [TWIN_KINDS[i % len(TWIN_KINDS)] for i in range(twins_per_image)]
        members = [base] + [make_twin(rng, base, kind) for kind in kinds[1:]]
        keys = [tuple(sorted(o.kind for o in s.objects)) if s is not None else None for s in members]
        if None in keys or seen & set(keys) or len({k for k, kind in zip(keys, kinds) if kind != "rearranged"}) != sum(
                kind != "rearranged" for kind in kinds):
            continue  # a swap that failed, an object set used by another group, or two swaps giving the same set
        if len({tuple(sorted((o.kind, o.x, o.y) for o in s.objects)) for s in members}) != group:
            continue  # a rearrangement that put every object back in its cell
        captions = [_distinct_descriptions(rng, s, [o for o in members if o is not s], captions_per_image, tries=80)
                    for s in members]
        if any(len(c) < captions_per_image for c in captions):
            continue
        seen.update(keys)
        first, size = len(scenes), min(group, n_images - len(scenes))  # the last group may be cut short
        members, kinds, captions = members[:size], kinds[:size], captions[:size]
        for index, (scene, kind, descriptions) in enumerate(zip(members, kinds, captions)):
            image = len(scenes)
            scenes.append(scene)
            start = len(out["captions"])
            out["captions"].extend(statement_text(d) for d in descriptions)
            out["img2txt"].append(list(range(start, len(out["captions"]))))
            out["txt2img"].extend([image] * len(descriptions))
            out["twins"].append([first + j for j in range(size) if j != index])
            out["twin_kinds"].append(kind)
    if len(set(out["captions"])) != len(out["captions"]):
        raise RuntimeError("internal error: duplicate captions in the synthetic twin retrieval set")
    out["images"] = [render_scene(s, image_size) for s in scenes]
    if return_scenes:
        out["scenes"] = scenes
    return out


# --------------------------------------------------------------------------------------------------- captioning
CAPTION_MAX_OBJECTS = 3
"""Captioning scenes hold 2-3 objects: a full description then has at most 15 words (two objects in a relation and
one bare), so every reference and its [SEP] fit the decoder's 20 new tokens; 5 objects would need up to 25 words."""
CAPTION_REFERENCES = 5
"""References per held-out captioning scene (COCO has about five)."""


def scene_captions(rng: random.Random, scene: Scene, n: int = CAPTION_REFERENCES, tries: int = 40) -> list[str]:
    """Up to `n` distinct full descriptions of `scene` (other pairings, orders and true relations), each checked true.

    A 2-object scene has 2-4 distinct descriptions, a 3-object scene 6-12, so fewer than `n` may come back (never 0).

    Raises:
        RuntimeError: a description the checker finds false (an internal error of `describe_scene`).
    """
    return [statement_text(d) for d in _distinct_descriptions(rng, scene, [], n, tries)]


def make_captioning_item(rng: random.Random, image_size: int = 64, return_scene: bool = False) -> dict:
    """One training item: {"image", "caption"} (+ "scene"): a 2-3 object scene and one true full description."""
    scene = random_scene(rng, MIN_OBJECTS, CAPTION_MAX_OBJECTS)
    item = {"image": render_scene(scene, image_size), "caption": scene_captions(rng, scene, n=1)[0]}
    if return_scene:
        item["scene"] = scene
    return item


class SyntheticCaptioningDataset(_SyntheticIterable):
    """Fresh synthetic scenes for captioning: {"image": PIL RGB, "caption": a true description} (2-3 objects).

    Args: as `SyntheticRetrievalDataset`.
    """

    def _item(self, rng: random.Random) -> dict:
        return make_captioning_item(rng, self.image_size, self.return_scene)


def make_captioning_eval_set(n_images: int, seed: int = 0, image_size: int = 64,
                             references: int = CAPTION_REFERENCES, return_scenes: bool = False) -> dict:
    """A fixed held-out captioning set: `n_images` scenes of 2-3 objects with up to `references` true descriptions.

    Returns:
        the shape of `make_retrieval_eval_set` (and of an ALBEF test JSON): dict(images=list[PIL],
        captions=list[str] (all references, image by image), img2txt=list[list[int]] (image i's references),
        txt2img=list[int]) (+ "scenes" if asked). A pure function of its arguments.
    """
    if n_images < 1 or references < 1:
        raise ValueError(f"need n_images >= 1 and references >= 1, got {n_images} and {references}")
    rng = random.Random(f"efficientvlm-captioning-eval-{seed}")
    scenes = [random_scene(rng, MIN_OBJECTS, CAPTION_MAX_OBJECTS) for _ in range(n_images)]
    result: dict = {"images": [render_scene(s, image_size) for s in scenes], "captions": [], "img2txt": [],
                    "txt2img": []}
    for index, scene in enumerate(scenes):
        captions = scene_captions(rng, scene, references)
        start = len(result["captions"])
        result["img2txt"].append(list(range(start, start + len(captions))))
        result["captions"].extend(captions)
        result["txt2img"].extend([index] * len(captions))
    if return_scenes:
        result["scenes"] = scenes
    return result


# -------------------------------------------------------------------------------------------------------- NLVR2
# Per-image truth patterns (left image, right image) of the inner statement that give each (quantifier, label).
_NLVR2_PATTERNS = {
    ("left", 1): ((True, True), (True, False)), ("left", 0): ((False, True), (False, False)),
    ("right", 1): ((True, True), (False, True)), ("right", 0): ((True, False), (False, False)),
    ("both", 1): ((True, True),), ("both", 0): ((True, False), (False, True), (False, False)),
    ("exactly_one", 1): ((True, False), (False, True)), ("exactly_one", 0): ((True, True), (False, False)),
}


def perturb_scene(rng: random.Random, scene: Scene) -> Scene:
    """A near copy of `scene`: one object recoloured, reshaped, resized, removed or added, then rearranged."""
    original = [o.kind for o in scene.objects]
    while True:
        kinds = list(original)
        edit = rng.choice(("color", "shape", "size", "remove", "add"))
        if edit == "remove" and len(kinds) > MIN_OBJECTS:
            kinds.pop(rng.randrange(len(kinds)))
        elif edit == "add" and len(kinds) < MAX_OBJECTS:
            kinds.append(rng.choice([k for k in _ALL_KINDS if k not in kinds]))
        elif edit in ("color", "shape", "size"):
            i = rng.randrange(len(kinds))
            fields = dict(zip(("size", "color", "shape"), kinds[i]))
            options = {"size": SIZES, "color": COLORS, "shape": SHAPES}[edit]
            fields[edit] = rng.choice([v for v in options if v != fields[edit]])
            kinds[i] = (fields["size"], fields["color"], fields["shape"])
        if kinds != original and len(set(kinds)) == len(kinds):  # changed, and kinds stay distinct in a scene
            return _place(rng, kinds)


NLVR2_LEVELS = ("easy", "hard")
"""Synthetic NLVR2 difficulty. easy: the statement describes a whole scene ("both images show a big red circle left
of ..."), true images are that scene, false ones unrelated random scenes; hard: existence, count and relation
statements on images from one scene's family (rearranged twins, one-object perturbations)."""


def rejitter_scene(rng: random.Random, scene: Scene) -> Scene:
    """The same objects in the same cells with new drawing offsets (a second photo of the same scene)."""
    return Scene(tuple(replace(o, **_jitter(rng)) for o in scene.objects))


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


__all__ = [
    "CAPTION_MAX_OBJECTS", "CAPTION_REFERENCES", "COLORS", "Count", "Description", "EVAL_PROTOCOLS", "Exists",
    "NLVR2_LEVELS", "TWIN_KINDS",
    "ObjectRef", "PairStatement", "QUANTIFIERS", "RELATIONS", "Relation",
    "SHAPES", "SIZES", "SYNTHETIC_WORDS", "Scene", "SceneObject", "SyntheticCaptioningDataset", "SyntheticNLVR2Dataset",
    "SyntheticRetrievalDataset", "describe_scene", "hard_negative", "make_captioning_eval_set", "make_captioning_item",
    "make_nlvr2_eval_set", "make_nlvr2_item",
    "make_retrieval_eval_set", "make_retrieval_group", "make_retrieval_item", "make_statement", "make_twin",
    "make_twin_retrieval_eval_set", "swap_attributes_scene", "object_box", "object_phrase",
    "parse_statement", "perturb_scene", "random_scene", "rejitter_scene", "scene_regions",
    "rearrange_scene", "render_scene", "scene_captions", "statement_is_true", "statement_text",
]
