#!/usr/bin/env python
"""Evaluate a GLIPModel on any COCO-format dataset: COCO box mAP (detection) or Flickr30K-protocol recall@1/5/10
(grounding, MDETR-style json whose images carry a `caption` and annotations `tokens_positive`).

    python examples/evaluate_glip.py --model path/to/glip --annotations instances_val2017.json --images val2017/
    python examples/evaluate_glip.py --model path/to/glip --annotations final_flickr_separateGT_val.json \
        --images flickr30k/ --task grounding

Large vocabularies (LVIS) are split into prompt chunks (`--names_per_chunk 40` as the original's LVIS command line;
chunks are also bounded by the 256-token prompt limit). Prints the metrics as JSON and writes them with --output.
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
from processing.training_data import coco_json_to_records

METRICS = Path(__file__).resolve().parents[1] / "metrics"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="GLIPModel folder (save_pretrained / converted checkpoint)")
    parser.add_argument("--tokenizer", help="BERT tokenizer folder (default: --model)")
    parser.add_argument("--annotations", required=True, help="COCO-format json (detection) or MDETR-style json (grounding)")
    parser.add_argument("--images", help="image folder the json's file_name are relative to")
    parser.add_argument("--task", choices=("detection", "grounding"), default="detection")
    parser.add_argument("--min_size", type=int, default=800)
    parser.add_argument("--max_size", type=int, default=1333)
    parser.add_argument("--names_per_chunk", type=int, help="class names per prompt chunk (TEST.CHUNKED_EVALUATION)")
    parser.add_argument("--threshold", type=float, default=0.05, help="candidate score threshold (INFERENCE_TH)")
    parser.add_argument("--max_detections", type=int, default=100, help="detections per prompt chunk (DETECTIONS_PER_IMG)")
    parser.add_argument("--max_images", type=int, help="evaluate the first N images only")
    parser.add_argument("--merge_boxes", action="store_true", help="grounding: 'merged' ground truth instead of 'separate'")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", help="write the metrics JSON here")
    return parser.parse_args(argv)


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
