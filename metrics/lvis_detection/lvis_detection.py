"""LVIS box AP (the official `lvis` API) as an `evaluate` metric, standard or Fixed AP; load it offline with
`evaluate.load("metrics/lvis_detection/lvis_detection.py")`."""

import contextlib
import json
import logging
import numbers
import tempfile
import warnings
from pathlib import Path

import datasets
import evaluate

from .detection_inputs import box_list_feature, check_boxes, check_known_ids, check_same_lengths, check_values, prediction_features
from .lvis_compat import load_lvis_api

_DESCRIPTION = """
LVIS box detection metrics computed by the official LVIS API (lvis 0.5.3) from per-image predictions and federated
ground truth: AP over IoU 0.50:0.95, AP50, AP75, AP by object size (APs / APm / APl), AP of the rare / common /
frequent categories (APr / APc / APf) and AR. A detection of a category that is neither annotated in its image nor in
the image's `neg_category_ids` is not evaluated; an unmatched detection of a category in `not_exhaustive_category_ids`
is not a false positive.

Protocols:
* "standard" (the LVIS challenge): the `max_detections` (300) best detections of each image.
* "fixed" (Fixed AP, Dave et al., "Evaluating Large-Vocabulary Object Detectors: The Devil is in the Details", 2021;
  the protocol of GLIP's LVIS tables): no per-image cap; the `max_detections_per_category` (10,000) best detections of
  each category over the whole evaluated set (ties kept in input order), as the original GLIP's
  `LvisEvaluatorFixedAP` (maskrcnn_benchmark/data/datasets/evaluation/lvis/lvis_eval.py).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one dict per image: `image_id` (int), `boxes` (list of COCO [x, y, w, h] in pixels), `scores`
        (list of floats), `labels` (list of category ids).
    references: one dict per image: `image_id`, `boxes` (COCO [x, y, w, h]), `labels` (category ids), `area` (per
        box; LVIS uses the segment area, pass w * h for boxes only), `neg_category_ids` (categories verified absent
        from the image), `not_exhaustive_category_ids` (categories whose instances are not all annotated).
    categories (list of dicts, required): every category of the vocabulary: `id` (int) and `frequency` ("r", "c"
        or "f": in < 10, 10-100 or > 100 training images), as the `categories` of an LVIS annotation file.
    protocol (str, defaults to "standard"): "standard" or "fixed" (see above).
    max_detections (int, defaults to 300): standard protocol: detections per image (LVIS's official value: 300).
    max_detections_per_category (int, defaults to 10000): fixed protocol: detections per category over the data set.
    image_ids (list of ints or path, optional): evaluate these images only (e.g. LVIS MiniVal); a path names a JSON
        list of ids, an LVIS-format annotation file (its `images`) or a text file with one id per line. References
        and predictions of other images are not evaluated; every listed image must have a reference.
    Every number must be finite and every box have a non-negative width and height; every category id must be one of
    `categories`; an image_id may appear once in the references and once in the predictions. Anything else is a
    ValueError naming the image and the field.
Returns:
    AP, AP50, AP75, APs, APm, APl, APr, APc, APf and AR@N, ARs@N, ARm@N, ARl@N with N = max_detections (standard) or
    "all" (fixed: no per-image cap); -1 where no ground truth exists (e.g. no rare category in the evaluated images).
Example:
    >>> metric = evaluate.load("metrics/lvis_detection/lvis_detection.py")
    >>> metric.add_batch(predictions=[{"image_id": 1, "boxes": [[10, 10, 20, 20]], "scores": [0.9], "labels": [3]}],
    ...                  references=[{"image_id": 1, "boxes": [[10, 10, 20, 20]], "labels": [3], "area": [400.0],
    ...                               "neg_category_ids": [], "not_exhaustive_category_ids": []}])
    >>> round(metric.compute(categories=[{"id": 3, "frequency": "r"}], protocol="fixed")["APr"], 6)
    1.0
"""

