"""Bad training data, one kind per test: every bad record is skipped and counted by reason (exact counts) and never
raises inside the collator; broken files are errors that name the file (and line); nothing is dropped silently."""

import json
import logging
import os

import PIL.Image
import pytest
from torch.utils.data import DataLoader
from transformers import BertTokenizer

from processing import GLIPImageProcessor, GLIPProcessor
from processing.train_transforms import GLIPTrainTransform
from processing.training_data import (
    WARNINGS_PER_REASON,
    GLIPTrainingCollator,
    IndexedIterableDataset,
    coco_json_to_records,
    is_empty_batch,
    load_training_records,
    normalize_record,
)
from tests.training_fixtures import CATEGORIES, draw_squares, grounding_record

GOOD = {"file_name": "good.png", "width": 64, "height": 64, "caption": None, "annotations": [{"bbox": [5, 5, 20, 20], "category_id": 11}]}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """image_root with good.png and a 4000x2 image; outside.png beside the root and link.png pointing at it."""
    top = tmp_path_factory.mktemp("bad_inputs")
    root = top / "images"
    root.mkdir()
    draw_squares(root / "good.png", [("red", 5, 5, 20)])
    PIL.Image.new("RGB", (4000, 2), (128, 128, 128)).save(root / "thin.png")
    draw_squares(top / "outside.png", [("red", 5, 5, 20)])
    os.symlink(top / "outside.png", root / "link.png")
    return root


@pytest.fixture(scope="module")
def collator(bert_vocab_dir, images):
    processor = GLIPProcessor(GLIPImageProcessor(), BertTokenizer.from_pretrained(str(bert_vocab_dir)))
    return GLIPTrainingCollator.from_categories(processor, CATEGORIES, image_root=images, transform=GLIPTrainTransform((64,), 64, 0.0))


def collate(collator, records):
    return collator([{"record": record, "index": index, "epoch": 0} for index, record in enumerate(records)])


