"""Self-training data: noun phrases of captions (`processing.noun_phrases`) and the teacher pseudo-labelling script
(`examples/pseudo_label_glip.py`): formats, skipped images counted by reason, 2 processes = 1, kill + rerun =
uninterrupted, settings checked on a rerun, and the output trains in `pretrain_glip.py`."""

import io
import json
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from processing.noun_phrases import NounPhraseExtractor, group_spans, rule_noun_phrase_spans
from processing.training_data import load_training_records
from tests.training_fixtures import ENV, REPO, draw_squares, load_script

SCRIPT = REPO / "examples" / "pseudo_label_glip.py"
pseudo_label = load_script("pseudo_label_glip")

# (caption, (width, height), or None for a corrupt file); shard size 3 -> units of records 0-2, 3-5, 6-8
SAMPLES = [
    ("a red square and a blue square", (64, 64)),
    ("a green square", (80, 48)),  # another canvas than the 64 x 64 images
    ("", (64, 64)),  # empty caption
    ("of and the", (64, 64)),  # no noun phrase
    ("a red square", None),  # unreadable image
    ("A red square, a red square; and (a blue square).", (64, 64)),  # repeated and punctuated phrases
    ("a blue square next to a green square", (72, 64)),
    ("a red square", (64, 64)),
    ("a red square", (1, 300)),  # too elongated to resize
]
SKIPPED = {"skipped_empty_caption": 1, "skipped_no_noun_phrase": 1, "skipped_unreadable_image": 1, "skipped_unusable_image_size": 1}


# -- noun phrases -----------------------------------------------------------------------------------------------------
def texts(result):
    return [(entity.text, entity.spans) for entity in result.entities]


def test_rules_on_nested_repeated_and_punctuated_captions():
    extract = NounPhraseExtractor("rules")
    assert extract.method == "rules"
    caption = "A dog, a DOG; and (a  dog)."
    assert texts(extract(caption)) == [("A dog", ((0, 5), (7, 12), (19, 25)))]  # one entity, every mention
    assert texts(extract("a small red star left of a blue ring")) == [("a small red star", ((0, 16),)), ("a blue ring", ((25, 36),))]
    assert texts(extract("A man, wearing a red hat, rides a horse.")) == [("A man", ((0, 5),)), ("a red hat", ((15, 24),)), ("a horse", ((32, 39),))]
    assert texts(extract("a man riding a horse in front of the old building")) == [
        ("a man", ((0, 5),)), ("a horse", ((13, 20),)), ("the old building", ((33, 49),)),
    ]
    assert texts(extract("the two dogs' t-shirts")) == [("the two dogs' t-shirts", ((0, 22),))]
    assert extract("of and the").entities == [] and extract("").entities == [] and extract("!!").entities == []


def test_given_phrases_nested_missing_and_case():
    extract = NounPhraseExtractor("rules")
    result = extract("A red car next to a car.", phrases=["a red car", "car", "  car ", "a truck", ""])
    # "car" nests in "a red car": both entities, every whole-word occurrence; duplicates merged; absent ones reported
    assert texts(result) == [("A red car", ((0, 9),)), ("car", ((6, 9), (20, 23)))]
    assert result.missing == ["a truck", ""]
    assert texts(extract("scar on a car", phrases=["car"])) == [("car", ((10, 13),))]  # whole words only
    with pytest.raises(TypeError, match="phrases must be a list of strings"):
        extract("a car", phrases="a car")
    with pytest.raises(TypeError, match="caption must be a string, got NoneType"):
        extract(None)


def test_group_spans_and_rules_spans_agree_with_the_caption():
    caption = "two green squares and a large purple cross"
    spans = rule_noun_phrase_spans(caption)
    assert [caption[start:end] for start, end in spans] == ["two green squares", "a large purple cross"]
    assert group_spans(caption, spans + spans)[0].spans == ((0, 17),)


def test_method_errors_name_the_argument():
    with pytest.raises(ValueError, match="method must be one of .* got method='nltk'"):
        NounPhraseExtractor("nltk")
    if NounPhraseExtractor("auto").method == "rules":  # no spaCy pipeline installed: asking for it is an error
        with pytest.raises(ValueError, match="spacy"):
            NounPhraseExtractor("spacy", spacy_model="no_such_pipeline_xyz")


