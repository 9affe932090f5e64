"""`efficientvlm app` (issue #35): the Space-ready folder, what the page offers per model, push-space to the local Hub,
the page's handlers on bad input, and the page itself in headless Chromium (Selenium) with the demo teacher.

The browser test needs gradio (the `app` extra), selenium (dev) and Debian's chromium + chromium-driver (.ci/run
installs them); it is skipped, saying which is missing, without them. With EFFICIENTVLM_UPDATE_SCREENSHOT=1 it also
writes docs/app-screenshot.png.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from efficientvlm.training.commands.app import (
    APP_CONFIG,
    CAPTIONING,
    IMAGE_SEARCH,
    INSTALL_HINT,
    TEXT_SEARCH,
    VQA,
    ZERO_SHOT,
    AppArguments,
    SpaceArguments,
    model_facts,
    model_tasks,
    push_space,
    write_app,
)
from efficientvlm.training.commands.cli import main
from efficientvlm.training.commands.demo import DEMO_TEACHER_DIR
from efficientvlm.training.data.scene_language import statement_text
from efficientvlm.training.data.scene_render import render_scene
from efficientvlm.training.data.scene_world import describe_scene, random_scene
from huggingface_hub import metadata_load

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "app-screenshot.png"
RETRIEVAL_CONFIG = {
    "architectures": ["EfficientVLMForImageTextRetrieval"],
    "auto_map": {"AutoModel": "m.R", "AutoModelForZeroShotImageClassification": "m.R",
                 "AutoModelForImageTextToText": "m.C"},
    "custom_pipelines": {"image-text-retrieval": {}},
}


def scene_gallery(folder: Path, count: int = 8, seed: int = 0) -> dict[str, str]:
    """Rendered synthetic scenes as PNG files; {file name: a full description of that scene}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, captions = random.Random(seed), {}
    for i in range(count):
        scene = random_scene(rng)
        render_scene(scene, 64).save(folder / f"scene_{i}.png")
        captions[f"scene_{i}.png"] = statement_text(describe_scene(rng, scene))
    return captions


# ------------------------------------------------------------------------------------------ without gradio or a page
def test_tasks_follow_the_config():
    assert model_tasks(RETRIEVAL_CONFIG) == [TEXT_SEARCH, IMAGE_SEARCH, ZERO_SHOT]  # retrieval heads: no captioning
    pretraining = {**RETRIEVAL_CONFIG, "architectures": ["EfficientVLMForPreTraining"]}
    assert model_tasks(pretraining) == [TEXT_SEARCH, IMAGE_SEARCH, ZERO_SHOT, CAPTIONING]  # its MLM head was trained
    captioner = {"architectures": ["EfficientVLMForConditionalGeneration"], "auto_map": RETRIEVAL_CONFIG["auto_map"]}
    assert model_tasks(captioner) == [CAPTIONING]
    vqa = {"architectures": ["EfficientVLMForQuestionAnswering"], "answer_list": ["red", "blue"],
           "custom_pipelines": {"visual-question-answering": {}}}
    assert model_tasks(vqa) == [VQA]
    assert model_tasks({**vqa, "answer_list": None}) == []  # the pipeline ranks the answer list
    assert model_tasks({"architectures": ["EfficientVLMForVisualReasoning"]}) == []
    teacher = json.loads((Path(DEMO_TEACHER_DIR) / "config.json").read_text())
    assert model_tasks(teacher) == [TEXT_SEARCH, IMAGE_SEARCH, ZERO_SHOT, CAPTIONING]


def test_facts_of_a_pruned_model():
    structure = {"params": 360_000, "reference_params": 1_345_718, "reference_name": "the teacher",
                 "sparsity": {"vision": 0.6, "text": 0.4, "fusion": 0.5, "total": 0.5},
                 "speedup": 2.9, "speedup_min": 2.85, "speedup_max": 3.07, "speedup_baseline": "the teacher"}
    card = {"model-index": [{"name": "p", "results": [{"dataset": {"name": "scenes"},
                                                      "metrics": [{"name": "r_mean", "value": 77.4}]}]}]}
    facts = dict(model_facts({"vision_config": {"num_hidden_layers": 6}}, structure, card))
    assert facts["parameters"] == "0.36 M"
    assert facts["kept share"] == "26.8% of the teacher (1.35 M)"
    assert facts["sparsity"].startswith("50.0% (vision 60%")
    assert facts["speed-up"] == "2.90× (range 2.85–3.07×) over the teacher"
    assert facts["r_mean (scenes)"] == "77.4"
    assert facts["layers (vision / text / fusion)"] == "6 / ? / ?"


