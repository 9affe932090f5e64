"""Drawing a synthetic scene: the image, each object's box, and the region phrases grounding reads."""

from PIL import Image, ImageDraw

from .scene_language import object_phrase
from .scene_world import GRID, _RADIUS, Scene, SceneObject


_COLOR_RGB = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (230, 200, 30), "purple": (140, 60, 180), "gray": (128, 128, 128),
}
_SQUARE_HALF_SIDE = 0.85  # in radii: a square of half-side r looks bigger than a circle of radius r
_TRIANGLE_BASE = 0.8  # in radii below the centre (the apex is r above it)


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


def scene_regions(scene: Scene) -> dict[str, list]:
    """Region annotations of a scene for L_BBOX: {"region_phrases": [phrase], "region_boxes": [[cx, cy, w, h]]}.

    One region per scene, its first object: object kinds and cells are drawn at random (`_place`), so it is a
    uniformly random object of the image, and no random number is consumed (the caption stream stays as it was).
    """
    obj = scene.objects[0]
    return {"region_phrases": [object_phrase(obj)], "region_boxes": [list(object_box(obj))]}