def test_spacy_noun_chunks_when_installed():
    pytest.importorskip("spacy")
    try:
        extract = NounPhraseExtractor("spacy")
    except ValueError as error:
        pytest.skip(f"no English spaCy pipeline: {error}")
    result = extract("A man riding a horse sees it near the old barn.")
    assert [entity.text for entity in result.entities] == ["A man", "a horse", "the old barn"]  # no pronoun chunk


# -- the script -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The SAMPLES as an imagefolder, two webdataset tar shards and two parquet files."""
    import datasets

    root = tmp_path_factory.mktemp("captions")
    folder = root / "imagefolder"
    folder.mkdir()
    encoded = []
    for index, (caption, size) in enumerate(SAMPLES):
        path = folder / f"{index:03d}.png"
        if size is None:
            path.write_bytes(b"not an image")
        else:
            draw_squares(path, [("red", 4, 4, 20), ("blue", 30, 30, 16)], size=max(size))
            if size[0] != size[1]:  # crop to a non-square size
                Image.open(path).crop((0, 0, size[0], size[1])).save(path)
        encoded.append(path.read_bytes())
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i:03d}.png", "caption": c}) + "\n" for i, (c, _) in enumerate(SAMPLES)))
    (root / "wds").mkdir()
    for shard, indices in enumerate((range(0, 5), range(5, 9))):
        with tarfile.open(root / "wds" / f"shard-{shard}.tar", "w") as tar:
            for index in indices:
                for suffix, data in (("png", encoded[index]), ("txt", SAMPLES[index][0].encode())):
                    member = tarfile.TarInfo(f"{index:03d}.{suffix}")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    for part, indices in enumerate((range(0, 4), range(4, 9))):
        rows = {"image": [{"bytes": encoded[i], "path": f"{i:03d}.png"} for i in indices], "caption": [SAMPLES[i][0] for i in indices]}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(root / f"part-{part}.parquet"))
    phrases = {  # given phrases: one not in its caption, one record whose phrases are not a list of strings
        "image": [{"bytes": encoded[0], "path": None}] * 3,
        "caption": ["a red square and a blue square", "a red square", "A red square"],
        "phrases": [["blue square", "a green circle"], None, ["SQUARE"]],
    }
    features = datasets.Features({**features, "phrases": datasets.List(datasets.Value("string"))})
    datasets.Dataset.from_dict(phrases, features=features).to_parquet(str(root / "phrases.parquet"))
    return root


def base_args(teacher, output, *extra):
    return ["--cpu", "--teacher", str(teacher), "--output_dir", str(output), "--shard_size", "3", "--batch_size", "2",
            "--score_threshold", "0", "--max_boxes_per_phrase", "2", "--noun_phrases", "rules", *extra]


def output_bytes(output: Path) -> dict:
    """Every file of a finished output (progress files are removed by the merge)."""
    return {str(path.relative_to(output)): path.read_bytes() for path in sorted(output.rglob("*")) if path.is_file()}


def records(output: Path) -> list:
    return [json.loads(line) for path in sorted((output / "shards").glob("*.jsonl")) for line in path.read_text().splitlines()]


def launch(argv, processes=1, expect_rc=0):
    launcher = [sys.executable]
    if processes > 1:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        launcher += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                     "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    result = subprocess.run([*launcher, str(SCRIPT), *argv], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == expect_rc, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def reference(inputs, tiny_glip_checkpoint):
    """One uninterrupted single-process run on the webdataset shards (images stored in the output)."""
    output = inputs / "reference"
    manifest = pseudo_label.main(base_args(tiny_glip_checkpoint, output, "--data_files", str(inputs / "wds" / "*.tar"), "--num_workers", "0"))
    return output, manifest


