"""`glip-detect`: zero-shot detection on image files from the command line.

    glip-detect IMAGE_OR_FOLDER [...] (--labels "cat, remote control" | --caption "a cat on a couch" [--phrases "a cat; a couch"])
                [--model DIR_OR_REPO] [--threshold 0.3] [--candidate_threshold T] [--top_k N] [--output_dir detections]
                [--min_size S] [--max_size L] [--batch_size B] [--num_workers W]

A folder stands for its image files (by extension, sorted, not recursive). The prompt is encoded once for all images
(`processing.fixed_prompt.FixedPromptDetector`); `--num_workers` processes decode and resize the next images while the
model runs, and `--batch_size` images of the same padded canvas share a forward (results equal to one at a time;
benchmarks/README.md "Many images" says which settings pay on which machine).

The image resize is the checkpoint's (its saved processor; printed at start) unless --min_size / --max_size are given.
Flags use underscores; the dashed spellings (`--output-dir`, `--top-k`, `--candidate-threshold`) are accepted too.

Prints a table per image and writes into the output directory:

* `detections.json`: COCO results, a JSON list of {"image_id", "category_id", "bbox": [x, y, w, h], "score"};
* `detections_info.json`: the run as a COCO dataset without annotations ("images", "categories": ids follow the order
  of --labels / --phrases) plus "failed_images", so that
  `COCO("detections_info.json").loadRes("detections.json")` (pycocotools) loads the results;
* an annotated PNG per image (`<stem>_detections.png`, numbered when two inputs share a stem); an image whose short
  side is under 480 px is drawn enlarged to 480 px (boxes scaled with it), so that its labels stay legible.

An image that cannot be read or processed is reported on one line and skipped; both JSON files are always written
(atomically), also when images fail or the run is interrupted. While the run lasts, every finished image is also
appended to `detections.partial.jsonl` (flushed to disk), so that a run killed outright (kill -9, power loss) loses at
most the image in progress: the same command again resumes after the finished images (other settings or inputs
start over), and the journal is removed once a run completes. Exit status: 0, 1 when some image failed, 2 for bad
arguments, 130 when interrupted. Works offline with a local checkpoint.

The prompt, model loading, detection, annotation and report pieces are shared with `glip-app` (modeling_glip/app.py).
"""

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from processing import post_processing_limits
from processing.atomic_files import append_durably, write_atomically, write_json_atomically
from processing.fixed_prompt import FixedPromptDetector, detect_files

from .command_line import GLIPArgumentParser, ResolutionError, checked_model_path, keep_freed_memory, load_processor, non_negative_int, positive_int

# the bundled demo checkpoint: the repository's checkpoints/glip-demo (source checkout, `pip install -e .`), or the copy
# that `pip install .` installs as package data (setup.py maps it to modeling_glip/glip_demo)
DEMO_CHECKPOINTS = (Path(__file__).resolve().parent.parent / "checkpoints" / "glip-demo", Path(__file__).resolve().parent / "glip_demo")
DEFAULT_THRESHOLD = 0.3
# images whose short side is smaller are annotated on an enlarged copy, so that the label tags stay legible
MIN_ANNOTATED_SIDE = 480
CONVERT_HINT = (
    "Convert the official GLIP weights first, e.g.\n"
    "  python -m modeling_glip.convert_glip_original_to_hf --checkpoint glip_tiny_model_o365_goldg_cc_sbu.pth --output glip-t\n"
    "then use the folder glip-t as the model."
)
# 20 colours far apart from each other (one per category, cycled)
PALETTE = (
    "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c", "#fabebe",
    "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000", "#ffd8b1", "#000075", "#808080",
)  # fmt: skip


