#!/usr/bin/env python
"""Pseudo-label image-caption pairs with a teacher GLIP: grounding `.jsonl` shards for `pretrain_glip.py` (GLIP's
self-training, the paper's Cap4M / Cap24M).

    accelerate launch examples/pseudo_label_glip.py --teacher path/to/glip --format imagefolder --data_dir captions/ \
        --output_dir pseudo/
    python examples/pretrain_glip.py ... --train_files pseudo/shards/*.jsonl --image_root <manifest.json's image_root>

Per image: the caption's noun phrases (`processing.noun_phrases`: spaCy noun chunks when an English spaCy pipeline is
installed, else a built-in chunker, or `--phrases_column`), the teacher's grounding inference on the caption with those
phrases (`GLIPProcessor(text=caption, phrase_spans=...)`, `post_process_grounded_object_detection` with the model's
own candidate threshold / NMS / caps), then the filters, one flag each:

* `--score_threshold 0.5`: keep boxes whose final score (sqrt(probability x centerness), the original's) is >= it.
  The GLIP paper gives no value; its released GLIP-L config reads pseudo-labelled caption data with
  `DATASETS.FURTHER_SCREEN: True, CAPTION_CONF: 0.5` (boxes scoring <= 0.5 dropped), `CAPTION_NMS: -1` (no extra
  NMS beyond the model's per-phrase NMS) and `CAPTION_MIN_BOX: 1`. No pseudo-labelling script is released.
* `--max_boxes_per_phrase 0`: at most this many boxes (the best) per phrase; 0 = no cap (the original has none).
* `--min_boxes_per_image 1`: images with fewer kept boxes are skipped (CAPTION_MIN_BOX).
* `--unboxed_phrases negative`: a phrase without a kept box stays in the caption with no box, so that its tokens are
  negatives in training (the original's format v2: an entity with no box adds no annotation); `drop_image` skips
  images where any phrase has no box instead (fewer images, no "absent" signal for objects the teacher missed).

Equal phrases of a caption are one entity (`Entity.spans`): the teacher grounds its first mention and each kept box's
`tokens_positive` lists every mention. Output record (the `processing.training_data` grounding format, extra fields
ignored by the loader): `{"file_name", "width", "height", "caption", "annotations": [{"bbox": [x, y, w, h],
"tokens_positive": [[start, end], ...], "score", "phrase"}], "phrases_without_box": [...], "source": ...}`.

Input (`datasets`, streamed: nothing has to fit in memory): `--format imagefolder --data_dir DIR` (images plus a
`metadata.jsonl` / `.csv` with `file_name` and a caption column), `--format parquet|arrow --data_files ...` (an image
column: `datasets.Image`, encoded bytes, or a path), `--format webdataset --data_files shards/*.tar` (`jpg`/`png`/...
and `txt` members). Images of an imagefolder are referenced where they are; images of parquet / arrow / tar sources
(or of an imagefolder with `--copy_images`) are written once, byte for byte as stored (no re-encoding), to
`OUTPUT/images/<unit>/<position>.<format>`. Records name their image relative to `--image_root` (default: `--data_dir`
when referenced, OUTPUT when written), the `--image_root` of `pretrain_glip.py`; give a folder above both to train the
pseudo-labelled shards together with other data under that folder.

Scale and failure. The input's `datasets` shards (files; parquet row groups after `reshard()`) are *streams*; stream
s is cut into *units* of `--shard_size` consecutive records, `part-<s>-<k>`. Units are a function of the input and
`--shard_size` only, so the output is the same for any number of processes, machines and data-loading workers.
Readers (processes x workers) take streams round-robin when there are at least as many streams as readers (each file
is read by one reader); otherwise each stream is read by several readers, which take its units in turn and skip
the others' records without decoding them (cheap for an imagefolder, whose records are paths; give tar / parquet
inputs at least as many files or row groups as readers). Batches are formed inside a unit, from images with the same
padded canvas (`GLIPImageProcessor.canvas_size`), so an image's boxes never depend on its batch mates.
A unit is committed atomically: its images into `images/<unit>.partial/` then renamed, its records into
`shards/<unit>.jsonl.partial` then renamed, then its manifest entry `manifest.d/<unit>.json` (counts, file sizes,
sha256) is written, last. A unit is finished iff its entry is there and its files match it; a rerun (after a crash,
`kill -9` of any process, or with another number of processes) skips finished units and redoes the others from
scratch, so the final output equals an uninterrupted run's. Settings that change the output (teacher, thresholds,
shard size, batch size, dtype, input files ...) are stored in `run_config.json` and a rerun with other values is
refused. At the end the main process waits for every process (through `progress/` files, so that unequal shares
never time out a collective) and merges the entries into `manifest.json`: every unit, whether every stream was read
to its end (`complete`), the non-empty shards (`train_files`), the `image_root`, and the totals; `--merge_only` does
that step alone. Skipped images are counted by reason, never fatal: `empty_caption`, `invalid_phrases`,
`no_noun_phrase`, `unusable_caption` (its prompt exceeds the tokenizer's `max_text_len` or a phrase maps to no token),
`unreadable_image` (missing, corrupt, not an image), `unusable_image_size` (too elongated to resize), `no_box`
(fewer than `--min_boxes_per_image` kept boxes), `unboxed_phrase` (`--unboxed_phrases drop_image`).
"""

