"""`glip-app`: zero-shot detection in the browser, a local Gradio page over the same pieces as `glip-detect`.

    glip-app [--model DIR_OR_REPO] [--port 7860]

Serves http://127.0.0.1:PORT (this machine only). Upload or pick an example image, type class names
("cat, remote control") or a caption (with optional phrases), set the score threshold and the number of detections,
press Detect. The page shows the annotated image and a table of the detections, and offers `glip-detect`'s files for
download (detections.json, detections_info.json, the annotated PNG). Bad input (no image, an unreadable image, an empty
prompt, a phrase that is not in the caption, a threshold outside [0, 1], a checkpoint that does not load) is one
message in the page. Each checkpoint is loaded once (the last `MODELS_KEPT` stay in memory).

The same detection is the API endpoint `/detect` (gradio_client: `Client(url).predict(handle_file(path), "Labels",
"cat, dog", "", "", 0.3, 20, model_path, api_name="/detect")`).

Needs the `app` extra (`pip install -e ".[app]"`: gradio); nothing else in the package imports this module.
"""

import argparse
import functools
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

from PIL import Image

from processing import load_rgb_image, post_processing_limits
from processing.atomic_files import write_atomically
from processing.post_processing_glip import check_fraction, check_integer

from .command_line import GLIPArgumentParser, checked_model_path, keep_freed_memory
from .cli import (
    DEFAULT_THRESHOLD,
    annotate,
    annotated_names,
    build_prompt,
    category_names,
    coco_results,
    default_model,
    detect,
    image_record,
    load_model,
    write_reports,
)

HOST = "127.0.0.1"  # never another interface: the page reads any checkpoint path typed into it
DEFAULT_PORT = 7860
DEFAULT_MAX_DETECTIONS = 20
IMAGE_HEIGHT = 360  # pixels of the input and output image boxes
MODELS_KEPT = 2
RESULTS_KEPT = 64  # result folders (downloads) kept on disk; older ones are removed
PROMPT_KINDS = ("Labels", "Caption")
TABLE_HEADERS = ["label", "score", "xmin", "ymin", "xmax", "ymax"]
EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
DEMO_LABELS = "yellow star, blue ring, green square, red triangle, purple heart, orange cross"
DEMO_CAPTION = "a yellow star above a green square and a blue ring beside a red triangle"
# image, prompt kind, labels, caption, phrases, threshold, max detections (the scenes: examples/demo/build_glip_demo.py)
EXAMPLES = (
    ("demo_scene.png", "Labels", DEMO_LABELS, "", "", 0.5, DEFAULT_MAX_DETECTIONS),
    ("demo_scene.png", "Caption", "", DEMO_CAPTION, "yellow star; green square; blue ring; red triangle", 0.55, DEFAULT_MAX_DETECTIONS),
    ("app/fresh_scene_2.png", "Labels", "green square, blue heart, orange diamond, orange cross", "", "", 0.5, DEFAULT_MAX_DETECTIONS),
    ("app/fresh_scene_13.png", "Labels", "blue triangle, red diamond, green cross, purple square, orange cross", "", "", 0.5, DEFAULT_MAX_DETECTIONS),
)  # fmt: skip
# small images (the demo scenes are 160 px) are scaled up to the image boxes' height
CSS = "#image img, #annotated img {width: 100%; height: 100%; object-fit: contain}"
INTRO = """# GLIP zero-shot detection
Name what to find, as class names or as phrases of a caption. The bundled checkpoint (`checkpoints/glip-demo`) is a
small GLIP trained on synthetic shapes only: it knows 6 colours x 8 shapes (e.g. "red triangle"). For real photos,
convert the official weights and enter the folder under *Model*."""


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


@functools.lru_cache(maxsize=MODELS_KEPT)
def cached_model(model_path: str) -> tuple:
    """(model, processor, post-processing limits) of a checkpoint, loaded once per path (ValueError: see `load_model`)."""
    model, processor = load_model(checked_model_path(model_path, "model"))
    return model, processor, post_processing_limits(model.config)


