"""GLIP's ATSS post-processing (original `ATSSPostProcessor`), reproduced on the model's Hugging Face outputs.

All section references are to glip_architecture.md. Model output contract (attribute or key access):

* `logits` (R, N, T): region-word logits, levels P3..P7 concatenated, each level row-major (h, w).
* `pred_boxes` (R, N, 4): normalised (cx, cy, w, h) relative to each row's unpadded resized size `image_sizes`.
* `centerness` (R, N): logits.
* `spatial_shapes` (L, 2) or (R, L, 2): (h, w) of each level, so that N = sum(h * w).
* `image_sizes` (R, 2): unpadded resized (h, w) per row.
* `input_ids`, `attention_mask` (R, T): only read by `positive_maps_from_attention_mask`.

R is the number of text rows (chunks); several rows may belong to the same image (`chunk_to_image`).
"""

from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torchvision.ops import batched_nms
from transformers.image_transforms import center_to_corners_format

SCORE_AGGREGATIONS = ("mean", "max")


def post_processing_limits(config: Any, **overrides: Any) -> dict:
    """A GLIP model config's post-processing limits (INFERENCE_TH, NMS_TH, PRE_NMS_TOP_N, DETECTIONS_PER_IMG, SCORE_AGG)
    as keyword arguments of the post-processing functions; `overrides` that are not None win."""
    limits = {
        "threshold": config.inference_threshold,
        "nms_threshold": config.nms_threshold,
        "pre_nms_top_n": config.pre_nms_top_n,
        "max_detections": config.detections_per_image,
        "score_aggregation": config.score_aggregation,
    }
    return {**limits, **{name: value for name, value in overrides.items() if value is not None}}


def output_field(outputs: Any, name: str) -> torch.Tensor:
    """Read `name` from a ModelOutput / BaseModelOutput / dict, with a clear error when it is missing."""
    value = outputs.get(name) if hasattr(outputs, "get") else getattr(outputs, name, None)
    if value is None:
        raise ValueError(f"model outputs have no `{name}`; GLIP post-processing needs it")
    return value


def validate_limits(threshold: float, nms_threshold: float, pre_nms_top_n: int, max_detections: int, score_aggregation: str):
    """Raise ValueError for post-processing limits outside their meaningful range."""
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    if not 0.0 <= nms_threshold <= 1.0:
        raise ValueError(f"nms_threshold must be in [0, 1], got {nms_threshold}")
    if int(pre_nms_top_n) < 1:
        raise ValueError(f"pre_nms_top_n must be >= 1, got {pre_nms_top_n}")
    if int(max_detections) < 0:
        raise ValueError(f"max_detections must be >= 0 (0 disables the cap), got {max_detections}")
    if score_aggregation not in SCORE_AGGREGATIONS:
        raise ValueError(f"score_aggregation must be one of {SCORE_AGGREGATIONS}, got {score_aggregation!r}")


def pred_boxes_to_pixels(pred_boxes: torch.Tensor, image_size: torch.Tensor) -> torch.Tensor:
    """(N, 4) normalised cxcywh and (2,) image (h, w) -> (N, 4) xyxy pixels in the resized frame (the original's decoded boxes)."""
    height, width = image_size.to(pred_boxes)
    return center_to_corners_format(pred_boxes) * torch.stack((width, height, width, height))


def clip_boxes(boxes: torch.Tensor, image_size: torch.Tensor) -> torch.Tensor:
    """(N, 4) xyxy -> clipped to [0, w-1] x [0, h-1] of the (h, w) unpadded image (legacy clip_to_image, section 7)."""
    height, width = image_size.tolist()
    x_max, y_max = width - 1, height - 1
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack((x1.clamp(0, x_max), y1.clamp(0, y_max), x2.clamp(0, x_max), y2.clamp(0, y_max)), dim=1)


