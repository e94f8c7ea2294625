"""GLIP training data: one record format for detection and grounding, `datasets` loading, detection prompts with
sampled negatives, and the collator that turns records into `GLIPModel` inputs + `labels`.

Record format (one row per image; the fields of a COCO / MDETR annotation file, flattened per image):

```
{"file_name": "000001.jpg", "width": 640, "height": 480,        # width / height optional (checked when given)
 "caption": null,                                              # detection: no caption, boxes carry category_id
 "annotations": [{"bbox": [x, y, w, h], "category_id": 3}]}
{"file_name": "000002.jpg", "caption": "a dog on the left",      # grounding: a caption, boxes carry char spans
 "annotations": [{"bbox": [x, y, w, h], "tokens_positive": [[0, 5]]}]}
```

`bbox` is COCO (x, y, w, h) in pixels of the stored image; `tokens_positive` lists the [start, end) character spans
of the phrases a box is grounded to (MDETR / GoldG convention). Detection `category_id`s are the annotation file's
ids, mapped to contiguous labels through its `categories` list sorted by id (the original's
`json_category_id_to_contiguous_id`). `load_training_records` reads COCO / MDETR json files (detection or grounding,
chosen per image by the presence of a `caption`) and JSON-lines shards of the records above (optionally streamed).
"""

import json
import logging
import random
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import PIL.Image
import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import IterableDataset as TorchIterableDataset
from transformers.image_transforms import corners_to_center_format

from .image_conversion import load_rgb_image
from .prompts import DEFAULT_SEPARATOR, Prompt, build_detection_prompt, clean_class_names
from .train_transforms import GLIPTrainTransform, Span, legacy_xyxy_from_coco

logger = logging.getLogger(__name__)

# DATASETS.RANDOM_SAMPLE_NEG of the GLIP pre-training configs; CONTROL_PROB[2] ("full negatives" probability)
GLIP_RANDOM_SAMPLE_NEG = 85
GLIP_FULL_NEGATIVE_PROB = 0.5


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read the annotation file {path}: {error}") from error


def coco_categories(path: Union[str, Path]) -> List[dict]:
    """The `categories` list ({"id", "name"}) of a COCO-format json file, sorted by id."""
    data = _read_json(Path(path))
    if not isinstance(data, dict) or not isinstance(data.get("categories"), list) or not data["categories"]:
        raise ValueError(f"{path} has no non-empty `categories` list")
    return sorted(data["categories"], key=lambda category: category["id"])


def coco_json_to_records(path: Union[str, Path]) -> Tuple[List[dict], Optional[List[dict]]]:
    """A COCO detection json or an MDETR-style grounding json (image entries with a `caption`, annotations with
    `tokens_positive`) -> (records in image-id order, its sorted categories or None).

    Crowd annotations (`iscrowd` = 1) are dropped, as the original training datasets do.
    """
    data = _read_json(Path(path))
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path} is not a COCO-format file: it needs `images` and `annotations` lists")
    by_image: Dict[Any, List[dict]] = {}
    for annotation in data["annotations"]:
        if annotation.get("iscrowd", 0):
            continue
        entry = {"bbox": annotation.get("bbox"), "category_id": annotation.get("category_id"), "tokens_positive": annotation.get("tokens_positive")}
        by_image.setdefault(annotation.get("image_id"), []).append(entry)
    records = [
        {
            "image_id": image.get("id"),
            "file_name": image.get("file_name"),
            "width": image.get("width"),
            "height": image.get("height"),
            "caption": image.get("caption"),
            "annotations": by_image.get(image.get("id"), []),
        }
        for image in sorted(data["images"], key=lambda image: image.get("id"))
    ]
    categories = sorted(data["categories"], key=lambda category: category["id"]) if data.get("categories") else None
    return records, categories


