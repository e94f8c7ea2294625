"""ATSS post-processing parity with the original (glip_architecture.md section 7) on the recorded head outputs."""

import pytest
import torch
from transformers.image_transforms import corners_to_center_format
from transformers.modeling_outputs import BaseModelOutput

from modeling_glip.box_coder import BoxCoder
from processing.image_processing_glip import GLIPImageProcessor
from processing.post_processing_glip import (
    class_scores,
    clip_boxes,
    nms_and_cap,
    post_process_grounded,
    pre_nms_candidates,
    pred_boxes_to_pixels,
)

LEVELS = ("p3", "p4", "p5", "p6", "p7")
ATOL = 1e-4


@pytest.fixture(scope="module")
def head_outputs(fixture_tensors):
    """The model-output contract built from the fixture's recorded head outputs (one image, 256 tokens)."""
    f = fixture_tensors
    deltas = torch.cat([f[f"head.bbox_reg.{level}"].permute(0, 2, 3, 1).reshape(1, -1, 4) for level in LEVELS], 1)
    anchors = torch.cat([f[f"anchors.{level}"] for level in LEVELS])
    image_sizes = f["input.image_sizes_hw"]
    height, width = image_sizes[0].tolist()
    legacy_xyxy = BoxCoder().decode(deltas, anchors)
    return {
        "logits": torch.cat([f[f"head.dot_product_logits.{level}"] for level in LEVELS], 1),
        "pred_boxes": corners_to_center_format(legacy_xyxy) / torch.tensor([width, height, width, height], dtype=torch.float32),
        "centerness": torch.cat([f[f"head.centerness.{level}"].reshape(1, -1) for level in LEVELS], 1),
        "anchors": anchors,
        "spatial_shapes": torch.tensor([list(f[f"head.bbox_reg.{level}"].shape[-2:]) for level in LEVELS]),
        "image_sizes": image_sizes,
        "input_ids": f["input.input_ids"],
        "attention_mask": f["input.attention_mask"],
        "legacy_xyxy": legacy_xyxy,
    }


@pytest.fixture(scope="module")
def positive_map(fixture_tensors):
    return fixture_tensors["input.positive_map_label_to_token_dense"]  # (5, 256), row = label - 1


def _assert_same_set(actual, expected):
    """Two detection sets are equal up to ATOL: same size, and a one-to-one pairing (per label, by the Hungarian
    method on max(|score diff|, max |box diff|)) whose pairs agree. Pairing by sorting would break on near-tied
    scores, whose float32 order can differ between CPUs."""
    from scipy.optimize import linear_sum_assignment

    a_scores, a_labels, a_boxes = actual
    e_scores, e_labels, e_boxes = expected
    assert len(a_scores) == len(e_scores)
    assert torch.equal(a_labels.sort().values, e_labels.sort().values)
    score_diff, box_diff = 0.0, 0.0
    for label in e_labels.unique().tolist():
        a_idx, e_idx = (a_labels == label).nonzero().flatten(), (e_labels == label).nonzero().flatten()
        scores = (a_scores[a_idx, None].double() - e_scores[None, e_idx].double()).abs()
        boxes = (a_boxes[a_idx, None].double() - e_boxes[None, e_idx].double()).abs().amax(-1)
        rows, cols = linear_sum_assignment(torch.maximum(scores, boxes).numpy())
        score_diff = max(score_diff, scores[rows, cols].max().item())
        box_diff = max(box_diff, boxes[rows, cols].max().item())
    assert score_diff <= ATOL and box_diff <= ATOL, (score_diff, box_diff)
    return score_diff, box_diff


def test_pred_boxes_round_trip(head_outputs):
    boxes = pred_boxes_to_pixels(head_outputs["pred_boxes"][0], head_outputs["image_sizes"][0])
    # cxcywh normalisation and back costs float32 rounding only (~6e-5 px at 500 px)
    assert torch.allclose(boxes, head_outputs["legacy_xyxy"][0], atol=ATOL, rtol=0)


