"""`glip-app`: the detection behind the page (glip-detect's results and files, one message per bad input, the model
cache), the core package without gradio, and the running app through its API (gradio_client) and in headless
Chromium (selenium)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from modeling_glip import app
from modeling_glip.cli import annotate
from modeling_glip.cli import main as glip_detect

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT / "examples" / "demo_scene.png"
DEMO_LABELS = "yellow star, blue ring, green square, red triangle, purple heart, orange cross"
SCENE_OBJECTS = ["blue ring", "green square", "yellow star", "red triangle"]  # what `make demo` finds at 0.5
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")  # Debian's chromium, chromium-driver
START_TIMEOUT_S = 300  # torch + transformers + gradio imports on 2 loaded cores


def annotated_size(path) -> tuple:
    """(width, height) of glip-detect's annotated image of `path` (small images are drawn enlarged)."""
    nothing = {"labels": torch.zeros(0, dtype=torch.long), "text_labels": [], "scores": torch.zeros(0), "boxes": torch.zeros(0, 4)}
    return annotate(Image.open(path), nothing).size


def detect_page(image, output_root, labels=DEMO_LABELS, threshold=0.5, model=str(app.default_model()), **changes):
    arguments = {"prompt_kind": "Labels", "labels": labels, "caption": "", "phrases": "", "threshold": threshold, "max_detections": 20}
    arguments.update(changes)
    return app.run_detection(image, model_path=model, output_root=output_root, **arguments)


def test_page_detection_is_glip_detects(tmp_path):
    annotated, rows, files, summary = detect_page({"path": str(SCENE), "orig_name": "demo_scene.png"}, tmp_path / "app")
    assert [row[0] for row in rows] == SCENE_OBJECTS and summary.startswith("4 detection(s) at threshold 0.5")
    assert [Path(file).name for file in files] == ["detections.json", "detections_info.json", "demo_scene_detections.png"]
    # the same files as glip-detect's for this image (its file name as uploaded), scores and boxes in the table
    assert glip_detect([str(SCENE), "--labels", DEMO_LABELS, "--threshold", "0.5", "--output-dir", str(tmp_path / "cli")]) == 0
    cli_results = json.loads((tmp_path / "cli" / "detections.json").read_text())
    assert json.loads(Path(files[0]).read_text()) == cli_results
    cli_info = json.loads((tmp_path / "cli" / "detections_info.json").read_text())
    cli_info["images"][0]["file_name"] = "demo_scene.png"
    assert json.loads(Path(files[1]).read_text()) == cli_info
    assert np.array_equal(np.asarray(Image.open(files[2])), np.asarray(Image.open(tmp_path / "cli" / "demo_scene_detections.png")))
    assert np.array_equal(np.asarray(annotated), np.asarray(Image.open(files[2])))
    assert len(COCO(files[1]).loadRes(files[0]).getAnnIds()) == 4
    for row, result in zip(rows, cli_results):
        x, y, w, h = result["bbox"]
        assert row[1:] == [round(result["score"], 3), round(x, 1), round(y, 1), round(x + w, 1), round(y + h, 1)]


def test_caption_with_phrases_and_max_detections(tmp_path):
    phrases = ["yellow star", "green square", "blue ring", "red triangle"]
    caption = {"prompt_kind": "Caption", "caption": app.DEMO_CAPTION, "phrases": "; ".join(phrases), "labels": "stale, ignored"}
    _, rows, files, _ = detect_page(str(SCENE), tmp_path, threshold=0.55, **caption)
    assert sorted(row[0] for row in rows) == sorted(phrases)
    assert [c["name"] for c in json.loads(Path(files[1]).read_text())["categories"]] == phrases  # the phrases' order
    _, rows, _, _ = detect_page(str(SCENE), tmp_path, threshold=0.0, max_detections=2)
    assert len(rows) == 2 and rows[0][0] == "blue ring"


def test_no_detection_is_said_not_an_error(tmp_path):
    _, rows, files, summary = detect_page(str(SCENE), tmp_path, threshold=0.99)
    assert rows == [] and summary.startswith("No detection") and json.loads(Path(files[0]).read_text()) == []


