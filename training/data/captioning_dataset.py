"""Synthetic captioning: training items, the streaming dataset, and the evaluation set with reference captions."""

import random

from .scene_language import CAPTION_REFERENCES, scene_captions
from .scene_render import render_scene
from .scene_world import MIN_OBJECTS, random_scene
from .synthetic_stream import _SyntheticIterable


# --------------------------------------------------------------------------------------------------- captioning
CAPTION_MAX_OBJECTS = 3
"""Captioning scenes hold 2-3 objects: a full description then has at most 15 words (two objects in a relation and
one bare), so every reference and its [SEP] fit the decoder's 20 new tokens; 5 objects would need up to 25 words."""


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