def test_pre_nms_candidates_match(head_outputs, positive_map, fixture_tensors, manifest):
    size = head_outputs["image_sizes"][0]
    boxes = clip_boxes(pred_boxes_to_pixels(head_outputs["pred_boxes"][0], size), size)
    scores = class_scores(head_outputs["logits"][0].sigmoid(), positive_map)
    level_sizes = (head_outputs["spatial_shapes"].prod(1)).tolist()
    candidates = pre_nms_candidates(scores, head_outputs["centerness"][0], boxes, level_sizes, candidate_threshold=0.01, pre_nms_top_n=1000)
    assert len(candidates[0]) == manifest["checks"]["num_pre_nms_boxes"] == 1495
    expected = (
        fixture_tensors["detections.pre_nms_scores"],
        fixture_tensors["detections.pre_nms_labels"] - 1,  # fixture labels are 1-based
        fixture_tensors["detections.pre_nms_boxes_xyxy_resized"],
    )
    _assert_same_set(candidates, expected)


def test_final_detections_match(head_outputs, positive_map, fixture_tensors):
    result = post_process_grounded(head_outputs, positive_map[None], candidate_threshold=0.01)[0]
    assert len(result["scores"]) == 100
    expected = (fixture_tensors["detections.scores"], fixture_tensors["detections.labels"] - 1, fixture_tensors["detections.boxes_xyxy_resized"])
    _assert_same_set((result["scores"], result["labels"], result["boxes"]), expected)
    assert torch.all(result["scores"][:-1] >= result["scores"][1:])


def test_final_detections_in_original_image(head_outputs, positive_map, fixture_tensors, manifest):
    width, height = manifest["image"]["original_wh"]
    result = post_process_grounded(head_outputs, positive_map[None], candidate_threshold=0.01, target_sizes=[(height, width)])[0]
    expected = (fixture_tensors["detections.scores"], fixture_tensors["detections.labels"] - 1, fixture_tensors["detections.boxes_xyxy_original"])
    _assert_same_set((result["scores"], result["labels"], result["boxes"]), expected)


def test_stage_counts(head_outputs, positive_map, manifest):
    result = post_process_grounded(head_outputs, positive_map[None], candidate_threshold=0.01, max_detections=0)[0]
    assert len(result["scores"]) == manifest["checks"]["num_after_nms"] == 425
    # the default candidate threshold 0.05 gives nothing on the random-weight fixture (all probabilities ~0.01)
    assert len(post_process_grounded(head_outputs, positive_map[None])[0]["scores"]) == 0


def test_max_aggregation_and_text_labels(head_outputs, positive_map, manifest):
    names = manifest["class_names_input"]
    result = post_process_grounded(head_outputs, positive_map[None], text_labels=[names], candidate_threshold=0.01, score_aggregation="max")[0]
    assert 0 < len(result["scores"]) and result["text_labels"] == [names[label] for label in result["labels"].tolist()]


def test_kthvalue_cut_keeps_ties():
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10], [80, 0, 90, 10]])
    scores = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.1])
    kept, _, _ = nms_and_cap(scores, torch.zeros(5, dtype=torch.long), boxes, 0.6, max_detections=2)
    assert kept.tolist() == pytest.approx([0.9, 0.5, 0.5, 0.5])  # 3 tied scores at the cut survive (quirk 11.11)


def test_nms_uses_legacy_plus_one_iou():
    # continuous IoU = 16 / 56 = 0.286; legacy +1 IoU = 25 / 75 = 0.333 (> 0.3: suppressed only with +1)
    boxes = torch.tensor([[0.0, 0.0, 9.0, 4.0], [5.0, 0.0, 14.0, 4.0]])
    kept, _, _ = nms_and_cap(torch.tensor([0.9, 0.8]), torch.zeros(2, dtype=torch.long), boxes, 0.3, max_detections=100)
    assert kept.tolist() == [pytest.approx(0.9)]


