"""One prompt for many images (processing/fixed_prompt.py): the text encoder runs once, same-canvas batches and
worker-decoded files give the one-image-at-a-time results, unreadable files are reported, and glip-detect takes
folders with --batch_size / --num_workers."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

import modeling_glip  # noqa: F401  (registers GLIP with the Auto classes)
from modeling_glip.cli import main as glip_detect
from processing.fixed_prompt import FixedPromptDetector, detect_files
from tests.test_demo_checkpoint import demo, shapes

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "glip-demo"
LABELS = ["yellow star", "blue ring", "green square", "red triangle", "purple heart"]


@pytest.fixture(scope="module")
def demo_model():
    model = AutoModelForZeroShotObjectDetection.from_pretrained(CHECKPOINT, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(CHECKPOINT)


def one_at_a_time(model, processor, image, **kwargs):
    inputs = processor(images=[image], text=LABELS)
    with torch.no_grad():
        outputs = model(**inputs)
    return processor.post_process_grounded_object_detection(outputs, inputs, target_sizes=[(image.height, image.width)], **kwargs)[0]


def assert_same(actual, expected):
    assert actual["text_labels"] == expected["text_labels"] and torch.equal(actual["labels"], expected["labels"])
    for key in ("scores", "boxes"):
        torch.testing.assert_close(actual[key], expected[key], atol=1e-4, rtol=0)


def scenes():
    """Five images: three 160 px scenes (one canvas), a wider and a taller one (canvases of their own)."""
    images = [demo.fresh_scene(index)[0] for index in range(3)]
    images.append(images[0].resize((240, 160)))
    images.append(images[1].resize((160, 224)))
    return images


def test_batches_of_one_canvas_equal_one_image_at_a_time(demo_model, monkeypatch):
    model, processor = demo_model
    text_passes = []
    encode = model.get_text_features
    monkeypatch.setattr(model, "get_text_features", lambda **kwargs: text_passes.append(1) or encode(**kwargs))
    detector = FixedPromptDetector(model, processor, LABELS, threshold=0.05)
    images = scenes()
    batched = detector(images)  # three canvases: one batch of 3, two of 1
    again = [detector([image])[0] for image in images]
    assert len(text_passes) == 1  # the prompt was encoded once, at construction
    for image, actual, single in zip(images, batched, again):
        expected = one_at_a_time(model, processor, image, threshold=0.05)
        assert len(expected["scores"]) > 0
        assert_same(actual, expected)
        assert_same(single, expected)


def test_chunked_prompt_rows_repeat_per_image(demo_model):
    model, processor = demo_model
    names = [category["name"] for category in shapes.categories()]
    detector = FixedPromptDetector(model, processor, names, names_per_chunk=20, max_detections=30)
    assert detector.num_rows == 3
    images = scenes()[:2]
    inputs = processor(images=images, text=names, names_per_chunk=20)
    with torch.no_grad():
        outputs = model(**inputs)
    expected = processor.post_process_grounded_object_detection(outputs, inputs, target_sizes=[(i.height, i.width) for i in images], max_detections=30)
    for actual, reference in zip(detector(images), expected):
        assert_same(actual, reference)


@pytest.mark.parametrize("batch_size, num_workers", [(1, 0), (2, 1)])
def test_files_are_decoded_ahead_and_failures_reported(demo_model, tmp_path, batch_size, num_workers):
    model, processor = demo_model
    images = scenes()
    paths = []
    for index, image in enumerate(images):
        paths.append(str(tmp_path / f"{index}.png"))
        image.save(paths[-1])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    paths.insert(2, str(tmp_path / "broken.png"))
    paths.append(str(tmp_path / "missing.png"))
    detector = FixedPromptDetector(model, processor, LABELS, threshold=0.05)
    items = list(detect_files(detector, paths, batch_size=batch_size, num_workers=num_workers))
    assert sorted(item.index for item in items) == list(range(len(paths)))  # every file exactly once
    failed = {item.path: item.error for item in items if item.error is not None}
    assert set(failed) == {str(tmp_path / "broken.png"), str(tmp_path / "missing.png")}
    assert all(failed.values())
    for item in items:
        if item.error is None:
            assert_same(item.result, one_at_a_time(model, processor, Image.open(item.path).convert("RGB"), threshold=0.05))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        next(detect_files(detector, paths, batch_size=0))
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0, got -1"):
        next(detect_files(detector, paths, num_workers=-1))


def test_glip_detect_runs_a_folder_in_batches(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(scenes()):
        image.save(folder / f"scene_{index}.png")
    (folder / "notes.txt").write_text("not an image: ignored")
    reports = {}
    for name, extra in (("plain", []), ("batched", ["--batch_size", "3", "--num_workers", "1"])):
        output = tmp_path / name
        status = glip_detect([str(folder), "--labels", ", ".join(LABELS), "--threshold", "0.3", "--output_dir", str(output), *extra])
        assert status == 0
        reports[name] = (json.loads((output / "detections.json").read_text()), json.loads((output / "detections_info.json").read_text()))
    (plain, plain_info), (batched, batched_info) = reports["plain"], reports["batched"]
    assert [image["file_name"] for image in plain_info["images"]] == [str(folder / f"scene_{i}.png") for i in range(5)]
    assert batched_info["images"] == plain_info["images"] and len(plain) > 0
    assert [(r["image_id"], r["category_id"]) for r in batched] == [(r["image_id"], r["category_id"]) for r in plain]
    for a, b in zip(batched, plain):
        assert abs(a["score"] - b["score"]) < 1e-4 and max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"])) < 1e-3
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit:
        glip_detect([str(empty), "--labels", "cat"])
    assert exit.value.code == 2 and "holds no image file" in capsys.readouterr().err
    for flag, value in (("--batch_size", "0"), ("--num_workers", "-1")):
        with pytest.raises(SystemExit) as exit:
            glip_detect([str(folder), "--labels", "cat", flag, value])
        assert exit.value.code == 2 and flag in capsys.readouterr().err
