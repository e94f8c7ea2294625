"""metrics/lvis_detection: agreement with the official lvis API run directly, a hand-checked federated case, standard vs
Fixed AP, the MiniVal subset and bad input. Needs `pip install lvis==0.5.3` (skipped without it)."""

import importlib.util
import json
from pathlib import Path

import evaluate
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
METRIC = REPO / "metrics" / "lvis_detection" / "lvis_detection.py"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lvis") is None, reason="needs the lvis package (pip install lvis==0.5.3)")


@pytest.fixture(scope="module")
def metric():
    return evaluate.load(str(METRIC))


def lvis_api():
    """The official classes (lvis_compat only imports them: no visualiser, np.float for numpy >= 1.24)."""
    spec = importlib.util.spec_from_file_location("lvis_compat", METRIC.parent / "lvis_compat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load_lvis_api()


def reference(image_id, boxes, labels, neg=(), not_exhaustive=()):
    return {
        "image_id": image_id,
        "boxes": boxes,
        "labels": labels,
        "area": [w * h for _, _, w, h in boxes],
        "neg_category_ids": list(neg),
        "not_exhaustive_category_ids": list(not_exhaustive),
    }


def prediction(image_id, detections):
    """detections: (box, score, label) triples."""
    return {
        "image_id": image_id,
        "boxes": [list(box) for box, _, _ in detections],
        "scores": [score for _, score, _ in detections],
        "labels": [label for _, _, label in detections],
    }


def compute(metric, predictions, references, **kwargs):
    """The metric's computation on its own (evaluate's Arrow round trip costs ~1 s a call; it is exercised by
    test_agrees_with_the_official_lvis_api)."""
    return metric._compute(predictions, references, **kwargs)


def random_federated_set(seed=0, images=8, num_categories=6):
    """Random LVIS-style data: boxes of every size, verified-absent and not-exhaustive categories, detections that
    are jittered ground truth, random boxes and categories nobody verified."""
    rng = np.random.default_rng(seed)
    categories = [{"id": c, "frequency": "rcf"[c % 3]} for c in range(1, num_categories + 1)]
    references, predictions = [], []
    for image_id in range(1, images + 1):
        labels = rng.choice(np.arange(1, num_categories + 1), size=int(rng.integers(1, 5))).tolist()
        sides = rng.choice([12.0, 50.0, 140.0], size=len(labels))
        boxes = [[float(rng.uniform(0, 300)), float(rng.uniform(0, 300)), side, side * float(rng.uniform(0.6, 1.4))] for side in sides]
        absent = [c for c in range(1, num_categories + 1) if c not in labels]
        neg = [c for c in absent if rng.random() < 0.5]
        not_exhaustive = [c for c in set(labels) if rng.random() < 0.3]
        references.append(reference(image_id, boxes, labels, neg, not_exhaustive))
        detections = [([x + rng.normal(0, 2), y + rng.normal(0, 2), w, h], float(rng.random()), label) for (x, y, w, h), label in zip(boxes, labels)]
        detections += [
            ([float(rng.uniform(0, 300)), float(rng.uniform(0, 300)), 40.0, 40.0], float(rng.random()), int(rng.integers(1, num_categories + 1)))
            for _ in range(6)
        ]
        predictions.append(prediction(image_id, detections))
    return predictions, references, categories


def official(predictions, references, categories, tmp_path, max_dets=300):
    """The same data through LVIS / LVISResults / LVISEval directly, from an LVIS-format json file."""
    LVIS, LVISResults, LVISEval = lvis_api()
    dataset = {
        "images": [
            {"id": r["image_id"], "neg_category_ids": r["neg_category_ids"], "not_exhaustive_category_ids": r["not_exhaustive_category_ids"]}
            for r in references
        ],
        "annotations": [
            {"id": i, "image_id": image_id, "bbox": box, "category_id": label, "area": area}
            for i, (image_id, box, label, area) in enumerate(
                ((r["image_id"], b, l, a) for r in references for b, l, a in zip(r["boxes"], r["labels"], r["area"])), start=1
            )
        ],
        "categories": categories,
    }
    path = tmp_path / "lvis_gt.json"
    path.write_text(json.dumps(dataset))
    results = [
        {"image_id": p["image_id"], "bbox": b, "score": s, "category_id": l}
        for p in predictions
        for b, s, l in zip(p["boxes"], p["scores"], p["labels"])
    ]
    ground_truth = LVIS(str(path))
    evaluation = LVISEval(ground_truth, LVISResults(ground_truth, results, max_dets=max_dets), iou_type="bbox")
    evaluation.params.max_dets = max_dets
    evaluation.run()
    return {name.replace("@-1", "@all"): float(value) for name, value in evaluation.get_results().items()}


@pytest.mark.filterwarnings("ignore:The .warn. method is deprecated")
def test_agrees_with_the_official_lvis_api(metric, tmp_path):
    predictions, references, categories = random_federated_set()
    expected = official(predictions, references, categories, tmp_path)
    assert 0.05 < expected["AP"] < 0.95 and min(expected[name] for name in ("APr", "APc", "APf", "APs", "APm", "APl")) > -1
    metric.add_batch(predictions=predictions, references=references)
    assert metric.compute(categories=categories) == pytest.approx(expected, abs=1e-12)
    # Fixed AP with a per-category cap above every category's count = no per-image cap at all
    expected_fixed = official(predictions, references, categories, tmp_path, max_dets=-1)
    assert compute(metric, predictions, references, categories=categories, protocol="fixed") == pytest.approx(expected_fixed, abs=1e-12)


A = [10.0, 10.0, 20.0, 20.0]  # disjoint 20 x 20 boxes: IoU 1 with themselves, 0 with each other -> same AP at every IoU
B = [60.0, 10.0, 20.0, 20.0]
C = [110.0, 10.0, 20.0, 20.0]
D = [160.0, 10.0, 20.0, 20.0]


def test_hand_checked_federated_case(metric):
    """Category 1 (rare): 3 ground-truth boxes; category 2 (frequent): 1; category 3 (common): none.
    Category 1's detections by score:
      .95 image 3, unmatched, but 1 is in image 3's not_exhaustive_category_ids -> ignored
      .90 image 1 on A -> TP          .85 image 2 (1 in its neg_category_ids) -> FP
      .80 image 1 on B -> FP          .75 image 3 on A -> TP          .70 image 1 on C -> TP
    TP/FP: T F F T T -> recall 1/3 1/3 1/3 2/3 1, precision 1 .5 .33 .5 .6, interpolated 1 .6 .6 .6 .6.
    101 recall points: 0.00-0.33 (34 points) -> 1, 0.34-1.00 (67 points) -> .6: AP = (34 + 67 * .6) / 101 = 74.2 / 101.
    Category 2: image 1's .99 detection is not evaluated (2 is neither annotated nor verified absent there); image
    2's .60 detection matches: AP 1 (it would be .5 if the .99 counted).
    AP = mean(74.2 / 101, 1); APc = -1 (no common ground truth); every box is small (400 px): APm = APl = -1."""
    references = [
        reference(1, [A, C], [1, 1]),
        reference(2, [D], [2], neg=[1]),
        reference(3, [A], [1], not_exhaustive=[1]),
    ]
    predictions = [
        prediction(1, [(A, 0.90, 1), (B, 0.80, 1), (C, 0.70, 1), (D, 0.99, 2)]),
        prediction(2, [(B, 0.85, 1), (D, 0.60, 2)]),
        prediction(3, [(D, 0.95, 1), (A, 0.75, 1)]),
    ]
    categories = [{"id": 1, "frequency": "r"}, {"id": 2, "frequency": "f"}, {"id": 3, "frequency": "c"}]
    results = compute(metric, predictions, references, categories=categories)
    ap_rare = 74.2 / 101
    expected = {"AP": (ap_rare + 1) / 2, "AP50": (ap_rare + 1) / 2, "AP75": (ap_rare + 1) / 2, "APs": (ap_rare + 1) / 2}
    expected.update({"APm": -1, "APl": -1, "APr": ap_rare, "APc": -1, "APf": 1.0, "AR@300": 1.0, "ARs@300": 1.0, "ARm@300": -1, "ARl@300": -1})
    assert results == pytest.approx(expected, abs=1e-9)


def test_fixed_ap_differs_from_standard_where_the_cap_matters(metric):
    references = [reference(1, [A, B, C], [1, 2, 3]), reference(2, [D], [1])]
    predictions = [prediction(1, [(A, 0.9, 1), (B, 0.8, 2), (C, 0.1, 3), (B, 0.95, 1)]), prediction(2, [(D, 0.5, 1)])]
    categories = [{"id": c, "frequency": "f"} for c in (1, 2, 3)]
    # standard, 3 per image: image 1 keeps .95 (FP of 1), .9 and .8: category 3's only detection is cut -> AP3 = 0
    standard = compute(metric, predictions, references, categories=categories, max_detections=3)
    # fixed: no per-image cap; category 1: FP .95, TP .9, TP .5 -> precision .5, .67 at recall .5, 1 -> AP 2/3
    fixed = compute(metric, predictions, references, categories=categories, protocol="fixed")
    # category 1 in standard: .95 FP, .9 TP (image 1), .5 TP (image 2) -> also 2/3; category 2: 1; category 3: 0 vs 1
    assert standard["APf"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert fixed["APf"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    # the per-CATEGORY cap: 1 detection of category 1 over the set keeps only its FP (.95) -> AP1 = 0
    capped = compute(metric, predictions, references, categories=categories, protocol="fixed", max_detections_per_category=1)
    assert capped["APf"] == pytest.approx((0 + 1 + 1) / 3)
    assert "AR@all" in fixed and "AR@3" in standard


def test_minival_subset_from_a_file(metric, tmp_path):
    predictions, references, categories = random_federated_set(seed=1)
    subset = [3, 5, 8]
    ids_file = tmp_path / "minival_ids.txt"
    ids_file.write_text("\n".join(map(str, subset)))
    lvis_file = tmp_path / "minival.json"
    lvis_file.write_text(json.dumps({"images": [{"id": i} for i in subset], "annotations": [], "categories": []}))
    expected = compute(
        metric, [p for p in predictions if p["image_id"] in subset], [r for r in references if r["image_id"] in subset], categories=categories
    )
    for image_ids in (subset, str(ids_file), lvis_file):
        assert compute(metric, predictions, references, categories=categories, image_ids=image_ids) == expected
    assert expected != compute(metric, predictions, references, categories=categories)


def test_no_detections_give_zero_where_ground_truth_exists(metric):
    results = compute(metric, [prediction(1, [])], [reference(1, [A], [1])], categories=[{"id": 1, "frequency": "r"}, {"id": 2, "frequency": "c"}])
    zero = dict.fromkeys(("AP", "AP50", "AP75", "APs", "APr", "AR@300", "ARs@300"), 0.0)
    assert results == {**zero, **dict.fromkeys(("APm", "APl", "APc", "APf", "ARm@300", "ARl@300"), -1.0)}
    assert list(results)[:3] == ["AP", "AP50", "AP75"]


CATEGORIES = [{"id": 1, "frequency": "r"}, {"id": 2, "frequency": "c"}]


@pytest.mark.parametrize(
    "predictions, references, kwargs, message",
    [
        ([prediction(1, [([float("nan"), 1, 2, 2], 0.5, 1)])], [reference(1, [A], [1])], {}, r"prediction of image 1: boxes\[0\].*not finite"),
        ([prediction(1, [(A, float("nan"), 1)])], [reference(1, [A], [1])], {}, r"prediction of image 1: scores\[0\] = nan"),
        ([prediction(1, [])], [reference(1, [[0, 0, -3, 2]], [1])], {}, r"reference of image 1: boxes\[0\].*negative width"),
        ([prediction(1, [(A, 0.5, 7)])], [reference(1, [A], [1])], {}, r"prediction of image 1: labels\[0\] = 7 is not one of the categories"),
        ([prediction(1, [])], [reference(1, [A], [1], neg=[9])], {}, r"reference of image 1: neg_category_ids\[0\] = 9"),
        ([prediction(1, [])], [reference(1, [A], [1], not_exhaustive=[9])], {}, r"not_exhaustive_category_ids\[0\] = 9"),
        ([prediction(1, [])], [reference(1, [A], [1], neg=[1])], {}, r"image 1: neg_category_ids lists annotated categories \[1\]"),
        ([prediction(1, []), prediction(1, [])], [reference(1, [A], [1]), reference(2, [A], [1])], {}, "image_id 1 appears in several predictions"),
        ([prediction(1, []), prediction(2, [])], [reference(1, [A], [1]), reference(1, [A], [1])], {}, "image_id 1 appears in several references"),
        ([prediction(2, [])], [reference(1, [A], [1])], {}, "prediction for image_id 2, which has no reference"),
        ([prediction(1, [])], [reference(1, [A], [1])], {"image_ids": [1, 4]}, r"image_ids lists images without a reference: \[4\]"),
        ([prediction(1, [])], [reference(1, [A], [1])], {"image_ids": [1, 1]}, "image_ids lists image 1 twice"),
        ([prediction(1, [])], [reference(1, [A], [1])], {"protocol": "pooled"}, "protocol must be one of"),
        ([prediction(1, [])], [reference(1, [A], [1])], {"max_detections": 0}, "max_detections must be an integer >= 1, got 0"),
        ([prediction(1, [])], [reference(1, [A], [1])], {"max_detections_per_category": 2.5}, "max_detections_per_category must be an integer"),
        ([prediction(1, [])], [reference(1, [A], [1])], {"categories": [{"id": 1, "frequency": "x"}]}, r"categories\[0\] \(id 1\): frequency 'x'"),
        ([prediction(1, [])], [reference(1, [A], [1])], {"categories": [{"id": 1, "frequency": "r"}] * 2}, "category id 1 appears twice"),
        ([prediction(1, [])], [reference(1, [A], [1])], {"categories": None}, "categories must be a non-empty list"),
    ],
)
def test_bad_input_is_refused_with_the_image_and_field(metric, predictions, references, kwargs, message):
    with pytest.raises(ValueError, match=message):
        compute(metric, predictions, references, **{"categories": CATEGORIES, **kwargs})


def test_image_id_file_with_a_non_integer_line(metric, tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("1\nabc\n")
    with pytest.raises(ValueError, match="one integer image id per line"):
        compute(metric, [prediction(1, [])], [reference(1, [A], [1])], categories=CATEGORIES, image_ids=str(path))