def test_records_counts_and_manifest(reference):
    output, manifest = reference
    totals = manifest["totals"]
    assert {key: value for key, value in totals.items() if key.startswith("skipped_")} == SKIPPED  # counted, not fatal
    assert totals["images"] == 9 and totals["records"] == 5 and manifest["complete"] and manifest["image_root"] == "."
    rows = records(output)
    assert [row["caption"] for row in rows] == [c for c, size in SAMPLES if size and size[0] > 1 and c and c != "of and the"]
    repeated = next(row for row in rows if row["caption"].startswith("A red square,"))
    # the repeated phrase is one entity: each of its boxes is grounded to both mentions
    assert {tuple(map(tuple, a["tokens_positive"])) for a in repeated["annotations"]} == {((0, 12), (14, 26)), ((33, 46),)}
    for row in rows:
        assert (output / row["file_name"]).is_file() and row["file_name"].startswith("images/part-")
        assert 1 <= len(row["annotations"]) <= 2 * len({a["phrase"] for a in row["annotations"]})  # --max_boxes_per_phrase 2
        for annotation in row["annotations"]:
            x, y, w, h = annotation["bbox"]
            assert w > 0 and h > 0 and x + w <= row["width"] + 1 and y + h <= row["height"] + 1
            assert all(row["caption"][s:e].lower() == annotation["phrase"].lower() for s, e in annotation["tokens_positive"])
    assert sorted(manifest["train_files"]) == sorted(f"shards/{path.name}" for path in (output / "shards").glob("*.jsonl"))
    assert totals["boxes"] == sum(len(row["annotations"]) for row in rows)
    assert not (output / "progress").exists() and not list(output.rglob("*.partial"))
    dataset, _ = load_training_records(sorted((output / "shards").glob("*.jsonl")))  # the training loader's schema
    assert len(dataset) == 5 and all(record["invalid"] is None for record in dataset)


def test_formats_give_the_same_records(inputs, tiny_glip_checkpoint, tmp_path):
    """Imagefolder (images referenced in place), webdataset tar and parquet (images stored in the output) cut the
    input into other units; with one image per forward the teacher sees the same inputs, so the records agree."""
    sources = {
        "imagefolder": ["--data_dir", str(inputs / "imagefolder"), "--num_workers", "2", "--image_root", str(inputs)],
        "webdataset": ["--data_files", str(inputs / "wds" / "*.tar"), "--num_workers", "0"],
        "parquet": ["--data_files", str(inputs / "part-*.parquet"), "--num_workers", "0"],
    }
    runs = {name: pseudo_label.main(base_args(tiny_glip_checkpoint, tmp_path / name, *argv, "--batch_size", "1")) for name, argv in sources.items()}
    assert runs["imagefolder"]["image_root"] == str(inputs.resolve())  # referenced in place, relative to --image_root
    assert all(row["file_name"].startswith("imagefolder/") for row in records(tmp_path / "imagefolder"))
    assert runs["webdataset"]["image_root"] == runs["parquet"]["image_root"] == "."  # stored in the output
    contents = {}
    for name, manifest in runs.items():
        rows = records(tmp_path / name)
        root = Path(manifest["image_root"]) if manifest["image_root"] != "." else tmp_path / name
        assert all((root / row["file_name"]).is_file() for row in rows)
        assert {k: v for k, v in manifest["totals"].items() if k.startswith("skipped_")} == SKIPPED
        contents[name] = [{**row, "file_name": None, "source": None} for row in rows]
    assert contents["imagefolder"] == contents["webdataset"] == contents["parquet"] and len(contents["parquet"]) == 5


def test_phrases_from_a_column(inputs, tiny_glip_checkpoint, tmp_path):
    manifest = pseudo_label.main(base_args(
        tiny_glip_checkpoint, tmp_path, "--data_files", str(inputs / "phrases.parquet"), "--phrases_column", "phrases", "--num_workers", "0"
    ))
    totals = manifest["totals"]
    assert totals["skipped_invalid_phrases"] == 1 and totals["phrases_not_in_caption"] == 1 and totals["records"] == 2
    rows = records(tmp_path)
    assert [sorted({a["phrase"] for a in row["annotations"]} | set(row["phrases_without_box"])) for row in rows] == [["blue square"], ["square"]]
    assert rows[1]["annotations"][0]["tokens_positive"] == [[6, 12]]  # found case-insensitively, as written in the caption
    assert all(Path(row["file_name"]).suffix == ".png" for row in rows)  # stored under the format read from the bytes