PROTOCOLS = ("standard", "fixed")
FREQUENCIES = ("r", "c", "f")
AREA_RANGES = {"s": (0.0, 32.0**2), "m": (32.0**2, 96.0**2), "l": (96.0**2, 1e5**2)}  # LVISEval's Params.area_rng


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_categories(categories) -> dict:
    """-> {id: frequency}; each category a dict with an integer `id` (once) and a `frequency` in r / c / f."""
    if not isinstance(categories, (list, tuple)) or not categories:
        raise ValueError(f"categories must be a non-empty list of {{'id', 'frequency'}} dicts (an LVIS file's), got {categories!r}")
    frequency_of = {}
    for index, category in enumerate(categories):
        if not isinstance(category, dict) or isinstance(category.get("id"), bool) or not isinstance(category.get("id"), numbers.Integral):
            raise ValueError(f"categories[{index}] = {category!r} has no integer `id`")
        if category["id"] in frequency_of:
            raise ValueError(f"categories[{index}]: category id {category['id']} appears twice")
        if category.get("frequency") not in FREQUENCIES:
            raise ValueError(f"categories[{index}] (id {category['id']}): frequency {category.get('frequency')!r} is not one of 'r', 'c', 'f'")
        frequency_of[int(category["id"])] = category["frequency"]
    return frequency_of


def read_image_ids(image_ids) -> list:
    """`image_ids` as a list of ints: a sequence, or a path to a JSON list, an LVIS-format json (its images) or a text
    file with one id per line."""
    if isinstance(image_ids, (str, Path)):
        path = Path(image_ids)
        if not path.is_file():
            raise ValueError(f"image_ids: {path} is not a file")
        text = path.read_text()
        if path.suffix == ".json":
            data = json.loads(text)
            image_ids = [image["id"] for image in data["images"]] if isinstance(data, dict) and "images" in data else data
        else:
            try:
                image_ids = [int(line) for line in text.split()]
            except ValueError as error:
                raise ValueError(f"image_ids: {path} must hold one integer image id per line ({error})") from None
    if not isinstance(image_ids, (list, tuple)) or not image_ids:
        raise ValueError(f"image_ids must be a non-empty list of image ids or a file of them, got {image_ids!r}")
    seen = set()
    for index, image_id in enumerate(image_ids):
        if isinstance(image_id, bool) or not isinstance(image_id, numbers.Integral):
            raise ValueError(f"image_ids[{index}] = {image_id!r} is not an integer image id")
        if image_id in seen:
            raise ValueError(f"image_ids lists image {image_id} twice")
        seen.add(image_id)
    return [int(image_id) for image_id in image_ids]


def _ground_truth(references, frequency_of: dict, selected) -> dict:
    """Checked references -> an LVIS-format dataset of the selected images."""
    images, annotations, seen = [], [], set()
    for reference in references:
        image_id = reference["image_id"]
        if image_id in seen:
            raise ValueError(f"image_id {image_id} appears in several references")
        seen.add(image_id)
        check_same_lengths("reference", image_id, reference, ("boxes", "labels", "area"))
        check_boxes("reference", image_id, reference["boxes"])
        check_values("reference", image_id, "area", reference["area"], minimum=0.0)
        for field in ("labels", "neg_category_ids", "not_exhaustive_category_ids"):
            check_known_ids("reference", image_id, field, reference[field], frequency_of)
        both = sorted(set(reference["labels"]) & set(reference["neg_category_ids"]))
        if both:
            raise ValueError(f"reference of image {image_id}: neg_category_ids lists annotated categories {both}")
        if selected is not None and image_id not in selected:
            continue
        images.append(
            {
                "id": image_id,
                "neg_category_ids": list(reference["neg_category_ids"]),
                "not_exhaustive_category_ids": list(reference["not_exhaustive_category_ids"]),
            }
        )
        for box, label, area in zip(reference["boxes"], reference["labels"], reference["area"]):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "bbox": list(box), "category_id": label, "area": area})
    if selected is not None and selected - seen:
        raise ValueError(f"image_ids lists images without a reference: {sorted(selected - seen)[:10]}")
    categories = [{"id": category_id, "frequency": frequency} for category_id, frequency in frequency_of.items()]
    return {"images": images, "annotations": annotations, "categories": categories}


def _detections(predictions, frequency_of: dict, referenced, evaluated) -> list:
    """Checked predictions of the evaluated images -> LVIS result dicts."""
    detections, predicted = [], set()
    for prediction in predictions:
        image_id = prediction["image_id"]
        if image_id not in referenced:
            raise ValueError(f"prediction for image_id {image_id}, which has no reference")
        if image_id in predicted:
            raise ValueError(f"image_id {image_id} appears in several predictions: give all detections of an image in one")
        predicted.add(image_id)
        check_same_lengths("prediction", image_id, prediction, ("boxes", "scores", "labels"))
        check_boxes("prediction", image_id, prediction["boxes"])
        check_values("prediction", image_id, "scores", prediction["scores"])
        check_known_ids("prediction", image_id, "labels", prediction["labels"], frequency_of)
        if image_id in evaluated:
            detections += [
                {"image_id": image_id, "bbox": list(box), "score": score, "category_id": label}
                for box, score, label in zip(prediction["boxes"], prediction["scores"], prediction["labels"])
            ]
    return detections


