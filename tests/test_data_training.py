"""Training data: record loading, the original's box convention, flips that keep captions consistent, sampled
negatives, and bad samples skipped with a count."""

import json
import logging
import random

import pytest
import torch
from transformers import BertTokenizer
from transformers.image_transforms import center_to_corners_format

from processing import GLIPImageProcessor, GLIPProcessor
from processing.train_transforms import GLIPTrainTransform, legacy_xyxy_from_coco, swap_left_right
from processing.training_data import (
    DetectionPromptSampler,
    GLIPTrainingCollator,
    IndexedDataset,
    IndexedIterableDataset,
    coco_json_to_records,
    is_empty_batch,
    load_training_records,
    sample_rng,
)
from tests.training_fixtures import CATEGORIES, draw_squares, grounding_record, make_detection_set


@pytest.fixture(scope="module")
def processor(bert_vocab_dir):
    return GLIPProcessor(GLIPImageProcessor(), BertTokenizer.from_pretrained(str(bert_vocab_dir)))


@pytest.fixture(scope="module")
def detection_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    return root, make_detection_set(root, num_images=4)


def collate(collator, records, epoch=0):
    return collator([{"record": record, "index": index, "epoch": epoch} for index, record in enumerate(records)])


def original_targets(bbox, image_size, new_size, flip):
    """The original's xyxy target, written out step by step: BoxList xywh->xyxy (+1), clip, resize, transpose."""
    x, y, w, h = bbox
    width, height = image_size
    x1, y1, x2, y2 = x, y, x + w - 1, y + h - 1
    x1, x2 = min(max(x1, 0), width - 1), min(max(x2, 0), width - 1)
    y1, y2 = min(max(y1, 0), height - 1), min(max(y2, 0), height - 1)
    rw, rh = new_size[0] / width, new_size[1] / height
    x1, y1, x2, y2 = x1 * rw, y1 * rh, x2 * rw, y2 * rh
    if flip:
        x1, x2 = new_size[0] - x2 - 1, new_size[0] - x1 - 1
    return [x1, y1, x2, y2]


@pytest.mark.parametrize("flip", [False, True])
def test_collator_boxes_are_the_original_xyxy_targets(processor, detection_set, flip):
    root, annotations = detection_set
    records, categories = coco_json_to_records(annotations)
    collator = GLIPTrainingCollator.from_categories(processor, categories, image_root=root, transform=GLIPTrainTransform((96,), 200, float(flip)))
    batch = collate(collator, records)
    for record, labels, mask in zip(records, batch["labels"], batch["pixel_mask"]):
        height, width = int(mask.any(1).sum()), int(mask.any(0).sum())
        assert (height, width) == (96, 96)
        # what GLIPModel.forward does with `labels`
        model_view = center_to_corners_format(labels["boxes"]) * torch.tensor([width, height, width, height])
        expected = torch.tensor([original_targets(a["bbox"], (64, 64), (96, 96), flip) for a in record["annotations"]])
        torch.testing.assert_close(model_view, expected, rtol=0, atol=1e-3)


def test_legacy_conversion_drops_what_the_original_drops():
    boxes = torch.tensor([[10.0, 10.0, 1.0, 5.0], [60.0, 5.0, 10.0, 10.0], [-5.0, -5.0, 10.0, 10.0], [70.0, 70.0, 5.0, 5.0]])
    xyxy, keep = legacy_xyxy_from_coco(boxes, 64, 64)
    assert keep.tolist() == [False, True, True, False]  # 1-px wide -> x2 == x1; fully outside -> empty after clip
    assert xyxy[1].tolist() == [60.0, 5.0, 63.0, 14.0] and xyxy[2].tolist() == [0.0, 0.0, 4.0, 4.0]