def test_two_processes_equal_one(inputs, reference, tiny_glip_checkpoint, tmp_path):
    output = tmp_path / "ddp"
    result = launch(base_args(tiny_glip_checkpoint, output, "--data_files", str(inputs / "wds" / "*.tar"), "--num_workers", "1"), processes=2)
    assert "images read: 9" in result.stdout
    assert {json.dumps(row, sort_keys=True) for row in records(output)} == {json.dumps(row, sort_keys=True) for row in records(reference[0])}
    assert output_bytes(output) == output_bytes(reference[0])  # units do not depend on the number of processes


def test_kill_and_rerun_equals_uninterrupted(inputs, reference, tiny_glip_checkpoint, tmp_path):
    output = tmp_path / "killed"
    argv = base_args(tiny_glip_checkpoint, output, "--data_files", str(inputs / "wds" / "*.tar"), "--num_workers", "0")
    launch([*argv, "--kill_during_commit", "3"], expect_rc=-9)
    # two units are finished; the third was killed after its images, before its records and manifest entry
    assert sorted(path.name for path in (output / "manifest.d").glob("*.json")) == ["part-00000-00000.json", "part-00000-00001.json"]
    assert (output / "images" / "part-00001-00000").is_dir() and not (output / "manifest.json").exists()
    (output / "shards" / "part-00001-00000.jsonl.partial").write_text("half a shard")  # as a kill inside the write leaves
    result = launch(argv, processes=2)  # rerun with another number of processes
    assert "2 units already finished" in result.stderr
    assert output_bytes(output) == output_bytes(reference[0])


def test_output_trains_in_pretrain(reference, tiny_glip_checkpoint, tmp_path):
    output, manifest = reference
    argv = [sys.executable, str(REPO / "examples" / "pretrain_glip.py"), "--cpu", "--model_name_or_path", str(tiny_glip_checkpoint),
            "--train_files", *[str(output / name) for name in manifest["train_files"]], "--image_root", str(output),
            "--max_steps", "2", "--per_device_batch_size", "2", "--num_workers", "0", "--min_sizes", "64", "--max_size", "96",
            "--warmup_steps", "1", "--logging_steps", "1", "--output_dir", str(tmp_path / "student")]
    result = subprocess.run(argv, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    losses = [row for row in rows if "loss" in row]
    assert len(losses) == 2 and all(row["loss"] > 0 for row in losses)
    assert not [key for row in rows for key in row if key.startswith("skipped_")]  # every record is usable training data


def test_rerun_with_other_settings_is_refused(inputs, reference, tiny_glip_checkpoint):
    output = reference[0]
    argv = base_args(tiny_glip_checkpoint, output, "--data_files", str(inputs / "wds" / "*.tar"), "--num_workers", "0")
    argv[argv.index("--score_threshold") + 1] = "0.3"
    with pytest.raises(ValueError, match="other settings \\(score_threshold: 0.0 -> 0.3\\)"):
        pseudo_label.main(argv)
    assert pseudo_label.main(["--output_dir", str(output), "--merge_only"])["totals"] == reference[1]["totals"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--score_threshold", "1.5"], "--score_threshold must be in \\[0, 1\\], got 1.5"),
        (["--shard_size", "0"], "--shard_size must be >= 1, got 0"),
        (["--dtype", "float16"], "--dtype float16 needs a GPU"),
        (["--format", "imagefolder"], "--format imagefolder takes --data_dir"),
        (["--min_boxes_per_image", "0"], "--min_boxes_per_image must be >= 1, got 0"),
        (["--image_root", "/no-such-root"], "--image_root '/no-such-root' must contain the images"),
    ],
)
def test_bad_arguments_are_one_line_errors(inputs, tiny_glip_checkpoint, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as error:
        pseudo_label.main(base_args(tiny_glip_checkpoint, tmp_path, "--data_files", str(inputs / "wds" / "*.tar"), *extra))
    assert error.value.code == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_bad_columns_and_files_name_the_problem(inputs, tiny_glip_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="--caption_column 'title': the input has no such column; its columns are \\['image', 'caption'\\]"):
        pseudo_label.main(base_args(tiny_glip_checkpoint, tmp_path, "--data_files", str(inputs / "part-*.parquet"), "--caption_column", "title"))
    with pytest.raises(ValueError, match="--data_files '.*nothing-\\*.tar' matches no file"):
        pseudo_label.main(base_args(tiny_glip_checkpoint, tmp_path, "--data_files", str(inputs / "nothing-*.tar")))