def test_app_folder(tmp_path):
    scene_gallery(tmp_path / "gallery", count=3)
    args = AppArguments(model=DEMO_TEACHER_DIR, gallery=str(tmp_path / "gallery"), output_dir=str(tmp_path / "app"),
                        model_repo="user/demo-teacher")
    config = write_app(args, args.output_dir)
    app = tmp_path / "app"
    assert sorted(p.name for p in app.iterdir()) == ["README.md", "app.py", APP_CONFIG, "gallery", "requirements.txt"]
    assert sorted(p.name for p in (app / "gallery").iterdir()) == ["scene_0.png", "scene_1.png", "scene_2.png"]
    assert config["model"] == "user/demo-teacher" and config["tasks"] == model_tasks(
        json.loads((Path(DEMO_TEACHER_DIR) / "config.json").read_text()))
    meta = metadata_load(app / "README.md")
    assert (meta["sdk"], meta["app_file"], meta["models"]) == ("gradio", "app.py", ["user/demo-teacher"])
    source = (app / "app.py").read_text()
    assert "efficientvlm." not in source and "import training" not in source  # only gradio, torch, transformers
    assert "trust_remote_code=True" in source
    requirements = (app / "requirements.txt").read_text()
    assert "transformers>=5" in requirements and "efficientvlm" not in requirements
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_app(args, args.output_dir)
    no_gallery = write_app(AppArguments(model=DEMO_TEACHER_DIR, output_dir=str(tmp_path / "bare")),
                           str(tmp_path / "bare"))
    assert no_gallery["tasks"] == [ZERO_SHOT, CAPTIONING] and not no_gallery["on_hub"]  # nothing to search