import argparse
import glob
import hashlib
import io
import json
import logging
import math
import os
import shutil
import signal
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

import PIL.Image
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch.utils.data import DataLoader
from torch.utils.data import IterableDataset as TorchIterableDataset
from torch.utils.data import get_worker_info
from tqdm.auto import tqdm

from modeling_glip.command_line import GLIPArgumentParser
from modeling_glip.modeling_glip import GLIPModel
from pretrain_glip import exit_without_teardown
from processing import GLIPProcessor, load_rgb_image, post_processing_limits
from processing.atomic_files import fsync_path
from processing.evaluation import legacy_xyxy_to_coco
from processing.noun_phrases import DEFAULT_SPACY_MODEL, NOUN_PHRASE_METHODS, NounPhraseExtractor
from processing.training_data import WARNINGS_PER_REASON

logger = logging.getLogger("pseudo_label_glip")
FORMATS = ("imagefolder", "parquet", "arrow", "webdataset")
FORMAT_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".tar": "webdataset"}
IMAGE_KEYS = ("image", "jpg", "jpeg", "png", "webp")  # default image column: the first one present
CAPTION_KEYS = ("caption", "txt", "text")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UNBOXED_PHRASES = ("negative", "drop_image")
MANIFEST = "manifest.json"
RUN_CONFIG = "run_config.json"
PARTIAL = ".partial"
FORMAT_VERSION = 1
ROW_BATCH = 64  # records read from the input at a time
PROGRESS_SECONDS = 2.0  # how often a process publishes its progress (and the main process refreshes the bar)


class SkippedImage(Exception):
    """An image that is not pseudo-labelled; `reason` is the counter key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = GLIPArgumentParser(description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("input")
    data.add_argument("--format", choices=FORMATS, help="input format (default: from --data_dir / the --data_files suffix)")
    data.add_argument("--data_dir", help="imagefolder: the folder of the images and their metadata.jsonl / .csv")
    data.add_argument("--data_files", nargs="+", help="parquet / arrow / webdataset: files or glob patterns")
    data.add_argument("--image_column", help=f"default: the first of {IMAGE_KEYS} the input has")
    data.add_argument("--caption_column", help=f"default: the first of {CAPTION_KEYS} the input has")
    data.add_argument("--phrases_column", help="a column of phrase lists to ground instead of extracted noun phrases")
    data.add_argument("--noun_phrases", choices=NOUN_PHRASE_METHODS, default="auto", help="noun phrase extraction (auto: spaCy if installed, else rules)")
    data.add_argument("--spacy_model", default=DEFAULT_SPACY_MODEL, help="installed spaCy pipeline for --noun_phrases spacy / auto")
    data.add_argument("--copy_images", action="store_true", help="imagefolder: write the images into the output too")
    data.add_argument("--image_root", help="folder the records' file_name are relative to; it must contain the images (default: --data_dir, or --output_dir for written images)")
    data.add_argument("--num_images", type=int, help="number of input images, for the ETA (default: counted for imagefolder / parquet)")
    teacher = parser.add_argument_group("teacher")
    teacher.add_argument("--teacher", help="a GLIPModel folder with its processor (save_pretrained / converted)")
    teacher.add_argument("--min_size", type=int, help="test resize short side (default: the teacher's processor)")
    teacher.add_argument("--max_size", type=int, help="test resize long-side cap (default: the teacher's processor)")
    teacher.add_argument("--batch_size", type=int, default=8, help="images per forward (same canvas only)")
    teacher.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="teacher precision (bfloat16 / float16 need a GPU)")
    teacher.add_argument("--cpu", action="store_true", help="run on CPU (also with several processes: gloo)")
    filters = parser.add_argument_group("filters")
    filters.add_argument("--score_threshold", type=float, default=0.5, help="keep boxes with final score >= it (CAPTION_CONF)")
    filters.add_argument("--max_boxes_per_phrase", type=int, default=0, help="best boxes kept per phrase; 0: no cap")
    filters.add_argument("--min_boxes_per_image", type=int, default=1, help="skip images with fewer kept boxes (CAPTION_MIN_BOX)")
    filters.add_argument("--unboxed_phrases", choices=UNBOXED_PHRASES, default="negative", help="a phrase without a box: a negative, or skip the image")
    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", required=True)
    run.add_argument("--shard_size", type=int, default=1000, help="records per unit (output shard)")
    run.add_argument("--num_workers", type=int, default=2, help="data-loading workers per process (decoding, preprocessing)")
    run.add_argument("--merge_only", action="store_true", help="only (re)write manifest.json from the finished units")
    run.add_argument("--kill_during_commit", type=int, help="testing aid: SIGKILL inside the commit of this process's N-th unit")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Checks argparse cannot express; `parser.error` names the flag and the value."""
    if args.merge_only:
        return args
    if args.teacher is None:
        parser.error("--teacher is required (a GLIPModel folder with its processor)")
    if not (Path(args.teacher) / "config.json").is_file():
        parser.error(f"--teacher {args.teacher!r} is not a model folder (no config.json)")
    if args.format is None:
        suffixes = {Path(pattern).suffix for pattern in args.data_files or []}
        if args.data_dir is not None and not args.data_files:
            args.format = "imagefolder"
        elif len(suffixes) == 1 and suffixes <= set(FORMAT_SUFFIXES):
            args.format = FORMAT_SUFFIXES[suffixes.pop()]
        else:
            parser.error(f"give --format: it cannot be told from --data_dir {args.data_dir!r} / --data_files {args.data_files!r}")
    if args.format == "imagefolder" and (args.data_dir is None or args.data_files):
        parser.error("--format imagefolder takes --data_dir (the folder with the images and metadata.jsonl), not --data_files")
    if args.format != "imagefolder" and (not args.data_files or args.data_dir is not None):
        parser.error(f"--format {args.format} takes --data_files, not --data_dir")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        parser.error(f"--data_dir {args.data_dir!r} is not a folder")
    if args.image_root is not None:
        images = Path(args.data_dir if args.format == "imagefolder" and not args.copy_images else args.output_dir).resolve()
        if not images.is_relative_to(Path(args.image_root).resolve()):
            parser.error(f"--image_root {args.image_root!r} must contain the images ({images}): records name them relative to it")
    for name, minimum in {"batch_size": 1, "shard_size": 1, "num_workers": 0, "max_boxes_per_phrase": 0, "min_boxes_per_image": 1, "num_images": 0, "min_size": 1, "max_size": 1}.items():
        value = getattr(args, name)
        if value is not None and value < minimum:
            parser.error(f"--{name} must be >= {minimum}, got {value}")
    if not (math.isfinite(args.score_threshold) and 0.0 <= args.score_threshold <= 1.0):
        parser.error(f"--score_threshold must be in [0, 1], got {args.score_threshold}")
    if args.dtype != "float32" and (args.cpu or not torch.cuda.is_available()):
        parser.error(f"--dtype {args.dtype} needs a GPU (this run is on CPU); use --dtype float32")
    return args


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    return check_args(parser, parser.parse_args(argv))