BAD_RECORDS = {
    # kind: (the bad record, expected counts of a batch [GOOD, bad])
    "string_coordinate": ({**GOOD, "annotations": [{"bbox": ["x", 5, 20, 20], "category_id": 11}]}, {"invalid_box": 1, "no_valid_boxes": 1}),
    "numeric_string_coordinate": ({**GOOD, "annotations": [{"bbox": ["5", 5, 20, 20], "category_id": 11}, GOOD["annotations"][0]]}, {"invalid_box": 1}),
    "annotation_is_a_list": ({**GOOD, "annotations": [[5, 5, 20, 20], GOOD["annotations"][0]]}, {"invalid_box": 1}),
    "infinite_box": ({**GOOD, "annotations": [{"bbox": [5, 5, float("inf"), 20], "category_id": 11}]}, {"invalid_box": 1, "no_valid_boxes": 1}),
    "number_beyond_float_range": ({**GOOD, "annotations": [{"bbox": [10**400, 5, 20, 20], "category_id": 11}]}, {"invalid_box": 1, "no_valid_boxes": 1}),
    "width_beyond_int64": ({**GOOD, "width": 2**70}, {"invalid_record": 1}),
    "string_category": ({**GOOD, "annotations": [{"bbox": [5, 5, 20, 20], "category_id": "11"}]}, {"invalid_box": 1, "no_valid_boxes": 1}),
    "non_numeric_width": ({**GOOD, "width": "wide"}, {"invalid_record": 1}),
    "negative_height": ({**GOOD, "height": -64}, {"invalid_record": 1}),
    "annotations_not_a_list": ({**GOOD, "annotations": {"bbox": [5, 5, 20, 20]}}, {"invalid_record": 1}),
    "record_not_an_object": (["good.png", 64, 64], {"invalid_record": 1}),
    "caption_not_a_string": ({**GOOD, "caption": 7}, {"invalid_record": 1}),
    "too_elongated_image": (
        {"file_name": "thin.png", "width": 4000, "height": 2, "caption": None, "annotations": [{"bbox": [0, 0, 100, 2], "category_id": 11}]},
        {"unusable_image_size": 1},
    ),
    "absolute_path": ({**GOOD, "file_name": "/etc/passwd"}, {"unsafe_path": 1}),
    "parent_path": ({**GOOD, "file_name": "../outside.png"}, {"unsafe_path": 1}),
    "symlink_out_of_root": ({**GOOD, "file_name": "link.png"}, {"unsafe_path": 1}),
    "nul_byte_in_path": ({**GOOD, "file_name": "good.png\x00"}, {"unsafe_path": 1}),
    "span_outside_caption": (
        grounding_record("good.png", "a red square", [("red square", (5, 5, 20, 20))]) | {"annotations": [{"bbox": [5, 5, 20, 20], "tokens_positive": [[40, 50]]}]},
        {"invalid_box": 1, "no_valid_boxes": 1},
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
def test_bad_record_is_skipped_and_counted(collator, kind):
    record, expected = BAD_RECORDS[kind]
    collator.skipped.clear()
    batch = collate(collator, [GOOD, record])
    assert dict(batch["skipped"]) == expected and dict(collator.skipped) == expected
    kept = 1 if set(expected) - {"invalid_box"} else 2  # a skipped sample, or only a dropped box
    assert len(batch["labels"]) == kept and batch["pixel_values"].shape[0] == kept


def test_a_batch_of_only_bad_records_keeps_its_counts(collator):
    batch = collate(collator, [BAD_RECORDS["parent_path"][0], BAD_RECORDS["non_numeric_width"][0], {**GOOD, "file_name": "missing.png"}])
    assert is_empty_batch(batch)
    assert batch == {"skipped": {"unsafe_path": 1, "invalid_record": 1, "corrupt_image": 1}}


def test_per_sample_warnings_are_rate_limited(bert_vocab_dir, images, caplog):
    processor = GLIPProcessor(GLIPImageProcessor(), BertTokenizer.from_pretrained(str(bert_vocab_dir)))
    fresh = GLIPTrainingCollator.from_categories(processor, CATEGORIES, image_root=images, transform=GLIPTrainTransform((64,), 64, 0.0))
    missing = [{**GOOD, "file_name": f"missing_{index}.png"} for index in range(40)]
    with caplog.at_level(logging.WARNING, logger="processing.training_data"):
        for start in range(0, 40, 4):
            collate(fresh, missing[start : start + 4])
    assert fresh.skipped == {"corrupt_image": 40}
    assert len(caplog.records) == WARNINGS_PER_REASON and "counted, not logged" in caplog.records[-1].getMessage()


def test_normalize_record_never_raises_and_keeps_the_reason():
    assert normalize_record(None)["invalid"] == "the record is a NoneType, not an object"
    row = normalize_record({"file_name": "a.png", "width": 64.0, "annotations": [{"bbox": [1, 2, 3, 4], "iscrowd": 1}, "junk"]})
    assert row["width"] == 64 and row["invalid"] is None
    assert row["annotations"] == [{"bbox": None, "category_id": None, "tokens_positive": None}]  # crowd dropped, junk kept as invalid
    assert normalize_record(normalize_record({"file_name": "a.png", "width": True}))["invalid"] == "width True is not a positive integer"


@pytest.mark.parametrize("streaming", [False, True])
def test_jsonl_shards_of_different_kinds_load_together(tmp_path, collator, streaming):
    detection = tmp_path / "detection.jsonl"
    grounding = tmp_path / "grounding.jsonl"
    huge_category = {**GOOD, "annotations": [{"bbox": [5, 5, 20, 20], "category_id": 2**70}, *GOOD["annotations"]]}  # beyond int64
    detection.write_text("\n".join(json.dumps(row) for row in (GOOD, {**GOOD, "width": "wide", "extra": 1}, huge_category)) + "\n")
    grounding.write_text(json.dumps(grounding_record("good.png", "a red square", [("red square", (5, 5, 20, 20))], width=None, height=None)) + "\n\n")
    records, categories = load_training_records([detection, grounding], streaming=streaming)
    rows = list(records)
    assert categories is None and [row["caption"] for row in rows] == [None, None, None, "a red square"]
    assert rows[1]["invalid"] == "width 'wide' is not a positive integer" and rows[3]["width"] is None
    batch = collate(collator, rows)
    assert len(batch["labels"]) == 3 and dict(batch["skipped"]) == {"invalid_record": 1, "invalid_box": 1}


@pytest.mark.parametrize("streaming", [False, True])
def test_empty_jsonl_is_an_error_naming_the_file(tmp_path, streaming):
    (tmp_path / "full.jsonl").write_text(json.dumps(GOOD) + "\n")
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(ValueError, match=r"empty\.jsonl contains no records"):
        load_training_records([tmp_path / "full.jsonl", tmp_path / "empty.jsonl"], streaming=streaming)


@pytest.mark.parametrize("streaming", [False, True])
def test_broken_jsonl_line_is_an_error_naming_file_and_line(tmp_path, streaming):
    shard = tmp_path / "broken.jsonl"
    shard.write_text(json.dumps(GOOD) + "\n\n" + '{"file_name": "a.png", "annotations": [\n' + json.dumps(GOOD) + "\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl, line 3: not valid JSON"):
        records, _ = load_training_records(shard, streaming=streaming)
        list(records)  # a stream reads the line when it gets there


def test_changed_jsonl_is_not_served_from_a_stale_cache(tmp_path):
    shard = tmp_path / "shard.jsonl"
    shard.write_text(json.dumps(GOOD) + "\n")
    assert len(load_training_records(shard)[0]) == 1
    shard.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    assert len(load_training_records(shard)[0]) == 2


def coco_file(path, images, annotations):
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return path


def test_duplicate_image_ids_are_an_error(tmp_path):
    path = coco_file(tmp_path / "dup.json", [{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}], [{"id": 1, "image_id": 1, "bbox": [1, 1, 5, 5], "category_id": 11}])
    with pytest.raises(ValueError, match=r"dup\.json: 1 image ids are used by several images \(1\)"):
        coco_json_to_records(path)


def test_orphan_annotations_are_an_error(tmp_path):
    annotations = [{"id": 1, "image_id": 1, "bbox": [1, 1, 5, 5], "category_id": 11}, {"id": 2, "image_id": 7, "bbox": [1, 1, 5, 5], "category_id": 11}]
    path = coco_file(tmp_path / "orphan.json", [{"id": 1, "file_name": "a.png"}], annotations)
    with pytest.raises(ValueError, match=r"orphan\.json: 1 annotations refer to image ids that no image has \(7\)"):
        coco_json_to_records(path)
    path = coco_file(tmp_path / "list.json", [{"id": 1, "file_name": "a.png"}], [[1, 1, 5, 5]])
    with pytest.raises(ValueError, match=r"annotations entries 0 are not objects with an `image_id`"):
        coco_json_to_records(path)


def test_a_stream_counts_the_records_of_its_incomplete_last_batch(collator):
    # 7 records, global batch 3 (per-device batch 3, one process): 2 full batches, 1 record dropped and counted
    stream = IndexedIterableDataset([GOOD] * 7, group_size=3)
    items = list(stream)
    assert [item["index"] for item in items] == list(range(6)) and items[-1]["dropped_tail"] == 1
    collator.skipped.clear()
    batches = list(DataLoader(stream, batch_size=3, collate_fn=collator, drop_last=True))
    assert len(batches) == 2 and collator.skipped == {"incomplete_last_batch": 1}
    assert list(IndexedIterableDataset([GOOD] * 6, group_size=3))[-1].get("dropped_tail") is None
    with pytest.raises(ValueError, match="group_size"):
        IndexedIterableDataset([GOOD], group_size=0)