def class_scores(token_probs: torch.Tensor, positive_map: torch.Tensor, score_aggregation: str = "mean") -> torch.Tensor:
    """(N, T) token probabilities and (C, T) 0/1 label->token map -> (N, C) class scores (mean or max over each label's tokens)."""
    columns = []
    for label, row in enumerate(positive_map):
        tokens = row.nonzero().squeeze(1)
        if tokens.numel() == 0:
            raise ValueError(f"label {label} of the positive map has no tokens")
        picked = token_probs[:, tokens]
        columns.append(picked.mean(-1) if score_aggregation == "mean" else picked.amax(-1))  # SCORE_AGG (section 7)
    return torch.stack(columns, dim=1)


def _level_candidates(scores: torch.Tensor, centerness: torch.Tensor, boxes: torch.Tensor, threshold: float, pre_nms_top_n: int):
    """One level: (n, C) class scores, (n,) centerness logits, (n, 4) boxes -> top-k candidates (scores, labels, boxes)."""
    candidates = scores > threshold  # evaluated BEFORE the centerness product (section 7, quirk 11.9)
    top_n = min(int(candidates.sum()), pre_nms_top_n)
    weighted = scores * centerness.sigmoid()[:, None]
    top_scores, top = weighted[candidates].topk(top_n, sorted=False)  # over flattened (anchor, class) order (section 7)
    anchor_index, label = candidates.nonzero()[top].unbind(1)
    return top_scores.sqrt(), label, boxes[anchor_index]  # final score = sqrt(prob * centerness) (quirk 11.9)