def top_per_category(detections: list, limit: int) -> list:
    """Fixed AP's cap: the `limit` highest-scoring detections of each category over the whole set (stable order)."""
    by_category = {}
    for detection in detections:
        by_category.setdefault(detection["category_id"], []).append(detection)
    return [kept for group in by_category.values() for kept in sorted(group, key=lambda d: -d["score"])[:limit]]


def _without_detections(ground_truth: dict, frequency_of: dict, suffix: str) -> dict:
    """What LVISEval gives when nothing is detected (its results loader refuses an empty list): 0 for every group
    with ground truth, -1 for the others."""
    areas = [annotation["area"] for annotation in ground_truth["annotations"]]
    frequencies = {frequency_of[annotation["category_id"]] for annotation in ground_truth["annotations"]}
    has = {"AP": bool(areas), "AP50": bool(areas), "AP75": bool(areas), f"AR@{suffix}": bool(areas)}
    for size, (low, high) in AREA_RANGES.items():
        has[f"AP{size}"] = has[f"AR{size}@{suffix}"] = any(low <= area <= high for area in areas)
    has.update({f"AP{frequency}": frequency in frequencies for frequency in FREQUENCIES})
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"] + [f"AR{size}@{suffix}" for size in ("", "s", "m", "l")]
    return {name: 0.0 if has[name] else -1.0 for name in names}  # in LVISEval's order


@contextlib.contextmanager
def _quiet(logger_name: str):
    """lvis logs a warning (through the deprecated `Logger.warn`) on every in-memory result list: silence both for
    the duration of one computation."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The 'warn' method is deprecated", category=DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LvisDetection(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Gupta et al., LVIS: A Dataset for Large Vocabulary Instance Segmentation, CVPR 2019; "
            "Dave et al., Evaluating Large-Vocabulary Object Detectors: The Devil is in the Details, 2021.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": prediction_features(),
                    "references": {
                        "image_id": datasets.Value("int64"),
                        "boxes": box_list_feature(),
                        "labels": datasets.Sequence(datasets.Value("int64")),
                        "area": datasets.Sequence(datasets.Value("float64")),
                        "neg_category_ids": datasets.Sequence(datasets.Value("int64")),
                        "not_exhaustive_category_ids": datasets.Sequence(datasets.Value("int64")),
                    },
                }
            ),
        )

    def _compute(
        self,
        predictions,
        references,
        categories=None,
        protocol: str = "standard",
        max_detections: int = 300,
        max_detections_per_category: int = 10000,
        image_ids=None,
    ):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        max_detections = _check_count("max_detections", max_detections, 1)
        max_detections_per_category = _check_count("max_detections_per_category", max_detections_per_category, 1)
        frequency_of = _check_categories(categories)
        selected = set(read_image_ids(image_ids)) if image_ids is not None else None
        ground_truth = _ground_truth(references, frequency_of, selected)
        evaluated = {image["id"] for image in ground_truth["images"]}
        detections = _detections(predictions, frequency_of, {reference["image_id"] for reference in references}, evaluated)
        suffix = str(max_detections) if protocol == "standard" else "all"
        if not detections:
            return _without_detections(ground_truth, frequency_of, suffix)
        if protocol == "fixed":
            detections = top_per_category(detections, max_detections_per_category)
        LVIS, LVISResults, LVISEval = load_lvis_api()
        with tempfile.TemporaryDirectory() as folder, _quiet("lvis"):
            path = Path(folder) / "ground_truth.json"
            path.write_text(json.dumps(ground_truth))
            lvis_ground_truth = LVIS(str(path))
            results = LVISResults(lvis_ground_truth, detections, max_dets=max_detections if protocol == "standard" else -1)
            evaluation = LVISEval(lvis_ground_truth, results, iou_type="bbox")
            evaluation.params.max_dets = max_detections if protocol == "standard" else -1  # only names the AR results
            evaluation.run()
        return {name.replace("@-1", "@all"): float(value) for name, value in evaluation.get_results().items()}