def _uploaded_image(image: Union[None, dict, str, os.PathLike]) -> Tuple[Image.Image, str]:
    """(RGB image, file name) of the page's image input: Gradio's file payload ({"path", "orig_name", ...}) or a path."""
    if image is None:
        raise ValueError("image: none given, upload an image or pick an example below")
    if isinstance(image, dict):
        path = image.get("path")
        if not isinstance(path, str):
            raise ValueError(f"image: the upload has no file path ({sorted(image)})")
        name = image.get("orig_name") or Path(path).name
    elif isinstance(image, (str, os.PathLike)):
        path = name = os.fspath(image)
    else:
        raise TypeError(f"image must be an uploaded file or a path, got {type(image).__name__}")
    try:
        return load_rgb_image(path), name
    except ValueError as error:  # name the file as the user knows it, not by its server-side upload path
        raise ValueError(str(error).replace(path, name)) from None


def _prompt(kind: str, labels: Optional[str], caption: Optional[str], phrases: Optional[str]) -> dict:
    if kind not in PROMPT_KINDS:
        raise ValueError(f"prompt kind must be one of {PROMPT_KINDS}, got {kind!r}")
    if kind == "Labels":
        return build_prompt(labels=labels or "")
    return build_prompt(caption=caption or "", phrases=(phrases or "").strip() or None)


