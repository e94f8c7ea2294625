"""The synthetic grounding data generator (examples/synthetic_shapes.py): determinism, exact boxes, held-out
combinations, caption spans, and loading through the training-data loader."""

import dataclasses
import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "examples" / "synthetic_shapes.py"
_spec = importlib.util.spec_from_file_location("synthetic_shapes", _PATH)
shapes = importlib.util.module_from_spec(_spec)
sys.modules["synthetic_shapes"] = shapes
_spec.loader.exec_module(shapes)

SPLITS = ("train", "test_seen", "test_unseen")
SIZES = {"train": 16, "test_seen": 8, "test_unseen": 8}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    shapes.generate_dataset(root, train_images=SIZES["train"], test_images=SIZES["test_seen"], seed=0)
    return root


def _load(root, name):
    return json.loads((root / name).read_text())


def _file_bytes(root):
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_cli_output_is_deterministic(dataset, tmp_path, capsys):
    shapes.main(["--output", str(tmp_path), "--train-images", str(SIZES["train"]), "--test-images", str(SIZES["test_seen"]), "--seed", "0"])
    assert "train: 16 images" in capsys.readouterr().out
    assert _file_bytes(tmp_path) == _file_bytes(dataset)
    # another seed gives other scenes
    assert shapes.scene_for(1, "train", 0) != shapes.scene_for(0, "train", 0)


def test_layout_and_coco_fields(dataset):
    metadata = _load(dataset, "metadata.json")
    assert metadata["unseen_combinations"] == [f"{c} {s}" for c, s in shapes.UNSEEN_COMBINATIONS]
    expected_categories = shapes.categories()
    assert len(expected_categories) == len(shapes.COLORS) * len(shapes.SHAPES)
    for split in SPLITS:
        files = metadata["splits"][split]
        names = [files["detection"]] + ([files["grounding"]] if split == "train" else [])
        assert names == [f"{split}_detection.json"] + ([f"{split}_grounding.json"] if split == "train" else [])
        for name in names:
            data = _load(dataset, name)
            assert data["categories"] == expected_categories
            assert len(data["images"]) == SIZES[split] == files["images"]
            assert len(data["annotations"]) == files["annotations"]
            assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
            for image in data["images"]:
                assert (dataset / image["file_name"]).is_file() and image["file_name"].startswith(split + "/")
                assert ("caption" in image) == name.endswith("grounding.json")
            for annotation in data["annotations"]:
                x, y, w, h = annotation["bbox"]
                assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= 160 and y + h <= 160 and annotation["iscrowd"] == 0


def test_square_box_convention():
    """A 20 px axis-aligned square centred on (50, 50) covers pixels 40..59: COCO box [40, 40, 20, 20]."""
    spec = shapes.SceneSpec((shapes.ShapeSpec("square", "red", "small", (50.0, 50.0), extent=20.0),))
    image, (annotation,) = shapes.render_scene(spec)
    assert annotation["bbox"] == [40, 40, 20, 20] and annotation["area"] == 400 and annotation["name"] == "red square"
    pixels = np.asarray(image)
    assert (pixels[40:60, 40:60] == shapes.COLORS["red"]).all()
    assert (np.delete(np.delete(pixels, np.s_[40:60], 0), np.s_[40:60], 1) == 128).all()


def _drawn(spec):
    """Boolean mask of the pixels `spec`'s shapes change relative to its background alone."""
    image, _ = shapes.render_scene(spec)
    background, _ = shapes.render_scene(dataclasses.replace(spec, shapes=()))
    return (np.asarray(image) != np.asarray(background)).any(axis=2)


def _mask_box(mask):
    rows, columns = np.nonzero(mask)
    return [int(columns.min()), int(rows.min()), int(columns.max() - columns.min() + 1), int(rows.max() - rows.min() + 1)]


