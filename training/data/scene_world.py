"""The synthetic world: scenes of rendered shapes, the statements said about them, their truth, and edits.

A scene is a plain description: 2-5 objects, each a (size, color, shape) kind unique within the scene, placed in
distinct cells of a 3x3 grid (plus a small drawing jitter that never leaves the cell). Spatial relations are read from
the grid cells, so "left of" / "above" are never ambiguous.

Everything said about a scene is first built as a structure (`Exists`, `Count`, `Relation`, `Description`,
`PairStatement`), checked with `statement_is_true`, and only then rendered to text. Their text and its parser
live in `scene_language`, the drawing in `scene_render`, the per-task datasets in `*_dataset`.

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

import random
from dataclasses import dataclass, replace
from typing import Union


GRID = 3
SIZES = ("big", "small")
COLORS = ("red", "green", "blue", "yellow", "purple", "gray")  # none starts with a vowel: the article is always "a"
SHAPES = ("circle", "square", "triangle", "diamond")
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
QUANTIFIERS = ("left", "right", "both", "exactly_one")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
MIN_OBJECTS, MAX_OBJECTS = 2, 5
_RADIUS = {"big": 0.40, "small": 0.22}  # in cell widths; with jitter <= 0.08 objects stay inside their cell
_MAX_JITTER = 0.08
_ALL_KINDS = tuple((z, c, s) for z in SIZES for c in COLORS for s in SHAPES)


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


def rejitter_scene(rng: random.Random, scene: Scene) -> Scene:
    """The same objects in the same cells with new drawing offsets (a second photo of the same scene)."""
    return Scene(tuple(replace(o, **_jitter(rng)) for o in scene.objects))
