"""Synthetic image-text retrieval: training items and groups (a scene with its twins and several captions), the
streaming dataset, and the two evaluation protocols (`scenes`; `twins`, the default)."""

import random

from .scene_language import _distinct_descriptions, statement_text
from .scene_render import render_scene, scene_regions
from .scene_world import describe_scene, Description, _distinguishing_description, hard_negative, make_twin, MAX_OBJECTS, random_scene, rearrange_scene, Scene, Statement, TWIN_KINDS
from .synthetic_stream import _SyntheticIterable


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


def make_twin_retrieval_eval_set(n_images: int = 1000, *, seed: int = 0, image_size: int = 64,
                                 captions_per_image: int = 5,
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
