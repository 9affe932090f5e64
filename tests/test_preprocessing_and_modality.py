"""One image conversion for pipeline, processor and training loaders; the pipeline's type-only modality rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

from efficientvlm.training.data.files import load_image
from modeling_efficientvlm import EfficientVLMForImageTextRetrieval
from modeling_efficientvlm.pipeline_efficientvlm import ImageTextRetrievalPipeline
from modeling_efficientvlm.processing_efficientvlm import open_image, to_rgb
from tests.conftest import tiny_config
from tests.conftest import TINY_TEXTS, tiny_processor

QUERY = "a red circle"
TRANSPARENT_XY, OPAQUE_XY = (0, 0), (5, 5)


def _random_rgb(seed: int, size=(40, 36)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def _alpha(seed: int, size=(40, 36)) -> np.ndarray:
    """(H, W) alpha with fully transparent, half transparent and opaque pixels."""
    alpha = np.random.default_rng(seed + 100).choice(np.array([0, 128, 255], dtype=np.uint8), (size[1], size[0]))
    alpha[TRANSPARENT_XY[1], TRANSPARENT_XY[0]], alpha[OPAQUE_XY[1], OPAQUE_XY[0]] = 0, 255
    return alpha


def rgba_image() -> Image.Image:
    rgb = _random_rgb(0)
    rgb[TRANSPARENT_XY[1], TRANSPARENT_XY[0]] = 0  # black under full transparency: `.convert("RGB")` shows black
    return Image.fromarray(np.dstack([rgb, _alpha(0)]))  # (H, W, 4) uint8 → RGBA


def la_image() -> Image.Image:
    grey = _random_rgb(1)[..., 0]
    grey[TRANSPARENT_XY[1], TRANSPARENT_XY[0]] = 0
    return Image.fromarray(np.dstack([grey, _alpha(1)]))  # (H, W, 2) uint8 → LA


def palette_image() -> Image.Image:
    """P image whose palette index 0 (black) is transparent; index 0 covers a third of the pixels."""
    indices = np.random.default_rng(2).integers(0, 3, (36, 40), dtype=np.uint8)
    indices[TRANSPARENT_XY[1], TRANSPARENT_XY[0]], indices[OPAQUE_XY[1], OPAQUE_XY[0]] = 0, 1
    image = Image.frombytes("P", (40, 36), indices.tobytes())
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255])
    image.info["transparency"] = 0
    return image


IMAGES = {"RGBA": rgba_image, "LA": la_image, "P": palette_image}


def white_composite(image: Image.Image) -> np.ndarray:
    """Independent reference: (H, W, 3) float colour * alpha + white * (1 - alpha)."""
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)
    alpha = rgba[..., 3:] / 255.0
    return rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)


@pytest.fixture(scope="module")
def pipe() -> ImageTextRetrievalPipeline:
    torch.manual_seed(0)
    model = EfficientVLMForImageTextRetrieval(tiny_config(text=dict(initializer_range=0.3))).eval()
    return ImageTextRetrievalPipeline(model=model, processor=tiny_processor(), device=-1)


@torch.no_grad()
def processor_embedding(pipe: ImageTextRetrievalPipeline, image) -> torch.Tensor:
    """(E,) L2-normalised ITC embedding of one image through `processor(images=...)` (the AutoProcessor path)."""
    pixels = pipe.processor(images=[image])["pixel_values"]
    return torch.nn.functional.normalize(pipe.model.get_image_features(pixels)[0], dim=-1)


@torch.no_grad()
def query_embedding(pipe: ImageTextRetrievalPipeline, text: str) -> torch.Tensor:
    encoded = pipe.processor(text=[text])
    features = pipe.model.get_text_features(encoded["input_ids"], encoded["attention_mask"])
    return torch.nn.functional.normalize(features[0], dim=-1)


# ------------------------------------------------------------------------------------------------ preprocessing
@pytest.mark.parametrize("mode", sorted(IMAGES))
def test_to_rgb_composites_transparency_on_white(mode):
    image = IMAGES[mode]()
    assert image.mode == mode
    converted = to_rgb(image)
    assert converted.mode == "RGB"
    assert converted.getpixel(TRANSPARENT_XY) == (255, 255, 255)  # fully transparent black → white
    assert converted.getpixel(OPAQUE_XY) == image.convert("RGB").getpixel(OPAQUE_XY)  # opaque: colour kept
    np.testing.assert_allclose(np.asarray(converted, dtype=np.float64), white_composite(image), atol=1.0)
    assert to_rgb(converted) is converted  # idempotent: RGB without orientation tag is returned as is


@pytest.mark.parametrize("mode", sorted(IMAGES))
def test_pipeline_processor_and_loader_embed_alike(pipe, tmp_path, mode):
    """The same transparent picture gives one embedding through pipeline (PIL, Path, str path), processor, loader."""
    image = IMAGES[mode]()
    path = tmp_path / f"{mode}.png"
    image.save(path)
    reference = processor_embedding(pipe, image)  # AutoProcessor given the PIL image
    text = query_embedding(pipe, QUERY)
    for loaded in (load_image(image), load_image(str(path)), load_image({"bytes": path.read_bytes(), "path": None})):
        torch.testing.assert_close(processor_embedding(pipe, loaded), reference, atol=1e-6, rtol=1e-6)
    white = processor_embedding(pipe, Image.fromarray(np.rint(white_composite(image)).astype(np.uint8)))
    assert torch.dot(white, reference) > 0.999  # the reference itself is the picture on white
    for gallery, kwargs in (([image], {}), ([path], {}), ([str(path)], {"gallery_type": "image"})):
        score = pipe(QUERY, gallery=gallery, **kwargs)[0]["score"]
        assert score == pytest.approx(torch.dot(text, reference).item(), abs=1e-5), (mode, gallery)


def test_processor_and_pipeline_see_white_for_fully_transparent_pixels(pipe):
    transparent = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    torch.testing.assert_close(pipe.processor(images=transparent)["pixel_values"],
                               pipe.processor(images=white)["pixel_values"])
    ranked = pipe(QUERY, gallery=[transparent, white], top_k=None)
    assert ranked[0]["score"] == pytest.approx(ranked[1]["score"], abs=1e-6)


def _rotated_file(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A 40x36 PNG tagged EXIF orientation 6 (display rotated 90° clockwise) and its upright (40, 36, 3) pixels."""
    pixels = _random_rgb(3)  # stored (36, 40, 3): wider than tall
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    path = tmp_path / "rotated.png"
    Image.fromarray(pixels).save(path, exif=exif)
    return path, np.rot90(pixels, k=-1)