def load_training_records(files: Union[str, Path, Sequence[Union[str, Path]]], streaming: bool = False):
    """Load training records with `datasets`: COCO / MDETR `.json` files, or `.jsonl` shards of records.

    Args:
        files: one path or a list; all `.json` or all `.jsonl`.
        streaming: stream `.jsonl` shards (`datasets.IterableDataset`) instead of loading them into Arrow.

    Returns:
        (`datasets.Dataset` or `datasets.IterableDataset`, categories of the json files or None).
    """
    import datasets

    paths = [Path(files)] if isinstance(files, (str, Path)) else [Path(path) for path in files]
    if not paths:
        raise ValueError("no training files were given")
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise ValueError(f"training files not found: {missing}")
    suffixes = {path.suffix for path in paths}
    if suffixes == {".jsonl"}:
        return datasets.load_dataset("json", data_files=[str(path) for path in paths], split="train", streaming=streaming), None
    if suffixes != {".json"}:
        raise ValueError(f"training files must be all COCO/MDETR .json or all .jsonl record shards, got {sorted(suffixes)}")
    if streaming:
        raise ValueError("COCO/MDETR .json files are single documents and cannot be streamed; convert them to .jsonl shards")
    records, categories = [], None
    for path in paths:
        file_records, file_categories = coco_json_to_records(path)
        if categories is not None and file_categories is not None and file_categories != categories:
            raise ValueError(f"{path} has other categories than the previous files")
        categories = categories or file_categories
        records += file_records
    return datasets.Dataset.from_list(records), categories


class IndexedDataset(TorchDataset):
    """A map-style dataset of records, yielding {"record", "index", "epoch"} so that every sample's random
    augmentation is a function of (seed, epoch, index): identical across processes, workers and resumed runs."""

    def __init__(self, records):
        self.records = records
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return {"record": self.records[index], "index": index, "epoch": self.epoch}


class IndexedIterableDataset(TorchIterableDataset):
    """The streaming counterpart of `IndexedDataset` (the index is the position in the epoch's stream)."""

    def __init__(self, records):
        self.records = records
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch
        if hasattr(self.records, "set_epoch"):
            self.records.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict]:
        for index, record in enumerate(self.records):
            yield {"record": record, "index": index, "epoch": self.epoch}


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The random generator of one sample (string seeds are hashed deterministically by `random`)."""
    return random.Random(f"glip:{seed}:{epoch}:{index}")


class DetectionPromptSampler:
    """Detection prompts as the original pre-training (`convert_object_detection_to_grounding_optimized_for_od` with
    `check_for_positive_overflow`, glip_architecture.md section 9):

    1. the image's positive classes, shuffled, are kept while the running token count of "name. " stays within
       `max_text_len - 2` (boxes of dropped classes are removed by the caller);
    2. negatives: with probability `full_negative_prob` `max_negatives` class draws, else a uniform number in
       1..max_negatives (DATASETS.RANDOM_SAMPLE_NEG, CONTROL_PROB); draws that are positives are discarded, the rest
       shuffled and kept while the remaining token budget stays positive;
    3. prompt = negatives + positives, shuffled, joined by ". " (`build_detection_prompt`).

    `max_negatives=None` puts every class in every prompt (the fine-tuning path, `convert_od_to_grounding_simple`),
    still within the token budget. `shuffle=False` keeps class-id order (DATASETS.DISABLE_SHUFFLE).
    Deviation: the original may also draw its "__background__" entry as a negative; there is none here.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        tokenizer,
        max_negatives: Optional[int] = GLIP_RANDOM_SAMPLE_NEG,
        shuffle: bool = True,
        full_negative_prob: float = GLIP_FULL_NEGATIVE_PROB,
        max_text_len: int = 256,
        separator: str = DEFAULT_SEPARATOR,
    ):
        if max_negatives is not None and max_negatives < 0:
            raise ValueError(f"max_negatives must be >= 0 or None (all classes), got {max_negatives}")
        if not 0.0 <= full_negative_prob <= 1.0:
            raise ValueError(f"full_negative_prob must be in [0, 1], got {full_negative_prob}")
        self.cleaned = clean_class_names(list(class_names))
        self.max_negatives = max_negatives
        self.shuffle = shuffle
        self.full_negative_prob = full_negative_prob
        self.separator = separator
        self.budget = max_text_len - tokenizer.num_special_tokens_to_add()
        # tokens of "name. " per class, as the original's budget counts them (section 9)
        self.token_counts = [len(ids) for ids in tokenizer([name + separator for name in self.cleaned], add_special_tokens=False)["input_ids"]]

    @property
    def num_classes(self) -> int:
        return len(self.cleaned)

    def sample(self, positive_labels: Sequence[int], rng: random.Random) -> List[int]:
        """Contiguous labels of the prompt, in prompt order."""
        positive_set = set(positive_labels)
        positives = sorted(positive_set)
        if self.shuffle:
            rng.shuffle(positives)
        kept, length = [], 0
        for label in positives:
            length += self.token_counts[label]  # counted before the check: an overflow leaves no room for negatives
            if length > self.budget:
                break
            kept.append(label)

        if self.max_negatives is None:
            drawn = list(range(self.num_classes))
        else:
            full = min(self.max_negatives, self.num_classes)
            count = full if rng.random() < self.full_negative_prob or full == 0 else rng.randint(1, full)
            drawn = rng.sample(range(self.num_classes), count)
        negatives = [label for label in drawn if label not in positive_set]
        if self.shuffle:
            rng.shuffle(negatives)
        remaining, screened = self.budget - length, []
        for label in negatives:
            remaining -= self.token_counts[label]
            if remaining <= 0:
                break
            screened.append(label)

        labels = screened + kept
        if self.shuffle:
            rng.shuffle(labels)
        else:
            labels.sort()
        return labels

    def prompt(self, labels: Sequence[int]) -> Prompt:
        return build_detection_prompt([self.cleaned[label] for label in labels], self.separator)