# ----------------------------------------------------------------------------------------------------------------------
# input: a streamed `datasets.IterableDataset`, its streams and units
# ----------------------------------------------------------------------------------------------------------------------
def resolve_data_files(patterns: Sequence[str]) -> List[str]:
    """Files matching the patterns, sorted (the stream order); ValueError for a pattern that matches no file."""
    files = []
    for pattern in patterns:
        matched = sorted(path for path in glob.glob(pattern) if Path(path).is_file())
        if not matched:
            raise ValueError(f"--data_files {pattern!r} matches no file")
        files += [str(Path(path).resolve()) for path in matched]
    return sorted(set(files))


def open_input(args) -> Tuple["datasets.IterableDataset", Dict[str, Optional[str]], List[str]]:  # noqa: F821
    """-> (the streamed dataset with its image column undecoded, {"image", "caption", "phrases"} column names, the
    input files). Parquet inputs are resharded per row group (more streams than files)."""
    import datasets

    if args.format == "imagefolder":
        files = [str(Path(args.data_dir).resolve())]
        dataset = datasets.load_dataset("imagefolder", data_dir=files[0], split="train", streaming=True)
    else:
        files = resolve_data_files(args.data_files)
        dataset = datasets.load_dataset(args.format, data_files={"train": files}, split="train", streaming=True)
        if args.format == "parquet":
            dataset = dataset.reshard()
    names = list(dataset.features or {})
    image = args.image_column or next((key for key in IMAGE_KEYS if key in names), None)
    caption = args.caption_column or next((key for key in CAPTION_KEYS if key in names), None)
    for flag, column in (("--image_column", image), ("--caption_column", caption), ("--phrases_column", args.phrases_column)):
        if (column is None and flag != "--phrases_column") or (column is not None and column not in names):
            raise ValueError(f"{flag} {column!r}: the input has no such column; its columns are {names}")
    if isinstance(dataset.features[image], datasets.Image):
        dataset = dataset.cast_column(image, datasets.Image(decode=False))  # decoded here, so that a bad image is counted
    return dataset, {"image": image, "caption": caption, "phrases": args.phrases_column}, files


def count_images(args, dataset, columns: Dict[str, Optional[str]], files: List[str]) -> Optional[int]:
    """The number of input records when it is cheap to know (for the ETA): parquet metadata, an imagefolder's captions."""
    if args.num_images is not None:
        return args.num_images
    if args.format == "parquet":
        import pyarrow.parquet

        return sum(pyarrow.parquet.read_metadata(path).num_rows for path in files)
    if args.format == "imagefolder":
        return sum(1 for _ in dataset.select_columns([columns["caption"]]))
    return None


def unit_name(stream: int, chunk: int) -> str:
    return f"part-{stream:05d}-{chunk:05d}"


def reads_stream(reader: int, stream: int, num_streams: int, num_readers: int) -> bool:
    """Whether `reader` reads `stream`: streams round-robin over readers, or, with fewer streams than readers, the
    readers r with r % num_streams == stream share it."""
    return stream % num_readers == reader if num_streams >= num_readers else reader % num_streams == stream