@pytest.mark.parametrize(
    "changes, error, message",
    [
        ({"image": None}, ValueError, "image: none given, upload an image"),
        ({"labels": " , "}, ValueError, "labels is empty"),
        ({"labels": None}, ValueError, "labels is empty"),
        ({"labels": "cat, dog, Cat"}, ValueError, "labels: .*duplicate"),
        ({"prompt_kind": "Caption", "caption": "  "}, ValueError, "caption is empty"),
        ({"prompt_kind": "Caption", "caption": "a cat on a couch", "phrases": "a cat; a dog"}, ValueError, "caption / phrases: .*a dog"),
        ({"prompt_kind": "Prompt"}, ValueError, "prompt kind must be one of"),
        ({"threshold": 1.5}, ValueError, r"threshold must be in \[0, 1\], got 1.5"),
        ({"threshold": -0.1}, ValueError, r"threshold must be in \[0, 1\], got -0.1"),
        ({"threshold": None}, TypeError, "threshold must be a number, got None"),
        ({"threshold": "high"}, TypeError, "threshold must be a number, got 'high'"),
        ({"max_detections": 0}, ValueError, "max detections must be an integer >= 1, got 0"),
        ({"max_detections": 2.5}, TypeError, "max detections must be an integer, got 2.5"),
        ({"model": "/no/such/checkpoint"}, ValueError, r"model /no/such/checkpoint: no such folder \(/no/such/checkpoint does not exist\)"),
        ({"model": " "}, ValueError, "model: no checkpoint folder or Hub repo id given"),
    ],
)
def test_bad_input_is_one_message_naming_it(tiny_glip_checkpoint, tmp_path, changes, error, message):
    arguments = {"image": str(SCENE), "model": str(tiny_glip_checkpoint), **changes}
    with pytest.raises(error, match=message):
        detect_page(output_root=tmp_path, **arguments)
    assert not any(tmp_path.iterdir())  # nothing written for a refused request


def test_unreadable_upload_is_named_as_uploaded(tmp_path):
    upload = tmp_path / "upload-cache" / "f3a9" / "holiday.png"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="'holiday.png'.*could not be read") as error:
        detect_page({"path": str(upload), "orig_name": "holiday.png"}, tmp_path / "out")
    assert "upload-cache" not in str(error.value)
    with pytest.raises(TypeError, match="image must be an uploaded file or a path, got int"):
        detect_page(3, tmp_path / "out")


def test_model_is_loaded_once_per_path_and_downloads_are_pruned(tiny_glip_checkpoint, tmp_path, monkeypatch):
    loads = []
    real_load = app.load_model
    monkeypatch.setattr(app, "load_model", lambda path: loads.append(path) or real_load(path))
    monkeypatch.setattr(app, "RESULTS_KEPT", 2)
    app.cached_model.cache_clear()
    try:
        for _ in range(3):
            detect_page(str(SCENE), tmp_path, model=f" {tiny_glip_checkpoint} ", threshold=0.0)
        assert loads == [str(tiny_glip_checkpoint)]
        detect_page(str(SCENE), tmp_path, threshold=0.0)
        assert loads == [str(tiny_glip_checkpoint), str(app.default_model())]
    finally:
        app.cached_model.cache_clear()
    assert len(list(tmp_path.iterdir())) == 2  # the two newest result folders