def test_exif_orientation_applied_on_every_path(pipe, tmp_path):
    path, upright = _rotated_file(tmp_path)
    for image in (open_image(path), load_image(str(path)), to_rgb(Image.open(path))):
        assert image.size == (36, 40)
        np.testing.assert_array_equal(np.asarray(image), upright)
    with Image.open(path) as opened:  # AutoProcessor given the file's PIL image, orientation tag and all
        reference = processor_embedding(pipe, opened)
    torch.testing.assert_close(reference, processor_embedding(pipe, Image.fromarray(upright)))
    score = pipe(QUERY, gallery=[path])[0]["score"]
    assert score == pytest.approx(torch.dot(query_embedding(pipe, QUERY), reference).item(), abs=1e-5)


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    values = np.arange(0, 256, dtype=np.uint16).reshape(16, 16)
    image = Image.fromarray(values * 257)  # 16-bit: 0 .. 65535
    assert image.mode == "I;16"
    np.testing.assert_array_equal(np.asarray(to_rgb(image)), np.repeat(values[..., None], 3, axis=-1))


def test_other_modes_convert_and_bad_modes_name_themselves():
    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (4, 4), 7)).getpixel((0, 0)) == (7, 7, 7)
    with pytest.raises(ValueError, match="'La'"):
        to_rgb(Image.new("La", (4, 4)))


