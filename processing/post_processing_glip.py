"""GLIP's ATSS post-processing (original `ATSSPostProcessor`), reproduced on the model's Hugging Face outputs.

All section references are to glip_architecture.md. Model output contract (attribute or key access):

* `logits` (R, N, T): region-word logits, levels P3..P7 concatenated, each level row-major (h, w).
* `pred_boxes` (R, N, 4): normalised (cx, cy, w, h) relative to each row's unpadded resized size `image_sizes`.
* `centerness` (R, N): logits.
* `spatial_shapes` (L, 2) or (R, L, 2): (h, w) of each level, so that N = sum(h * w).
* `image_sizes` (R, 2): unpadded resized (h, w) per row.
* `input_ids` (R, T): the prompt; compared with the processor's `input_ids` when both are given.
* `attention_mask` (R, T): only read by `positive_maps_from_attention_mask`.

R is the number of text rows (chunks); several rows may belong to the same image (`chunk_to_image`).

Two thresholds, as in transformers' detection post-processing:

* `threshold`: cut on the FINAL reported score sqrt(label probability x centerness), applied last (after NMS and the
  `max_detections` cap), so a detection's reported score never depends on it; 0 keeps every detection (the
  original's output).
* `candidate_threshold`: GLIP's INFERENCE_TH, a cut on the label probability BEFORE centerness that selects the NMS
  candidates (quirk 11.9); it changes which boxes compete in NMS, hence the original's results.
"""

import math
import numbers
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torchvision.ops import batched_nms
from transformers.image_transforms import center_to_corners_format

SCORE_AGGREGATIONS = ("mean", "max")

# post-processing argument -> GLIPConfig field holding its default (the original's MODEL.ATSS / DYHEAD settings)
_CONFIG_LIMITS = {
    "candidate_threshold": "inference_threshold",
    "nms_threshold": "nms_threshold",
    "pre_nms_top_n": "pre_nms_top_n",
    "max_detections": "detections_per_image",
    "score_aggregation": "score_aggregation",
}


def post_processing_limits(config: Any, **overrides: Any) -> dict:
    """A GLIP model config's post-processing limits (INFERENCE_TH, NMS_TH, PRE_NMS_TOP_N, DETECTIONS_PER_IMG, SCORE_AGG)
    as keyword arguments of the post-processing functions (`candidate_threshold`, `nms_threshold`, `pre_nms_top_n`,
    `max_detections`, `score_aggregation`); `overrides` that are not None win. The final-score `threshold` is not a
    config value: callers pass it themselves."""
    unknown = sorted(set(overrides) - set(_CONFIG_LIMITS))
    if unknown:
        raise TypeError(f"post_processing_limits got unexpected keyword argument(s) {unknown}; known: {sorted(_CONFIG_LIMITS)}")
    limits = {name: getattr(config, field) for name, field in _CONFIG_LIMITS.items()}
    return {**limits, **{name: value for name, value in overrides.items() if value is not None}}


def check_integer(name: str, value: Any, minimum: int) -> int:
    """`value` as an int >= `minimum`; TypeError for anything that is not an integer (bool included)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_fraction(name: str, value: Any, include_one: bool = True) -> float:
    """`value` as a float in [0, 1] (or [0, 1) when not `include_one`); TypeError for non-numbers (bool included)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not 0.0 <= value <= 1.0 or (value == 1.0 and not include_one):  # NaN fails the comparison
        raise ValueError(f"{name} must be in [0, {'1]' if include_one else '1)'}, got {value}")
    return value


def validate_limits(
    threshold: float, candidate_threshold: float, nms_threshold: float, pre_nms_top_n: int, max_detections: int, score_aggregation: str
) -> dict:
    """The post-processing limits, type- and range-checked (TypeError / ValueError naming the argument)."""
    if score_aggregation not in SCORE_AGGREGATIONS:
        raise ValueError(f"score_aggregation must be one of {SCORE_AGGREGATIONS}, got {score_aggregation!r}")
    return {
        "threshold": check_fraction("threshold", threshold),
        # the candidate test is `probability > candidate_threshold`: 1 would keep nothing
        "candidate_threshold": check_fraction("candidate_threshold", candidate_threshold, include_one=False),
        "nms_threshold": check_fraction("nms_threshold", nms_threshold),
        "pre_nms_top_n": check_integer("pre_nms_top_n", pre_nms_top_n, 1),
        "max_detections": check_integer("max_detections (0 disables the cap)", max_detections, 0),
        "score_aggregation": score_aggregation,
    }


