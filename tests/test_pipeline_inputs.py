"""Inputs the pipelines accept, and those they refuse with a named error (issue #34 items 8-9): greyscale and float
arrays, truncated files, empty zero-shot labels, a zero beam count, missing tokenizer files; big images stay cheap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_efficientvlm import EfficientVLMForConditionalGeneration, EfficientVLMForImageTextRetrieval
from modeling_efficientvlm.pipeline_efficientvlm import ImageTextRetrievalPipeline, save_pipeline_files
from modeling_efficientvlm.processing_efficientvlm import (
    EfficientVLMProcessor,
    array_to_image,
    open_image,
    reduce_image,
    to_rgb,
)
from tests.conftest import run_clean_python, tiny_config, tiny_processor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipe() -> ImageTextRetrievalPipeline:
    torch.manual_seed(0)
    model = EfficientVLMForImageTextRetrieval(tiny_config()).eval()
    return ImageTextRetrievalPipeline(model=model, processor=tiny_processor(), device=-1)


def _image_scores(pipe, gallery) -> list[float]:
    hits = pipe("a red circle", gallery, top_k=None)
    return [hit["score"] for hit in sorted(hits, key=lambda hit: hit["index"])]


def test_greyscale_and_float_arrays_read_as_the_same_picture(pipe):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (40, 36), dtype=np.uint8)
    rgb = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
    as_pil = _image_scores(pipe, [Image.fromarray(grey).convert("RGB"), Image.fromarray(rgb)])
    # (H, W) uint8, and floats in [0, 1] (channels-last and channels-first) give the uint8 image's scores
    assert _image_scores(pipe, [grey, rgb]) == pytest.approx(as_pil, abs=1e-6)
    assert _image_scores(pipe, [grey / 255.0, rgb / 255.0]) == pytest.approx(as_pil, abs=1e-6)
    assert _image_scores(pipe, [grey[None] / 255.0, (rgb / 255.0).transpose(2, 0, 1)]) == pytest.approx(as_pil,
                                                                                                     abs=1e-6)
    assert np.array_equal(np.asarray(array_to_image(grey.astype(np.uint16) * 257)), grey)


@pytest.mark.parametrize("array, match", [
    (np.full((8, 8, 3), 200.0), r"values in \[0, 1\], got 200 to 200"),
    (np.full((8, 8), np.nan), "NaN"),
    (np.full((8, 8), 300, dtype=np.int32), "0-255"),
    (np.zeros((8, 8, 5), dtype=np.uint8), r"shape \(8, 8, 5\)"),
    (np.zeros((2, 8, 8, 3, 1), dtype=np.uint8), "shape"),
])
def test_arrays_that_are_no_image_are_refused_by_shape_and_range_not_dumped(pipe, array, match):
    with pytest.raises(ValueError, match=match) as error:
        pipe("a red circle", [np.zeros((8, 8), np.uint8), array])
    assert str(error.value).startswith("image item 1: ") and len(str(error.value)) < 300


def test_truncated_file_is_named_by_index_and_path(pipe, tmp_path):
    good, bad = tmp_path / "good.png", tmp_path / "bad.jpg"
    Image.new("RGB", (40, 36), (200, 10, 10)).save(good)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(bad)
    bad.write_bytes(bad.read_bytes()[:400])
    with pytest.raises(OSError, match=rf"image item 2 \('{bad}'\): .*[Tt]runcated"):
        pipe("a red circle", [good, good, bad], batch_size=2)  # item 2 is the first of the second batch
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    with pytest.raises(OSError, match="image item 1 .*notes.png"):
        pipe("a red circle", [str(good), str(not_image)], gallery_type="image")


def test_large_images_are_reduced_near_the_input_size_with_the_same_result(tmp_path):
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    big = small.resize((4000, 3000), Image.NEAREST)  # 4000 x 3000 for a 32-px model
    reduced = to_rgb(big, 32)
    assert reduced.size == (128, 96)  # short side 3 x 32
    assert to_rgb(reduced, 32) is reduced and reduce_image(small, 32) is small  # nothing to reduce
    big.save(tmp_path / "big.jpg", quality=95)
    from_jpeg = open_image(tmp_path / "big.jpg", 32)  # decoded at 1/8 scale (DCT), then reduced
    assert 96 <= min(from_jpeg.size) < 2 * 96
    processor = tiny_processor()
    full = processor.image_processor([big], return_tensors="pt")["pixel_values"]  # the full image, no reduction
    ours = processor(images=[big])["pixel_values"]
    assert (ours - full).abs().mean() < 0.02  # CLIP-normalised units (~0.4 grey levels): the same pixels


def test_empty_zero_shot_labels_are_named(tmp_path):
    model = EfficientVLMForImageTextRetrieval(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    tiny_processor().save_pretrained(tmp_path)
    save_pipeline_files(tmp_path)
    out = run_clean_python(
        f"""
        from PIL import Image
        from transformers import pipeline
        zero_shot = pipeline("zero-shot-image-classification", model={str(tmp_path)!r}, trust_remote_code=True)
        image = Image.new("RGB", (40, 36))
        print(len(zero_shot(image, candidate_labels=["a red circle", "a blue square"])))
        for labels in ([], None):
            try:
                zero_shot(image, candidate_labels=labels)
            except ValueError as error:
                print("refused", "candidate_labels" in str(error))
        """
    )
    assert out.split() == ["2", "refused", "True", "refused", "True"]


def test_zero_beams_in_generation_config_is_named(tmp_path):
    torch.manual_seed(0)
    model = EfficientVLMForConditionalGeneration(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    path = tmp_path / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**config, "num_beams": 0}))
    loaded = EfficientVLMForConditionalGeneration.from_pretrained(tmp_path)
    pixels = torch.randn(1, 3, 32, 32)
    prompt = torch.tensor([[2]])  # [CLS]
    with pytest.raises(ValueError, match=r"num_beams must be an integer >= 1, got 0 from the generation config"):
        loaded.generate(pixels, prompt)
    with pytest.raises(ValueError, match="num_return_sequences .* from the generate call"):
        loaded.generate(pixels, prompt, num_beams=2, num_return_sequences=0)
    assert loaded.generate(pixels, prompt, num_beams=2, max_new_tokens=2, min_new_tokens=1).shape[0] == 1


@pytest.mark.parametrize("gone, named", [(("tokenizer.json",), "tokenizer.json or vocab.txt"),
                                          (("tokenizer.json", "tokenizer_config.json"), "tokenizer.json"),
                                          (("processor_config.json",), "processor_config.json")])
def test_missing_processor_files_are_named(tmp_path, gone, named):
    processor = EfficientVLMProcessor.from_pretrained(ROOT / "training" / "assets" / "demo_teacher")
    processor.save_pretrained(tmp_path)
    for name in gone:
        (tmp_path / name).unlink(missing_ok=True)
    (tmp_path / "vocab.txt").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match=named) as error:
        EfficientVLMProcessor.from_pretrained(tmp_path)
    assert str(tmp_path) in str(error.value) and "sentencepiece" not in str(error.value)


@pytest.mark.slow
def test_three_huge_images_cost_about_one_decoded_image(tmp_path):
    """3 x 12000 x 12000 PNG through the retrieval pipeline: the peak resident memory grows by well under 1 GB
    (432 MB is one decoded image; every image kept at full size for the batch used to cost 4.35 GB)."""
    path = tmp_path / "huge.png"
    ramp = np.linspace(0, 255, 12000).astype(np.uint8)
    pixels = np.empty((12000, 12000, 3), np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = ramp[None, :], ramp[:, None], 128
    Image.fromarray(pixels).save(path, compress_level=1)
    del pixels
    code = textwrap.dedent(
        f"""
        import resource
        import torch
        from PIL import Image
        from modeling_efficientvlm import EfficientVLMForImageTextRetrieval
        from modeling_efficientvlm.pipeline_efficientvlm import ImageTextRetrievalPipeline
        from tests.conftest import tiny_config, tiny_processor
        Image.MAX_IMAGE_PIXELS = None  # 144 Mpx: past Pillow's decompression-bomb warning
        pipe = ImageTextRetrievalPipeline(model=EfficientVLMForImageTextRetrieval(tiny_config()).eval(),
                                          processor=tiny_processor(), device=-1)
        pipe("a red circle", [Image.new("RGB", (40, 40))])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        hits = pipe("a red circle", [{str(path)!r}] * 3, gallery_type="image")
        print(len(hits), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    count, grown_mb = result.stdout.split()[-2:]
    assert int(count) == 3 and float(grown_mb) < 1024, grown_mb
