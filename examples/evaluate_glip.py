#!/usr/bin/env python
"""Evaluate a GLIPModel on any COCO-format dataset: COCO box mAP (detection) or Flickr30K-protocol recall@1/5/10
(grounding, MDETR-style json whose images carry a `caption` and annotations `tokens_positive`).

    python examples/evaluate_glip.py --model path/to/glip --annotations instances_val2017.json --images val2017/
    python examples/evaluate_glip.py --model path/to/glip --annotations final_flickr_separateGT_val.json \
        --images flickr30k/ --task grounding

Large vocabularies (LVIS) are split into prompt chunks (`--names_per_chunk 40` as the original's LVIS command line;
chunks are also bounded by the 256-token prompt limit). The images are resized as the checkpoint's saved processor
says (the resolution the model was trained for; printed at start) unless --min_size / --max_size are given. Prints the
metrics as a table and as JSON, and writes the JSON with --output.

`--threshold` was the candidate threshold in earlier versions: it is still accepted as `--candidate_threshold`, with a
deprecation note. There is no final-score cut: COCO mAP ranks every detection (a cut only lowers recall).

`--task lvis` runs zero-shot LVIS (an LVIS-format json: MiniVal or val v1.0) with the original's settings
(`processing/lvis_evaluation.py`: chunks of 40 names, 300 detections per chunk, text features once) and reports
Fixed AP (`--protocol fixed`, the paper's) or the standard 300-per-image AP, with APr / APc / APf. Per-image
detections are cached in `--cache_dir`: rerunning the same command resumes an interrupted run.

    python examples/evaluate_glip.py --task lvis --model path/to/glip --annotations lvis_v1_minival.json --images coco/ \
        --cache_dir runs/lvis_minival
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import evaluate
import torch

from modeling_glip.command_line import GLIPArgumentParser, ResolutionError, checked_model_path, load_processor
from modeling_glip.modeling_glip import GLIPModel
from processing import post_processing_limits
from processing.image_conversion import load_rgb_image
from processing.evaluation import coco_references, load_coco_evaluation_set, metrics_table, predict_coco, predict_grounding
from processing.lvis_evaluation import (
    LVIS_DETECTIONS_PER_CHUNK,
    LVIS_NAMES_PER_CHUNK,
    DetectionCache,
    cached_predictions,
    load_lvis_evaluation_set,
    lvis_detector,
    run_detection,
)
from processing.training_data import coco_json_to_records

METRICS = Path(__file__).resolve().parents[1] / "metrics"


class _DeprecatedThreshold(argparse.Action):
    """`--threshold` of earlier versions: stored as --candidate_threshold, with a note."""

    def __call__(self, parser, namespace, value, option_string=None):
        print(f"{parser.prog}: --threshold is deprecated: it is the candidate threshold; use --candidate_threshold {value}", file=sys.stderr)
        namespace.candidate_threshold = value


def build_parser() -> GLIPArgumentParser:
    parser = GLIPArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="GLIPModel folder (save_pretrained / converted checkpoint) or Hub repo id")
    parser.add_argument("--tokenizer", help="BERT tokenizer folder (default: the checkpoint's)")
    parser.add_argument("--annotations", required=True, help="COCO-format json (detection) or MDETR-style json (grounding)")
    parser.add_argument("--images", help="image folder the json's file_name are relative to (default: the current directory)")
    parser.add_argument("--task", choices=("detection", "grounding", "lvis"), default="detection", help="COCO mAP, grounding recall@k, or LVIS AP")
    parser.add_argument("--min_size", type=int, help="resize: short side (default: the checkpoint processor's)")
    parser.add_argument("--max_size", type=int, help="resize: long-side cap (default: the checkpoint processor's)")
    parser.add_argument("--names_per_chunk", type=int, help="class names per prompt chunk (TEST.CHUNKED_EVALUATION; default: as many as fit, lvis 40)")
    parser.add_argument("--candidate_threshold", type=float, help="candidate threshold on the label probability (INFERENCE_TH; default: the model config's)")
    parser.add_argument("--threshold", type=float, action=_DeprecatedThreshold, dest="candidate_threshold", help="deprecated spelling of --candidate_threshold")
    parser.add_argument("--max_detections", type=int, help="detections per prompt chunk (DETECTIONS_PER_IMG; default: the model config's, lvis 300)")
    parser.add_argument("--protocol", choices=("fixed", "standard"), default="fixed", help="lvis: Fixed AP (the paper's) or 300 per image")
    parser.add_argument("--cache_dir", default="lvis_detections", help="lvis: folder of the per-image detections (resumable)")
    parser.add_argument("--max_images", type=int, help="evaluate the first N images only")
    parser.add_argument("--merge_boxes", action="store_true", help="grounding: 'merged' ground truth instead of 'separate'")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--output", help="write the metrics JSON here")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None, parser: Optional[GLIPArgumentParser] = None) -> argparse.Namespace:
    """The checked flags: sizes and limits in range, --model / --tokenizer existing folders or reachable repo ids."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    for name in ("min_size", "max_size", "names_per_chunk", "max_detections", "max_images"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if args.candidate_threshold is not None and not 0 <= args.candidate_threshold < 1:
        parser.error(f"--candidate_threshold must be in [0, 1), got {args.candidate_threshold}")
    try:
        args.model = checked_model_path(args.model, "--model")
        args.tokenizer = args.tokenizer and checked_model_path(args.tokenizer, "--tokenizer")
    except ValueError as error:
        parser.error(str(error))
    if args.task == "lvis":  # the original's LVIS command line
        args.max_detections = args.max_detections or LVIS_DETECTIONS_PER_CHUNK
        args.names_per_chunk = args.names_per_chunk or LVIS_NAMES_PER_CHUNK
    return args