def optional_output_field(outputs: Any, name: str) -> Optional[Any]:
    """Read `name` from a ModelOutput / BaseModelOutput / dict; None when absent."""
    return outputs.get(name) if hasattr(outputs, "get") else getattr(outputs, name, None)


def output_field(outputs: Any, name: str) -> torch.Tensor:
    """Read `name` from a ModelOutput / BaseModelOutput / dict, with a clear error when it is missing."""
    value = optional_output_field(outputs, name)
    if value is None:
        raise ValueError(f"model outputs have no `{name}`; GLIP post-processing needs it")
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"model outputs `{name}` must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_same_prompt(outputs: Any, input_ids: Optional[torch.Tensor]) -> None:
    """Refuse outputs computed for another prompt than the one the positive maps / names come from: both carry
    `input_ids` (R, T), which must be equal. Nothing to compare when either is absent."""
    output_ids = optional_output_field(outputs, "input_ids")
    if input_ids is None or output_ids is None:
        return
    input_ids = torch.as_tensor(input_ids)
    if output_ids.shape != input_ids.shape or not torch.equal(output_ids.cpu(), input_ids.cpu()):
        raise ValueError(
            f"the model outputs were computed for another prompt than these inputs (outputs.input_ids of shape "
            f"{tuple(output_ids.shape)} differ from inputs['input_ids'] of shape {tuple(input_ids.shape)}): post-process "
            "each output with the processor inputs it was computed from"
        )


def _require_finite(name: str, values: torch.Tensor, row: int) -> None:
    bad = int((~torch.isfinite(values)).sum())
    if bad:
        raise ValueError(
            f"model outputs `{name}` of text row {row} hold {bad} non-finite value(s) (NaN or inf); post-processing "
            "refuses them (an all-zero pixel_mask, a NaN input or a diverged model produce these)"
        )


def _check_output_shapes(logits: torch.Tensor, pred_boxes: torch.Tensor, centerness: torch.Tensor, image_sizes: torch.Tensor) -> None:
    """(R, N, T) logits, (R, N, 4) pred_boxes, (R, N) centerness and (R, 2) image_sizes of positive sizes."""
    if logits.dim() != 3:
        raise ValueError(f"model outputs `logits` must have shape (rows, anchors, tokens), got {tuple(logits.shape)}")
    rows, anchors = logits.shape[:2]
    expected = {"pred_boxes": (pred_boxes, (rows, anchors, 4)), "centerness": (centerness, (rows, anchors)), "image_sizes": (image_sizes, (rows, 2))}
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"model outputs `{name}` must have shape {shape} to match the logits {tuple(logits.shape)}, got {tuple(tensor.shape)}"
            )
    if image_sizes.is_floating_point() or image_sizes.is_complex() or (image_sizes < 1).any():
        raise ValueError(
            f"model outputs `image_sizes` must hold positive integer (height, width) pairs, got {image_sizes.tolist()} "
            "(a row of zeros means an image without valid pixels: an all-zero pixel_mask)"
        )


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


