"""A demo page for an EfficientVLM model (a Hugging Face Space, or `python app.py` on your machine).

The page offers what the model can do: search a gallery of images by text or by image, classify an image with your own
labels, caption an image, answer a question about an image. `app_config.json` beside this file names the model (a Hub
repo or a local folder), the tasks, the gallery and the model card's facts; `efficientvlm app` writes it.

Needs only gradio, torch, transformers (>= 5), pillow and numpy: the model, its processor and its pipelines load from
the model repo as remote code (`trust_remote_code=True`). Nothing else is downloaded.

    python app.py    # http://127.0.0.1:7860; GRADIO_SERVER_PORT / GRADIO_SERVER_NAME choose another address
"""

import functools
import importlib
import json
import logging
import os
from pathlib import Path

import gradio as gr
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import pipeline

HERE = Path(__file__).resolve().parent
CONFIG = json.loads((HERE / "app_config.json").read_text(encoding="utf-8"))
MODEL = os.environ.get("EFFICIENTVLM_APP_MODEL") or CONFIG["model"]  # a local copy of the model may stand in
TOP_K, RERANK_K = CONFIG.get("top_k", 6), CONFIG.get("rerank_k", 8)  # results shown; of them re-scored by ITM
MAX_PIXELS = 40_000_000  # larger uploads are refused before they are decoded
MAX_SIDE = 1024  # uploads are shrunk to this before the processor resizes them to the model's input size
MAX_QUERY_CHARS = 300
IMAGE_FILES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # PIL itself refuses twice this (a decompression bomb)
log = logging.getLogger("app")


class BadInput(ValueError):
    """An input the page explains to its user (no image, an empty query, ...)."""


def shows_errors(handler):
    """A handler's result and a status line: bad input, or any failure, empties the result and the status says why."""

    @functools.wraps(handler)
    def wrapped(*args):
        try:
            return handler(*args), ""
        except BadInput as error:
            gr.Warning(str(error))
            return None, f"⚠️ {error}"
        except Exception as error:  # the traceback goes to the server's log, never to the page
            log.exception("%s failed", handler.__name__)
            return None, f"❌ {handler.__name__} failed: {type(error).__name__}: {error}"

    return wrapped


@functools.cache
def load(task):
    """A task's pipeline, loaded on first use (image-text-retrieval and visual-question-answering are the model's)."""
    return pipeline(task, model=MODEL, trust_remote_code=True)


def open_upload(path):
    """An uploaded file as an image (the model's processor converts it to RGB), or BadInput saying why not."""
    if not path:
        raise BadInput("Upload an image first.")
    try:
        image = Image.open(path)
        if image.width * image.height > MAX_PIXELS:
            raise BadInput(f"The image is {image.width}×{image.height} pixels; the limit is {MAX_PIXELS // 10**6} "
                           "megapixels.")
        image = ImageOps.exif_transpose(image)
        image.thumbnail((MAX_SIDE, MAX_SIDE))  # decodes it: a truncated file fails here
        return image
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as error:
        raise BadInput("That file is not an image this page can read (PNG, JPEG, WebP, ...).") from error


def read_query(text):
    query = (text or "").strip()
    if not query:
        raise BadInput("Type a query first, e.g. “a red circle”.")
    if len(query) > MAX_QUERY_CHARS:
        raise BadInput(f"The query has {len(query)} characters; keep it under {MAX_QUERY_CHARS}.")
    return query


# ------------------------------------------------------------------------------------------------------ the gallery
@functools.cache
def gallery_index():
    """The gallery as the remote code's GalleryIndex, which the retrieval pipeline searches: the index folder that
    `efficientvlm index` wrote (its images in gallery/), or the images of gallery/ embedded once, here."""
    retrieval = load("image-text-retrieval")
    remote = importlib.import_module(type(retrieval).__module__)  # the model's pipeline file: it imports the index
    images = HERE / CONFIG["gallery"]
    if CONFIG.get("index"):
        index = remote.load_gallery_index(HERE / CONFIG["index"])
        index.manifest["source"]["root"] = str(images)  # the images travel with the app
        return index
    names = sorted(p.relative_to(images).as_posix() for p in images.rglob("*") if p.suffix.lower() in IMAGE_FILES)
    embeddings = torch.cat([embed_images(retrieval, [images / n for n in names[i : i + 32]])
                            for i in range(0, len(names), 32)])  # (G, E), unit length
    manifest = {"model": {"name": MODEL, "fingerprint": remote.model_fingerprint(retrieval.model)},
                "source": {"kind": "folder", "root": str(images)}}
    return remote.GalleryIndex(images, manifest, names, embeddings, parts=[])


@torch.no_grad()
def embed_images(retrieval, paths):
    """(N, E) unit-length ITC embeddings of image files (the model's `get_image_features`)."""
    pixels = retrieval.processor(images=[Image.open(p) for p in paths], return_tensors="pt")  # to RGB as the pipeline
    features = retrieval.model.get_image_features(pixels["pixel_values"].to(retrieval.device, retrieval.model.dtype))
    return torch.nn.functional.normalize(features.float().cpu(), dim=-1)