# ----------------------------------------------------------------------------------------------------- modality
def test_str_is_always_text_whatever_the_working_directory(pipe, tmp_path, monkeypatch):
    image = rgba_image()
    elsewhere = pipe(image, gallery=TINY_TEXTS, top_k=None)
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "blue", format="PNG")  # a gallery text naming an image file
    assert "blue" in TINY_TEXTS and Path("blue").is_file()
    here = pipe(image, gallery=TINY_TEXTS, top_k=None)
    assert here == elsewhere and all("text" in entry for entry in here)


def test_declared_string_paths_and_their_errors(pipe, tmp_path):
    path = tmp_path / "picture.png"
    rgba_image().save(path)
    typo = str(tmp_path / "pictrue.png")
    with pytest.raises(FileNotFoundError, match="pictrue.png"):
        pipe(QUERY, gallery=[str(path), typo], gallery_type="image")
    with pytest.raises(FileNotFoundError, match="pictrue.png"):
        pipe(QUERY, gallery=[Path(typo)])
    with pytest.raises(FileNotFoundError, match="pictrue.png"):
        pipe(typo, gallery=TINY_TEXTS, query_type="image")
    with pytest.raises(ValueError, match="both texts.*gallery_type='image'"):  # undeclared: a text, and the hint
        pipe(QUERY, gallery=[str(path)])
    with pytest.raises(ValueError, match="mixes texts and images.*a `str` is always a text"):
        pipe(QUERY, gallery=[path, str(path)])
    with pytest.raises(TypeError, match="gallery item 0 is a PngImageFile, but gallery_type='text'"):
        pipe(QUERY, gallery=[Image.open(path)], gallery_type="text")
    with pytest.raises(ValueError, match="gallery_type must be 'text' or 'image', got 'video'"):
        pipe(QUERY, gallery=[path], gallery_type="video")
    # the older argument names still work; contradicting the new ones is an error
    declared = pipe(QUERY, gallery=[str(path)], gallery_type="image")
    assert pipe(QUERY, gallery=[str(path)], gallery_modality="image") == declared
    with pytest.raises(ValueError, match="disagree"):
        pipe(QUERY, gallery=[str(path)], gallery_type="image", gallery_modality="text")


def test_numpy_arrays_are_images(pipe):
    images = [Image.fromarray(_random_rgb(seed)) for seed in range(3)]
    from_pil = pipe(QUERY, gallery=images, top_k=None)
    from_arrays = pipe(QUERY, gallery=[np.asarray(image) for image in images], top_k=None)
    assert [e["index"] for e in from_arrays] == [e["index"] for e in from_pil]
    torch.testing.assert_close(torch.tensor([e["score"] for e in from_arrays]),
                               torch.tensor([e["score"] for e in from_pil]), atol=1e-5, rtol=1e-5)
    assert pipe(np.asarray(images[0]), gallery=TINY_TEXTS)[0]["text"] in TINY_TEXTS


def test_save_pipeline_files_ships_the_processing_file_it_imports(pipe, tmp_path):
    """The pipeline imports `processing_efficientvlm` (`to_rgb`): a folder made pipeline-ready must carry both."""
    import modeling_efficientvlm.processing_efficientvlm as processing
    from modeling_efficientvlm.pipeline_efficientvlm import save_pipeline_files

    pipe.model.save_pretrained(tmp_path)  # model only: no processor files yet
    save_pipeline_files(tmp_path)
    assert (tmp_path / "processing_efficientvlm.py").read_text() == Path(processing.__file__).read_text()
    assert "from .processing_efficientvlm import" in (tmp_path / "pipeline_efficientvlm.py").read_text()