def pre_nms_candidates(
    scores: torch.Tensor,
    centerness: torch.Tensor,
    boxes: torch.Tensor,
    level_sizes: Sequence[int],
    threshold: float = 0.05,
    pre_nms_top_n: int = 1000,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-level thresholding and top-k of one row, concatenated over levels (the input of the original's NMS).

    Args:
        scores: (N, C) class scores (see `class_scores`).
        centerness: (N,) centerness logits.
        boxes: (N, 4) xyxy boxes, already clipped to the image.
        level_sizes: anchors per level (h * w), summing to N.

    Returns:
        scores (K,), labels (K,) row-local label indices, boxes (K, 4).
    """
    parts = [
        _level_candidates(s, c, b, threshold, pre_nms_top_n)
        for s, c, b in zip(scores.split(level_sizes), centerness.split(level_sizes), boxes.split(level_sizes))
    ]
    return tuple(torch.cat(part) for part in zip(*parts))


def nms_and_cap(
    scores: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor, nms_threshold: float = 0.6, max_detections: int = 100
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-label NMS then the original's top-`max_detections` cut; (K,), (K,), (K, 4) -> the kept subset, by descending score."""
    legacy_boxes = boxes + boxes.new_tensor([0.0, 0.0, 1.0, 1.0])  # legacy +1 IoU of the GPU ml_nms (section 7, quirk 11.10)
    keep = batched_nms(legacy_boxes, scores, labels, nms_threshold)
    scores, labels, boxes = scores[keep], labels[keep], boxes[keep]
    count = scores.numel()
    if count > max_detections > 0:
        # kthvalue cut keeps ties, so more than max_detections may survive (section 7, quirk 11.11)
        kth = scores.kthvalue(count - max_detections + 1).values
        keep = scores >= kth
        scores, labels, boxes = scores[keep], labels[keep], boxes[keep]
    return scores, labels, boxes


def _level_sizes(spatial_shapes: torch.Tensor, row: int, num_anchors: int) -> List[int]:
    shapes = spatial_shapes[row] if spatial_shapes.dim() == 3 else spatial_shapes
    sizes = (shapes[:, 0] * shapes[:, 1]).tolist()
    if sum(sizes) != num_anchors:
        raise ValueError(f"spatial_shapes {shapes.tolist()} give {sum(sizes)} anchors but the logits have {num_anchors}")
    return sizes


def detect_rows(
    outputs: Any,
    positive_maps: Sequence[torch.Tensor],
    threshold: float = 0.05,
    pre_nms_top_n: int = 1000,
    nms_threshold: float = 0.6,
    max_detections: int = 100,
    score_aggregation: str = "mean",
) -> List[dict]:
    """The original ATSSPostProcessor for every text row (each row is one forward of the original).

    Args:
        outputs: model outputs (see the module docstring).
        positive_maps: per row a (C_r, T) 0/1 label->token map.

    Returns:
        per row {"scores": (K,), "labels": (K,) row-local label indices, "boxes": (K, 4) xyxy in the resized frame},
        by descending score.
    """
    validate_limits(threshold, nms_threshold, pre_nms_top_n, max_detections, score_aggregation)
    logits = output_field(outputs, "logits").float()
    pred_boxes = output_field(outputs, "pred_boxes").float()
    centerness = output_field(outputs, "centerness").float()
    spatial_shapes = output_field(outputs, "spatial_shapes")
    image_sizes = output_field(outputs, "image_sizes")
    if len(positive_maps) != logits.shape[0]:
        raise ValueError(f"got {len(positive_maps)} positive maps for {logits.shape[0]} rows of logits")
    results = []
    for row, positive_map in enumerate(positive_maps):
        if positive_map.shape[-1] != logits.shape[-1]:
            raise ValueError(f"positive map of row {row} has {positive_map.shape[-1]} tokens, the logits have {logits.shape[-1]}")
        level_sizes = _level_sizes(spatial_shapes, row, logits.shape[1])
        # remove_small_boxes(min_size=0) after the clip keeps every box, so it is omitted (section 7)
        boxes = clip_boxes(pred_boxes_to_pixels(pred_boxes[row], image_sizes[row]), image_sizes[row])
        scores = class_scores(logits[row].sigmoid(), positive_map.to(logits.device), score_aggregation)
        candidates = pre_nms_candidates(scores, centerness[row], boxes, level_sizes, threshold, int(pre_nms_top_n))
        kept_scores, kept_labels, kept_boxes = nms_and_cap(*candidates, nms_threshold, int(max_detections))
        results.append({"scores": kept_scores, "labels": kept_labels, "boxes": kept_boxes})
    return results


def positive_maps_from_attention_mask(attention_mask: torch.Tensor) -> List[torch.Tensor]:
    """(R, T) attention mask -> per row a (1, T) map selecting every attended token except the first and the last one.

    This is the whole text as one label, for prompts encoded as "[CLS] label [SEP]" (what the zero-shot pipeline's
    per-label tokenizer call produces).
    """
    maps = []
    for row, mask in enumerate(attention_mask):
        attended = mask.nonzero().squeeze(1)
        if attended.numel() < 3:
            raise ValueError(f"text row {row} has no token between its special tokens")
        label = torch.zeros_like(mask, dtype=torch.float32)
        label[attended[1:-1]] = 1.0
        maps.append(label[None])
    return maps


def rescale_boxes(boxes: torch.Tensor, from_size: torch.Tensor, to_size: Sequence[int]) -> torch.Tensor:
    """(K, 4) xyxy boxes in an image of (h, w) `from_size` -> the same boxes in (h, w) `to_size`, pure ratio (BoxList.resize, section 7)."""
    from_h, from_w = (float(v) for v in from_size)
    to_h, to_w = (float(v) for v in to_size)
    ratio_w, ratio_h = to_w / from_w, to_h / from_h
    return boxes * boxes.new_tensor([ratio_w, ratio_h, ratio_w, ratio_h])


def target_size_rows(target_sizes: Union[torch.Tensor, Sequence[Sequence[int]]], count: int) -> List[Tuple[int, int]]:
    """Validate `target_sizes` (one (h, w) per image) and return them as python tuples."""
    sizes = [tuple(int(v) for v in size) for size in target_sizes]
    if len(sizes) != count or any(len(size) != 2 for size in sizes):
        raise ValueError(f"target_sizes must hold one (height, width) per image ({count}), got {len(sizes)} entries")
    return sizes


def post_process_grounded(
    outputs: Any,
    positive_map: Union[torch.Tensor, Sequence[torch.Tensor]],
    label_ids: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]] = None,
    chunk_to_image: Optional[torch.Tensor] = None,
    text_labels: Optional[Sequence[Sequence[str]]] = None,
    threshold: float = 0.05,
    target_sizes: Optional[Union[torch.Tensor, Sequence[Sequence[int]]]] = None,
    nms_threshold: float = 0.6,
    pre_nms_top_n: int = 1000,
    max_detections: int = 100,
    score_aggregation: str = "mean",
) -> List[dict]:
    """Detections per image, chunks merged back with global labels.

    Args:
        outputs: model outputs (see the module docstring).
        positive_map: (R, L, T) 0/1 label->token map per row (or a sequence of (L_r, T)).
        label_ids: (R, L) global label id of each row-local label, -1 for padding; None = row-local ids 0..L_r-1.
        chunk_to_image: (R,) image index of each row; None = one row per image.
        text_labels: per image the names of its global labels; None = no `text_labels` in the result.
        target_sizes: per image (h, w) to rescale the boxes to (usually the original image size); None = keep the
            unpadded resized frame.

    Returns:
        per image {"scores": (K,), "labels": (K,) global 0-based label ids, "boxes": (K, 4) xyxy, and "text_labels":
        K names when `text_labels` is given}, by descending score. Each row is post-processed like one forward of the
        original (its own top-k, NMS and `max_detections` cut) and the rows of an image are concatenated, as the
        original's chunked evaluation does (section 9): an image split into c chunks can return c * max_detections boxes.
    """
    num_rows = len(positive_map)
    if label_ids is None:
        label_ids = [torch.arange(len(row_map)) for row_map in positive_map]
    if chunk_to_image is None:
        chunk_to_image = torch.arange(num_rows)
    chunk_to_image = torch.as_tensor(chunk_to_image)
    if len(label_ids) != num_rows or len(chunk_to_image) != num_rows:
        raise ValueError(f"positive_map, label_ids and chunk_to_image must have one entry per text row ({num_rows})")
    row_maps, row_ids = [], []
    for row in range(num_rows):
        if len(label_ids[row]) != len(positive_map[row]):
            raise ValueError(f"row {row}: {len(label_ids[row])} label ids for {len(positive_map[row])} positive-map labels")
        valid = torch.as_tensor(label_ids[row]) >= 0
        row_maps.append(positive_map[row][valid])
        row_ids.append(torch.as_tensor(label_ids[row])[valid])
    rows = detect_rows(outputs, row_maps, threshold, pre_nms_top_n, nms_threshold, max_detections, score_aggregation)

    image_sizes = output_field(outputs, "image_sizes")
    num_images = int(chunk_to_image.max()) + 1
    if text_labels is not None and len(text_labels) != num_images:
        raise ValueError(f"text_labels has {len(text_labels)} entries for {num_images} images")
    sizes = target_size_rows(target_sizes, num_images) if target_sizes is not None else None
    results = []
    for image in range(num_images):
        image_rows = (chunk_to_image == image).nonzero().squeeze(1).tolist()
        if not image_rows:
            raise ValueError(f"chunk_to_image assigns no text row to image {image}")
        scores = torch.cat([rows[r]["scores"] for r in image_rows])
        labels = torch.cat([row_ids[r].to(rows[r]["labels"].device)[rows[r]["labels"]] for r in image_rows])
        boxes = torch.cat([rows[r]["boxes"] for r in image_rows])
        order = scores.argsort(descending=True, stable=True)
        scores, labels, boxes = scores[order], labels[order], boxes[order]
        if sizes is not None:
            boxes = rescale_boxes(boxes, image_sizes[image_rows[0]], sizes[image])
        result = {"scores": scores, "labels": labels, "boxes": boxes}
        if text_labels is not None:
            result["text_labels"] = [text_labels[image][label] for label in labels.tolist()]
        results.append(result)
    return results