def unit_reader(stream: int, chunk: int, num_streams: int, num_readers: int) -> int:
    """The reader that pseudo-labels unit (`stream`, `chunk`)."""
    if num_streams >= num_readers:
        return stream % num_readers
    sharing = list(range(stream, num_readers, num_streams))
    return sharing[chunk % len(sharing)]


def image_source(value) -> Tuple[Optional[bytes], Optional[str]]:
    """An image column value -> (encoded bytes or None, local path or None)."""
    if isinstance(value, dict):
        return value.get("bytes"), value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), None
    if isinstance(value, str):
        return None, value
    return None, None


def stored_suffix(data: bytes, path: Optional[str]) -> str:
    """The file suffix of an image stored byte for byte: the source name's when it is an image suffix PIL knows,
    else the format PIL reads in the header (the loader reads the content, the suffix is for people)."""
    suffix = Path(path).suffix.lower() if path else ""
    if suffix in PIL.Image.registered_extensions():
        return suffix
    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            return "." + (image.format or "img").lower()
    except (OSError, PIL.Image.DecompressionBombError):
        return ".img"


class UnitReader(TorchIterableDataset):
    """Reads this reader's units (see the module docstring) and yields, per unit, teacher batches of images with one
    canvas, then a `unit_end` item with the unit's counts. Runs in data-loading workers: decoding, phrase extraction
    and image preprocessing happen here, the teacher in the main process.

    Items: {"kind": "batch", "unit", "positions", "pixel_values" (B, 3, H, W), "pixel_mask" (B, H, W), "captions",
    "entities" (per image [(text, spans)]), "sizes" (per image (h, w)), "files" (per image the record's file_name),
    "payloads" (per image the bytes to store, or None), "sources"} and {"kind": "unit_end", "unit", "stream",
    "chunk", "images", "counts", "last_in_stream", "stream_records"}.
    """

    def __init__(self, dataset, num_streams: int, columns, extractor: NounPhraseExtractor, processor: GLIPProcessor, args,
                 reference: bool, image_root: Path, output: Path, finished: Set[str], rank: int, world_size: int):
        self.dataset = dataset
        self.num_streams = num_streams
        self.columns = columns
        self.extractor = extractor
        self.processor = processor
        self.shard_size = args.shard_size
        self.batch_size = args.batch_size
        self.reference = reference  # images referenced where they are, or stored in the output
        self.image_root = image_root
        self.images_folder = Path(os.path.relpath(output.resolve() / "images", image_root))  # stored images, from the root
        self.finished = finished
        self.rank = rank
        self.world_size = world_size
        self._warned = Counter()

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers = info.num_workers if info is not None else 1
        reader = self.rank * workers + (info.id if info is not None else 0)
        readers = self.world_size * workers
        for stream in range(self.num_streams):
            if reads_stream(reader, stream, self.num_streams, readers):
                yield from self._read_stream(stream, reader, readers)

    def _read_stream(self, stream: int, reader: int, readers: int) -> Iterator[dict]:
        records = self.dataset.shard(num_shards=self.num_streams, index=stream) if self.num_streams > 1 else self.dataset
        unit, position = None, -1
        iterator = enumerate(stream_rows(records))
        while True:
            try:
                position, record = next(iterator)
            except StopIteration:
                break
            except Exception as error:  # a broken input file: stop here, naming it (finished units are kept)
                raise RuntimeError(f"reading stream {stream} of the input failed after record {position}: {type(error).__name__}: {error}") from error
            chunk = position // self.shard_size
            if unit is not None and unit["chunk"] != chunk:
                yield from self._finish(unit, last_in_stream=False)
                unit = None
            if unit_reader(stream, chunk, self.num_streams, readers) != reader or unit_name(stream, chunk) in self.finished:
                continue  # another reader's unit, or a finished one: not decoded
            if unit is None:
                unit = {"stream": stream, "chunk": chunk, "images": 0, "counts": Counter(), "groups": {}}
            unit["images"] += 1
            try:
                sample = self._sample(record, position, unit_name(stream, chunk))
            except SkippedImage as skipped:
                unit["counts"][f"skipped_{skipped.reason}"] += 1
                self._warn(skipped.reason, f"{unit_name(stream, chunk)}, record {position}: {skipped}")
                continue
            unit["counts"]["phrases_not_in_caption"] += sample.pop("missing")
            group = unit["groups"].setdefault(sample.pop("canvas"), [])
            group.append(sample)
            if len(group) == self.batch_size:
                yield self._batch(unit, group)
                group.clear()
        last_chunk = max(position, 0) // self.shard_size
        owned = unit_reader(stream, last_chunk, self.num_streams, readers) == reader
        if unit is None and position < 0 and owned and unit_name(stream, 0) not in self.finished:
            unit = {"stream": stream, "chunk": 0, "images": 0, "counts": Counter(), "groups": {}}  # an empty stream
        if unit is not None:
            yield from self._finish(unit, last_in_stream=True, stream_records=position + 1)

    def _finish(self, unit: dict, last_in_stream: bool, stream_records: Optional[int] = None) -> Iterator[dict]:
        for group in unit["groups"].values():
            if group:
                yield self._batch(unit, group)
        yield {
            "kind": "unit_end",
            "unit": unit_name(unit["stream"], unit["chunk"]),
            "stream": unit["stream"],
            "chunk": unit["chunk"],
            "images": unit["images"],
            "counts": dict(unit["counts"]),
            "last_in_stream": last_in_stream,
            "stream_records": stream_records if last_in_stream else None,
        }

    def _sample(self, record: dict, position: int, unit: str) -> dict:
        """One input record -> a teacher sample, or SkippedImage. Cheap checks first: an image that would be skipped
        for its caption is never decoded."""
        caption = record.get(self.columns["caption"])
        if not isinstance(caption, str) or not caption.strip():
            raise SkippedImage("empty_caption", f"caption {caption!r:.80} is empty or not a string")
        phrases = record.get(self.columns["phrases"]) if self.columns["phrases"] else None
        if self.columns["phrases"] and not (isinstance(phrases, (list, tuple)) and all(isinstance(p, str) for p in phrases)):
            raise SkippedImage("invalid_phrases", f"{self.columns['phrases']} {phrases!r:.80} is not a list of strings")
        found = self.extractor(caption, phrases)
        if not found.entities:
            raise SkippedImage("no_noun_phrase", f"no noun phrase in {caption!r:.120}" + (f" (phrases not in it: {found.missing})" if found.missing else ""))
        spans = [entity.spans[0] for entity in found.entities]
        try:
            self.processor(text=caption, phrase_spans=spans)  # the prompt fits max_text_len and every phrase has tokens
        except ValueError as error:
            raise SkippedImage("unusable_caption", str(error)) from error
        data, path = image_source(record.get(self.columns["image"]))
        if data is None and path is None:
            raise SkippedImage("unreadable_image", f"the record has no image in its {self.columns['image']!r} column")
        try:
            image = load_rgb_image(data if data is not None else path)
        except (ValueError, TypeError) as error:
            raise SkippedImage("unreadable_image", f"image {path or ''!r}: {error}") from error
        try:
            canvas = self.processor.image_processor.canvas_size(image.height, image.width)
        except ValueError as error:  # get_resize_output_size: a side would be resized to 0 pixels
            raise SkippedImage("unusable_image_size", f"image {path or ''!r}: {error}") from error
        if self.reference and path is not None:  # referenced where it is
            file_name, payload = os.path.relpath(os.path.abspath(path), self.image_root), None
        else:  # stored byte for byte in the output
            payload = data if data is not None else Path(path).read_bytes()
            file_name = (self.images_folder / unit / f"{position:06d}{stored_suffix(payload, path)}").as_posix()
        source = record.get("__key__") or (os.path.basename(path) if path else None)
        return {
            "position": position, "image": image, "canvas": canvas, "caption": caption, "missing": len(found.missing),
            "entities": [(entity.text, [list(span) for span in entity.spans]) for entity in found.entities],
            "file_name": file_name, "payload": payload, "source": source,
        }

    def _batch(self, unit: dict, samples: List[dict]) -> dict:
        pixels = self.processor.image_processor([sample["image"] for sample in samples], return_tensors="pt")
        return {
            "kind": "batch",
            "unit": unit_name(unit["stream"], unit["chunk"]),
            "positions": [sample["position"] for sample in samples],
            "pixel_values": pixels["pixel_values"],
            "pixel_mask": pixels["pixel_mask"],
            "captions": [sample["caption"] for sample in samples],
            "entities": [sample["entities"] for sample in samples],
            "sizes": [(sample["image"].height, sample["image"].width) for sample in samples],
            "files": [sample["file_name"] for sample in samples],
            "payloads": [sample["payload"] for sample in samples],
            "sources": [sample["source"] for sample in samples],
        }

    def _warn(self, reason: str, message: str) -> None:
        self._warned[reason] += 1
        if self._warned[reason] <= WARNINGS_PER_REASON:
            suffix = f" (further `{reason}` images are counted, not logged)" if self._warned[reason] == WARNINGS_PER_REASON else ""
            logger.warning("skipped an image, %s: %s%s", reason, message, suffix)