@pytest.mark.parametrize("split", SPLITS)
def test_boxes_are_tight_bounds_of_drawn_pixels(split):
    for index in range(12):
        spec = shapes.scene_for(3, split, index)
        _, annotations = shapes.render_scene(spec)
        # on a plain grey background every drawn pixel differs from it: each box is exactly its shape's pixels' bound
        grey = dataclasses.replace(spec, background="plain", background_rgb=(128, 128, 128))
        for shape, annotation in zip(spec.shapes, annotations):
            mask = _drawn(dataclasses.replace(grey, shapes=(shape,)))
            assert _mask_box(mask) == annotation["bbox"] and int(mask.sum()) == annotation["area"]
        # on the real background (plain, noise or photo) nothing changes outside the boxes, which never overlap
        inside = np.zeros((spec.image_size, spec.image_size), dtype=bool)
        for x, y, w, h in (annotation["bbox"] for annotation in annotations):
            assert not inside[y : y + h, x : x + w].any()
            inside[y : y + h, x : x + w] = True
        assert not (_drawn(spec) & ~inside).any()


def test_held_out_combinations():
    unseen, seen = set(shapes.UNSEEN_COMBINATIONS), set(shapes.SEEN_COMBINATIONS)
    assert len(unseen) == 10 and not unseen & seen and unseen | seen == set(shapes.ALL_COMBINATIONS)
    assert {c for c, _ in seen} == set(shapes.COLORS) and {s for _, s in seen} == set(shapes.SHAPES)
    # what the splits hold: specs only (no rendering), enough scenes that every seen combination shows up in train
    drawn = {
        split: {(s.color, s.shape) for i in range(400 if split == "train" else 100) for s in shapes.scene_for(0, split, i).shapes}
        for split in SPLITS
    }
    assert drawn["train"] == seen and drawn["test_seen"] <= seen and drawn["test_unseen"] == unseen


def test_held_out_combinations_in_files(dataset):
    unseen_names = {shapes.category_name(*combination) for combination in shapes.UNSEEN_COMBINATIONS}
    for name in ("train_detection.json", "train_grounding.json", "test_seen_detection.json", "test_unseen_detection.json"):
        data = _load(dataset, name)
        names = {category["id"]: category["name"] for category in data["categories"]}
        used = {names[annotation["category_id"]] for annotation in data["annotations"]}
        assert used <= unseen_names if name.startswith("test_unseen") else not used & unseen_names


def test_shape_words_are_single_bert_tokens(bert_vocab_dir):
    vocab = set((bert_vocab_dir / "vocab.txt").read_text().split("\n"))
    assert set(shapes.COLORS) | set(shapes.SHAPES) | set(shapes.SIZES) <= vocab


_PHRASE = re.compile(r"^(a|an|two|three|four)(?: (small|large))? (\w+) (\w+)$")


def _check_caption(caption, annotations, spans):
    assert len(spans) == len(annotations)
    by_span = {}
    for index, span in enumerate(spans):
        by_span.setdefault(tuple(span), []).append(index)
    ordered = sorted(by_span)
    assert all(a[1] < b[0] for a, b in zip(ordered, ordered[1:])), "phrases overlap"
    for (start, end), members in by_span.items():
        match = _PHRASE.match(caption[start:end])
        assert match, caption[start:end]
        determiner, size, color, noun = match.groups()
        count = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4}[determiner]
        assert count == len(members)
        if count == 1:
            assert determiner == ("an" if (size or color)[0] in "aeiou" else "a")
        for index in members:
            annotation = annotations[index]
            assert color == annotation["color"] and size in (None, annotation["size"])
            assert noun == (annotation["shape"] if count == 1 else shapes.PLURALS[annotation["shape"]])
    # a relation between two phrases is true of their boxes
    for relation, holds in {
        "left of": lambda a, b: a[0] + a[2] <= b[0],
        "right of": lambda a, b: b[0] + b[2] <= a[0],
        "above": lambda a, b: a[1] + a[3] <= b[1],
        "below": lambda a, b: b[1] + b[3] <= a[1],
    }.items():
        if f" {relation} " in caption:
            first, second = (by_span[span][0] for span in ordered)
            assert holds(annotations[first]["bbox"], annotations[second]["bbox"]), caption