def evaluate_lvis(model, processor, args, limits: dict) -> dict:
    """Zero-shot LVIS: detections of every image (cached, resumable), then the lvis_detection metric."""
    records, categories, references = load_lvis_evaluation_set(args.annotations)
    records, references = records[: args.max_images], references[: args.max_images]
    names = [category["name"] for category in categories]
    settings = {
        "model": str(Path(args.model).resolve()),
        "min_size": processor.image_processor.min_size,
        "max_size": processor.image_processor.max_size,
        "names_per_chunk": args.names_per_chunk,
        "candidate_threshold": limits["candidate_threshold"],
        "max_detections": limits["max_detections"],
        "categories": [[category["id"], category["name"]] for category in categories],
    }
    cache = DetectionCache(args.cache_dir, settings)
    detector = lvis_detector(model, processor, names, args.names_per_chunk, limits["candidate_threshold"], limits["max_detections"])
    counts = run_detection(detector, records, [category["id"] for category in categories], cache, args.images)
    predictions = cached_predictions(cache, [record["image_id"] for record in records], args.protocol)
    metric = evaluate.load(str(METRICS / "lvis_detection" / "lvis_detection.py"))
    results = metric.compute(predictions=predictions, references=references, categories=categories, protocol=args.protocol)
    protocol = "Fixed AP (10,000 per category, no per-image cap)" if args.protocol == "fixed" else "standard AP (300 per image)"
    skipped = counts["skipped"]
    print(
        f"LVIS {protocol} on {len(records)} images of {Path(args.annotations).name}: {counts['computed']} detected now, "
        f"{counts['cached']} from {args.cache_dir}, {len(skipped)} unreadable (evaluated with no detections)"
    )
    for image_id, reason in list(skipped.items())[:5]:
        print(f"  skipped image {image_id}: {reason}")
    return {**results, "images": len(records), "skipped_images": len(skipped)}  # numbers only (tables format them)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = build_parser()
    args = parse_args(argv, parser)
    try:
        processor, summary = load_processor(args.model, args.tokenizer, args.min_size, args.max_size)
    except ResolutionError as error:
        parser.error(str(error))
    model = GLIPModel.from_pretrained(args.model).to(args.device).eval()
    limits = post_processing_limits(model.config, candidate_threshold=args.candidate_threshold, max_detections=args.max_detections)
    print(f"model: {args.model}; {summary}; candidate_threshold {limits['candidate_threshold']}, max_detections {limits['max_detections']}")

    if args.task == "detection":
        records, categories = load_coco_evaluation_set(args.annotations)
        records = records[: args.max_images]
        predictions = predict_coco(
            model, processor, records, categories, args.images, args.names_per_chunk, limits["candidate_threshold"], limits["max_detections"]
        )
        metric = evaluate.load(str(METRICS / "coco_detection" / "coco_detection.py"))
        results = metric.compute(predictions=predictions, references=coco_references(records))
    elif args.task == "lvis":
        results = evaluate_lvis(model, processor, args, limits)
    else:
        records, _ = coco_json_to_records(args.annotations)
        predictions, references, without_phrases = [], [], []
        for record in records[: args.max_images]:
            if not record.get("caption"):
                raise ValueError(f"image {record['image_id']} has no caption: not a grounding annotation file")
            # one phrase per distinct span; its ground truth = every box grounded to it (Flickr30K "separate")
            phrase_boxes = {}
            for annotation in record["annotations"]:
                x, y, w, h = annotation["bbox"]
                for start, end in annotation.get("tokens_positive") or []:
                    phrase_boxes.setdefault((int(start), int(end)), []).append([x, y, x + w, y + h])
            if not phrase_boxes:  # nothing to ground: counted and named, not scored
                without_phrases.append(record["image_id"])
                continue
            spans = sorted(phrase_boxes)
            path = Path(args.images) / record["file_name"] if args.images else Path(record["file_name"])
            ranked = predict_grounding(model, processor, load_rgb_image(path), record["caption"], spans, max_detections=limits["max_detections"])
            predictions += [{"boxes": boxes} for boxes in ranked]
            references += [{"boxes": phrase_boxes[span]} for span in spans]
        metric = evaluate.load(str(METRICS / "grounding_recall" / "grounding_recall.py"))
        results = metric.compute(predictions=predictions, references=references, merge_boxes=args.merge_boxes)
        results["images_without_phrases"] = len(without_phrases)
        if without_phrases:
            print(f"{len(without_phrases)} images have no box grounded to a phrase and are not scored: {without_phrases[:10]}")
    print(metrics_table([(Path(args.annotations).name, results)], "annotations"))
    print(json.dumps(results, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