def stream_rows(dataset) -> Iterator[dict]:
    """The records of a `datasets.IterableDataset`, in order. Read through `.iter(batch_size)`: iterating the dataset
    itself inside a data-loading worker would make `datasets` split its shards over the workers a second time (and
    stop the workers beyond its number of shards)."""
    for batch in dataset.iter(batch_size=ROW_BATCH):
        columns = list(batch)
        for row in range(len(batch[columns[0]]) if columns else 0):
            yield {column: batch[column][row] for column in columns}


def _items(item):
    """The loader's collate function: items are already batches (a module-level function: workers pickle it)."""
    return item


# ----------------------------------------------------------------------------------------------------------------------
# the teacher
# ----------------------------------------------------------------------------------------------------------------------
def load_teacher(args, device: torch.device) -> Tuple[GLIPModel, GLIPProcessor]:
    model = GLIPModel.from_pretrained(args.teacher, dtype=DTYPES[args.dtype]).to(device).eval()
    processor = GLIPProcessor.from_pretrained(args.teacher)
    sizes = {key: value for key, value in (("min_size", args.min_size), ("max_size", args.max_size)) if value is not None}
    if sizes:
        processor.image_processor = type(processor.image_processor)(**{**processor.image_processor.to_dict(), **sizes})
    return model, processor