def test_bad_samples_are_skipped_and_counted(processor, tmp_path, caplog):
    draw_squares(tmp_path / "good.png", [("red", 5, 5, 20)])
    (tmp_path / "corrupt.png").write_bytes(b"not an image")
    good = {"file_name": "good.png", "width": 64, "height": 64, "caption": None, "annotations": [{"bbox": [5, 5, 20, 20], "category_id": 11}]}
    records = [
        good,
        {**good, "file_name": "corrupt.png"},
        {**good, "file_name": "missing.png"},
        {**good, "width": 100},  # size differs from the file
        {**good, "annotations": [{"bbox": [5, 5, -3, 4], "category_id": 11}, {"bbox": [float("nan"), 1, 2, 3], "category_id": 11}]},
        {
            **good,
            "annotations": [
                {"bbox": [5, 5, 20, 20], "category_id": 11},
                {"bbox": [5, 5, 20, 20], "category_id": 999},  # unknown category
                {"bbox": [1, 2, 3], "category_id": 11},  # malformed
                {"bbox": [80, 80, 5, 5], "category_id": 11},  # outside the image
            ],
        },
        grounding_record("good.png", "a red square", [("red square", (5, 5, 20, 20))]) | {"annotations": [{"bbox": [5, 5, 20, 20], "tokens_positive": [[40, 50]]}]},
    ]
    collator = GLIPTrainingCollator.from_categories(processor, CATEGORIES, image_root=tmp_path, transform=GLIPTrainTransform((64,), 64, 0.0))
    with caplog.at_level(logging.WARNING, logger="processing.training_data"):
        batch = collate(collator, records)
    assert batch["pixel_values"].shape[0] == 2 and len(batch["labels"]) == 2  # records 0 and 5
    assert [len(labels["boxes"]) for labels in batch["labels"]] == [1, 1]
    expected = {"corrupt_image": 2, "size_mismatch": 1, "no_valid_boxes": 2, "invalid_box": 6}
    assert dict(batch["skipped"]) == expected and dict(collator.skipped) == expected
    assert "corrupt.png" in caplog.text and "missing.png" in caplog.text
    # a batch of only bad samples carries only its counts (the training loop skips the step on every process)
    empty = collate(collator, records[1:3])
    assert is_empty_batch(empty) and empty == {"skipped": {"corrupt_image": 2}}
    assert collator.skipped["corrupt_image"] == 4


def test_swap_left_right_moves_spans():
    caption = "the left dog and the Right cat, leftover"
    spans = [(0, 12), (21, 30), (32, 40)]
    flipped, moved = swap_left_right(caption, spans)
    assert flipped == "the right dog and the Left cat, leftover"
    assert [caption[s:e] for s, e in spans] == ["the left dog", "Right cat", "leftover"]
    assert [flipped[s:e] for s, e in moved] == ["the right dog", "Left cat", "leftover"]
    with pytest.raises(ValueError, match="cuts the word"):
        swap_left_right("the left dog", [(5, 12)])


def test_flip_keeps_grounding_captions_consistent(processor, tmp_path):
    draw_squares(tmp_path / "pair.png", [("red", 4, 20, 20), ("blue", 40, 20, 20)])
    caption = "a red square on the left and a blue square on the right"
    record = grounding_record("pair.png", caption, [("red square on the left", (4, 20, 20, 20)), ("blue square on the right", (40, 20, 20, 20))])
    collator = GLIPTrainingCollator(processor, image_root=tmp_path, transform=GLIPTrainTransform((64,), 64, flip_prob=1.0))
    batch = collate(collator, [record])
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    labels = batch["labels"][0]
    phrases = [" ".join(t for t, on in zip(tokens, row.tolist()) if on) for row in labels["positive_map"]]
    assert phrases == ["red square on the right", "blue square on the left"]
    # the red square now lies on the right half of the flipped image, the blue one on the left
    assert labels["boxes"][0, 0] > 0.5 > labels["boxes"][1, 0]
    # detection prompts are never rewritten; grounding captions without left/right are flipped as they are
    plain = grounding_record("pair.png", "a red square", [("red square", (4, 20, 20, 20))])
    batch = collate(collator, [plain])
    assert processor.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True) == "a red square" and batch["labels"][0]["boxes"][0, 0] > 0.5


def test_negative_sampling(processor):
    names = [f"class{i} thing" for i in range(200)]
    sampler = DetectionPromptSampler(names, processor.tokenizer, max_negatives=85)
    positives = [3, 17, 150]
    counts = set()
    for seed in range(40):
        labels, unnamed = sampler.sample(positives, random.Random(seed))
        assert unnamed == set()
        assert set(positives) <= set(labels) and len(set(labels)) == len(labels)
        counts.add(len(labels) - len(positives))
        encoded = processor(text=sampler.prompt(labels).text, phrase_spans=list(sampler.prompt(labels).spans))
        assert encoded["input_ids"].shape[1] <= 256  # the token budget holds with many negatives
    assert min(counts) >= 1 and max(counts) <= 85 and len(counts) > 5  # between 1 and 85 negatives, varying
    first = [sampler.sample(positives, random.Random(seed))[0] for seed in range(3)]
    assert len({tuple(labels) for labels in first}) == 3  # shuffled differently
    # every class, in id order: the fine-tuning prompt
    ordered = DetectionPromptSampler(names[:5], processor.tokenizer, max_negatives=None, shuffle=False)
    assert ordered.sample([2], random.Random(0))[0] == [0, 1, 2, 3, 4]
    # positives that do not fit are dropped and leave no room for negatives (check_for_positive_overflow)
    long_names = [" ".join(["word"] * 60) + f" {i}" for i in range(6)]
    crowded = DetectionPromptSampler(long_names, processor.tokenizer, max_negatives=85)
    assert len(crowded.sample(range(6), random.Random(0))[0]) == 4
    with pytest.raises(ValueError, match="max_negatives"):
        DetectionPromptSampler(names, processor.tokenizer, max_negatives=-2)


