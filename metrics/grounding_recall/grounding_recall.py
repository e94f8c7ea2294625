"""Phrase grounding recall@k with the Flickr30K Entities protocol (as GLIP's / MDETR's `FlickrEvaluator`); load it
offline with `evaluate.load("metrics/grounding_recall/grounding_recall.py")`."""

import numbers

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Recall@k of phrase grounding: a phrase counts as recalled at k when one of its k best-scored predicted boxes has
IoU >= iou_threshold with one of its ground-truth boxes ("separate" protocol, GLIP's default FLICKR_GT_TYPE) or
with the box enclosing all of them (`merge_boxes=True`, the "merged" protocol).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one dict per phrase: `boxes`, the predicted [x1, y1, x2, y2] boxes sorted by decreasing score
        (may be empty: a miss).
    references: one dict per phrase: `boxes`, its ground-truth [x1, y1, x2, y2] boxes (at least one).
    topk (tuple of int, defaults to (1, 5, 10)): the k values (distinct integers >= 1).
    iou_threshold (float, defaults to 0.5): in (0, 1].
    merge_boxes (bool, defaults to False): compare with the enclosing box of the ground truth instead.
    Boxes must be finite with x2 >= x1 and y2 >= y1, and ground-truth boxes must have a positive area; anything else
    is a ValueError naming the phrase and the field.
Returns:
    `recall@k` for each k, and `num_phrases`.
IoU uses continuous box areas ((x2 - x1) * (y2 - y1)), as the Flickr30K evaluator.
"""


def box_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """(N, 4) and (M, 4) xyxy -> (N, M) IoU with continuous areas."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    lt = np.maximum(boxes1[:, None, :2], boxes2[:, :2])
    rb = np.minimum(boxes1[:, None, 2:], boxes2[:, 2:])
    inter = (rb - lt).clip(min=0).prod(axis=-1)
    return inter / (area1[:, None] + area2 - inter)


def _check_arguments(topk, iou_threshold, merge_boxes) -> None:
    if not isinstance(topk, (list, tuple)) or not topk:
        raise ValueError(f"topk must be a non-empty list of integers >= 1, got {topk!r}")
    if any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1 for k in topk) or len(set(topk)) != len(topk):
        raise ValueError(f"topk must hold distinct integers >= 1, got {topk!r}")
    if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, numbers.Real) or not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be a number in (0, 1], got {iou_threshold!r}")
    if not isinstance(merge_boxes, bool):
        raise ValueError(f"merge_boxes must be True or False, got {merge_boxes!r}")


def _boxes(boxes, index: int, kind: str) -> np.ndarray:
    """[x1, y1, x2, y2] boxes of one phrase -> (N, 4) float64; ValueError when not finite or with x2 < x1 / y2 < y1."""
    array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    inverted = (array[:, 2] < array[:, 0]) | (array[:, 3] < array[:, 1])
    for name, bad in (("not finite", ~np.isfinite(array).all(1)), ("x2 < x1 or y2 < y1", inverted)):
        if bad.any():
            row = int(np.argmax(bad))
            raise ValueError(f"{kind} of phrase {index}: boxes[{row}] = {array[row].tolist()} is {name} (boxes are [x1, y1, x2, y2])")
    return array


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GroundingRecall(evaluate.Metric):
    def _info(self):
        boxes = datasets.Sequence(datasets.Sequence(datasets.Value("float64"), length=4))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Plummer et al., Flickr30k Entities, ICCV 2015; Kamath et al., MDETR, ICCV 2021.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": {"boxes": boxes}, "references": {"boxes": boxes}}),
        )

    def _compute(self, predictions, references, topk=(1, 5, 10), iou_threshold: float = 0.5, merge_boxes: bool = False):
        _check_arguments(topk, iou_threshold, merge_boxes)
        hits = {k: 0 for k in topk}
        for index, (prediction, reference) in enumerate(zip(predictions, references)):
            targets = _boxes(reference["boxes"], index, "reference")
            if len(targets) == 0:
                raise ValueError(f"phrase {index} has no ground-truth box")
            areas = (targets[:, 2] - targets[:, 0]) * (targets[:, 3] - targets[:, 1])
            if (areas <= 0).any():
                raise ValueError(f"reference of phrase {index}: boxes[{int(np.argmax(areas <= 0))}] has no area (IoU with it is undefined)")
            if merge_boxes:
                targets = np.concatenate((targets[:, :2].min(0), targets[:, 2:].max(0)))[None]
            ranked = _boxes(prediction["boxes"], index, "prediction")
            if len(ranked) == 0:
                continue
            best = box_iou(ranked, targets).max(axis=1)  # (N,) best IoU of each ranked prediction
            for k in topk:
                hits[k] += int(best[:k].max() >= iou_threshold)
        count = len(references)
        return {**{f"recall@{k}": hits[k] / count if count else 0.0 for k in topk}, "num_phrases": count}