@torch.inference_mode()
def pseudo_label_batch(model: GLIPModel, processor: GLIPProcessor, batch: dict, args) -> List[Tuple[Optional[dict], Counter]]:
    """One teacher batch -> per image (its record, or None when it is skipped; its counts)."""
    device = next(model.parameters()).device
    spans = [[spans[0] for _, spans in entities] for entities in batch["entities"]]
    text = processor(text=batch["captions"], phrase_spans=spans, return_tensors="pt")
    outputs = model(
        pixel_values=batch["pixel_values"].to(device, model.dtype),
        pixel_mask=batch["pixel_mask"].to(device),
        **{key: text[key].to(device) for key in ("input_ids", "attention_mask", "token_type_ids", "chunk_to_image") if key in text},
    )
    detections = processor.post_process_grounded_object_detection(
        outputs, text, threshold=args.score_threshold, target_sizes=batch["sizes"], **post_processing_limits(model.config)
    )
    results = []
    for index, found in enumerate(detections):
        entities = batch["entities"][index]
        boxes = legacy_xyxy_to_coco(found["boxes"].float().cpu()).tolist()
        per_phrase: Dict[int, List[dict]] = {label: [] for label in range(len(entities))}
        for box, score, label in zip(boxes, found["scores"].float().cpu().tolist(), found["labels"].tolist()):  # by score
            if args.max_boxes_per_phrase and len(per_phrase[label]) >= args.max_boxes_per_phrase:
                continue
            text_, mentions = entities[label]
            per_phrase[label].append({"bbox": [round(v, 2) for v in box], "tokens_positive": mentions, "score": round(score, 4), "phrase": text_})
        annotations = [annotation for label in range(len(entities)) for annotation in per_phrase[label]]
        unboxed = [entities[label][0] for label in range(len(entities)) if not per_phrase[label]]
        counts = Counter(labelled=1, phrases=len(entities), phrases_without_box=len(unboxed))
        if len(annotations) < args.min_boxes_per_image:
            counts["skipped_no_box"] += 1
            results.append((None, counts))
            continue
        if unboxed and args.unboxed_phrases == "drop_image":
            counts["skipped_unboxed_phrase"] += 1
            results.append((None, counts))
            continue
        height, width = batch["sizes"][index]
        record = {
            "file_name": batch["files"][index], "width": width, "height": height, "caption": batch["captions"][index],
            "annotations": annotations, "phrases_without_box": unboxed, "source": batch["sources"][index],
        }
        counts.update(records=1, boxes=len(annotations))
        results.append((record, counts))
    return results


# ----------------------------------------------------------------------------------------------------------------------
# output: atomic units, manifest entries, merge
# ----------------------------------------------------------------------------------------------------------------------
def replace_by_name(path: Path, data: bytes) -> None:
    """`data` to `path` through a flushed temporary file in the same folder and one rename. The temporary file has a
    fixed name (`path` + PARTIAL), not `processing.atomic_files.write_atomically`'s unique one, so that a rerun
    overwrites what a killed write left and the output stays file for file an uninterrupted run's."""
    partial = path.with_name(path.name + PARTIAL)
    partial.write_bytes(data)
    fsync_path(partial)
    os.replace(partial, path)


def entry_problem(output: Path, entry) -> Optional[str]:
    """Why a manifest entry does not describe a finished unit (files missing or of another size), or None."""
    if not isinstance(entry, dict) or not isinstance(entry.get("files"), dict):
        return "it is not a manifest entry of this script"
    for name, size in entry["files"].items():
        path = output / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{name} is missing or has another size than when it was written"
    return None


def read_entries(output: Path) -> Dict[str, dict]:
    """Finished units: manifest entries whose files are all there (others are redone, with a warning)."""
    entries = {}
    for path in sorted((output / "manifest.d").glob("part-*.json")):
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            logger.warning("ignoring manifest entry %s: %s (its unit is redone)", path, error)
            continue
        problem = entry_problem(output, entry)
        if problem:
            logger.warning("ignoring manifest entry %s: %s (its unit is redone)", path, problem)
            continue
        entries[path.stem] = entry
    return entries


def commit_unit(output: Path, end: dict, records: Dict[int, dict], payloads: Dict[int, bytes], counts: Counter, kill: bool = False) -> dict:
    """Write one unit atomically: images, records, then its manifest entry (see the module docstring)."""
    unit = end["unit"]
    files: Dict[str, int] = {}
    if payloads:
        folder, partial = output / "images" / unit, output / "images" / (unit + PARTIAL)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for position, data in sorted(payloads.items()):
            (partial / Path(records[position]["file_name"]).name).write_bytes(data)
            fsync_path(partial / Path(records[position]["file_name"]).name)
        fsync_path(partial)
        shutil.rmtree(folder, ignore_errors=True)  # left by an interrupted commit of this unit
        os.replace(partial, folder)
        files.update({f"images/{unit}/{Path(records[position]['file_name']).name}": len(data) for position, data in sorted(payloads.items())})
    if kill:
        os.kill(os.getpid(), signal.SIGKILL)  # testing aid: a crash in the middle of a commit
    shard = None
    if records:
        data = "".join(json.dumps(records[position], ensure_ascii=False) + "\n" for position in sorted(records)).encode()
        shard = f"shards/{unit}.jsonl"
        (output / "shards").mkdir(exist_ok=True)
        replace_by_name(output / shard, data)
        files[shard] = len(data)
    entry = {
        "unit": unit, "stream": end["stream"], "chunk": end["chunk"], "images": end["images"], "shard": shard,
        "sha256": hashlib.sha256(data).hexdigest() if records else None, "files": files,
        "last_in_stream": end["last_in_stream"], "stream_records": end["stream_records"], "counts": dict(sorted(counts.items())),
    }
    (output / "manifest.d").mkdir(exist_ok=True)
    replace_by_name(output / "manifest.d" / f"{unit}.json", json.dumps(entry, indent=1).encode())
    return entry