def test_partial_prompts_leave_named_positives_out_on_purpose(processor):
    names = [f"class{i} thing" for i in range(20)]
    positives = [1, 4, 7, 9]
    default = DetectionPromptSampler(names, processor.tokenizer, max_negatives=3)
    off = DetectionPromptSampler(names, processor.tokenizer, max_negatives=3, partial_positive_prob=0.0)
    assert [default.sample(positives, random.Random(s)) for s in range(10)] == [off.sample(positives, random.Random(s)) for s in range(10)]
    partial = DetectionPromptSampler(names, processor.tokenizer, max_negatives=3, partial_positive_prob=1.0)
    sizes = set()
    for seed in range(80):
        labels, unnamed = partial.sample(positives, random.Random(seed))
        named = set(labels) & set(positives)
        assert labels and named | unnamed == set(positives) and not named & unnamed
        assert not unnamed & set(labels)  # an unnamed positive is never drawn back as a negative
        sizes.add(len(named))
    assert sizes == {0, 1, 2, 3, 4}  # 0: a prompt of negatives only
    no_negatives = DetectionPromptSampler(names, processor.tokenizer, max_negatives=0, partial_positive_prob=1.0)
    for seed in range(20):
        labels, unnamed = no_negatives.sample(positives, random.Random(seed))
        assert labels and set(labels) <= set(positives)  # never an empty prompt
    for bad in (-0.1, 1.5, "0.5", True):
        with pytest.raises(ValueError, match="partial_positive_prob"):
            DetectionPromptSampler(names, processor.tokenizer, partial_positive_prob=bad)


def test_partial_prompts_turn_unnamed_objects_into_background_and_count_them(processor, detection_set):
    root, annotations = detection_set
    records, categories = coco_json_to_records(annotations)
    collator = GLIPTrainingCollator.from_categories(
        processor, categories, image_root=root, transform=GLIPTrainTransform((64,), 64, 0.0), max_negatives=0, partial_positive_prob=1.0
    )
    name_of = {category["id"]: category["name"] for category in categories}
    unnamed = total = kept = 0
    for epoch in range(4):
        batch = collate(collator, records, epoch)
        unnamed += batch["skipped"]["unnamed_in_prompt"]
        for record, labels, ids in zip(records, batch["labels"], batch["input_ids"]):
            prompt = processor.tokenizer.decode(ids, skip_special_tokens=True)
            named = [a for a in record["annotations"] if name_of[a["category_id"]] in prompt]
            assert labels["boxes"].shape[0] == len(named)
            total += len(record["annotations"])
            kept += len(named)
    assert unnamed > 0 and unnamed == total - kept  # every object left out is counted


def test_per_sample_randomness_depends_on_seed_epoch_index():
    assert sample_rng(0, 1, 2).random() == sample_rng(0, 1, 2).random()
    assert len({sample_rng(*key).random() for key in [(0, 1, 2), (1, 1, 2), (0, 2, 2), (0, 1, 3)]}) == 4


def test_json_and_streaming_jsonl_loading(tmp_path, detection_set):
    root, annotations = detection_set
    dataset, categories = load_training_records(annotations)
    assert len(dataset) == 4 and [c["id"] for c in categories] == [11, 12, 13]
    assert IndexedDataset(dataset)[1]["record"]["file_name"] == "train_1.png"
    # MDETR-style grounding json: image-level captions, spans on the annotations; crowd boxes dropped
    mdetr = {
        "images": [{"id": 5, "file_name": "a.png", "caption": "a red square", "width": 64, "height": 64}],
        "annotations": [
            {"id": 1, "image_id": 5, "bbox": [1, 1, 9, 9], "tokens_positive": [[2, 12]], "category_id": 1},
            {"id": 2, "image_id": 5, "bbox": [1, 1, 9, 9], "tokens_positive": [[2, 12]], "category_id": 1, "iscrowd": 1},
        ],
    }
    (tmp_path / "mdetr.json").write_text(json.dumps(mdetr))
    records, categories = coco_json_to_records(tmp_path / "mdetr.json")
    assert categories is None and records[0]["caption"] == "a red square" and len(records[0]["annotations"]) == 1
    # JSON-lines shards, streamed
    shard = tmp_path / "shard.jsonl"
    rows = [grounding_record(f"{i}.png", "a red square", [("red square", (1, 1, 9, 9))]) for i in range(3)]
    shard.write_text("\n".join(json.dumps(row) for row in rows))
    stream, _ = load_training_records([shard], streaming=True)
    items = list(IndexedIterableDataset(stream))
    assert [item["index"] for item in items] == [0, 1, 2] and items[2]["record"]["file_name"] == "2.png"
    with pytest.raises(ValueError, match="cannot be streamed"):
        load_training_records(annotations, streaming=True)
    with pytest.raises(ValueError, match="not found"):
        load_training_records(tmp_path / "nope.jsonl")
