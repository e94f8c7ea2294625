"""COCO box mAP (pycocotools) as an `evaluate` metric; load it offline with
`evaluate.load("metrics/coco_detection/coco_detection.py")`."""

import contextlib
import io
import numbers

import datasets
import evaluate
import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .detection_inputs import box_list_feature, check_boxes, check_same_lengths, check_values, prediction_features

_DESCRIPTION = """
COCO-style box detection metrics (AP over IoU 0.50:0.95, AP50, AP75, AP and AR by object size, AR at 1/10/100
detections) computed by pycocotools from per-image predictions and ground truth.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one dict per image: `image_id` (int), `boxes` (list of COCO [x, y, w, h] in pixels), `scores`
        (list of floats), `labels` (list of category ids).
    references: one dict per image: `image_id`, `boxes` (COCO [x, y, w, h]), `labels` (category ids), `iscrowd`
        (0/1 per box) and `area` (per box; COCO uses the segment area, pass w * h for boxes only).
    max_detections (int, defaults to 100): detections per image for AP (the last of COCO's maxDets), >= 10.
    Every number must be finite and every box have a non-negative width and height; an image_id may appear once in
    the references and once in the predictions; `iscrowd` is 0 or 1. Anything else is a ValueError naming the
    image and the field.
Returns:
    mAP, mAP_50, mAP_75, mAP_small, mAP_medium, mAP_large, mAR_1, mAR_10, mAR_100, mAR_small, mAR_medium,
    mAR_large (pycocotools' 12 stats; -1 where no ground truth exists, e.g. no small objects).
Example:
    >>> metric = evaluate.load("metrics/coco_detection/coco_detection.py")
    >>> metric.add_batch(predictions=[{"image_id": 1, "boxes": [[10, 10, 20, 20]], "scores": [0.9], "labels": [3]}],
    ...                  references=[{"image_id": 1, "boxes": [[10, 10, 20, 20]], "labels": [3], "iscrowd": [0], "area": [400.0]}])
    >>> metric.compute()["mAP_50"]
    1.0
"""

STAT_NAMES = (
    "mAP", "mAP_50", "mAP_75", "mAP_small", "mAP_medium", "mAP_large",
    "mAR_1", "mAR_10", "mAR_100", "mAR_small", "mAR_medium", "mAR_large",
)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CocoDetection(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin et al., Microsoft COCO: Common Objects in Context, ECCV 2014.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": prediction_features(),
                    "references": {
                        "image_id": datasets.Value("int64"),
                        "boxes": box_list_feature(),
                        "labels": datasets.Sequence(datasets.Value("int64")),
                        "iscrowd": datasets.Sequence(datasets.Value("int64")),
                        "area": datasets.Sequence(datasets.Value("float64")),
                    },
                }
            ),
        )

    def _compute(self, predictions, references, max_detections: int = 100):
        if isinstance(max_detections, bool) or not isinstance(max_detections, numbers.Integral) or max_detections < 10:
            raise ValueError(f"max_detections must be an integer >= 10 (COCO's maxDets are 1, 10, max_detections), got {max_detections!r}")
        images, annotations, categories, seen = [], [], set(), set()
        for reference in references:
            image_id = reference["image_id"]
            if image_id in seen:
                raise ValueError(f"image_id {image_id} appears in several references")
            seen.add(image_id)
            fields = ("boxes", "labels", "iscrowd", "area")
            check_same_lengths("reference", image_id, reference, fields)
            check_boxes("reference", image_id, reference["boxes"])
            check_values("reference", image_id, "area", reference["area"], minimum=0.0)
            if any(crowd not in (0, 1) for crowd in reference["iscrowd"]):
                raise ValueError(f"reference of image {image_id}: iscrowd must be 0 or 1, got {reference['iscrowd']}")
            images.append({"id": image_id})
            for box, label, crowd, area in zip(*(reference[name] for name in fields)):
                categories.add(label)
                annotations.append(
                    {"id": len(annotations) + 1, "image_id": image_id, "bbox": list(box), "category_id": label, "iscrowd": crowd, "area": area}
                )
        detections, predicted = [], set()
        for prediction in predictions:
            image_id = prediction["image_id"]
            if image_id not in seen:
                raise ValueError(f"prediction for image_id {image_id}, which has no reference")
            if image_id in predicted:
                raise ValueError(f"image_id {image_id} appears in several predictions: give all detections of an image in one")
            predicted.add(image_id)
            check_same_lengths("prediction", image_id, prediction, ("boxes", "scores", "labels"))
            check_boxes("prediction", image_id, prediction["boxes"])
            check_values("prediction", image_id, "scores", prediction["scores"])
            for box, score, label in zip(prediction["boxes"], prediction["scores"], prediction["labels"]):
                categories.add(label)
                detections.append({"image_id": prediction["image_id"], "bbox": list(box), "score": score, "category_id": label})
        if not detections or not annotations:
            return {name: 0.0 if annotations else -1.0 for name in STAT_NAMES}

        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            ground_truth = COCO()
            ground_truth.dataset = {"images": images, "annotations": annotations, "categories": [{"id": c} for c in sorted(categories)]}
            ground_truth.createIndex()
            evaluation = COCOeval(ground_truth, ground_truth.loadRes(detections), iouType="bbox")
            evaluation.params.maxDets = [1, 10, max_detections]
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        return {name: float(value) for name, value in zip(STAT_NAMES, np.asarray(evaluation.stats))}