def test_caption_spans_point_at_their_phrases(dataset):
    grounding = _load(dataset, "train_grounding.json")
    detection = _load(dataset, "train_detection.json")
    names = {category["id"]: category["name"] for category in grounding["categories"]}
    assert [a["bbox"] for a in grounding["annotations"]] == [a["bbox"] for a in detection["annotations"]]
    for image in grounding["images"]:
        boxes = [a for a in grounding["annotations"] if a["image_id"] == image["id"]]
        assert boxes and all(len(a["tokens_positive"]) == 1 for a in boxes)
        annotations = [
            dict(zip(("color", "shape"), names[a["category_id"]].split()), bbox=a["bbox"], size=None) for a in boxes
        ]
        spec = shapes.scene_for(0, "train", image["id"] - 1)
        for annotation, shape in zip(annotations, spec.shapes):
            annotation["size"] = shape.size
        _check_caption(image["caption"], annotations, [a["tokens_positive"][0] for a in boxes])


def test_many_captions():
    """Captions over many scenes (groups, relations, lists): every span names its boxes' colour, shape and size."""
    relations = 0
    for index in range(150):
        _, annotations = shapes.render_scene(shapes.scene_for(5, "train", index))
        caption, spans = shapes.make_caption(annotations, np.random.default_rng(index))
        _check_caption(caption, annotations, spans)
        relations += any(f" {word} " in caption for word in ("left", "right", "above", "below"))
    assert relations > 0


def test_files_load_with_the_training_data_loader(dataset, bert_vocab_dir):
    training_data = pytest.importorskip("processing.training_data", reason="the training-data loader is not in this checkout yet")
    from transformers import BertTokenizer

    from processing import GLIPImageProcessor, GLIPProcessor
    from processing.train_transforms import GLIPTrainTransform

    records, categories = training_data.load_training_records([dataset / "train_detection.json", dataset / "train_grounding.json"])
    assert len(records) == 2 * SIZES["train"] and categories == shapes.categories()
    processor = GLIPProcessor(GLIPImageProcessor(min_size=160, max_size=160), BertTokenizer.from_pretrained(str(bert_vocab_dir)))
    collator = training_data.GLIPTrainingCollator.from_categories(
        processor, categories, image_root=dataset, transform=GLIPTrainTransform(min_sizes=(160,), max_size=160)
    )
    items = training_data.IndexedDataset(records)
    batch = collator([items[index] for index in range(len(records))])
    assert not batch["skipped"] and not collator.skipped
    expected = [len(record["annotations"]) for record in records]
    assert [len(label["boxes"]) for label in batch["labels"]] == expected
    assert all(bool((label["positive_map"].sum(dim=1) > 0).all()) for label in batch["labels"])


def test_captions_only_split(tmp_path):
    """The captions-only split: an imagefolder of images and captions (`datasets` reads it), its boxes withheld in a
    separate grounding json, scenes drawn from every combination (held-out ones included); the other splits do not
    change when it is added."""
    import datasets

    metadata = shapes.generate_dataset(tmp_path, train_images=2, test_images=1, caption_images=6, seed=0)
    assert metadata["splits"]["captions"] == {
        "images": 6, "annotations": metadata["splits"]["captions"]["annotations"],
        "metadata": "captions/metadata.jsonl", "withheld": "captions_withheld_grounding.json",
    }
    folder = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "captions"), split="train")
    withheld = _load(tmp_path, "captions_withheld_grounding.json")
    assert folder["caption"] == [image["caption"] for image in withheld["images"]]
    assert [image["file_name"] for image in withheld["images"]] == [f"captions/{i:06d}.png" for i in range(1, 7)]
    assert len(withheld["annotations"]) == metadata["splits"]["captions"]["annotations"] and all(a["tokens_positive"] for a in withheld["annotations"])
    assert not (tmp_path / "captions_detection.json").exists()
    combinations = {(s.color, s.shape) for i in range(300) for s in shapes.scene_for(0, "captions", i).shapes}
    assert combinations == set(shapes.ALL_COMBINATIONS)  # unseen pairs too: web captions name what gold boxes lack
    without = tmp_path / "without"
    shapes.generate_dataset(without, train_images=2, test_images=1, seed=0)
    for name in ("train_detection.json", "train_grounding.json", "test_unseen_detection.json", "train/000001.png"):
        assert (tmp_path / name).read_bytes() == (without / name).read_bytes()
