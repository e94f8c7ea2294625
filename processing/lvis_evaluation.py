"""Zero-shot LVIS evaluation as the original GLIP runs it, in resumable pieces: the data set, a detector for a fixed
1203-name vocabulary, a per-image detection cache and the metric's inputs (`metrics/lvis_detection`).

The original's settings (microsoft/GLIP, README "LVIS Evaluation" command line with `--task_config
configs/lvis/minival.yaml` or `configs/lvis/val.yaml`; engine/inference.py, data/datasets/evaluation/lvis/lvis_eval.py):
names in category-id order, split into prompt chunks of 40 (TEST.CHUNKED_EVALUATION 40), 300 detections kept per
chunk (MODEL.ATSS.DETECTIONS_PER_IMG 300), the default candidate threshold 0.05 (MODEL.ATSS.INFERENCE_TH,
config/defaults.py), test size 800 / 1333 (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST of both task configs), boxes as
[x, y, x2 - x, y2 - y] (its LVIS evaluator's `convert_to_xywh`, without COCO's legacy +1), and Fixed AP.
"""

import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .atomic_files import write_atomically, write_json_atomically
from .fixed_prompt import FixedPromptDetector
from .image_conversion import load_rgb_image

LVIS_NAMES_PER_CHUNK = 40
LVIS_DETECTIONS_PER_CHUNK = 300
LVIS_CANDIDATE_THRESHOLD = 0.05
LVIS_TEST_SIZE = (800, 1333)



def lvis_image_file(image: dict) -> str:
    """An LVIS image entry's file, relative to the COCO image root: its `file_name` (GLIP's "inserted_image_name"
    files) or the last two parts of its `coco_url` ("val2017/000000397133.jpg", as the original reads LVIS v1)."""
    if image.get("file_name"):
        return image["file_name"]
    if not image.get("coco_url"):
        raise ValueError(f"LVIS image {image.get('id')} has neither a `file_name` nor a `coco_url`")
    return "/".join(image["coco_url"].split("/")[-2:])


def load_lvis_evaluation_set(annotation_file: Union[str, Path]) -> Tuple[List[dict], List[dict], List[dict]]:
    """An LVIS-format json -> (records {image_id, file_name} in image-id order, categories {id, name, frequency} in id
    order, `lvis_detection` metric references in the records' order)."""
    data = json.loads(Path(annotation_file).read_text())
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise ValueError(f"{annotation_file} is not an LVIS-format file: it needs an `{key}` list")
    for image in data["images"]:
        missing = [key for key in ("id", "neg_category_ids", "not_exhaustive_category_ids") if key not in image]
        if missing:
            raise ValueError(f"{annotation_file}: image {image.get('id')} lacks {missing} (LVIS's federated fields)")
    by_image: Dict[int, List[dict]] = {image["id"]: [] for image in data["images"]}
    for annotation in data["annotations"]:
        if annotation.get("image_id") not in by_image:
            raise ValueError(
                f"{annotation_file}: annotation {annotation.get('id')} refers to image {annotation.get('image_id')}, which is not listed"
            )
        by_image[annotation["image_id"]].append(annotation)
    images = sorted(data["images"], key=lambda image: image["id"])
    records = [{"image_id": image["id"], "file_name": lvis_image_file(image)} for image in images]
    references = [
        {
            "image_id": image["id"],
            "boxes": [list(a["bbox"]) for a in by_image[image["id"]]],
            "labels": [a["category_id"] for a in by_image[image["id"]]],
            "area": [float(a.get("area", a["bbox"][2] * a["bbox"][3])) for a in by_image[image["id"]]],
            "neg_category_ids": list(image["neg_category_ids"]),
            "not_exhaustive_category_ids": list(image["not_exhaustive_category_ids"]),
        }
        for image in images
    ]
    categories = [
        {"id": c["id"], "name": c["name"], "frequency": c.get("frequency")} for c in sorted(data["categories"], key=lambda c: c["id"])
    ]
    return records, categories, references