def test_app_without_gradio(tmp_path, monkeypatch, capsys):
    """The folder is written without gradio; --serve then fails with one line naming the extra."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else
                        real_find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    assert main(["app", "--model", DEMO_TEACHER_DIR, "--output_dir", str(tmp_path / "app")]) == 0
    assert (tmp_path / "app" / "app.py").is_file()
    assert main(["app", "--model", DEMO_TEACHER_DIR, "--serve", "true"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and INSTALL_HINT in error and 'pip install ".[app]"' in error


def test_push_space(tmp_path, local_hub):
    scene_gallery(tmp_path / "gallery", count=2)
    write_app(AppArguments(model=DEMO_TEACHER_DIR, gallery=str(tmp_path / "gallery"), output_dir=str(tmp_path / "a")),
              str(tmp_path / "a"))
    local_model = SpaceArguments(app=str(tmp_path / "a"), repo_id="user/demo-space", endpoint=local_hub.url)
    with pytest.raises(ValueError, match="--model_repo"):  # a Space cannot load a folder of this machine
        push_space(local_model)
    assert main(["push-space", "--app", str(tmp_path / "a"), "--repo_id", "user/demo-space", "--model_repo",
                 "user/demo-teacher", "--endpoint", local_hub.url]) == 0
    from huggingface_hub import HfApi

    files = HfApi(endpoint=local_hub.url).list_repo_files("user/demo-space", repo_type="space")
    assert {"app.py", APP_CONFIG, "README.md", "requirements.txt", "gallery/scene_0.png"} <= set(files)
    config = json.loads(local_hub.read_file("user/demo-space", APP_CONFIG, repo_type="space"))
    assert config["model"] == "user/demo-teacher" and config["on_hub"]
    readme = local_hub.read_file("user/demo-space", "README.md", repo_type="space").decode()
    assert "sdk: gradio" in readme and "models:\n- user/demo-teacher" in readme
    local = json.loads((tmp_path / "a" / APP_CONFIG).read_text())
    assert local["model"] == os.path.abspath(DEMO_TEACHER_DIR)  # the folder stays as written


# --------------------------------------------------------------------------------------------------- with gradio
needs_gradio = pytest.mark.skipif(importlib.util.find_spec("gradio") is None,
                                  reason='gradio is not installed (pip install ".[app]")')


@pytest.mark.slow
@needs_gradio
def test_handlers_explain_bad_input(tmp_path, monkeypatch):
    """Each handler returns (result, status): bad input empties the result and the status says why (no traceback)."""
    from PIL import Image

    captions = scene_gallery(tmp_path / "gallery", count=4)
    write_app(AppArguments(model=DEMO_TEACHER_DIR, gallery=str(tmp_path / "gallery"), output_dir=str(tmp_path / "a")),
              str(tmp_path / "a"))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # app.py lowers it: restored after
    spec = importlib.util.spec_from_file_location("efficientvlm_test_space_app", tmp_path / "a" / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("RGB", (9000, 6000)).save(tmp_path / "huge.png")
    bad = {
        "empty query": app.search_by_text("   ", 3),
        "long query": app.search_by_text("a red circle " * 40, 3),
        "no image": app.caption(None),
        "not an image": app.classify(str(tmp_path / "notes.png"), "a, b"),
        "huge image": app.search_by_image(str(tmp_path / "huge.png"), 3),
        "one label": app.classify(str(tmp_path / "gallery" / "scene_0.png"), "a red circle"),
    }
    for what, (result, status) in bad.items():
        assert result is None and status.startswith("⚠️") and "Traceback" not in status, what
    assert "9000×6000" in bad["huge image"][1] and "Type a query" in bad["empty query"][1]
    hits, status = app.search_by_text(captions["scene_2.png"], 4)
    assert hits[0][1].startswith("scene_2.png")  # rendered scenes: the teacher finds this one (checked by hand)
    assert status == "" and len(hits) == 4 and all(Path(path).is_file() for path, _ in hits)
    similar, _ = app.search_by_image(str(tmp_path / "gallery" / "scene_1.png"), 2)
    assert similar[0][1].startswith("scene_1.png")  # an image is nearest to itself
    text, status = app.caption(str(tmp_path / "gallery" / "scene_0.png"))
    assert status == "" and text

    # the same gallery as an index (`efficientvlm index`): copied with its images, searched through the pipeline
    from efficientvlm.training.commands.index import IndexArguments, build_index

    build_index(IndexArguments(model=DEMO_TEACHER_DIR, images=str(tmp_path / "gallery"),
                               output_dir=str(tmp_path / "i")))
    write_app(AppArguments(model=DEMO_TEACHER_DIR, index=str(tmp_path / "i"), output_dir=str(tmp_path / "b")),
              str(tmp_path / "b"))
    assert (tmp_path / "b" / "index" / "index.json").is_file() and (tmp_path / "b" / "gallery" / "scene_3.png").is_file()
    spec = importlib.util.spec_from_file_location("efficientvlm_test_space_app_index", tmp_path / "b" / "app.py")
    indexed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(indexed)
    assert indexed.search_by_text(captions["scene_2.png"], 4) == (
        [(path.replace(str(tmp_path / "a"), str(tmp_path / "b")), label) for path, label in hits], "")


def _browser_missing() -> str | None:
    if importlib.util.find_spec("gradio") is None:
        return 'gradio is not installed (pip install ".[app]")'
    if importlib.util.find_spec("selenium") is None:
        return 'selenium is not installed (pip install ".[dev]")'
    if not (shutil.which("chromium") or shutil.which("chromium-browser")) or not shutil.which("chromedriver"):
        return "headless Chromium is not installed (apt-get install chromium chromium-driver; .ci/run does)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_page(url: str, server: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the app exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"the app did not answer on {url} within {timeout} s:\n{log.read_text()[-3000:]}")


def _chrome():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,860"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def _pick_query(gallery: Path, captions: dict[str, str]) -> tuple[str, str]:
    """A (caption, file) the demo teacher ranks its own image first for, with a clear margin (checked with the
    pipeline the app uses: the same ranking, ITC then ITM re-ranking)."""
    from transformers import pipeline

    retrieval = pipeline("image-text-retrieval", model=DEMO_TEACHER_DIR, trust_remote_code=True)
    names = sorted(captions)
    for name in names:
        hits = retrieval(captions[name], gallery=[gallery / n for n in names], top_k=2, rerank_k=len(names))
        if names[hits[0]["index"]] == name and hits[0]["score"] - hits[1]["score"] > 2.0:
            return captions[name], name
    pytest.fail("the demo teacher ranks no scene's own description first with a margin")


@pytest.mark.slow
def test_app_in_browser(tmp_path):
    """Serve the page (`efficientvlm app --serve`), then in headless Chromium: a text query shows the expected scene
    first, an uploaded scene gets a caption, an empty query shows a message; every asset comes from the app."""
    missing = _browser_missing()
    if missing:
        pytest.skip(f"browser test: {missing}")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    gallery = tmp_path / "gallery"
    query, expected = _pick_query(gallery, scene_gallery(gallery))
    port, log = _free_port(), tmp_path / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "efficientvlm.training.commands.cli", "app", "--model", DEMO_TEACHER_DIR,
               "--gallery", str(gallery), "--output_dir", str(tmp_path / "app"), "--serve", "true", "--port",
               str(port)]
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    browser = None
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_for_page(url, server, log)
        browser = _chrome()
        wait = WebDriverWait(browser, 120)
        browser.get(url)
        box = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#text-query textarea"))
        box.send_keys(query)
        browser.find_element(By.ID, "text-button").click()
        first = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#text-results .caption-label"))[0]
        assert first.text.startswith(expected), (first.text, expected)
        browser.save_screenshot(str(tmp_path / "app.png"))
        if os.environ.get("EFFICIENTVLM_UPDATE_SCREENSHOT"):
            from PIL import Image

            Image.open(tmp_path / "app.png").convert("RGB").quantize(64).save(SCREENSHOT, optimize=True)

        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        browser.find_element(By.ID, "text-button").click()
        wait.until(lambda b: "Type a query" in b.find_element(By.ID, "text-status").text)

        browser.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Caption')]").click()
        upload = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#caption-image input[type=file]"))
        upload.send_keys(str(gallery / expected))
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#caption-image img"))
        browser.find_element(By.ID, "caption-button").click()
        caption = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#caption-output textarea")
                             .get_attribute("value").strip())
        assert len(caption.split()) >= 3, caption

        page = browser.find_element(By.TAG_NAME, "body").text
        assert "Traceback" not in page
        resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert resources and all(r.startswith((url, "data:", "blob:")) for r in resources), resources  # no CDN
    finally:
        if browser is not None:
            browser.quit()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
