#!/usr/bin/env python
"""Evaluate a GLIPModel on any COCO-format dataset: COCO box mAP (detection) or Flickr30K-protocol recall@1/5/10
(grounding, MDETR-style json whose images carry a `caption` and annotations `tokens_positive`).

    python examples/evaluate_glip.py --model path/to/glip --annotations instances_val2017.json --images val2017/
    python examples/evaluate_glip.py --model path/to/glip --annotations final_flickr_separateGT_val.json \
        --images flickr30k/ --task grounding

Large vocabularies (LVIS) are split into prompt chunks (`--names_per_chunk 40` as the original's LVIS command line;
chunks are also bounded by the 256-token prompt limit). Prints the metrics as JSON and writes them with --output.

`--task lvis` runs zero-shot LVIS (an LVIS-format json: MiniVal or val v1.0) with the original's settings
(`processing/lvis_evaluation.py`: chunks of 40 names, 300 detections per chunk, text features once) and reports
Fixed AP (`--protocol fixed`, the paper's) or the standard 300-per-image AP, with APr / APc / APf. Per-image
detections are cached in `--cache_dir`: rerunning the same command resumes an interrupted run.

    python examples/evaluate_glip.py --task lvis --model path/to/glip --annotations lvis_v1_minival.json --images coco/ \
        --cache_dir runs/lvis_minival
"""

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

import evaluate
import torch
from transformers import BertTokenizer

from modeling_glip.modeling_glip import GLIPModel
from processing import GLIPImageProcessor, GLIPProcessor
from processing.image_conversion import load_rgb_image
from processing.evaluation import coco_references, load_coco_evaluation_set, predict_coco, predict_grounding
from processing.lvis_evaluation import (
    LVIS_DETECTIONS_PER_CHUNK,
    LVIS_NAMES_PER_CHUNK,
    ChunkedVocabularyDetector,
    DetectionCache,
    cached_predictions,
    load_lvis_evaluation_set,
    run_detection,
)
from processing.training_data import coco_json_to_records

METRICS = Path(__file__).resolve().parents[1] / "metrics"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="GLIPModel folder (save_pretrained / converted checkpoint)")
    parser.add_argument("--tokenizer", help="BERT tokenizer folder (default: --model)")
    parser.add_argument("--annotations", required=True, help="COCO-format json (detection) or MDETR-style json (grounding)")
    parser.add_argument("--images", help="image folder the json's file_name are relative to")
    parser.add_argument("--task", choices=("detection", "grounding", "lvis"), default="detection")
    parser.add_argument("--min_size", type=int, default=800)
    parser.add_argument("--max_size", type=int, default=1333)
    parser.add_argument("--names_per_chunk", type=int, help="class names per prompt chunk (TEST.CHUNKED_EVALUATION)")
    parser.add_argument("--threshold", type=float, default=0.05, help="candidate score threshold (INFERENCE_TH)")
    parser.add_argument("--max_detections", type=int, help="detections per prompt chunk (DETECTIONS_PER_IMG; default 100, lvis 300)")
    parser.add_argument("--protocol", choices=("fixed", "standard"), default="fixed", help="lvis: Fixed AP (the paper's) or 300 per image")
    parser.add_argument("--cache_dir", default="lvis_detections", help="lvis: folder of the per-image detections (resumable)")
    parser.add_argument("--max_images", type=int, help="evaluate the first N images only")
    parser.add_argument("--merge_boxes", action="store_true", help="grounding: 'merged' ground truth instead of 'separate'")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", help="write the metrics JSON here")
    args = parser.parse_args(argv)
    if args.max_detections is None:
        args.max_detections = LVIS_DETECTIONS_PER_CHUNK if args.task == "lvis" else 100
    if args.task == "lvis" and args.names_per_chunk is None:
        args.names_per_chunk = LVIS_NAMES_PER_CHUNK
    return args


def evaluate_lvis(model, processor, args) -> dict:
    """Zero-shot LVIS: detections of every image (cached, resumable), then the lvis_detection metric."""
    records, categories, references = load_lvis_evaluation_set(args.annotations)
    records, references = records[: args.max_images], references[: args.max_images]
    names = [category["name"] for category in categories]
    settings = {
        "model": str(Path(args.model).resolve()),
        "min_size": args.min_size,
        "max_size": args.max_size,
        "names_per_chunk": args.names_per_chunk,
        "candidate_threshold": args.threshold,
        "max_detections": args.max_detections,
        "categories": [[category["id"], category["name"]] for category in categories],
    }
    cache = DetectionCache(args.cache_dir, settings)
    detector = ChunkedVocabularyDetector(model, processor, names, args.names_per_chunk, args.threshold, args.max_detections)
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
    args = parse_args(argv)
    model = GLIPModel.from_pretrained(args.model).to(args.device).eval()
    tokenizer = BertTokenizer.from_pretrained(args.tokenizer or args.model)
    processor = GLIPProcessor(GLIPImageProcessor(min_size=args.min_size, max_size=args.max_size), tokenizer, max_text_len=model.config.max_text_len)

    if args.task == "detection":
        records, categories = load_coco_evaluation_set(args.annotations)
        records = records[: args.max_images]
        predictions = predict_coco(model, processor, records, categories, args.images, args.names_per_chunk, args.threshold, args.max_detections)
        metric = evaluate.load(str(METRICS / "coco_detection" / "coco_detection.py"))
        results = metric.compute(predictions=predictions, references=coco_references(records))
    elif args.task == "lvis":
        results = evaluate_lvis(model, processor, args)
    else:
        records, _ = coco_json_to_records(args.annotations)
        predictions, references = [], []
        for record in records[: args.max_images]:
            if not record.get("caption"):
                raise ValueError(f"image {record['image_id']} has no caption: not a grounding annotation file")
            # one phrase per distinct span; its ground truth = every box grounded to it (Flickr30K "separate")
            phrase_boxes = {}
            for annotation in record["annotations"]:
                x, y, w, h = annotation["bbox"]
                for start, end in annotation.get("tokens_positive") or []:
                    phrase_boxes.setdefault((int(start), int(end)), []).append([x, y, x + w, y + h])
            if not phrase_boxes:
                continue
            spans = sorted(phrase_boxes)
            path = Path(args.images) / record["file_name"] if args.images else Path(record["file_name"])
            ranked = predict_grounding(model, processor, load_rgb_image(path), record["caption"], spans, max_detections=args.max_detections)
            predictions += [{"boxes": boxes} for boxes in ranked]
            references += [{"boxes": phrase_boxes[span]} for span in spans]
        metric = evaluate.load(str(METRICS / "grounding_recall" / "grounding_recall.py"))
        results = metric.compute(predictions=predictions, references=references, merge_boxes=args.merge_boxes)
    print(json.dumps(results, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