def gallery_items(hits):
    """Pipeline hits → (image file, "name · score") pairs for gr.Gallery."""
    index = gallery_index()
    return [(str(index.image(hit["index"])), f"{hit['image']} · {hit['score']:+.2f}") for hit in hits]


@shows_errors
def search_by_text(text, top_k):
    query = read_query(text)
    hits = load("image-text-retrieval")(query, gallery=gallery_index(), top_k=int(top_k), rerank_k=RERANK_K)
    return gallery_items(hits)


@shows_errors
def search_by_image(path, top_k):
    image = open_upload(path)  # ranked by ITC alone: the ITM head scores (text, image) pairs
    return gallery_items(load("image-text-retrieval")(image, gallery=gallery_index(), top_k=int(top_k)))


# ---------------------------------------------------------------------------------------------- one image, one answer
@shows_errors
def classify(path, labels):
    image = open_upload(path)
    candidates = list(dict.fromkeys(label.strip() for label in (labels or "").split(",") if label.strip()))
    if len(candidates) < 2:
        raise BadInput("Give at least two labels, separated by commas.")
    result = load("zero-shot-image-classification")(image, candidate_labels=candidates)
    return {r["label"]: r["score"] for r in result}


@shows_errors
def caption(path):
    image = open_upload(path)  # transformers 5 serves image-to-text as image-text-to-text: an empty prompt
    result = load("image-text-to-text")(image, text="", return_full_text=False)
    return result[0]["generated_text"].strip()


@shows_errors
def answer(path, question):
    image = open_upload(path)
    result = load("visual-question-answering")(image, question=read_query(question), top_k=5)
    return {r["answer"]: r["score"] for r in result}


# -------------------------------------------------------------------------------------------------------- the page
def facts_markdown():
    rows = "\n".join(f"- **{name}**: {value}" for name, value in CONFIG.get("facts", []))
    on_hub = CONFIG.get("on_hub") and MODEL == CONFIG["model"]
    name = f"[`{MODEL}`](https://huggingface.co/{MODEL})" if on_hub else f"`{MODEL}`"
    return f"### The model\n\n{name}\n\n{rows}"


def image_tab(name, key, handler, extra=None, output=None, button="Run"):
    """A tab with an image upload, optional extra inputs, a button, the output and a status line."""
    with gr.Tab(name, id=key):
        with gr.Row():
            image = gr.Image(type="filepath", image_mode=None, label="Image", elem_id=f"{key}-image", height=260)
            with gr.Column():
                inputs = [image, *(extra() if extra else [])]
                run = gr.Button(button, variant="primary", elem_id=f"{key}-button")
                result = output()
        status = gr.Markdown(elem_id=f"{key}-status")
    run.click(handler, inputs, [result, status])


def build_page():
    tasks = CONFIG["tasks"]
    with gr.Blocks(title=CONFIG["title"]) as page:
        gr.Markdown(f"# {CONFIG['title']}\n{CONFIG.get('description', '')}")
        with gr.Row():
            with gr.Column(scale=3), gr.Tabs():
                top_k = gr.Slider(1, 24, value=TOP_K, step=1, label="Results", render=False)
                results = functools.partial(gr.Gallery, label="Results", columns=3, height=420, object_fit="contain")
                if "text-to-image" in tasks:
                    with gr.Tab("Text → image", id="text"):
                        query = gr.Textbox(label="Describe an image", elem_id="text-query",
                                           placeholder="a big red circle left of a small blue square")
                        with gr.Row():
                            search = gr.Button("Search", variant="primary", elem_id="text-button")
                            top_k.render()
                        found, status = results(elem_id="text-results"), gr.Markdown(elem_id="text-status")
                    query.submit(search_by_text, [query, top_k], [found, status])
                    search.click(search_by_text, [query, top_k], [found, status])
                if "image-to-image" in tasks:
                    image_tab("Image → image", "similar", search_by_image, button="Find similar",
                              extra=lambda: [gr.Slider(1, 24, value=TOP_K, step=1, label="Results")],
                              output=lambda: results(elem_id="similar-results"))
                if "zero-shot" in tasks:
                    image_tab("Classify", "classify", classify, button="Classify",
                              extra=lambda: [gr.Textbox(label="Labels, separated by commas", elem_id="classify-labels",
                                                        value="a red circle, a blue square, a green triangle")],
                              output=lambda: gr.Label(label="Scores", elem_id="classify-output"))
                if "captioning" in tasks:
                    image_tab("Caption", "caption", caption, button="Caption",
                              output=lambda: gr.Textbox(label="Caption", elem_id="caption-output"))
                if "vqa" in tasks:
                    image_tab("Ask", "vqa", answer, button="Answer",
                              extra=lambda: [gr.Textbox(label="Question", elem_id="vqa-question")],
                              output=lambda: gr.Label(label="Answers", elem_id="vqa-output"))
            with gr.Column(scale=1):
                gr.Markdown(facts_markdown(), elem_id="model-facts")
    return page


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    if "text-to-image" in CONFIG["tasks"] or "image-to-image" in CONFIG["tasks"]:
        log.info("gallery: %s", gallery_index())  # embedded before the first visitor waits for it
    build_page().queue().launch(show_error=True, max_file_size="25mb")
