"""Features and checks of per-image detection inputs shared by the box metrics (`coco_detection`, `lvis_detection`).

`evaluate.load` copies a metric script together with the modules it imports relatively FROM ITS OWN FOLDER, so each
metric folder holds `detection_inputs.py` as a symbolic link to this one file: one implementation, and every metric
script stays loadable on its own with `evaluate.load("metrics/<name>/<name>.py")`.
Each check raises a ValueError that names the record kind ("reference" / "prediction"), the image and the field.
"""

import math
from typing import Iterable, Mapping, Sequence

import datasets


def box_list_feature() -> datasets.Sequence:
    """Per image: a list of [x, y, w, h] boxes."""
    return datasets.Sequence(datasets.Sequence(datasets.Value("float64"), length=4))


def prediction_features() -> dict:
    """The `predictions` record of the box metrics: image id, boxes, scores, category ids."""
    return {
        "image_id": datasets.Value("int64"),
        "boxes": box_list_feature(),
        "scores": datasets.Sequence(datasets.Value("float64")),
        "labels": datasets.Sequence(datasets.Value("int64")),
    }


def check_values(kind: str, image_id: int, field: str, values, minimum: float = -math.inf) -> None:
    """Every value finite and >= minimum."""
    for index, value in enumerate(values):
        if not math.isfinite(value) or value < minimum:
            raise ValueError(f"{kind} of image {image_id}: {field}[{index}] = {value} is not a finite number >= {minimum}")


def check_boxes(kind: str, image_id: int, boxes) -> None:
    """COCO [x, y, w, h] boxes: finite, width and height >= 0 (a NaN box would otherwise count as a perfect match)."""
    for index, box in enumerate(boxes):
        if not all(math.isfinite(value) for value in box):
            raise ValueError(f"{kind} of image {image_id}: boxes[{index}] = {list(box)} is not finite")
        if box[2] < 0 or box[3] < 0:
            raise ValueError(
                f"{kind} of image {image_id}: boxes[{index}] = {list(box)} has a negative width or height (COCO boxes are [x, y, w, h])"
            )


def check_same_lengths(kind: str, image_id: int, record: Mapping, fields: Sequence[str]) -> None:
    """The per-box fields of one record have one length."""
    if len({len(record[name]) for name in fields}) != 1:
        raise ValueError(f"{kind} of image {image_id}: {', '.join(fields[:-1])} and {fields[-1]} differ in length")


def check_known_ids(kind: str, image_id: int, field: str, values: Iterable[int], known) -> None:
    """Every category id of a field is one of the metric's categories."""
    for index, value in enumerate(values):
        if value not in known:
            raise ValueError(f"{kind} of image {image_id}: {field}[{index}] = {value} is not one of the categories")
