"""`glip-detect`: zero-shot detection on image files from the command line.

    glip-detect IMAGE [IMAGE ...] (--labels "cat, remote control" | --caption "a cat on a couch" [--phrases "a cat; a couch"])
                [--model DIR_OR_REPO] [--threshold 0.3] [--top-k N] [--output-dir detections]

Prints a table per image, writes `detections.json` (COCO results format plus the category names) and an annotated
PNG per image into the output directory. Works offline with a local checkpoint.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import draw_bounding_boxes
from tqdm.auto import tqdm

from processing import load_rgb_image, post_processing_limits

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "checkpoints" / "glip-demo"
CONVERT_HINT = (
    "Convert the official GLIP weights first, e.g.\n"
    "  python -m modeling_glip.convert_glip_original_to_hf --checkpoint glip_tiny_model_o365_goldg_cc_sbu.pth --output glip-t\n"
    "then pass --model glip-t."
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="glip-detect", description="GLIP zero-shot object detection on image files.")
    parser.add_argument("images", nargs="+", help="image files")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--labels", help='comma-separated class names, e.g. "cat, remote control"')
    prompt.add_argument("--caption", help="a free caption; its phrases are scored (see --phrases)")
    parser.add_argument("--phrases", help='"; "-separated phrases of --caption to detect (default: the caption split at "." and ",")')
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint directory or Hub repo id (default: the bundled demo checkpoint)")
    parser.add_argument("--threshold", type=float, default=0.3, help="minimum detection score to report (default 0.3)")
    parser.add_argument("--top-k", type=int, default=None, help="keep at most this many detections per image")
    parser.add_argument("--output-dir", default="detections", help="where detections.json and the annotated PNGs go")
    args = parser.parse_args(argv)
    if args.phrases and not args.caption:
        parser.error("--phrases needs --caption")
    return args


def prompt_from_args(args) -> dict:
    """Processor text arguments for the chosen prompt kind; raises ValueError on an empty prompt."""
    if args.labels is not None:
        labels = [label.strip() for label in args.labels.split(",") if label.strip()]
        if not labels:
            raise ValueError("--labels is empty: give at least one class name")
        return {"text": labels}
    caption = args.caption.strip()
    if not caption:
        raise ValueError("--caption is empty")
    separators = ";" if args.phrases else None
    source = args.phrases if args.phrases else caption.replace(",", ".")
    phrases = [p.strip() for p in (source.split(separators) if separators else source.split(".")) if p.strip()]
    return {"text": caption, "phrases": phrases}


def load_model(model_path: str):
    import modeling_glip  # noqa: F401  (registers GLIP with the Auto classes)
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    try:
        model = AutoModelForZeroShotObjectDetection.from_pretrained(model_path).eval()
        processor = AutoProcessor.from_pretrained(model_path)
    except (OSError, ValueError) as error:
        raise SystemExit(f"glip-detect: cannot load a GLIP checkpoint from {model_path!r} ({str(error).splitlines()[0]}).\n{CONVERT_HINT}")
    return model, processor


def detect(model, processor, image: Image.Image, prompt: dict, threshold: float, top_k: Optional[int]) -> dict:
    """One image -> {"scores", "text_labels", "boxes" (xyxy in image pixels)} above `threshold`, best first."""
    inputs = processor(images=[image], text=prompt["text"], phrases=prompt.get("phrases"))
    with torch.no_grad():
        outputs = model(**inputs)
    (result,) = processor.post_process_grounded_object_detection(
        outputs, inputs, target_sizes=[(image.height, image.width)], **post_processing_limits(model.config)
    )
    keep = result["scores"] >= threshold
    indices = keep.nonzero().flatten()[: top_k if top_k else None]
    return {"scores": result["scores"][indices], "labels": result["labels"][indices], "text_labels": [result["text_labels"][i] for i in indices.tolist()], "boxes": result["boxes"][indices]}


def annotate(image: Image.Image, detections: dict) -> Image.Image:
    names = [f"{name} {score:.2f}" for name, score in zip(detections["text_labels"], detections["scores"].tolist())]
    drawn = draw_bounding_boxes(pil_to_tensor(image), detections["boxes"], labels=names, colors="red", width=2)
    return to_pil_image(drawn)


def print_table(path: str, detections: dict) -> None:
    print(f"\n{path}: {len(detections['scores'])} detection(s)")
    if len(detections["scores"]):
        print(f"  {'label':<24} {'score':>6}   box (xmin, ymin, xmax, ymax)")
    for name, score, box in zip(detections["text_labels"], detections["scores"].tolist(), detections["boxes"].tolist()):
        print(f"  {name:<24} {score:6.3f}   ({box[0]:7.1f}, {box[1]:7.1f}, {box[2]:7.1f}, {box[3]:7.1f})")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        prompt = prompt_from_args(args)
    except ValueError as error:
        raise SystemExit(f"glip-detect: {error}")
    model, processor = load_model(args.model)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    categories, results, failures = {}, [], []
    for image_id, path in enumerate(tqdm(args.images, desc="images", unit="img", disable=len(args.images) < 2)):
        try:
            image = load_rgb_image(path)
        except ValueError as error:
            failures.append(path)
            print(f"glip-detect: cannot read image {path}: {error}", file=sys.stderr)
            continue
        detections = detect(model, processor, image, prompt, args.threshold, args.top_k)
        print_table(path, detections)
        annotate(image, detections).save(output_dir / f"{Path(path).stem}_detections.png")
        for name, score, box in zip(detections["text_labels"], detections["scores"].tolist(), detections["boxes"].tolist()):
            category_id = categories.setdefault(name, len(categories) + 1)
            x1, y1, x2, y2 = box
            results.append({"image_id": image_id, "file_name": str(path), "category_id": category_id, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})

    report = {"categories": [{"id": i, "name": n} for n, i in categories.items()], "annotations": results, "failed_images": failures}
    (output_dir / "detections.json").write_text(json.dumps(report, indent=1))
    print(f"\nwrote {output_dir / 'detections.json'} and {len(args.images) - len(failures)} annotated image(s) to {output_dir}/")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