def xyxy_to_lvis_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """(K, 4) xyxy -> (K, 4) [x, y, w, h] with w = x2 - x1 (the original's LVIS evaluator; no legacy +1)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((x1, y1, x2 - x1, y2 - y1), dim=-1)


def lvis_detector(
    model,
    processor,
    names: Sequence[str],
    names_per_chunk: int = LVIS_NAMES_PER_CHUNK,
    candidate_threshold: float = LVIS_CANDIDATE_THRESHOLD,
    max_detections: int = LVIS_DETECTIONS_PER_CHUNK,
) -> FixedPromptDetector:
    """The fixed-vocabulary detector of the original's chunked evaluation: prompt chunks of `names_per_chunk` names
    (fewer where 256 tokens would be exceeded) whose text features are computed once for the whole data set, at most
    `max_detections` per chunk, no final-score cut."""
    return FixedPromptDetector(
        model, processor, list(names), names_per_chunk=names_per_chunk, candidate_threshold=candidate_threshold, max_detections=max_detections
    )


class DetectionCache:
    """Per-image detections in a folder, one `<image_id>.safetensors` file each (boxes (K, 4) COCO xywh float32,
    scores (K,) float32, labels (K,) int64 category ids), written atomically: an interrupted run loses at most the image
    in progress and resumes where it stopped. `settings.json` records what produced the detections; a run with other
    settings (model, sizes, thresholds, vocabulary) is refused rather than mixed in.
    """

    def __init__(self, folder: Union[str, Path], settings: dict):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        settings = json.loads(json.dumps(settings))  # what reading it back gives (tuples -> lists)
        path = self.folder / "settings.json"
        if path.exists():
            saved = json.loads(path.read_text())
            changed = sorted(key for key in set(saved) | set(settings) if saved.get(key) != settings.get(key))
            if changed:
                details = "; ".join(f"{key}: cached {saved.get(key)!r}, now {settings.get(key)!r}" for key in changed[:5])
                raise ValueError(f"detection cache {self.folder} was written with other settings ({details}): use another folder")
        else:
            write_json_atomically(path, settings)

    def path(self, image_id: int) -> Path:
        return self.folder / f"{int(image_id)}.safetensors"

    def __contains__(self, image_id: int) -> bool:
        return self.path(image_id).exists()

    def put(self, image_id: int, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> None:
        tensors = {"boxes": boxes.float().reshape(-1, 4).contiguous(), "scores": scores.float().contiguous(), "labels": labels.long().contiguous()}
        write_atomically(self.path(image_id), lambda stream: stream.write(save(tensors)))

    def get(self, image_id: int) -> dict:
        """-> {"boxes", "scores", "labels"} tensors of a cached image (ValueError naming the file if it is damaged)."""
        path = self.path(image_id)
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"cached detections {path} cannot be read ({error}): delete the file to recompute that image") from None
        if set(tensors) != {"boxes", "scores", "labels"} or tensors["scores"].dim() != 1:
            raise ValueError(f"cached detections {path} are not boxes (K, 4), scores (K,), labels (K,): delete the file to recompute that image")
        count = tensors["scores"].shape[0]
        if tensors["boxes"].shape != (count, 4) or tensors["labels"].shape != (count,):
            raise ValueError(f"cached detections {path} are not boxes (K, 4), scores (K,), labels (K,): delete the file to recompute that image")
        return tensors


def run_detection(
    detect: FixedPromptDetector,
    records: Sequence[dict],
    category_ids: Sequence[int],
    cache: DetectionCache,
    image_root: Optional[Union[str, Path]] = None,
    progress: bool = True,
) -> dict:
    """Detect every record's image that the cache does not hold yet, caching each as it finishes.

    Images that cannot be read are skipped and counted (they are evaluated with no detections).
    Returns {"computed": n, "cached": n, "skipped": {image_id: reason}}.
    """
    from tqdm.auto import tqdm

    counts = {"computed": 0, "cached": 0, "skipped": {}}
    bar = tqdm(records, desc="images", unit="image", disable=not progress)
    for record in bar:
        image_id = record["image_id"]
        if image_id in cache:
            counts["cached"] += 1
            continue
        path = Path(image_root) / record["file_name"] if image_root is not None else Path(record["file_name"])
        try:
            image = load_rgb_image(path)
        except (OSError, ValueError) as error:
            counts["skipped"][image_id] = f"{path}: {error}"
            bar.set_postfix(skipped=len(counts["skipped"]))
            continue
        (result,) = detect([image])
        ids = torch.as_tensor(list(category_ids), dtype=torch.long)
        cache.put(image_id, xyxy_to_lvis_xywh(result["boxes"].float()), result["scores"].float(), ids[result["labels"].long()])
        counts["computed"] += 1
    return counts


def _stable_top(scores: torch.Tensor, limit: int) -> torch.Tensor:
    """Indices of the `limit` highest scores, ties in input order (the order the lvis API's stable sorts keep)."""
    return torch.sort(-scores, stable=True).indices[:limit]


def cached_predictions(
    cache: DetectionCache,
    image_ids: Iterable[int],
    protocol: str = "fixed",
    max_detections: int = 300,
    max_detections_per_category: int = 10000,
) -> List[dict]:
    """The cached detections of `image_ids` as `lvis_detection` predictions, reduced to what the protocol evaluates
    while they are read (a full run holds millions of detections): the `max_detections` best of each image
    (standard), or the `max_detections_per_category` best of each category so far (fixed). The metric applies the
    same cap again, which changes nothing. One prediction per image, in `image_ids` order; an image without a cache
    file (skipped: unreadable) has an empty one, so that it counts with no detections."""
    if protocol not in ("standard", "fixed"):
        raise ValueError(f"protocol must be 'standard' or 'fixed', got {protocol!r}")
    kept: List[Tuple[int, dict]] = []  # (image_id, tensors) in image order
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    for image_id in image_ids:
        tensors = cache.get(image_id) if image_id in cache else empty
        if protocol == "standard":
            order = _stable_top(tensors["scores"], max_detections)
            tensors = {name: value[order] for name, value in tensors.items()}
        kept.append((image_id, tensors))
    if protocol == "fixed":
        kept = _top_per_category(kept, max_detections_per_category)
    return [
        {"image_id": image_id, "boxes": t["boxes"].tolist(), "scores": t["scores"].tolist(), "labels": t["labels"].tolist()}
        for image_id, t in kept
    ]


def _top_per_category(kept: List[Tuple[int, dict]], limit: int) -> List[Tuple[int, dict]]:
    """Keep, per category, the `limit` best detections over all images (ties: earlier images first)."""
    if not kept:
        return kept
    scores = torch.cat([t["scores"] for _, t in kept])
    labels = torch.cat([t["labels"] for _, t in kept])
    keep = torch.zeros(len(scores), dtype=torch.bool)
    for label in labels.unique():
        members = (labels == label).nonzero().squeeze(1)
        keep[members[_stable_top(scores[members], limit)]] = True
    offsets = [0]
    for _, t in kept:
        offsets.append(offsets[-1] + len(t["scores"]))
    return [
        (image_id, {name: value[keep[offsets[i] : offsets[i + 1]]] for name, value in t.items()}) for i, (image_id, t) in enumerate(kept)
    ]
