"""`glip-detect`: table, COCO results + info files, annotated PNGs, and its behaviour on bad arguments and bad images."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from modeling_glip import cli
from modeling_glip.cli import annotate, annotated_names, main


def write_image(path, height=60, width=90, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")).save(path)
    return path


@pytest.fixture
def images(tmp_path):
    good = write_image(tmp_path / "scene.png")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    return good, bad


def run(arguments, checkpoint, output):
    return main([*arguments, "--model", str(checkpoint), "--output_dir", str(output)])


def test_detects_writes_coco_results_info_and_png_and_reports_unreadable_images(tiny_glip_checkpoint, images, tmp_path, capsys):
    good, bad = images
    output = tmp_path / "out"
    code = run([str(good), str(bad), "--labels", "cat, remote control", "--threshold", "0", "--top_k", "3"], tiny_glip_checkpoint, output)
    captured = capsys.readouterr()
    assert code == 1  # one image failed, the other was still processed
    # the settings it ran with: the checkpoint's processor (64 / 96 px), printed first
    assert captured.out.startswith(f"model: {tiny_glip_checkpoint}; processor: min_size 64, max_size 96, size_divisibility 32")
    assert f"skipped {bad}" in captured.err and len([line for line in captured.err.splitlines() if str(bad) in line]) == 1
    assert f"{good}: 3 detection(s)" in captured.out and "score" in captured.out
    results = json.loads((output / "detections.json").read_text())
    info = json.loads((output / "detections_info.json").read_text())
    assert [failure["file_name"] for failure in info["failed_images"]] == [str(bad)]
    assert info["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "remote control"}]  # --labels order
    assert info["images"] == [{"id": 0, "file_name": str(good), "width": 90, "height": 60, "annotated_image": "scene_detections.png"}]
    assert len(results) == 3 and all(set(r) == {"image_id", "category_id", "bbox", "score"} for r in results)
    # a pycocotools results file: loadRes against the info file (a COCO dataset without annotations)
    loaded = COCO(str(output / "detections_info.json")).loadRes(str(output / "detections.json"))
    assert len(loaded.getAnnIds()) == 3 and all(ann["bbox"][2] >= 0 for ann in loaded.anns.values())
    assert Image.open(output / "scene_detections.png").size == (720, 480)  # drawn enlarged: short side 480


def test_category_ids_follow_the_labels_not_the_detections(tiny_glip_checkpoint, images, tmp_path, capsys):
    good, _ = images
    labels = ["cat", "remote control", "couch", "person"]
    for order in (labels, labels[::-1]):
        capsys.readouterr()
        run([str(good), "--labels", ", ".join(order), "--threshold", "0"], tiny_glip_checkpoint, tmp_path)
        printed = re.findall(r"^  (\S.*?)\s+\d\.\d{3}\s+\(", capsys.readouterr().out, re.MULTILINE)  # the table's label column
        info = json.loads((tmp_path / "detections_info.json").read_text())
        results = json.loads((tmp_path / "detections.json").read_text())
        assert [c["name"] for c in info["categories"]] == order and [c["id"] for c in info["categories"]] == [1, 2, 3, 4]
        assert [order[r["category_id"] - 1] for r in results] == printed and len(set(printed)) > 1


def test_caption_with_phrases(tiny_glip_checkpoint, images, tmp_path):
    good, _ = images
    for phrases in ("a cat; a couch", "a cat, a couch"):
        code = run([str(good), "--caption", "a cat lying on a couch", "--phrases", phrases, "--threshold", "0"], tiny_glip_checkpoint, tmp_path)
        assert code == 0
        info = json.loads((tmp_path / "detections_info.json").read_text())
        assert info["categories"] == [{"id": 1, "name": "a cat"}, {"id": 2, "name": "a couch"}]


def test_threshold_is_the_reported_score_cut(tiny_glip_checkpoint, images, tmp_path):
    good, _ = images
    run([str(good), "--labels", "cat, dog", "--threshold", "0"], tiny_glip_checkpoint, tmp_path / "all")
    scores = sorted(r["score"] for r in json.loads((tmp_path / "all" / "detections.json").read_text()))
    cut = scores[len(scores) // 2]
    run([str(good), "--labels", "cat, dog", "--threshold", str(cut)], tiny_glip_checkpoint, tmp_path / "cut")
    kept = sorted(r["score"] for r in json.loads((tmp_path / "cut" / "detections.json").read_text()))
    assert kept == [score for score in scores if score >= cut] and 0 < len(kept) < len(scores)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--labels", " , "], "--labels is empty"),
        (["--labels", "cat, dog, Cat"], "--labels: .*duplicate"),
        (["--labels", "cat, " + " ".join(["dog"] * 300)], "--labels: .*254"),
        (["--caption", "a cat on a couch", "--phrases", "a cat; a dog"], "--caption / --phrases: .*a dog"),
        (["--caption", "a cat on a couch", "--phrases", " ; "], "--phrases is empty"),
        (["--labels", "cat", "--phrases", "a cat"], "--phrases needs a caption"),
        (["--labels", "cat", "--threshold", "1.5"], r"argument --threshold: must be in \[0, 1\], got 1.5"),
        (["--labels", "cat", "--threshold", "high"], "argument --threshold: expected a number"),
        (["--labels", "cat", "--candidate_threshold", "1"], r"argument --candidate_threshold: must be in \[0, 1\)"),
        (["--labels", "cat", "--candidate-threshold", "1"], r"argument --candidate_threshold: must be in \[0, 1\)"),  # dashed spelling
        (["--labels", "cat", "--top_k", "0"], "argument --top_k: must be >= 1"),
        (["--labels", "cat", "--min_size", "0"], "argument --min_size: must be >= 1"),
        (["--labels", "cat", "--min_size", "200"], r"--min_size 200: max_size must be .* the processor's min_size 64, max_size 96"),  # checkpoint's 96
    ],
)
def test_argument_errors_are_one_line_with_exit_status_2(images, arguments, message, tiny_glip_checkpoint, tmp_path, capsys):
    good, _ = images
    with pytest.raises(SystemExit) as exit_info:
        run([str(good), *arguments], tiny_glip_checkpoint, tmp_path / "out")
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("glip-detect: error:")]
    assert len(error_lines) == 1 and re.search(message, error_lines[0]), error_lines
    assert not (tmp_path / "out" / "detections.json").exists()  # nothing was run


@pytest.mark.parametrize(
    "model, message",
    [
        ("/no/such/checkpoint", r"--model /no/such/checkpoint: no such folder \(/no/such/checkpoint does not exist\)$"),
        # a relative path is also a valid repo id: it must not end in a Hub error about the repo id or the network
        ("runs/no-such-run", r"--model runs/no-such-run: no such folder \(/.*/runs/no-such-run does not exist\), and the Hub repo 'runs/no-such-run' is not in the local cache \(HF_HUB_OFFLINE=1\)$"),
    ],
)
def test_a_missing_model_path_is_named(images, model, message, capsys, monkeypatch):
    good, _ = images
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as exit_info:
        main([str(good), "--labels", "cat", "--model", model])
    assert exit_info.value.code == 2
    (error_line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("glip-detect: error:")]
    assert re.search(message, error_line), error_line


def test_a_folder_that_is_not_a_checkpoint_says_how_to_convert(images, tmp_path):
    good, _ = images
    with pytest.raises(SystemExit, match="Convert the official GLIP weights"):
        main([str(good), "--labels", "cat", "--model", str(tmp_path)])


def test_dashed_and_underscored_flags_are_the_same_flags(tiny_glip_checkpoint, images, tmp_path, capsys):
    good, _ = images
    for spelling in (["--top-k", "2", "--output-dir"], ["--top_k", "2", "--output_dir"], ["--top-k=2", "--output-dir"]):
        output = tmp_path / "-".join(spelling)
        assert main([str(good), "--labels", "cat", "--threshold", "0", "--model", str(tiny_glip_checkpoint), *spelling, str(output)]) == 0
        assert len(json.loads((output / "detections.json").read_text())) == 2


def test_resolution_flags_override_the_checkpoint_processor(tiny_glip_checkpoint, images, tmp_path, capsys, monkeypatch):
    good, _ = images
    seen = []
    real_detector = cli.prompt_detector
    monkeypatch.setattr(cli, "prompt_detector", lambda model, processor, *rest: seen.append(processor.image_processor.min_size) or real_detector(model, processor, *rest))
    run([str(good), "--labels", "cat", "--min_size", "32"], tiny_glip_checkpoint, tmp_path)
    printed = capsys.readouterr().out
    assert seen == [32] and "processor: min_size 32, max_size 96" in printed and "given: --min_size 32" in printed


def test_the_default_model_is_the_bundled_checkpoint_of_a_checkout_or_of_the_installed_package(monkeypatch, tmp_path):
    checkout, installed = tmp_path / "checkout", tmp_path / "installed"
    monkeypatch.setattr(cli, "DEMO_CHECKPOINTS", (checkout, installed))
    installed.mkdir()
    (installed / "config.json").write_text("{}")
    assert cli.default_model() == installed  # pip install . (package data)
    checkout.mkdir()
    (checkout / "config.json").write_text("{}")
    assert cli.default_model() == checkout  # a source checkout / editable install


def test_bad_images_are_skipped_and_same_named_inputs_do_not_overwrite(tiny_glip_checkpoint, tmp_path, capsys):
    first, second = write_image(tmp_path / "a" / "x.png", seed=1), write_image(tmp_path / "b" / "x.png", seed=2)
    elongated = write_image(tmp_path / "c" / "strip.png", height=2, width=2000)
    output = tmp_path / "out"
    code = run([str(first), str(elongated), str(second), "--labels", "cat", "--threshold", "0"], tiny_glip_checkpoint, output)
    assert code == 1
    assert "skipped" in capsys.readouterr().err
    info = json.loads((output / "detections_info.json").read_text())
    assert [image["annotated_image"] for image in info["images"]] == ["0_x_detections.png", "2_x_detections.png"]
    assert info["failed_images"][0]["file_name"] == str(elongated) and "too elongated" in info["failed_images"][0]["error"]
    assert not np.array_equal(np.asarray(Image.open(output / "0_x_detections.png")), np.asarray(Image.open(output / "2_x_detections.png")))
    assert {r["image_id"] for r in json.loads((output / "detections.json").read_text())} == {0, 2}


def test_annotated_names_are_unique_per_input_path():
    assert annotated_names(["a/x.png", "b/y.jpg"]) == ["x_detections.png", "y_detections.png"]
    names = annotated_names(["a/x.png", "b/x.png", "x_1.png", "c/x.jpg"])
    assert len(set(names)) == 4 and names[0] == "0_x_detections.png"


def test_interrupt_still_writes_the_finished_images(tiny_glip_checkpoint, tmp_path, monkeypatch, capsys):
    paths = [write_image(tmp_path / f"img{index}.png", seed=index) for index in range(3)]
    real_keep_top, calls = cli.keep_top, []

    def interrupt_at_the_second_image(*args, **kwargs):  # called once per detected image
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_keep_top(*args, **kwargs)

    monkeypatch.setattr(cli, "keep_top", interrupt_at_the_second_image)
    output = tmp_path / "out"
    assert run([*map(str, paths), "--labels", "cat", "--threshold", "0"], tiny_glip_checkpoint, output) == 130
    assert "interrupted after 1 of 3" in capsys.readouterr().err
    info = json.loads((output / "detections_info.json").read_text())
    assert [image["file_name"] for image in info["images"]] == [str(paths[0])]
    assert {r["image_id"] for r in json.loads((output / "detections.json").read_text())} == {0}
    # no temp files; the journal stays for the rerun
    assert sorted(p.name for p in output.iterdir()) == ["detections.json", "detections.partial.jsonl", "detections_info.json", "img0_detections.png"]


def test_a_killed_run_resumes_after_its_finished_images(tiny_glip_checkpoint, tmp_path, monkeypatch, capsys):
    """kill -9 after two images (simulated: the journal and PNGs are what such a run leaves, detections*.json are
    not written): the same command detects only the third image and reports all three; other settings start over."""
    paths = [str(write_image(tmp_path / f"img{index}.png", seed=index)) for index in range(3)]
    arguments = [*paths, "--labels", "cat, remote control", "--threshold", "0"]
    complete = tmp_path / "complete"
    assert run(arguments, tiny_glip_checkpoint, complete) == 0
    assert not (complete / "detections.partial.jsonl").exists()  # removed once the run completed
    expected = json.loads((complete / "detections.json").read_text())

    real_append, appended = cli.ResultJournal.append, []

    def killed_after_two(self, *args):
        real_append(self, *args)
        appended.append(1)
        if len(appended) == 2:
            raise SystemExit("killed")  # not KeyboardInterrupt: nothing of glip-detect's own handling runs

    killed = tmp_path / "killed"
    monkeypatch.setattr(cli.ResultJournal, "append", killed_after_two)
    with pytest.raises(SystemExit, match="killed"):
        run(arguments, tiny_glip_checkpoint, killed)
    monkeypatch.undo()
    for name in ("detections.json", "detections_info.json"):
        (killed / name).unlink()  # what kill -9 leaves: no reports
    with open(killed / "detections.partial.jsonl", "a") as journal:
        journal.write('{"index": 1}\n')  # not a line `append` writes: not trusted
        journal.write('{"index": 2, "ima')  # torn by the kill mid-write
    capsys.readouterr()

    detected = []
    real_detect_files = cli.detect_files
    monkeypatch.setattr(cli, "detect_files", lambda detector, files, *rest: detected.extend(files) or real_detect_files(detector, files, *rest))
    assert run(arguments, tiny_glip_checkpoint, killed) == 0
    assert "resuming: 2 of 3 image(s) already done" in capsys.readouterr().err
    assert detected == [paths[2]]
    assert json.loads((killed / "detections.json").read_text()) == expected
    assert [image["file_name"] for image in json.loads((killed / "detections_info.json").read_text())["images"]] == paths
    assert not (killed / "detections.partial.jsonl").exists()

    # a journal of other settings is not mixed in
    (killed / "detections.partial.jsonl").write_text(json.dumps({"settings": {"threshold": 0.9}}) + "\n")
    detected.clear()
    assert run(arguments, tiny_glip_checkpoint, killed) == 0
    assert "other settings or inputs: starting over" in capsys.readouterr().err and detected == paths


@pytest.mark.parametrize("size, scale, min_tag_height, max_tag_height", [((40, 40), 12, 12, 30), ((160, 160), 3, 12, 30), ((1200, 3000), 1, 25, 60)])
def test_annotation_is_legible_at_any_size(size, scale, min_tag_height, max_tag_height):
    """One colour per category, a filled tag behind the text, the font scaled to the image, the tag of a box at the
    right edge moved left to stay inside the frame, and a small image drawn enlarged to a 480 px short side."""
    import torch

    height, width = size
    image = Image.new("RGB", (width, height), "white")
    right_edge = width - 20 / scale
    boxes = torch.tensor([[right_edge, 0.0, width - 1.0, height * 0.3], [0.0, height * 0.6, width * 0.3, height - 1.0]])
    detections = {"labels": torch.tensor([0, 1]), "text_labels": ["remote control", "cat"], "scores": torch.tensor([0.9, 0.8]), "boxes": boxes}
    drawn = np.asarray(annotate(image, detections))
    assert drawn.shape == (height * scale, width * scale, 3) and np.asarray(image).min() == 255  # drawn on a copy

    def colour_mask(label):
        return (drawn == [int(cli.PALETTE[label][k : k + 2], 16) for k in (1, 3, 5)]).all(-1)

    assert colour_mask(0).any() and colour_mask(1).any()  # a distinct colour per category
    # the second box's outline is where its scaled coordinates say
    columns = np.nonzero(colour_mask(1).any(0))[0]
    assert columns.min() == 0 and abs(columns.max() - width * 0.3 * scale) <= 2
    box_left = round(right_edge * scale) - 2  # (less the rounding of the scaled outline)
    tag = colour_mask(0)[:, :box_left]  # left of the box: only the tag, shifted to fit in the frame
    tag_rows, tag_columns = np.nonzero(tag.any(1))[0], np.nonzero(tag.any(0))[0]
    assert min_tag_height <= len(tag_rows) <= max_tag_height
    assert tag_columns.min() < box_left - 5 and tag_rows.min() == 0  # kept inside: moved left, not above the frame


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-c", "from importlib.metadata import entry_points; print([e.value for e in entry_points(group='console_scripts') if e.name == 'glip-detect'])"], capture_output=True, text=True)
    assert "modeling_glip.cli:main" in result.stdout


FREED_MEMORY_PROBE = """
import os, sys, torch
from modeling_glip.command_line import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
before = resident_mib()
block = torch.ones(50 * 2**20)  # 200 MB, written
del block
print(applied, round(resident_mib() - before))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc's malloc")
@pytest.mark.parametrize("mode", ["keep", "system"])
def test_keep_freed_memory_keeps_a_freed_large_block(mode):
    """glip-detect's allocator setting: a freed 200 MB block stays in the process for reuse instead of being unmapped."""
    completed = subprocess.run([sys.executable, "-c", FREED_MEMORY_PROBE, mode], capture_output=True, text=True, check=True)
    applied, kept_mib = completed.stdout.split()
    if mode == "keep":
        assert applied == "True" and int(kept_mib) > 150
    else:
        assert int(kept_mib) < 50


def test_keep_freed_memory_leaves_a_tunables_choice_alone():
    code = "from modeling_glip.command_line import keep_freed_memory; print(keep_freed_memory())"
    environment = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.mmap_max=65536"}
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=environment)
    assert completed.stdout.strip() == "False"
