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
`json_category_id_to_contiguous_id`). `file_name` is relative to the collator's `image_root`. Annotations with
`iscrowd` = 1 are dropped, as the original training datasets do; other fields are ignored.

`load_training_records` reads COCO / MDETR json files (detection or grounding, chosen per image by the presence of a
`caption`) and JSON-lines shards of the records above (optionally streamed); shards of either kind, or mixing both,
load together because every record is normalised to one explicit `datasets.Features` schema
(`training_record_features`). A line that is not valid JSON, or an empty shard, is an error naming the file and line.
A record that does not fit the format (a wrong type, a negative size...) is kept with the reason in its `invalid`
field; the collator skips it and counts it (`invalid_record`), as every other bad sample.
"""

import hashlib
import json
import logging
import math
import random
from collections import Counter
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

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
# per-sample warnings logged per reason by one collator (process / worker); every sample is counted regardless
WARNINGS_PER_REASON = 5
# bump when `normalize_record` changes: it is part of the fingerprint of cached `.jsonl` loads
_RECORD_FORMAT_VERSION = 1


def training_record_features():
    """The `datasets.Features` of a normalised training record (`normalize_record`)."""
    import datasets

    return datasets.Features(
        {
            "file_name": datasets.Value("string"),
            "width": datasets.Value("int64"),
            "height": datasets.Value("int64"),
            "caption": datasets.Value("string"),
            "annotations": datasets.List(
                {
                    "bbox": datasets.List(datasets.Value("float64")),
                    "category_id": datasets.Value("int64"),
                    "tokens_positive": datasets.List(datasets.List(datasets.Value("int64"))),
                }
            ),
            "invalid": datasets.Value("string"),
        }
    )


def _is_integer(value) -> bool:
    """An int, or an integral float, that int64 holds exactly (|value| < 2**53); never a bool."""
    if isinstance(value, bool) or not isinstance(value, Real):
        return False
    if isinstance(value, Integral):
        return abs(value) < 2**53
    return math.isfinite(value) and float(value).is_integer() and abs(value) < 2**53


def _floats(values) -> Optional[List[float]]:
    """4 real numbers (not bools) -> floats; anything else, or an integer beyond the float range, -> None."""
    if not (isinstance(values, (list, tuple)) and len(values) == 4 and all(isinstance(v, Real) and not isinstance(v, bool) for v in values)):
        return None
    try:
        return [float(v) for v in values]
    except OverflowError:
        return None


def _normalize_annotation(annotation) -> Optional[dict]:
    """One annotation -> {"bbox", "category_id", "tokens_positive"} with None for every field that is not of its type
    (the collator drops such a box and counts it); None for a crowd annotation."""
    if not isinstance(annotation, dict):
        return {"bbox": None, "category_id": None, "tokens_positive": None}
    if annotation.get("iscrowd"):
        return None
    category_id = annotation.get("category_id")
    spans = annotation.get("tokens_positive")
    if not (isinstance(spans, (list, tuple)) and all(isinstance(span, (list, tuple)) and len(span) == 2 and all(map(_is_integer, span)) for span in spans)):
        spans = None
    return {
        "bbox": _floats(annotation.get("bbox")),
        "category_id": int(category_id) if _is_integer(category_id) else None,
        "tokens_positive": [[int(start), int(end)] for start, end in spans] if spans is not None else None,
    }


def normalize_record(record) -> dict:
    """Any object -> a record of the `training_record_features` schema, never raising.

    Record-level problems (not a JSON object, no `file_name` string, a `width` / `height` that is not a positive
    integer, a non-string `caption`, `annotations` that is not a list) set `invalid` to the reason; annotation-level
    problems set the bad field to None (the collator drops that box). Crowd annotations are dropped.
    """
    empty = {"file_name": None, "width": None, "height": None, "caption": None, "annotations": [], "invalid": None}
    if not isinstance(record, dict):
        return {**empty, "invalid": f"the record is a {type(record).__name__}, not an object"}
    problems = []
    file_name = record.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        problems.append(f"file_name {file_name!r} is not a non-empty string")
        file_name = None
    sizes = {}
    for key in ("width", "height"):
        value = record.get(key)
        if value is not None and not (_is_integer(value) and value > 0):
            problems.append(f"{key} {value!r:.40} is not a positive integer")
            value = None
        sizes[key] = int(value) if value is not None else None
    caption = record.get("caption")
    if caption is not None and not isinstance(caption, str):
        problems.append(f"caption {caption!r:.50} is not a string")
        caption = None
    annotations = record.get("annotations")
    if annotations is None:
        annotations = []
    if not isinstance(annotations, (list, tuple)):
        problems.append(f"annotations is a {type(annotations).__name__}, not a list")
        annotations = []
    normalized = [entry for entry in map(_normalize_annotation, annotations) if entry is not None]
    invalid = "; ".join(problems) if problems else record.get("invalid") if isinstance(record.get("invalid"), str) else None
    return {"file_name": file_name, **sizes, "caption": caption, "annotations": normalized, "invalid": invalid}


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


def _few(values) -> str:
    values = sorted(values, key=repr)
    return ", ".join(map(repr, values[:5])) + (f" and {len(values) - 5} more" if len(values) > 5 else "")


def coco_json_to_records(path: Union[str, Path]) -> Tuple[List[dict], Optional[List[dict]]]:
    """A COCO detection json or an MDETR-style grounding json (image entries with a `caption`, annotations with
    `tokens_positive`) -> (records in image-id order, its sorted categories or None).

    Crowd annotations (`iscrowd` = 1) are dropped, as the original training datasets do.

    Raises:
        ValueError: the file is not COCO-shaped, an image or annotation entry is not an object or has no id, two
            images share an id (their boxes could not be told apart), or annotations refer to no image.
    """
    data = _read_json(Path(path))
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path} is not a COCO-format file: it needs `images` and `annotations` lists")
    for kind in ("images", "annotations"):
        key = "id" if kind == "images" else "image_id"
        broken = [index for index, entry in enumerate(data[kind]) if not isinstance(entry, dict) or entry.get(key) is None]
        if broken:
            raise ValueError(f"{path}: {kind} entries {_few(broken)} are not objects with an `{key}`")
    counts = Counter(image["id"] for image in data["images"])
    duplicates = [image_id for image_id, count in counts.items() if count > 1]
    if duplicates:
        raise ValueError(f"{path}: {len(duplicates)} image ids are used by several images ({_few(duplicates)}); their boxes cannot be told apart")
    by_image: Dict[Any, List[dict]] = {image_id: [] for image_id in counts}
    orphans = Counter()
    for annotation in data["annotations"]:
        if annotation["image_id"] not in by_image:
            orphans[annotation["image_id"]] += 1
        elif not annotation.get("iscrowd", 0):
            by_image[annotation["image_id"]].append(
                {"bbox": annotation.get("bbox"), "category_id": annotation.get("category_id"), "tokens_positive": annotation.get("tokens_positive")}
            )
    if orphans:
        raise ValueError(f"{path}: {sum(orphans.values())} annotations refer to image ids that no image has ({_few(orphans)})")
    records = [
        {
            "image_id": image["id"],
            "file_name": image.get("file_name"),
            "width": image.get("width"),
            "height": image.get("height"),
            "caption": image.get("caption"),
            "annotations": by_image[image["id"]],
        }
        for image in sorted(data["images"], key=lambda image: (str(type(image["id"])), image["id"]))
    ]
    categories = sorted(data["categories"], key=lambda category: category["id"]) if data.get("categories") else None
    return records, categories


def _jsonl_records(paths: List[str]) -> Iterator[dict]:
    """Normalised records of JSON-lines shards (blank lines ignored). `paths` is a list so that `datasets` can split
    the shards over data-loading workers."""
    for path in paths:
        found = False
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {line_number}: not valid JSON ({error})") from error
                found = True
                yield normalize_record(record)
        if not found:
            raise ValueError(f"{path} contains no records (an empty .jsonl shard)")


def _check_not_empty(path: Path):
    """Fail fast on an empty shard (also when streaming): read up to its first non-blank line."""
    with path.open(encoding="utf-8") as handle:
        if not any(line.strip() for line in handle):
            raise ValueError(f"{path} contains no records (an empty .jsonl shard)")


def load_training_records(files: Union[str, Path, Sequence[Union[str, Path]]], streaming: bool = False):
    """Load training records with `datasets`: COCO / MDETR `.json` files, or `.jsonl` shards of records (detection,
    grounding or both, in any mix), normalised to `training_record_features()`.

    Args:
        files: one path or a list; all `.json` or all `.jsonl`.
        streaming: stream `.jsonl` shards (`datasets.IterableDataset`) instead of loading them into Arrow.

    Returns:
        (`datasets.Dataset` or `datasets.IterableDataset`, categories of the json files or None).

    Raises:
        ValueError: missing or empty files, mixed suffixes, a `.jsonl` line that is not JSON (file and line named;
            when streaming, raised when the line is reached), a broken COCO file (see `coco_json_to_records`).
    """
    import datasets

    paths = [Path(files)] if isinstance(files, (str, Path)) else [Path(path) for path in files]
    if not paths:
        raise ValueError("no training files were given")
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise ValueError(f"training files not found: {missing}")
    suffixes = {path.suffix for path in paths}
    features = training_record_features()
    if suffixes == {".jsonl"}:
        for path in paths:
            _check_not_empty(path)
        gen_kwargs = {"paths": [str(path) for path in paths]}
        if streaming:
            return datasets.IterableDataset.from_generator(_jsonl_records, features=features, gen_kwargs=gen_kwargs), None
        # the Arrow cache is keyed on the files' contents (size, mtime), not only on their names
        signature = [(str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns) for path in paths]
        fingerprint = hashlib.sha256(json.dumps([_RECORD_FORMAT_VERSION, signature]).encode()).hexdigest()
        try:
            return datasets.Dataset.from_generator(_jsonl_records, features=features, gen_kwargs=gen_kwargs, fingerprint=fingerprint), None
        except datasets.exceptions.DatasetGenerationError as error:
            if isinstance(error.__cause__, ValueError):  # our message (file and line) rather than the wrapper's
                raise error.__cause__ from None
            raise
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
        records += [normalize_record(record) for record in file_records]
    return datasets.Dataset.from_list(records, features=features), categories


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
    """The streaming counterpart of `IndexedDataset` (the index is the position in the epoch's stream).

    It yields whole groups of `group_size` records (the global batch: per-device batch size x processes) and drops
    the incomplete last group itself, so that the drop is counted: the last yielded item carries
    `"dropped_tail": k` (k records dropped), which the collator counts as `incomplete_last_batch`.
    """

    def __init__(self, records, group_size: int = 1):
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
        self.records = records
        self.group_size = group_size
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch
        if hasattr(self.records, "set_epoch"):
            self.records.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict]:
        previous, group = [], []  # one complete group is held back until we know whether it is the last one
        for index, record in enumerate(self.records):
            group.append({"record": record, "index": index, "epoch": self.epoch})
            if len(group) == self.group_size:
                yield from previous
                previous, group = group, []
        if previous and group:
            previous[-1] = {**previous[-1], "dropped_tail": len(group)}
        yield from previous


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

    Addition (not in the original; 0, the default, draws exactly the original's prompts): with probability
    `partial_positive_prob` the prompt names only k of the positives, k uniform in 0..n, before the token budget; the
    others are `unnamed` (never drawn as negatives, their boxes removed by the caller, so they are background), and
    with k = 0 the prompt holds only negatives (one positive is named after all if no negative is left). Detection
    prompts otherwise name something in the image every time, so a model trained only on them scores any object high
    against a prompt of one unrelated name (the one-name-per-forward prompts of transformers' stock pipeline); GLIP's
    web-scale grounding captions, which rarely name every object, teach part of the same thing.
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
        partial_positive_prob: float = 0.0,
    ):
        if max_negatives is not None and max_negatives < 0:
            raise ValueError(f"max_negatives must be >= 0 or None (all classes), got {max_negatives}")
        for name, value in (("full_negative_prob", full_negative_prob), ("partial_positive_prob", partial_positive_prob)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        self.partial_positive_prob = partial_positive_prob
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

    def sample(self, positive_labels: Sequence[int], rng: random.Random) -> Tuple[List[int], Set[int]]:
        """-> (contiguous labels of the prompt in prompt order, the positives left `unnamed` on purpose)."""
        positive_set = set(positive_labels)
        positives = sorted(positive_set)
        if self.shuffle:
            rng.shuffle(positives)
        unnamed: Set[int] = set()
        if self.partial_positive_prob and rng.random() < self.partial_positive_prob:  # no draw at 0: the original's stream
            named = rng.sample(positives, rng.randint(0, len(positives))) if positives else []
            unnamed = positive_set.difference(named)
            positives = [label for label in positives if label not in unnamed]
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
        if not labels and unnamed:  # a partial prompt with no name left at all: name one positive after all
            labels = [min(unnamed)]
            unnamed.discard(labels[0])
        if self.shuffle:
            rng.shuffle(labels)
        else:
            labels.sort()
        return labels, unnamed

    def prompt(self, labels: Sequence[int]) -> Prompt:
        return build_detection_prompt([self.cleaned[label] for label in labels], self.separator)


class SkippedSample(Exception):
    """A sample that cannot be used; `reason` is the counter key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# counter key of the records dropped with the incomplete last batch of a stream
INCOMPLETE_LAST_BATCH = "incomplete_last_batch"
UNNAMED_IN_PROMPT = "unnamed_in_prompt"  # boxes left out of a partial prompt on purpose (`partial_positive_prob`)


def is_empty_batch(batch: dict) -> bool:
    """True for the collator's output when every sample of the batch was skipped (it carries only `skipped`)."""
    return "pixel_values" not in batch


class GLIPTrainingCollator:
    """Records -> a `GLIPModel` training batch.

    Per sample: normalise the record (`normalize_record`); load the image (RGB); keep valid boxes in the original's
    legacy xyxy convention; build the prompt (detection: `DetectionPromptSampler`; grounding: the caption and its
    phrase spans); apply `GLIPTrainTransform`; tokenize and build the positive maps with the `GLIPProcessor`. Then
    normalise and pad the images with the processor's image processor (no resize) and pad the prompts to the longest
    one.

    Returned batch: `pixel_values` (B, 3, H, W), `pixel_mask` (B, H, W), `input_ids` / `attention_mask` /
    `token_type_ids` (B, T), `labels` (B dicts: `boxes` (M, 4) normalised cxcywh of the unpadded image,
    `positive_map` (M, T) 0/1), and `skipped` (a `Counter` of the samples / boxes dropped in this batch, by reason).
    When every sample was skipped the batch is `{"skipped": ...}` only (`is_empty_batch`), so that its counts still
    reach the training loop (also from data-loading workers).

    Boxes: `labels["boxes"]` is `corners_to_center(xyxy) / (w, h, w, h)` of the original's legacy xyxy targets
    (x2 = x + w - 1, resized, flipped as x' = w - x - 1); the model's `center_to_corners(boxes) * (w, h, w, h)` gives
    those xyxy back up to float32 rounding (< 1e-3 px), which is what its ATSS loss matches against.

    Prompts are padded to the longest in the batch, not to 256 tokens as the original: padded tokens are masked out of
    the loss, and the original's "[NoObj]" column (token 255) is masked too unless a prompt fills all 256 tokens.

    Bad input never raises. Skipped samples, by reason: `invalid_record` (does not fit the record format),
    `unsafe_path` (an absolute `file_name`, or one that resolves outside `image_root`, symbolic links included),
    `corrupt_image` (missing or unreadable), `size_mismatch` (the file's size differs from the record's),
    `unusable_image_size` (too elongated for the transform), `invalid_caption` (empty, or its prompt does not
    tokenize), `no_valid_boxes`. Dropped boxes: `invalid_box` (not 4 numbers, non-finite, w or h <= 0, empty after
    clipping, unknown category, missing or invalid spans), `dropped_for_prompt_length`, `unnamed_in_prompt` (the
    object's class left out of a partial prompt on purpose: background, `partial_positive_prob`). Records dropped with the
    incomplete last batch of a stream: `incomplete_last_batch`. Everything is counted in the batch's `skipped` and in
    `self.skipped` (per process / worker); the first `WARNINGS_PER_REASON` samples of each reason are logged.

    Args:
        processor: a `GLIPProcessor` (tokenizer, max_text_len, image normalisation and padding).
        class_names: names of the contiguous detection labels (needed for detection records).
        category_ids: the annotation file's category id of each class (default: 0..C-1 are the ids).
        image_root: folder that `file_name`s are relative to (default: the current directory); images outside it are
            refused.
        transform: the training transform (default: GLIP's multi-scale 480-800 / 1333 and flip 0.5).
        max_negatives, shuffle_classes, full_negative_prob, partial_positive_prob: see `DetectionPromptSampler`.
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
        partial_positive_prob: float = 0.0,
        seed: int = 0,
    ):
        self.processor = processor
        self.image_root = Path(image_root).resolve() if image_root is not None else None
        self.transform = transform if transform is not None else GLIPTrainTransform()
        self.seed = seed
        self.sampler = None
        self.category_to_label: Dict[int, int] = {}
        if class_names is not None:
            self.sampler = DetectionPromptSampler(
                class_names,
                processor.tokenizer,
                max_negatives,
                shuffle_classes,
                full_negative_prob,
                processor.max_text_len,
                processor.separator,
                partial_positive_prob,
            )
            ids = list(category_ids) if category_ids is not None else list(range(len(class_names)))
            if len(ids) != len(class_names) or len(set(ids)) != len(ids):
                raise ValueError(f"category_ids must be {len(class_names)} distinct ids, one per class name; got {ids}")
            self.category_to_label = {int(category): label for label, category in enumerate(ids)}
        self.skipped: Counter = Counter()
        self._warned: Counter = Counter()

    @classmethod
    def from_categories(cls, processor, categories: Sequence[dict], **kwargs) -> "GLIPTrainingCollator":
        """Collator for COCO `categories` ({"id", "name"}), contiguous labels in id order."""
        ordered = sorted(categories, key=lambda category: category["id"])
        return cls(processor, [c["name"] for c in ordered], [c["id"] for c in ordered], **kwargs)

    # -- one sample ---------------------------------------------------------------------------------------------------
    def _image_path(self, file_name: str) -> Path:
        """`file_name` inside `image_root` (resolved: `..` and symbolic links followed), or SkippedSample."""
        root = self.image_root if self.image_root is not None else Path.cwd().resolve()
        try:
            if Path(file_name).is_absolute():
                raise SkippedSample("unsafe_path", f"file_name {file_name!r} is absolute; it must be relative to the image root {root}")
            path = (root / file_name).resolve()
        except (OSError, ValueError) as error:  # e.g. an embedded NUL byte, a symlink loop
            raise SkippedSample("unsafe_path", f"file_name {file_name!r} cannot be resolved: {error}") from error
        if not path.is_relative_to(root):
            raise SkippedSample("unsafe_path", f"file_name {file_name!r} resolves to {path}, outside the image root {root}")
        return path

    def _load_image(self, record: dict) -> PIL.Image.Image:
        record = normalize_record(record)
        if record["file_name"] is None:
            raise SkippedSample("invalid_record", f"record has no file_name: {record!r:.200}")
        path = self._image_path(record["file_name"])
        try:
            image = load_rgb_image(path)
        except ValueError as error:
            raise SkippedSample("corrupt_image", str(error)) from error
        width, height = record["width"], record["height"]
        if (width is not None and width != image.size[0]) or (height is not None and height != image.size[1]):
            raise SkippedSample("size_mismatch", f"image {path} is {image.size[0]}x{image.size[1]}, the record says {width}x{height}")
        return image

    def _valid_annotations(self, record: dict, image: PIL.Image.Image, grounding: bool, counts: Counter):
        """A normalised record -> (legacy xyxy boxes (M, 4), per box its label (detection) or its spans (grounding))."""
        boxes, targets = [], []
        for number, annotation in enumerate(record["annotations"]):
            box = torch.tensor(annotation["bbox"], dtype=torch.float64) if annotation["bbox"] is not None else None
            if box is None or not bool(torch.isfinite(box).all()) or box[2] <= 0 or box[3] <= 0:
                problem = "bbox is not 4 numbers" if box is None else f"bbox {annotation['bbox']} is not finite with w, h > 0"
            elif grounding:
                target = tuple(sorted({(start, end) for start, end in annotation["tokens_positive"] or []}))
                valid = target and all(0 <= start < end <= len(record["caption"]) for start, end in target)
                problem = None if valid else f"tokens_positive {annotation['tokens_positive']} are not spans of the caption"
            else:
                target = self.category_to_label.get(annotation["category_id"])
                problem = None if target is not None else f"category_id {annotation['category_id']} is not a known category"
            if problem is not None:
                counts["invalid_box"] += 1
                self._warn("invalid_box", f"dropped box {number} of {record['file_name']!r}: {problem}")
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
        record = normalize_record(sample["record"])
        name = record["file_name"]
        if record["invalid"] is not None:
            raise SkippedSample("invalid_record", f"record {name!r} does not fit the record format: {record['invalid']}")
        rng = sample_rng(self.seed, sample["epoch"], sample["index"])
        caption = record["caption"]
        grounding = caption is not None
        if grounding and not caption.strip():
            raise SkippedSample("invalid_caption", f"record {name!r} has an empty caption")
        if not grounding and self.sampler is None:
            raise ValueError("a detection record (no caption) needs the collator's class_names / categories")
        image = self._load_image(record)
        boxes, targets = self._valid_annotations(record, image, grounding, counts)
        if len(targets) == 0:
            raise SkippedSample("no_valid_boxes", f"image {name!r} has no valid box")

        if grounding:
            spans: List[Span] = sorted({span for target in targets for span in target})
            image, boxes, caption, new_spans = self._transform(name, image, boxes, rng, caption, spans)
            span_row = {old: row for row, old in enumerate(spans)}
            box_rows = [[span_row[span] for span in target] for target in targets]
            text, phrase_spans = caption, new_spans
        else:
            labels, unnamed = self.sampler.sample(sorted(set(targets)), rng)
            label_row = {label: row for row, label in enumerate(labels)}
            kept = torch.tensor([target in label_row for target in targets], dtype=torch.bool)
            for target in targets:
                if target not in label_row:
                    counts[UNNAMED_IN_PROMPT if target in unnamed else "dropped_for_prompt_length"] += 1
            boxes = boxes[kept]
            box_rows = [[label_row[target]] for target in targets if target in label_row]
            prompt = self.sampler.prompt(labels)
            image, boxes, _, _ = self._transform(name, image, boxes, rng)
            text, phrase_spans = prompt.text, list(prompt.spans)
        try:
            encoding = self.processor(text=text, phrase_spans=phrase_spans)
        except ValueError as error:
            raise SkippedSample("invalid_caption", f"prompt of {name!r} cannot be used: {error}") from error
        return {"image": image, "boxes": boxes, "encoding": encoding, "box_rows": box_rows}

    def _transform(self, name: Optional[str], *args, **kwargs):
        try:
            return self.transform(*args, **kwargs)
        except ValueError as error:  # get_resize_output_size: a side would be resized to 0 pixels
            raise SkippedSample("unusable_image_size", f"image {name!r} cannot be resized for training: {error}") from error

    def _warn(self, reason: str, message: str):
        """Log the first `WARNINGS_PER_REASON` samples of each reason; the rest are only counted."""
        self._warned[reason] += 1
        if self._warned[reason] <= WARNINGS_PER_REASON:
            suffix = f" (further `{reason}` cases are counted, not logged)" if self._warned[reason] == WARNINGS_PER_REASON else ""
            logger.warning("training data, %s: %s%s", reason, message, suffix)

    # -- the batch ----------------------------------------------------------------------------------------------------
    def __call__(self, samples: List[dict]) -> dict:
        counts: Counter = Counter()
        prepared = []
        for sample in samples:
            if sample.get("dropped_tail"):
                counts[INCOMPLETE_LAST_BATCH] += sample["dropped_tail"]
            try:
                prepared.append(self._sample(sample, counts))
            except SkippedSample as skipped:
                counts[skipped.reason] += 1
                self._warn(skipped.reason, f"skipped a sample: {skipped}")
        self.skipped.update(counts)
        if not prepared:
            return {"skipped": counts}

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