def _level_candidates(scores: torch.Tensor, centerness: torch.Tensor, boxes: torch.Tensor, candidate_threshold: float, pre_nms_top_n: int):
    """One level: (n, C) class scores, (n,) centerness logits, (n, 4) boxes -> top-k candidates (scores, labels, boxes)."""
    candidates = scores > candidate_threshold  # evaluated BEFORE the centerness product (section 7, quirk 11.9)
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
    candidate_threshold: float = 0.05,
    pre_nms_top_n: int = 1000,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-level candidate thresholding and top-k of one row, concatenated over levels (the input of the original's NMS).

    Args:
        scores: (N, C) class scores (see `class_scores`).
        centerness: (N,) centerness logits.
        boxes: (N, 4) xyxy boxes, already clipped to the image.
        level_sizes: anchors per level (h * w), summing to N.

    Returns:
        scores (K,), labels (K,) row-local label indices, boxes (K, 4).
    """
    parts = [
        _level_candidates(s, c, b, candidate_threshold, pre_nms_top_n)
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
    *,
    threshold: float = 0.0,
    candidate_threshold: float = 0.05,
    pre_nms_top_n: int = 1000,
    nms_threshold: float = 0.6,
    max_detections: int = 100,
    score_aggregation: str = "mean",
) -> List[dict]:
    """The original ATSSPostProcessor for every text row (each row is one forward of the original), then the final
    `threshold` on the reported scores (see the module docstring for the two thresholds).

    Args:
        outputs: model outputs (see the module docstring).
        positive_maps: per row a (C_r, T) 0/1 label->token map.

    Returns:
        per row {"scores": (K,), "labels": (K,) row-local label indices, "boxes": (K, 4) xyxy in the resized frame},
        by descending score.

    Raises:
        TypeError / ValueError: a limit of the wrong type or out of range, outputs of inconsistent shapes, non-finite
            logits (on the tokens of a label), pred_boxes or centerness, image sizes that are not positive.
    """
    limits = validate_limits(threshold, candidate_threshold, nms_threshold, pre_nms_top_n, max_detections, score_aggregation)
    logits = output_field(outputs, "logits").float()
    pred_boxes = output_field(outputs, "pred_boxes").float()
    centerness = output_field(outputs, "centerness").float()
    spatial_shapes = output_field(outputs, "spatial_shapes")
    image_sizes = output_field(outputs, "image_sizes")
    _check_output_shapes(logits, pred_boxes, centerness, image_sizes)
    if len(positive_maps) != logits.shape[0]:
        raise ValueError(f"got {len(positive_maps)} positive maps for {logits.shape[0]} rows of logits")
    results = []
    for row, positive_map in enumerate(positive_maps):
        positive_map = torch.as_tensor(positive_map).to(logits.device)
        if positive_map.dim() != 2 or positive_map.shape[-1] != logits.shape[-1]:
            raise ValueError(
                f"positive map of row {row} has shape {tuple(positive_map.shape)}; "
                f"it needs (labels, {logits.shape[-1]}) for the logits' {logits.shape[-1]} tokens"
            )
        _require_finite("positive_map", positive_map, row)
        _require_finite("logits", logits[row][:, positive_map.any(0)], row)  # only the tokens that are scored
        _require_finite("pred_boxes", pred_boxes[row], row)
        _require_finite("centerness", centerness[row], row)
        level_sizes = _level_sizes(spatial_shapes, row, logits.shape[1])
        # remove_small_boxes(min_size=0) after the clip keeps every box, so it is omitted (section 7)
        boxes = clip_boxes(pred_boxes_to_pixels(pred_boxes[row], image_sizes[row]), image_sizes[row])
        scores = class_scores(logits[row].sigmoid(), positive_map, limits["score_aggregation"])
        candidates = pre_nms_candidates(scores, centerness[row], boxes, level_sizes, limits["candidate_threshold"], limits["pre_nms_top_n"])
        kept_scores, kept_labels, kept_boxes = nms_and_cap(*candidates, limits["nms_threshold"], limits["max_detections"])
        final = kept_scores >= limits["threshold"]  # last, so that reported scores never depend on it
        results.append({"scores": kept_scores[final], "labels": kept_labels[final], "boxes": kept_boxes[final]})
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


def _size_value(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value != int(value) or value < 1:
        raise ValueError(f"{name} must be a positive whole number of pixels, got {value!r}")
    return int(value)


def target_size_rows(target_sizes: Union[torch.Tensor, Sequence[Sequence[int]]], count: int) -> List[Tuple[int, int]]:
    """`target_sizes` -> one (height, width) of positive integers per image, as python tuples.

    Accepted: a (count, 2) tensor or array, a sequence of `count` (height, width) pairs, and, for a single image
    only, one (height, width) pair. Anything else is a TypeError / ValueError naming `target_sizes`.
    """
    if hasattr(target_sizes, "tolist") and not isinstance(target_sizes, (list, tuple)):  # torch / numpy
        values = target_sizes.tolist()
    elif isinstance(target_sizes, (list, tuple)):
        values = [size.tolist() if hasattr(size, "tolist") else size for size in target_sizes]
    else:
        raise TypeError(f"target_sizes must be a (N, 2) tensor or a list of (height, width) pairs, got {type(target_sizes).__name__}")
    if not isinstance(values, list):
        raise ValueError(f"target_sizes must be a (N, 2) tensor or a list of (height, width) pairs, got {target_sizes!r}")
    if len(values) == 2 and all(isinstance(value, numbers.Real) for value in values):  # one bare (h, w) pair
        if count != 1:
            raise ValueError(
                f"target_sizes={target_sizes!r} is a single (height, width) pair, but there are {count} images: give one pair per image"
            )
        values = [values]
    if len(values) != count:
        raise ValueError(f"target_sizes must hold one (height, width) pair per image ({count}), got {len(values)} entries")
    sizes = []
    for index, size in enumerate(values):
        if not isinstance(size, (list, tuple)) or len(size) != 2:
            raise ValueError(f"target_sizes[{index}] must be a (height, width) pair, got {size!r}")
        sizes.append(tuple(_size_value(f"target_sizes[{index}]", value) for value in size))
    return sizes


def post_process_grounded(
    outputs: Any,
    positive_map: Union[torch.Tensor, Sequence[torch.Tensor]],
    label_ids: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]] = None,
    chunk_to_image: Optional[torch.Tensor] = None,
    text_labels: Optional[Sequence[Sequence[str]]] = None,
    threshold: float = 0.0,
    target_sizes: Optional[Union[torch.Tensor, Sequence[Sequence[int]]]] = None,
    candidate_threshold: float = 0.05,
    nms_threshold: float = 0.6,
    pre_nms_top_n: int = 1000,
    max_detections: int = 100,
    score_aggregation: str = "mean",
    input_ids: Optional[torch.Tensor] = None,
) -> List[dict]:
    """Detections per image, chunks merged back with global labels.

    Args:
        outputs: model outputs (see the module docstring).
        positive_map: (R, L, T) 0/1 label->token map per row (or a sequence of (L_r, T)).
        label_ids: (R, L) global label id of each row-local label, -1 for padding; None = row-local ids 0..L_r-1.
        chunk_to_image: (R,) image index of each row; None = one row per image.
        text_labels: per image the names of its global labels; None = no `text_labels` in the result.
        threshold: keep detections whose final score is >= it, applied after NMS and the cap (0 keeps all).
        target_sizes: per image (h, w) to rescale the boxes to (usually the original image size); a (N, 2) tensor,
            a list of pairs, or one pair for a single image; None = keep the unpadded resized frame.
        candidate_threshold: GLIP's INFERENCE_TH on the label probability before centerness (NMS candidates).
        nms_threshold, pre_nms_top_n, max_detections, score_aggregation: see `detect_rows`.
        input_ids: (R, T) the prompt `positive_map` was built from; refused when the outputs carry other `input_ids`.

    Returns:
        per image {"scores": (K,), "labels": (K,) global 0-based label ids, "boxes": (K, 4) xyxy, and "text_labels":
        K names when `text_labels` is given}, by descending score. Each row is post-processed like one forward of the
        original (its own top-k, NMS and `max_detections` cut) and the rows of an image are concatenated, as the
        original's chunked evaluation does (section 9): an image split into c chunks can return c * max_detections boxes.
    """
    check_same_prompt(outputs, input_ids)
    num_rows = len(positive_map)
    if label_ids is None:
        label_ids = [torch.arange(len(row_map)) for row_map in positive_map]
    if chunk_to_image is None:
        chunk_to_image = torch.arange(num_rows)
    chunk_to_image = torch.as_tensor(chunk_to_image)
    if len(label_ids) != num_rows or len(chunk_to_image) != num_rows or num_rows == 0:
        raise ValueError(f"positive_map, label_ids and chunk_to_image must have one entry per text row (positive_map has {num_rows} rows)")
    if chunk_to_image.is_floating_point() or (chunk_to_image < 0).any():
        raise ValueError(f"chunk_to_image must hold non-negative image indices, got {chunk_to_image.tolist()}")
    num_images = int(chunk_to_image.max()) + 1
    empty = sorted(set(range(num_images)) - set(chunk_to_image.tolist()))
    if empty:
        raise ValueError(f"chunk_to_image assigns no text row to image(s) {empty}")
    if text_labels is not None and len(text_labels) != num_images:
        raise ValueError(f"text_labels has {len(text_labels)} entries for {num_images} images")
    sizes = target_size_rows(target_sizes, num_images) if target_sizes is not None else None
    row_maps, row_ids = [], []
    for row in range(num_rows):
        ids = torch.as_tensor(label_ids[row])
        if len(ids) != len(positive_map[row]):
            raise ValueError(f"row {row}: {len(ids)} label ids for {len(positive_map[row])} positive-map labels")
        valid = ids >= 0
        names = None if text_labels is None else text_labels[int(chunk_to_image[row])]
        if names is not None and valid.any() and int(ids[valid].max()) >= len(names):
            raise ValueError(f"row {row}: label id {int(ids[valid].max())} but its image has {len(names)} text_labels")
        row_maps.append(positive_map[row][valid])
        row_ids.append(ids[valid])
    rows = detect_rows(
        outputs,
        row_maps,
        threshold=threshold,
        candidate_threshold=candidate_threshold,
        pre_nms_top_n=pre_nms_top_n,
        nms_threshold=nms_threshold,
        max_detections=max_detections,
        score_aggregation=score_aggregation,
    )

    image_sizes = output_field(outputs, "image_sizes")
    results = []
    for image in range(num_images):
        image_rows = (chunk_to_image == image).nonzero().squeeze(1).tolist()
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