def test_pipeline_path_equals_grounded_path(head_outputs):
    """`GLIPImageProcessor.post_process_object_detection` = one label made of every attended token but [CLS]/[SEP]."""
    attention_mask = torch.zeros(1, 256, dtype=torch.long)
    attention_mask[0, :4] = 1  # [CLS] person . [SEP] -> tokens 1, 2
    outputs = BaseModelOutput({**head_outputs, "attention_mask": attention_mask})
    label_map = torch.zeros(1, 1, 256)
    label_map[0, 0, 1:3] = 1.0
    target = torch.tensor([[300, 451]], dtype=torch.int32)
    stock = GLIPImageProcessor().post_process_object_detection(outputs, candidate_threshold=0.01, target_sizes=target)[0]
    grounded = post_process_grounded(head_outputs, label_map, candidate_threshold=0.01, target_sizes=target)[0]
    assert len(stock["scores"]) > 0 and set(stock["labels"].tolist()) == {0}
    assert torch.equal(stock["scores"], grounded["scores"]) and torch.equal(stock["boxes"], grounded["boxes"])


def test_chunk_rows_merge_with_global_labels(head_outputs, positive_map):
    """Two rows of the same image (a 2-label chunk and a 3-label chunk) = the original's two forwards, concatenated."""
    outputs = {key: value.expand(2, *value.shape[1:]) if key not in ("anchors", "spatial_shapes") else value for key, value in head_outputs.items()}
    maps = torch.zeros(2, 3, 256)
    maps[0, :2], maps[1] = positive_map[:2], positive_map[2:]
    label_ids = torch.tensor([[0, 1, -1], [2, 3, 4]])
    merged = post_process_grounded(outputs, maps, label_ids, torch.tensor([0, 0]), [list("abcde")], candidate_threshold=0.01)
    assert len(merged) == 1
    first = post_process_grounded(head_outputs, positive_map[None, :2], candidate_threshold=0.01)[0]
    second = post_process_grounded(head_outputs, positive_map[None, 2:], candidate_threshold=0.01)[0]
    expected = (torch.cat((first["scores"], second["scores"])), torch.cat((first["labels"], second["labels"] + 2)), torch.cat((first["boxes"], second["boxes"])))
    _assert_same_set((merged[0]["scores"], merged[0]["labels"], merged[0]["boxes"]), expected)
    assert merged[0]["text_labels"] == ["abcde"[label] for label in merged[0]["labels"].tolist()]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"threshold": -0.1}, "threshold"),
        ({"nms_threshold": 1.5}, "nms_threshold"),
        ({"pre_nms_top_n": 0}, "pre_nms_top_n"),
        ({"max_detections": -1}, "max_detections"),
        ({"score_aggregation": "median"}, "score_aggregation"),
        ({"target_sizes": [(1, 2), (3, 4)]}, "target_sizes"),
    ],
)
def test_bad_arguments(head_outputs, positive_map, kwargs, message):
    with pytest.raises(ValueError, match=message):
        post_process_grounded(head_outputs, positive_map[None], **kwargs)


def test_bad_outputs(head_outputs, positive_map):
    with pytest.raises(ValueError, match="centerness"):
        post_process_grounded({k: v for k, v in head_outputs.items() if k != "centerness"}, positive_map[None])
    with pytest.raises(ValueError, match="spatial_shapes"):
        post_process_grounded({**head_outputs, "spatial_shapes": head_outputs["spatial_shapes"][:4]}, positive_map[None])
    with pytest.raises(ValueError, match="tokens"):
        post_process_grounded(head_outputs, positive_map[None, :, :100])
    with pytest.raises(ValueError, match="no tokens"):
        post_process_grounded(head_outputs, torch.zeros(1, 1, 256))


def test_post_processing_limits_come_from_the_config_unless_overridden():
    from modeling_glip import GLIPConfig
    from processing import post_processing_limits

    config = GLIPConfig(inference_threshold=0.1, pre_nms_top_n=500, detections_per_image=50, score_aggregation="max")
    expected = {"candidate_threshold": 0.1, "nms_threshold": 0.6, "pre_nms_top_n": 500, "max_detections": 50, "score_aggregation": "max"}
    assert post_processing_limits(config) == expected
    assert post_processing_limits(config, candidate_threshold=0.3, max_detections=None)["candidate_threshold"] == 0.3
    assert post_processing_limits(config, candidate_threshold=0.3, max_detections=None)["max_detections"] == 50
    with pytest.raises(TypeError, match="threshold"):  # the final-score threshold is not a config limit
        post_processing_limits(config, threshold=0.3)