def _prune(folder: Path, keep: int) -> None:
    """Remove all but the `keep` newest result folders in `folder`."""
    results = sorted((path for path in folder.iterdir() if path.is_dir()), key=lambda path: path.stat().st_mtime)
    for old in results[: max(len(results) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)


def run_detection(
    image,
    prompt_kind: str,
    labels: Optional[str],
    caption: Optional[str],
    phrases: Optional[str],
    threshold,
    max_detections,
    model_path: str,
    output_root: Path,
    progress: Callable[[float, str], None] = lambda fraction, description: None,
) -> Tuple[Image.Image, List[list], List[str], str]:
    """The page's Detect, without Gradio: (annotated image, table rows (TABLE_HEADERS), paths of detections.json,
    detections_info.json and the annotated PNG, a one-line summary). The files are glip-detect's, for this one image,
    in a new folder under `output_root`. Raises ValueError / TypeError naming the input at fault; cheap checks come
    before the model is loaded."""
    loaded, name = _uploaded_image(image)
    prompt = _prompt(prompt_kind, labels, caption, phrases)
    threshold = check_fraction("threshold", threshold)
    max_detections = check_integer("max detections", max_detections, 1)
    progress(0.1, "loading the model")
    try:
        model, processor, limits = cached_model(model_path.strip() if isinstance(model_path, str) else model_path)
    except ValueError as error:
        raise ValueError(f"model: {error}") from None
    try:  # duplicate names, a phrase not in the caption, a prompt over the length limit
        processor(text=prompt["text"], phrases=prompt.get("phrases"))
    except ValueError as error:
        raise ValueError(f"{'labels' if prompt_kind == 'Labels' else 'caption / phrases'}: {_one_line(error)}") from None
    progress(0.3, "detecting")
    start = time.perf_counter()
    detections = detect(model, processor, loaded, prompt, threshold, max_detections, limits)
    seconds = time.perf_counter() - start
    annotated = annotate(loaded, detections)

    folder = Path(output_root) / uuid.uuid4().hex
    folder.mkdir(parents=True)
    (png_name,) = annotated_names([name])
    write_atomically(folder / png_name, lambda handle: annotated.save(handle, format="PNG"))
    write_reports(folder, coco_results(0, detections), [image_record(0, name, loaded, png_name)], category_names(prompt), [])
    _prune(Path(output_root), RESULTS_KEPT)

    rows = [
        [label, round(score, 3), *(round(value, 1) for value in box)]
        for label, score, box in zip(detections["text_labels"], detections["scores"].tolist(), detections["boxes"].tolist())
    ]
    found = f"{len(rows)} detection(s)" if rows else "No detection: lower the threshold or check the names"
    summary = f"{found} at threshold {threshold:g} in {seconds:.2f} s"
    files = [str(folder / "detections.json"), str(folder / "detections_info.json"), str(folder / png_name)]
    return annotated, rows, files, summary


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local demo: no usage reports unless asked for
    try:
        import gradio
    except ImportError:
        raise SystemExit('glip-app needs gradio: pip install -e ".[app]"') from None
    return gradio


def build_app(model_path: Optional[str] = None, output_root: Optional[Union[str, Path]] = None):
    """The page as a `gradio.Blocks` (not launched) with `model_path` (default: the bundled demo checkpoint) in its model
    field; downloads go under `output_root` (default: a new temporary folder)."""
    gr = _gradio()
    model_path = str(default_model()) if model_path is None else model_path
    output_root = Path(output_root) if output_root is not None else Path(tempfile.mkdtemp(prefix="glip-app-"))

    def on_detect(image, kind, labels, caption, phrases, threshold, max_detections, model, progress=gr.Progress()):
        try:
            return run_detection(
                image, kind, labels, caption, phrases, threshold, max_detections, model, output_root,
                progress=lambda fraction, description: progress(fraction, desc=description),
            )  # fmt: skip
        except (ValueError, TypeError, OSError, RuntimeError) as error:  # bad input, unreadable file, out of memory
            raise gr.Error(_one_line(error), print_exception=False) from None

    def show_prompt_fields(kind):
        return gr.update(visible=kind == "Labels"), gr.update(visible=kind == "Caption"), gr.update(visible=kind == "Caption")

    with gr.Blocks(title="GLIP zero-shot detection", delete_cache=(3600, 3600)) as app:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"], label="Image", height=IMAGE_HEIGHT, elem_id="image")
                kind = gr.Radio(list(PROMPT_KINDS), value="Labels", label="Prompt", elem_id="prompt-kind")
                labels = gr.Textbox(label="Labels", placeholder="class names, comma separated: red triangle, blue ring", elem_id="labels")
                caption = gr.Textbox(label="Caption", placeholder="a red triangle next to a blue ring", visible=False, elem_id="caption")
                phrases = gr.Textbox(
                    label="Phrases (optional)", placeholder='parts of the caption, ";" separated (default: split at "." and ",")',
                    visible=False, elem_id="phrases",
                )  # fmt: skip
                with gr.Row():
                    threshold = gr.Number(value=DEFAULT_THRESHOLD, step=0.05, label="Threshold (score, 0-1)", elem_id="threshold")
                    max_detections = gr.Number(value=DEFAULT_MAX_DETECTIONS, precision=0, step=1, label="Max detections", elem_id="max-detections")
                with gr.Accordion("Model", open=False):
                    model = gr.Textbox(value=model_path, label="Checkpoint folder or Hub repo id", elem_id="model")
                run = gr.Button("Detect", variant="primary", elem_id="detect")
            with gr.Column():
                annotated = gr.Image(type="pil", format="png", label="Detections", interactive=False, height=IMAGE_HEIGHT, elem_id="annotated")
                summary = gr.Markdown(elem_id="summary")
                table = gr.Dataframe(headers=TABLE_HEADERS, label="Detections (boxes in image pixels)", interactive=False, elem_id="detections")
                downloads = gr.File(file_count="multiple", label="glip-detect files", interactive=False, elem_id="downloads")
        inputs = [image, kind, labels, caption, phrases, threshold, max_detections]
        examples = [[str(EXAMPLES_DIR / row[0]), *row[1:]] for row in EXAMPLES if (EXAMPLES_DIR / row[0]).is_file()]
        if examples:  # an installed (non-editable) package has no examples folder
            gr.Examples(examples, inputs, label="Examples")
        kind.change(show_prompt_fields, kind, [labels, caption, phrases], queue=False, api_visibility="private")
        # raw inputs (preprocess=False): the image reaches processing.load_rgb_image as the uploaded file, numbers as sent
        gr.on(
            [run.click, labels.submit, caption.submit, phrases.submit], on_detect, [*inputs, model], [annotated, table, downloads, summary],
            api_name="detect", preprocess=False, concurrency_limit=1,
        )  # fmt: skip
    return app


def build_parser() -> argparse.ArgumentParser:
    parser = GLIPArgumentParser(prog="glip-app", description=f"GLIP zero-shot detection in the browser (serves http://{HOST}:PORT).")
    parser.add_argument("--model", default=str(default_model()), help="the page's default checkpoint folder or Hub repo id (default: the bundled demo checkpoint)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port on {HOST} (default {DEFAULT_PORT})")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.port <= 65535:
        build_parser().error(f"argument --port: must be in [1, 65535], got {args.port}")
    keep_freed_memory()
    with tempfile.TemporaryDirectory(prefix="glip-app-") as output_root:
        page = build_app(args.model, output_root)
        try:
            page.launch(server_name=HOST, server_port=args.port, css=CSS)
        except OSError as error:  # the port is taken
            raise SystemExit(f"glip-app: {_one_line(error)}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
