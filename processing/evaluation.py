"""Run a GLIP model over a COCO-format dataset and turn its outputs into the inputs of the repository's `evaluate`
metrics (`metrics/coco_detection`, `metrics/grounding_recall`).

Long vocabularies are split into prompt chunks by `GLIPProcessor` (one text row per chunk) and merged back per image
by its `post_process_grounded_object_detection`, as the original's TEST.CHUNKED_EVALUATION (section 9).
"""

import json
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .fixed_prompt import FixedPromptDetector
from .image_conversion import load_rgb_image
from .training_data import coco_json_to_records


def load_coco_evaluation_set(annotation_file: Union[str, Path]) -> Tuple[List[dict], List[dict]]:
    """-> (records with all annotations, crowd ones included, as COCO evaluates them; sorted categories)."""
    data = json.loads(Path(annotation_file).read_text())
    records, categories = coco_json_to_records(annotation_file)
    if categories is None:
        raise ValueError(f"{annotation_file} has no `categories`: it is not a detection evaluation set")
    by_image: Dict[int, List[dict]] = {}
    for annotation in data["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    for record in records:
        record["annotations"] = by_image.get(record["image_id"], [])
    return records, categories


def coco_references(records: Sequence[dict]) -> List[dict]:
    """Records of `load_coco_evaluation_set` -> `coco_detection` metric references (COCO xywh boxes)."""
    references = []
    for record in records:
        annotations = record["annotations"]
        references.append(
            {
                "image_id": record["image_id"],
                "boxes": [list(a["bbox"]) for a in annotations],
                "labels": [a["category_id"] for a in annotations],
                "iscrowd": [int(a.get("iscrowd", 0)) for a in annotations],
                "area": [float(a.get("area", a["bbox"][2] * a["bbox"][3])) for a in annotations],
            }
        )
    return references


def metrics_table(rows: Sequence[Tuple[str, Mapping[str, float]]], key: str = "step") -> str:
    """Evaluation results as a text table: one row per (label, metrics) pair (e.g. one per evaluation step), one
    column per metric name (in first-seen order), numbers with 3 decimals (-1: no ground truth for that metric)."""
    names: List[str] = []
    for _, metrics in rows:
        names += [name for name in metrics if name not in names]
    cells = [[key, *names]] + [[str(label), *(f"{metrics[name]:.3f}" if name in metrics else "" for name in names)] for label, metrics in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(cells[0]))]
    lines = ["  ".join(cell.rjust(width) if column else cell.ljust(width) for column, (cell, width) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join([lines[0], "  ".join("-" * width for width in widths), *lines[1:]])


def legacy_xyxy_to_coco(boxes: torch.Tensor) -> torch.Tensor:
    """(K, 4) xyxy detections -> COCO (x, y, w, h) with the legacy +1 width / height, as the original's COCO
    evaluation (`BoxList.convert("xywh")`, TO_REMOVE = 1, section 8)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((x1, y1, x2 - x1 + 1, y2 - y1 + 1), dim=-1)


@torch.no_grad()
def predict_coco(
    model,
    processor,
    records: Iterable[dict],
    categories: Sequence[dict],
    image_root: Optional[Union[str, Path]] = None,
    names_per_chunk: Optional[int] = None,
    candidate_threshold: float = 0.05,
    max_detections: int = 100,
) -> List[dict]:
    """Detect every category in every record's image -> `coco_detection` metric predictions (one dict per image).

    The prompt's text features are computed once (`FixedPromptDetector`); images are run one at a time (the text rows
    of its prompt chunks form the batch).

    Args:
        model: a `GLIPModel` (put in eval mode by the caller).
        processor: a `GLIPProcessor`; its image processor sets the test resolution.
        records: records with `image_id` and `file_name`.
        categories: COCO categories ({"id", "name"}); prompts list them in this order.
        image_root: folder the `file_name`s are relative to.
        names_per_chunk: optional cap on class names per prompt chunk (TEST.CHUNKED_EVALUATION).
        candidate_threshold, max_detections: post-processing (INFERENCE_TH, DETECTIONS_PER_IMG per chunk); no
            final-score cut, as the original's evaluation.
    """
    names = [category["name"] for category in categories]
    ids = [category["id"] for category in categories]
    detector = FixedPromptDetector(model, processor, names, names_per_chunk=names_per_chunk, candidate_threshold=candidate_threshold, max_detections=max_detections)
    predictions = []
    for record in records:
        path = Path(image_root) / record["file_name"] if image_root is not None else Path(record["file_name"])
        (result,) = detector([load_rgb_image(path)])
        predictions.append(
            {
                "image_id": record["image_id"],
                "boxes": legacy_xyxy_to_coco(result["boxes"].float().cpu()).tolist(),
                "scores": result["scores"].float().cpu().tolist(),
                "labels": [ids[label] for label in result["labels"].tolist()],
            }
        )
    return predictions


@torch.no_grad()
def predict_grounding(
    model,
    processor,
    image,
    caption: str,
    phrase_spans: Sequence[Tuple[int, int]],
    candidate_threshold: float = 0.0,
    max_detections: int = 100,
) -> List[List[List[float]]]:
    """Ground each phrase of a caption -> per phrase its predicted xyxy boxes (original image pixels), by decreasing
    score: the `grounding_recall` metric's predictions (the original's Flickr30K inference, section 9)."""
    device = next(model.parameters()).device
    inputs = processor(images=[image], text=caption, phrase_spans=list(phrase_spans)).to(device)
    outputs = model(**inputs)
    result = processor.post_process_grounded_object_detection(
        outputs, inputs, target_sizes=[(image.height, image.width)], candidate_threshold=candidate_threshold, max_detections=max_detections
    )[0]
    ranked: List[List[List[float]]] = [[] for _ in phrase_spans]
    for box, label in zip(result["boxes"].float().cpu().tolist(), result["labels"].tolist()):  # already by decreasing score
        ranked[label].append(box)
    return ranked
