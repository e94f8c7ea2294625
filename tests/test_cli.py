"""`glip-detect`: table, COCO-style JSON, annotated PNGs, and its error messages."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from modeling_glip.cli import main


@pytest.fixture
def images(tmp_path):
    good = tmp_path / "scene.png"
    Image.fromarray((np.random.RandomState(0).rand(60, 90, 3) * 255).astype("uint8")).save(good)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    return good, bad


def test_detects_writes_json_and_png_and_reports_unreadable_images(tiny_glip_checkpoint, images, tmp_path, capsys):
    good, bad = images
    output = tmp_path / "out"
    code = main([str(good), str(bad), "--labels", "cat, remote control", "--model", str(tiny_glip_checkpoint), "--threshold", "0", "--top-k", "3", "--output-dir", str(output)])
    captured = capsys.readouterr()
    assert code == 1  # one image failed, the other was still processed
    assert f"cannot read image {bad}" in captured.err
    assert f"{good}: 3 detection(s)" in captured.out and "score" in captured.out
    report = json.loads((output / "detections.json").read_text())
    assert report["failed_images"] == [str(bad)]
    assert len(report["annotations"]) == 3 and {c["name"] for c in report["categories"]} <= {"cat", "remote control"}
    for annotation in report["annotations"]:
        assert annotation["image_id"] == 0 and len(annotation["bbox"]) == 4 and annotation["bbox"][2] >= 0
    annotated = Image.open(output / "scene_detections.png")
    assert annotated.size == (90, 60)


def test_caption_with_phrases(tiny_glip_checkpoint, images, tmp_path, capsys):
    good, _ = images
    code = main([str(good), "--caption", "a cat lying on a couch", "--phrases", "a cat; a couch", "--model", str(tiny_glip_checkpoint), "--threshold", "0", "--output-dir", str(tmp_path)])
    assert code == 0
    names = {c["name"] for c in json.loads((tmp_path / "detections.json").read_text())["categories"]}
    assert names and names <= {"a cat", "a couch"}


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--labels", " , "], "--labels is empty"),
        (["--labels", "cat", "--model", "/no/such/checkpoint"], "Convert the official GLIP weights"),
    ],
)
def test_clear_errors(images, arguments, message, tiny_glip_checkpoint):
    good, _ = images
    if "--model" not in arguments:
        arguments = arguments + ["--model", str(tiny_glip_checkpoint)]
    with pytest.raises(SystemExit, match=message):
        main([str(good), *arguments])


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-c", "from importlib.metadata import entry_points; print([e.value for e in entry_points(group='console_scripts') if e.name == 'glip-detect'])"], capture_output=True, text=True)
    assert "modeling_glip.cli:main" in result.stdout