def merge(output: Path) -> dict:
    """Every finished unit -> `manifest.json` (written atomically): units, completeness, train_files, totals."""
    if not (output / RUN_CONFIG).is_file():
        raise ValueError(f"{output} has no {RUN_CONFIG}: it is not an output folder of this script")
    config = json.loads((output / RUN_CONFIG).read_text())
    entries = read_entries(output)
    missing = []
    for stream in range(config["num_streams"]):
        chunks = {entry["chunk"]: entry for entry in entries.values() if entry["stream"] == stream}
        last = next((entry for entry in chunks.values() if entry["last_in_stream"]), None)
        if last is None:
            missing.append(f"stream {stream}: not read to its end")
            continue
        missing += [unit_name(stream, chunk) for chunk in range(last["chunk"] + 1) if chunk not in chunks]
    totals = Counter()
    for entry in entries.values():
        totals.update(images=entry["images"], **entry["counts"])
    manifest = {
        "format_version": FORMAT_VERSION,
        "complete": not missing,
        "missing": missing,
        "image_root": config["image_root"],
        "train_files": [entry["shard"] for entry in entries.values() if entry["shard"]],
        "totals": dict(sorted(totals.items())),
        "settings": config,
        "units": list(entries.values()),
    }
    replace_by_name(output / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def summary_lines(manifest: dict) -> List[str]:
    totals = Counter(manifest["totals"])
    skipped = {key[len("skipped_"):]: value for key, value in totals.items() if key.startswith("skipped_")}
    return [
        f"images read: {totals['images']}, pseudo-labelled by the teacher: {totals['labelled']}, written: {totals['records']} "
        f"in {len(manifest['train_files'])} shards",
        f"phrases: {totals['phrases']}, boxes kept: {totals['boxes']}, phrases without a box: {totals['phrases_without_box']}, "
        f"given phrases not in their caption: {totals['phrases_not_in_caption']}",
        f"skipped images by reason: {dict(sorted(skipped.items()))}",
        f"complete: {manifest['complete']}" + (f" (missing: {manifest['missing'][:10]})" if manifest["missing"] else ""),
    ]


def run_config(args, files: List[str], columns: dict, num_streams: int, extractor: NounPhraseExtractor, processor: GLIPProcessor, image_root: str) -> dict:
    """The settings that change the output (compared on a rerun)."""
    teacher = Path(args.teacher).resolve()
    return {
        "format": args.format, "inputs": {path: os.path.getsize(path) for path in files if os.path.isfile(path)} or files,
        "columns": columns, "num_streams": num_streams, "shard_size": args.shard_size,
        "teacher": str(teacher), "teacher_files": {p.name: p.stat().st_size for p in sorted(teacher.iterdir()) if p.is_file()},
        "dtype": args.dtype, "batch_size": args.batch_size, "image_processor": {"min_size": processor.image_processor.min_size, "max_size": processor.image_processor.max_size},
        "noun_phrases": extractor.method, "spacy_model": args.spacy_model if extractor.method == "spacy" else None,
        "score_threshold": args.score_threshold, "max_boxes_per_phrase": args.max_boxes_per_phrase,
        "min_boxes_per_image": args.min_boxes_per_image, "unboxed_phrases": args.unboxed_phrases, "image_root": image_root,
    }


# ----------------------------------------------------------------------------------------------------------------------
# progress: every process publishes its count; the main process shows the sum
# ----------------------------------------------------------------------------------------------------------------------
class Progress:
    """`progress/rank-<r>.json` = {"token", "images", "done"} per process (the token tells this run's files from a
    previous run's); the main process's bar shows the images of every process (images/s, ETA when the total is known)."""

    def __init__(self, output: Path, accelerator: Accelerator, token: str, total: Optional[int], initial: int):
        self.folder = output / "progress"
        self.folder.mkdir(exist_ok=True)
        self.accelerator, self.token = accelerator, token
        self.images, self.published = 0, 0.0
        self.bar = tqdm(total=total, initial=initial, unit="img", desc="pseudo-label", disable=not accelerator.is_main_process, dynamic_ncols=True)
        self.initial = initial

    def update(self, images: int, force: bool = False, done: bool = False) -> None:
        self.images += images
        if not (force or done or time.monotonic() - self.published > PROGRESS_SECONDS):
            return
        self.published = time.monotonic()
        data = {"token": self.token, "images": self.images, "done": done}
        replace_by_name(self.folder / f"rank-{self.accelerator.process_index:05d}.json", json.dumps(data).encode())
        if self.accelerator.is_main_process:
            self._refresh()

    def _refresh(self) -> int:
        """Update the bar from every process's file -> the number of processes that are done."""
        images = done = 0
        for rank in range(self.accelerator.num_processes):
            try:
                data = json.loads((self.folder / f"rank-{rank:05d}.json").read_text())
            except (OSError, ValueError):
                continue
            if data.get("token") == self.token:
                images += data["images"]
                done += bool(data["done"])
        self.bar.n = self.initial + images
        self.bar.refresh()
        return done

    def wait_for_all(self) -> None:
        """Main process: poll until every process is done (a process that dies takes the launcher, and us, down)."""
        while self._refresh() < self.accelerator.num_processes:
            time.sleep(PROGRESS_SECONDS)
        self.bar.close()


# ----------------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------------
def check_run_config(output: Path, config: dict, accelerator: Accelerator) -> str:
    """The main process stores the settings of the first run; every process compares its own with them. -> this
    run's progress token (one for all processes)."""
    path = output / RUN_CONFIG
    if accelerator.is_main_process and not path.is_file():
        replace_by_name(path, json.dumps(config, indent=1).encode())
    token = [uuid.uuid4().hex if accelerator.is_main_process else None]
    broadcast_object_list(token)  # also a barrier: run_config.json exists from here on
    stored = json.loads(path.read_text())
    different = sorted(key for key in set(stored) | set(config) if stored.get(key) != json.loads(json.dumps(config)).get(key))
    if different:
        raise ValueError(
            f"{output} was written with other settings ({', '.join(f'{key}: {stored.get(key)!r:.80} -> {config.get(key)!r:.80}' for key in different)}); "
            "a rerun must use the same ones (its finished units are kept); use another --output_dir for new settings"
        )
    return token[0]


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    args = parse_args(argv)
    output = Path(args.output_dir)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.merge_only:
        manifest = merge(output)
        print("\n".join(summary_lines(manifest)))
        return manifest
    accelerator = Accelerator(cpu=args.cpu)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    output.mkdir(parents=True, exist_ok=True)
    dataset, columns, files = open_input(args)
    extractor = NounPhraseExtractor(args.noun_phrases, args.spacy_model)
    model, processor = load_teacher(args, accelerator.device)
    reference = args.format == "imagefolder" and not args.copy_images
    root = Path(args.image_root or (args.data_dir if reference else output)).resolve()
    image_root = "." if root == output.resolve() else str(root)
    config = run_config(args, files, columns, dataset.num_shards, extractor, processor, image_root)
    token = check_run_config(output, config, accelerator)
    finished = read_entries(output)
    logger.info(
        "%d streams in units of %d records, %d processes; %d units already finished; noun phrases: %s; images %s",
        dataset.num_shards, args.shard_size, accelerator.num_processes, len(finished), extractor.method,
        f"referenced in {image_root}" if reference else f"written to {output / 'images'}",
    )
    total = count_images(args, dataset, columns, files) if accelerator.is_main_process else None
    progress = Progress(output, accelerator, token, total, initial=sum(entry["images"] for entry in finished.values()))
    reader = UnitReader(dataset, dataset.num_shards, columns, extractor, processor, args, reference, root, output,
                        set(finished), accelerator.process_index, accelerator.num_processes)
    loader = DataLoader(reader, batch_size=None, collate_fn=_items, num_workers=args.num_workers)
    pending: Dict[str, dict] = {}
    commits = 0
    start = time.perf_counter()
    for item in loader:
        state = pending.setdefault(item["unit"], {"records": {}, "payloads": {}, "counts": Counter()})
        if item["kind"] == "batch":
            for index, (record, counts) in enumerate(pseudo_label_batch(model, processor, item, args)):
                state["counts"].update(counts)
                if record is not None:
                    position = item["positions"][index]
                    if item["payloads"][index] is not None:
                        state["payloads"][position] = item["payloads"][index]
                    state["records"][position] = record
            progress.update(len(item["positions"]))
            continue
        pending.pop(item["unit"])
        state["counts"].update(item["counts"])
        commits += 1
        commit_unit(output, item, state["records"], state["payloads"], state["counts"], kill=commits == args.kill_during_commit)
        progress.update(sum(v for k, v in item["counts"].items() if k.startswith("skipped_")), force=True)
    elapsed = time.perf_counter() - start
    progress.update(0, done=True)
    logger.info("process %d: %d units, %d images in %.1f s (%.2f images/s)", accelerator.process_index, commits, progress.images, elapsed, progress.images / max(elapsed, 1e-9))
    if not accelerator.is_main_process:
        return None
    progress.wait_for_all()
    manifest = merge(output)
    shutil.rmtree(output / "progress", ignore_errors=True)
    print("\n".join(summary_lines(manifest)))
    print(f"train with: examples/pretrain_glip.py --train_files {output}/shards/*.jsonl --image_root {output if image_root == '.' else image_root}")
    return manifest


if __name__ == "__main__":
    main()
    exit_without_teardown()