def test_core_package_does_not_import_gradio_nor_the_app():
    code = (
        "import sys, modeling_glip, processing, modeling_glip.cli; print('modeling_glip.app' in sys.modules, 'gradio' in sys.modules); "
        "import modeling_glip.app; print('gradio' in sys.modules)"  # gradio only when the page is built
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.split()
    assert printed == ["False", "False", "False"]


def test_without_gradio_the_app_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    with pytest.raises(SystemExit, match=r'glip-app needs gradio: pip install -e "\.\[app\]"'):
        app.build_app()


def test_port_must_be_a_port():
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--port", "70000"])
    assert exit_info.value.code == 2


# -- the running app -------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _missing(what: str):
    """Skip (fail on CI, whose .ci/run installs them) when what the running-app tests need is not here."""
    message = f"{what} (pip install -e '.[app,dev]'; apt-get install chromium chromium-driver)"
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the app tests: {message}")
    pytest.skip(message)


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """`python -m modeling_glip.app` (what glip-app runs) on a free port of 127.0.0.1, offline; its URL."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        _missing("gradio is not installed")
    folder = tmp_path_factory.mktemp("glip-app")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.update(GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(folder / "gradio"))
    log = open(folder / "app.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "modeling_glip.app", "--port", str(port)], cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"glip-app did not start (exit {server.poll()}):\n{(folder / 'app.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def test_api_detects_and_refuses_bad_input(app_url):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(app_url, verbose=False)
    image, table, files, summary = client.predict(
        handle_file(str(SCENE)), "Labels", DEMO_LABELS, "", "", 0.5, 20, str(app.default_model()), api_name="/detect"
    )
    assert [row[0] for row in table["data"]] == SCENE_OBJECTS and table["headers"] == app.TABLE_HEADERS
    assert Image.open(image).size == annotated_size(SCENE) and summary.startswith("4 detection(s)")
    assert [Path(file).name for file in files] == ["detections.json", "detections_info.json", "demo_scene_detections.png"]
    assert len(json.loads(Path(files[0]).read_text())) == 4
    with pytest.raises(AppError, match=r"threshold must be in \[0, 1\], got 1.5"):
        client.predict(handle_file(str(SCENE)), "Labels", DEMO_LABELS, "", "", 1.5, 20, str(app.default_model()), api_name="/detect")
    with pytest.raises(AppError, match="caption / phrases: .*purple heart"):
        client.predict(handle_file(str(SCENE)), "Caption", "", "a yellow star", "purple heart", 0.5, 20, str(app.default_model()), api_name="/detect")


@pytest.fixture
def browser(tmp_path):
    try:
        from selenium import webdriver
    except ImportError:
        _missing("selenium is not installed")
    if not (CHROMIUM and CHROMEDRIVER):
        _missing(f"headless Chromium needs chromium and chromedriver on PATH (found {CHROMIUM}, {CHROMEDRIVER})")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--window-size=1280,1400", f"--user-data-dir={tmp_path / 'chromium-profile'}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_browser_upload_labels_detect(app_url, browser, tmp_path):
    """A person's path through the page: upload the scene, type the labels and a threshold, press Detect; the table
    lists the scene's objects, the annotated image shows; then an empty prompt is a message in the page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as shown
    from selenium.webdriver.support.ui import WebDriverWait

    def replace_text(selector, text):
        field = browser.find_element(By.CSS_SELECTOR, selector)
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(Keys.DELETE)
        if text:
            field.send_keys(text)

    def table_rows():
        """The rows of the detections table as shown (its text: the label, the headers, then the cells row by row)."""
        lines = browser.find_element(By.CSS_SELECTOR, "#detections").text.splitlines()
        cells = lines[lines.index("ymax") + 1 :] if lines[-len(app.TABLE_HEADERS) :] != app.TABLE_HEADERS else []
        return [cells[start : start + len(app.TABLE_HEADERS)] for start in range(0, len(cells), len(app.TABLE_HEADERS))]

    wait = WebDriverWait(browser, 240)
    browser.get(app_url)
    wait.until(shown.presence_of_element_located((By.CSS_SELECTOR, "#image input[type=file]"))).send_keys(str(SCENE))
    wait.until(shown.visibility_of_element_located((By.CSS_SELECTOR, "#image img")))  # the upload's preview
    replace_text("#labels textarea", DEMO_LABELS)
    replace_text("#threshold input", "0.5")
    started = time.monotonic()
    browser.find_element(By.CSS_SELECTOR, "#detect").click()
    wait.until(lambda _: len(table_rows()) == len(SCENE_OBJECTS))
    latency = time.monotonic() - started
    assert [row[0] for row in table_rows()] == SCENE_OBJECTS, table_rows()
    shown_image = wait.until(shown.visibility_of_element_located((By.CSS_SELECTOR, "#annotated img")))
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", shown_image) == annotated_size(SCENE)[0]
    assert "4 detection(s) at threshold 0.5" in browser.find_element(By.CSS_SELECTOR, "#summary").text
    browser.save_screenshot(str(tmp_path / "app.png"))
    print(f"\nfirst result {latency:.1f} s after Detect; screenshot {tmp_path / 'app.png'}")

    replace_text("#labels textarea", "")
    browser.find_element(By.CSS_SELECTOR, "#detect").click()
    wait.until(lambda _: "labels is empty: give at least one class name" in browser.find_element(By.TAG_NAME, "body").text)
    browser.save_screenshot(str(tmp_path / "app_error.png"))