def _fraction(include_one: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not 0.0 <= value <= 1.0 or (value == 1.0 and not include_one):
            raise argparse.ArgumentTypeError(f"must be in [0, {'1]' if include_one else '1)'}, got {text}")
        return value

    return parse


def default_model() -> Path:
    """The bundled demo checkpoint's folder (the first of `DEMO_CHECKPOINTS` that exists, else the first)."""
    return next((path for path in DEMO_CHECKPOINTS if (path / "config.json").is_file()), DEMO_CHECKPOINTS[0])


def build_parser() -> argparse.ArgumentParser:
    parser = GLIPArgumentParser(prog="glip-detect", description="GLIP zero-shot object detection on image files.")
    parser.add_argument("images", nargs="+", help="image files, or folders of them")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--labels", help='comma-separated class names, e.g. "cat, remote control"')
    prompt.add_argument("--caption", help="a free caption; its phrases are scored (see --phrases)")
    parser.add_argument(
        "--phrases", help='phrases of --caption to detect, separated by ";" or "," (default: the caption split at "." and ",")'
    )
    parser.add_argument("--model", default=str(default_model()), help="checkpoint directory or Hub repo id (default: the bundled demo checkpoint)")
    parser.add_argument("--threshold", type=_fraction(True), default=DEFAULT_THRESHOLD, help="report detections whose score is >= this")
    parser.add_argument(
        "--candidate_threshold",
        type=_fraction(False),
        help="GLIP's candidate threshold on the label probability before centerness (INFERENCE_TH; default: the model config's)",
    )
    parser.add_argument("--top_k", type=positive_int, default=None, help="keep at most this many detections per image")
    parser.add_argument("--output_dir", default="detections", help="where detections.json, detections_info.json and the annotated PNGs go")
    parser.add_argument("--min_size", type=positive_int, help="resize the short side to this (default: the checkpoint processor's)")
    parser.add_argument("--max_size", type=positive_int, help="cap on the resized long side (default: the checkpoint processor's)")
    parser.add_argument("--batch_size", type=positive_int, default=1, help="images of one canvas size per forward")
    parser.add_argument("--num_workers", type=non_negative_int, default=0, help="processes that decode and resize images ahead of the model")
    return parser


IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


def expand_image_paths(arguments: Sequence[str]) -> List[str]:
    """Image arguments -> files: a folder becomes its files with an image suffix (sorted, not recursive), anything
    else is kept as given (a missing or unreadable file fails on its own line later). ValueError names a folder
    without images."""
    paths = []
    for argument in arguments:
        folder = Path(argument)
        if folder.is_dir():
            found = sorted(str(path) for path in folder.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"images: folder {argument!r} holds no image file ({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        else:
            paths.append(argument)
    return paths


def build_prompt(labels: Optional[str] = None, caption: Optional[str] = None, phrases: Optional[str] = None) -> dict:
    """Processor text arguments from the user's text: `labels` ("cat, remote control") or `caption` with optional
    `phrases` ("a cat; a couch", default: the caption split at "." and ","). Raises ValueError for an empty prompt or
    a wrong combination; each message starts with the name of the argument at fault."""
    if (labels is None) == (caption is None):
        raise ValueError(f"labels or caption: give exactly one, got {'both' if labels is not None else 'neither'}")
    if labels is not None:
        if phrases is not None:
            raise ValueError("phrases needs a caption (phrases are parts of a caption, not of labels)")
        names = [label.strip() for label in labels.split(",") if label.strip()]
        if not names:
            raise ValueError("labels is empty: give at least one class name")
        return {"text": names}
    caption = caption.strip()
    if not caption:
        raise ValueError("caption is empty")
    source, separators = (phrases, r"[;,]") if phrases else (caption, r"[.,]")
    names = [phrase.strip() for phrase in re.split(separators, source) if phrase.strip()]
    if not names:
        raise ValueError("phrases is empty" if phrases else "caption has no phrase (it is only punctuation)")
    return {"text": caption, "phrases": names}


def category_names(prompt: dict) -> List[str]:
    """Names in prompt order: category i + 1 of the outputs is names[i] (post-processing's label i)."""
    return list(prompt["phrases"] if "phrases" in prompt else prompt["text"])


def load_model(model_path: str, min_size: Optional[int] = None, max_size: Optional[int] = None):
    """-> (model in eval mode, its processor with the given resize overrides); prints the processor settings used.
    ValueError (with how to convert the official weights) when the checkpoint cannot be loaded; `ResolutionError` (a
    ValueError) for overrides that the checkpoint's processor cannot take."""
    import modeling_glip  # noqa: F401  (registers GLIP with the Auto classes)
    from transformers import AutoModelForZeroShotObjectDetection

    if not isinstance(model_path, str) or not model_path.strip():
        raise ValueError(f"no checkpoint folder or Hub repo id given (got {model_path!r})")
    try:
        model = AutoModelForZeroShotObjectDetection.from_pretrained(model_path).eval()
        processor, summary = load_processor(model_path, min_size=min_size, max_size=max_size)
    except ResolutionError:  # --min_size / --max_size: an argument error for the caller to report
        raise
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot load a GLIP checkpoint from {model_path!r} ({reason}).\n{CONVERT_HINT}") from None
    print(f"model: {model_path}; {summary}")
    return model, processor


def prompt_detector(model, processor, prompt: dict, threshold: float, limits: dict) -> FixedPromptDetector:
    """The detector of `prompt` (`build_prompt`'s) reporting scores >= `threshold`."""
    return FixedPromptDetector(model, processor, prompt["text"], phrases=prompt.get("phrases"), threshold=threshold, **limits)


def keep_top(detections: dict, top_k: Optional[int]) -> dict:
    """The `top_k` best of one image's detections (all for None)."""
    return {name: values[:top_k] for name, values in detections.items()}


def detect(model, processor, image: Image.Image, prompt: dict, threshold: float, top_k: Optional[int], limits: dict) -> dict:
    """One image -> {"scores", "labels", "text_labels", "boxes" (xyxy in image pixels)} with score >= `threshold`, best first."""
    return keep_top(prompt_detector(model, processor, prompt, threshold, limits)([image])[0], top_k)


def _text_colour(colour: str) -> str:
    red, green, blue = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else "white"


def annotate(image: Image.Image, detections: dict) -> Image.Image:
    """Boxes and "name score" tags drawn on a copy of `image`: one colour per category, a filled tag behind the text,
    line width and font scaled to the image, tags kept inside the frame. The best detection is drawn last (on top).

    An image whose short side is under `MIN_ANNOTATED_SIDE` is drawn on a copy enlarged to that short side (boxes
    scaled with it), so that the tags of a small image stay legible; the returned image then has that size."""
    scale = max(1.0, MIN_ANNOTATED_SIDE / min(image.size))
    canvas = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS) if scale > 1 else image.copy()
    draw = ImageDraw.Draw(canvas)
    short_side = min(canvas.size)
    line_width = max(1, round(short_side / 250))
    font = ImageFont.load_default(size=max(9, round(short_side / 35)))
    padding = max(1, line_width)
    drawn = zip(detections["labels"].tolist(), detections["text_labels"], detections["scores"].tolist(), detections["boxes"].tolist())
    for label, name, score, box in reversed(list(drawn)):
        box = [coordinate * scale for coordinate in box]
        colour = PALETTE[label % len(PALETTE)]
        draw.rectangle(box, outline=colour, width=line_width)
        text = f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tag_width, tag_height = right - left + 2 * padding, bottom - top + 2 * padding
        x = min(max(box[0], 0), max(canvas.width - tag_width, 0))
        y = box[1] - tag_height if box[1] - tag_height >= 0 else box[1]  # above the box when it fits, else inside
        y = min(max(y, 0), max(canvas.height - tag_height, 0))
        draw.rectangle((x, y, x + tag_width, y + tag_height), fill=colour)
        draw.text((x + padding - left, y + padding - top), text, fill=_text_colour(colour), font=font)
    return canvas


def print_table(path: str, detections: dict) -> None:
    print(f"\n{path}: {len(detections['scores'])} detection(s)")
    if len(detections["scores"]):
        print(f"  {'label':<24} {'score':>6}   box (xmin, ymin, xmax, ymax)")
    for name, score, box in zip(detections["text_labels"], detections["scores"].tolist(), detections["boxes"].tolist()):
        print(f"  {name:<24} {score:6.3f}   ({box[0]:7.1f}, {box[1]:7.1f}, {box[2]:7.1f}, {box[3]:7.1f})")


def annotated_names(paths: Sequence[str]) -> List[str]:
    """One output PNG name per input: `<stem>_detections.png`, or, when two inputs share a stem (a/x.png, b/x.png),
    every name prefixed with its zero-padded input index, which keeps them unique."""
    stems = [Path(path).stem for path in paths]
    if len(set(stems)) == len(stems):
        return [f"{stem}_detections.png" for stem in stems]
    width = len(str(len(paths) - 1))
    return [f"{index:0{width}d}_{stem}_detections.png" for index, stem in enumerate(stems)]


def coco_results(image_id: int, detections: dict) -> List[dict]:
    """`detect`'s output as COCO results records ({"image_id", "category_id", "bbox": [x, y, w, h], "score"}); category
    ids are 1-based positions in the prompt (see `category_names`)."""
    results = []
    for label, score, box in zip(detections["labels"].tolist(), detections["scores"].tolist(), detections["boxes"].tolist()):
        x1, y1, x2, y2 = box
        results.append({"image_id": image_id, "category_id": label + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    return results


def image_record(image_id: int, file_name: str, image: Image.Image, annotated_image: str) -> dict:
    """The "images" entry of detections_info.json for one processed image."""
    return {"id": image_id, "file_name": file_name, "width": image.width, "height": image.height, "annotated_image": annotated_image}


class ResultJournal:
    """`detections.partial.jsonl` in the output directory: the run's settings on the first line, then one line per
    finished image ({"index", "image": its detections_info record, "results": its COCO results}), each flushed and
    fsync'ed as it is written. A killed run leaves it behind; `finished()` gives the images a rerun with the same
    settings can skip (a torn last line, from a kill mid-write, is ignored)."""

    NAME = "detections.partial.jsonl"

    def __init__(self, output_dir: Path, settings: dict):
        self.path = Path(output_dir) / self.NAME
        self.settings = json.loads(json.dumps(settings))  # as read back (tuples -> lists)

    def finished(self) -> dict:
        """index -> {"image", "results"} of a previous run with the same settings; {} when there is none."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return {}
        entries = []
        for line in lines:
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                break  # torn by a kill mid-write: everything before it stands
        if not entries or entries[0] != {"settings": self.settings}:
            return {}
        # a line of any other shape (not written by `append`) is not trusted: its image is detected again
        return {entry["index"]: entry for entry in entries[1:] if isinstance(entry, dict) and entry.keys() == {"index", "image", "results"} and isinstance(entry["index"], int)}

    def start(self, finished: dict) -> None:
        """Rewrite the journal with the settings and the `finished` entries kept from a previous run."""
        lines = [{"settings": self.settings}, *(finished[index] for index in sorted(finished))]
        write_atomically(self.path, lambda handle: handle.write("".join(json.dumps(line) + "\n" for line in lines).encode()))

    def append(self, index: int, image: dict, results: list) -> None:
        append_durably(self.path, json.dumps({"index": index, "image": image, "results": results}) + "\n")

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def write_reports(output_dir: Path, results: list, images: list, categories: List[str], failures: list) -> None:
    categories = [{"id": index + 1, "name": name} for index, name in enumerate(categories)]
    info = {"images": images, "categories": categories, "failed_images": failures}
    for name, content in (("detections.json", results), ("detections_info.json", info)):
        write_json_atomically(output_dir / name, content)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        prompt = build_prompt(args.labels, args.caption, args.phrases)
    except ValueError as error:
        parser.error(f"--{error}")  # the message starts with the argument's name
    try:
        model_path = checked_model_path(args.model, "--model")
    except ValueError as error:
        if args.model == str(default_model()):  # an installed package without its data, or a moved checkout
            error = ValueError(f"{error}. The bundled demo checkpoint is missing: pass --model with a checkpoint folder (e.g. checkpoints/glip-demo of the glip-hf repository)")
        parser.error(str(error))
    keep_freed_memory()
    try:
        model, processor = load_model(model_path, args.min_size, args.max_size)
    except ResolutionError as error:
        parser.error(str(error))
    except ValueError as error:
        raise SystemExit(f"glip-detect: {error}")
    try:
        processor(text=prompt["text"], phrases=prompt.get("phrases"))  # duplicates, unknown phrases, too long: before any image
    except ValueError as error:
        parser.error(f"{'--labels' if args.labels is not None else '--caption / --phrases'}: {_one_line(error)}")
    try:
        paths = expand_image_paths(args.images)
    except ValueError as error:
        parser.error(str(error))
    limits = post_processing_limits(model.config, candidate_threshold=args.candidate_threshold)
    output_dir = Path(args.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--output_dir {output_dir}: {_one_line(error)}")

    categories = category_names(prompt)
    results, images, failures = [], [], []
    png_names = annotated_names(paths)
    settings = {"model": model_path, "prompt": prompt, "threshold": args.threshold, "top_k": args.top_k, "limits": limits}
    settings.update(image_processor=json.loads(processor.image_processor.to_json_string()), images=[str(Path(path).resolve()) for path in paths])
    journal = ResultJournal(output_dir, settings)
    finished = {
        index: entry for index, entry in journal.finished().items() if 0 <= index < len(paths) and (output_dir / png_names[index]).is_file()
    }
    if finished:
        print(f"glip-detect: resuming: {len(finished)} of {len(paths)} image(s) already done ({journal.path})", file=sys.stderr)
    elif journal.path.exists():
        print(f"glip-detect: {journal.path} is from a run with other settings or inputs: starting over", file=sys.stderr)
    for entry in finished.values():
        images.append(entry["image"])
        results.extend(entry["results"])
    journal.start(finished)
    remaining = [index for index in range(len(paths)) if index not in finished]
    done = len(finished)
    detector = prompt_detector(model, processor, prompt, args.threshold, limits)
    completed = False
    try:
        files = detect_files(detector, [paths[index] for index in remaining], args.batch_size, args.num_workers)
        for item in tqdm(files, total=len(remaining), desc="images", unit="img", disable=len(remaining) < 2):
            index, error = remaining[item.index], item.error
            if error is None:
                detections = keep_top(item.result, args.top_k)
                try:
                    write_atomically(output_dir / png_names[index], lambda handle: annotate(item.image, detections).save(handle, format="PNG"))
                except (ValueError, OSError) as failure:
                    error = f"{type(failure).__name__}: {_one_line(failure)}"
            if error is not None:  # this image only: unreadable, too elongated, out of memory, annotation not writable
                failures.append({"file_name": item.path, "error": error})
                print(f"glip-detect: skipped {item.path}: {error}", file=sys.stderr)
                continue
            print_table(item.path, detections)
            images.append(image_record(index, item.path, item.image, png_names[index]))
            image_results = coco_results(index, detections)
            results.extend(image_results)
            journal.append(index, images[-1], image_results)
            done += 1
        completed = True
    except KeyboardInterrupt:
        print(f"\nglip-detect: interrupted after {done + len(failures)} of {len(paths)} image(s); the same command resumes", file=sys.stderr)
        return 130
    finally:  # whatever happened, the finished images are on disk, in input order
        images.sort(key=lambda record: record["id"])
        results.sort(key=lambda record: record["image_id"])
        write_reports(output_dir, results, images, categories, failures)
        if completed:  # an interrupted or crashed run keeps its journal for the rerun
            journal.remove()
    print(f"\nwrote {output_dir / 'detections.json'}, {output_dir / 'detections_info.json'} and {done} annotated image(s) to {output_dir}/")
    if failures:
        print(f"glip-detect: {len(failures)} of {len(paths)} image(s) failed (listed in detections_info.json)", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