class SkippedSample(Exception):
    """A sample that cannot be used; `reason` is the counter key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class GLIPTrainingCollator:
    """Records -> a `GLIPModel` training batch.

    Per sample: load the image (RGB); keep valid boxes in the original's legacy xyxy convention; build the prompt
    (detection: `DetectionPromptSampler`; grounding: the caption and its phrase spans); apply `GLIPTrainTransform`;
    tokenize and build the positive maps with the `GLIPProcessor`. Then normalise and pad the images with the
    processor's image processor (no resize) and pad the prompts to the longest one.

    Returned batch: `pixel_values` (B, 3, H, W), `pixel_mask` (B, H, W), `input_ids` / `attention_mask` /
    `token_type_ids` (B, T), `labels` (B dicts: `boxes` (M, 4) normalised cxcywh of the unpadded image,
    `positive_map` (M, T) 0/1), and `skipped` (a `Counter` of the samples / boxes dropped in this batch, by reason);
    None when every sample of the batch was skipped.

    Boxes: `labels["boxes"]` is `corners_to_center(xyxy) / (w, h, w, h)` of the original's legacy xyxy targets
    (x2 = x + w - 1, resized, flipped as x' = w - x - 1); the model's `center_to_corners(boxes) * (w, h, w, h)` gives
    those xyxy back up to float32 rounding (< 1e-3 px), which is what its ATSS loss matches against.

    Prompts are padded to the longest in the batch, not to 256 tokens as the original: padded tokens are masked out of
    the loss, and the original's "[NoObj]" column (token 255) is masked too unless a prompt fills all 256 tokens.

    Bad input never raises: an unreadable image, a size that differs from the record's, a record without valid boxes
    or a caption whose prompt does not tokenize is skipped; an invalid box (non-finite, w or h <= 0, empty after
    clipping, unknown category, missing or invalid spans) is dropped. Each is logged as a warning and counted in
    `skipped` and in `self.skipped` (per process / worker).

    Args:
        processor: a `GLIPProcessor` (tokenizer, max_text_len, image normalisation and padding).
        class_names: names of the contiguous detection labels (needed for detection records).
        category_ids: the annotation file's category id of each class (default: 0..C-1 are the ids).
        image_root: folder that `file_name`s are relative to.
        transform: the training transform (default: GLIP's multi-scale 480-800 / 1333 and flip 0.5).
        max_negatives, shuffle_classes, full_negative_prob: see `DetectionPromptSampler`.
        seed: base seed of the per-sample augmentation (`sample_rng`).
    """

    def __init__(
        self,
        processor,
        class_names: Optional[Sequence[str]] = None,
        category_ids: Optional[Sequence[int]] = None,
        image_root: Optional[Union[str, Path]] = None,
        transform: Optional[GLIPTrainTransform] = None,
        max_negatives: Optional[int] = GLIP_RANDOM_SAMPLE_NEG,
        shuffle_classes: bool = True,
        full_negative_prob: float = GLIP_FULL_NEGATIVE_PROB,
        seed: int = 0,
    ):
        self.processor = processor
        self.image_root = Path(image_root) if image_root is not None else None
        self.transform = transform if transform is not None else GLIPTrainTransform()
        self.seed = seed
        self.sampler = None
        self.category_to_label: Dict[int, int] = {}
        if class_names is not None:
            self.sampler = DetectionPromptSampler(
                class_names, processor.tokenizer, max_negatives, shuffle_classes, full_negative_prob, processor.max_text_len, processor.separator
            )
            ids = list(category_ids) if category_ids is not None else list(range(len(class_names)))
            if len(ids) != len(class_names) or len(set(ids)) != len(ids):
                raise ValueError(f"category_ids must be {len(class_names)} distinct ids, one per class name; got {ids}")
            self.category_to_label = {int(category): label for label, category in enumerate(ids)}
        self.skipped: Counter = Counter()

    @classmethod
    def from_categories(cls, processor, categories: Sequence[dict], **kwargs) -> "GLIPTrainingCollator":
        """Collator for COCO `categories` ({"id", "name"}), contiguous labels in id order."""
        ordered = sorted(categories, key=lambda category: category["id"])
        return cls(processor, [c["name"] for c in ordered], [c["id"] for c in ordered], **kwargs)

    # -- one sample ---------------------------------------------------------------------------------------------------
    def _load_image(self, record: dict) -> PIL.Image.Image:
        file_name = record.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise SkippedSample("corrupt_image", f"record has no file_name: {record!r:.200}")
        path = self.image_root / file_name if self.image_root is not None else Path(file_name)
        try:
            image = load_rgb_image(path)
        except ValueError as error:
            raise SkippedSample("corrupt_image", str(error)) from error
        width, height = record.get("width"), record.get("height")
        if width is not None and height is not None and (int(width), int(height)) != image.size:
            raise SkippedSample("size_mismatch", f"image {path} is {image.size[0]}x{image.size[1]}, the record says {width}x{height}")
        return image

    def _valid_annotations(self, record: dict, image: PIL.Image.Image, grounding: bool, counts: Counter):
        """-> (legacy xyxy boxes (M, 4), per box its label (detection) or its spans (grounding))."""
        boxes, targets = [], []
        for annotation in record.get("annotations") or []:
            bbox = annotation.get("bbox")
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or any(v is None for v in bbox):
                counts["invalid_box"] += 1
                continue
            box = torch.tensor([float(v) for v in bbox], dtype=torch.float64)
            if not bool(torch.isfinite(box).all()) or box[2] <= 0 or box[3] <= 0:
                counts["invalid_box"] += 1
                continue
            if grounding:
                spans = annotation.get("tokens_positive") or []
                caption_length = len(record["caption"])
                try:
                    target = tuple(sorted({(int(start), int(end)) for start, end in spans}))
                except (TypeError, ValueError):
                    target = ()
                if not target or any(not 0 <= start < end <= caption_length for start, end in target):
                    counts["invalid_box"] += 1
                    continue
            else:
                target = self.category_to_label.get(annotation.get("category_id"))
                if target is None:
                    counts["invalid_box"] += 1
                    continue
            boxes.append(box)
            targets.append(target)
        if not boxes:
            return torch.zeros(0, 4), targets
        xyxy, keep = legacy_xyxy_from_coco(torch.stack(boxes), image.width, image.height)
        if not bool(keep.all()):
            counts["invalid_box"] += int((~keep).sum())
        return xyxy[keep], [target for target, kept in zip(targets, keep.tolist()) if kept]

    def _sample(self, sample: dict, counts: Counter) -> dict:
        """One {"record", "index", "epoch"} -> {"image", "boxes" legacy xyxy, "encoding", "box_rows"} or SkippedSample."""
        record = sample["record"]
        rng = sample_rng(self.seed, sample["epoch"], sample["index"])
        caption = record.get("caption")
        grounding = caption is not None
        if grounding and (not isinstance(caption, str) or not caption.strip()):
            raise SkippedSample("invalid_caption", f"record {record.get('file_name')!r} has an empty caption")
        if not grounding and self.sampler is None:
            raise ValueError("a detection record (no caption) needs the collator's class_names / categories")
        image = self._load_image(record)
        boxes, targets = self._valid_annotations(record, image, grounding, counts)
        if len(targets) == 0:
            raise SkippedSample("no_valid_boxes", f"image {record.get('file_name')!r} has no valid box")

        if grounding:
            spans: List[Span] = sorted({span for target in targets for span in target})
            image, boxes, caption, new_spans = self.transform(image, boxes, rng, caption, spans)
            span_row = {old: row for row, old in enumerate(spans)}
            box_rows = [[span_row[span] for span in target] for target in targets]
            text, phrase_spans = caption, new_spans
        else:
            labels = self.sampler.sample(sorted(set(targets)), rng)
            label_row = {label: row for row, label in enumerate(labels)}
            kept = torch.tensor([target in label_row for target in targets], dtype=torch.bool)
            if not bool(kept.all()):
                counts["dropped_for_prompt_length"] += int((~kept).sum())
            boxes = boxes[kept]
            box_rows = [[label_row[target]] for target in targets if target in label_row]
            prompt = self.sampler.prompt(labels)
            image, boxes, _, _ = self.transform(image, boxes, rng)
            text, phrase_spans = prompt.text, list(prompt.spans)
        try:
            encoding = self.processor(text=text, phrase_spans=phrase_spans)
        except ValueError as error:
            raise SkippedSample("invalid_caption", f"prompt of {record.get('file_name')!r} cannot be used: {error}") from error
        return {"image": image, "boxes": boxes, "encoding": encoding, "box_rows": box_rows}

    # -- the batch ----------------------------------------------------------------------------------------------------
    def __call__(self, samples: List[dict]) -> Optional[dict]:
        counts: Counter = Counter()
        prepared = []
        for sample in samples:
            try:
                prepared.append(self._sample(sample, counts))
            except SkippedSample as skipped:
                counts[skipped.reason] += 1
                logger.warning("skipping a training sample (%s): %s", skipped.reason, skipped)
        if counts:
            dropped = {key: value for key, value in counts.items() if key in ("invalid_box", "dropped_for_prompt_length")}
            if dropped:
                logger.warning("dropped boxes in this batch: %s", dropped)
            self.skipped.update(counts)
        if not prepared:
            return None

        images = self.processor.image_processor([item["image"] for item in prepared], do_resize=False, return_tensors="pt")
        num_tokens = max(item["encoding"]["input_ids"].shape[1] for item in prepared)
        pad_id = self.processor.tokenizer.pad_token_id
        input_ids = torch.full((len(prepared), num_tokens), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prepared), num_tokens), dtype=torch.long)
        token_type_ids = torch.zeros((len(prepared), num_tokens), dtype=torch.long)
        labels = []
        for row, item in enumerate(prepared):
            encoding = item["encoding"]
            length = encoding["input_ids"].shape[1]
            input_ids[row, :length] = encoding["input_ids"][0]
            attention_mask[row, :length] = encoding["attention_mask"][0]
            token_type_ids[row, :length] = encoding["token_type_ids"][0]
            label_map = encoding["positive_map"][0]  # (L, length): one row per prompt label / phrase span
            positive_map = torch.zeros(len(item["box_rows"]), num_tokens)
            for box, rows in enumerate(item["box_rows"]):
                positive_map[box, :length] = label_map[rows].amax(dim=0)  # a box grounded to several phrases: union
            height, width = item["image"].height, item["image"].width
            scale = torch.tensor([width, height, width, height], dtype=torch.float64)
            boxes = corners_to_center_format(item["boxes"].to(torch.float64)) / scale
            labels.append({"boxes": boxes.to(torch.float32), "positive_map": positive_map})
        return {
            "pixel_values": images["pixel_values"],
            "pixel_mask": images["pixel_mask"],
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "labels": labels,
            "skipped": counts,
        }
