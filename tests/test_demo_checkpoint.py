"""The bundled demo checkpoint (checkpoints/glip-demo): it loads through the Auto classes, both zero-shot pipelines
and remote code (its auto_map and code files, symlinks to the package sources), finds the objects of freshly generated
synthetic scenes with the right names, and `make demo`'s command runs."""

import importlib.util
import json
import os
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor, pipeline

import modeling_glip  # noqa: F401  (registers GLIP with the Auto classes)
from modeling_glip.cli import main as glip_detect
from processing import GLIPZeroShotObjectDetectionPipeline
from tests.test_hf_integration import run_isolated

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "glip-demo"
MAX_CHECKPOINT_BYTES = 20 * 10**6


def _load(name: str, path: Path):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


shapes = _load("synthetic_shapes", ROOT / "examples" / "synthetic_shapes.py")
demo = _load("build_glip_demo", ROOT / "examples" / "demo" / "build_glip_demo.py")


@pytest.fixture(scope="module")
def model():
    return AutoModelForZeroShotObjectDetection.from_pretrained(CHECKPOINT, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def one_pass():
    return pipeline("zero-shot-object-detection", model=str(CHECKPOINT), pipeline_class=GLIPZeroShotObjectDetectionPipeline)


def test_checkpoint_files_and_size():
    names = {path.name for path in CHECKPOINT.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "processor_config.json", "tokenizer_config.json"} <= names
    assert (CHECKPOINT / "model.safetensors").stat().st_size <= MAX_CHECKPOINT_BYTES
    tokenizer_config = json.loads((CHECKPOINT / "tokenizer_config.json").read_text())
    assert tokenizer_config.get("model_max_length", 512) >= 256
    if (CHECKPOINT / "tokenizer.json").is_file():  # no truncation / padding inherited from MiniLM's tokenizer.json
        tokenizer_json = json.loads((CHECKPOINT / "tokenizer.json").read_text())
        assert tokenizer_json["truncation"] is None and tokenizer_json["padding"] is None


def test_carries_auto_map_and_links_its_code_files_to_the_package_sources(tiny_glip_checkpoint):
    """The bundled checkpoint carries the same auto_map and the same code files as a checkpoint saved now
    (`make demo-checkpoint`), each file a relative symlink to its package source: no second copy that could drift."""
    for name in ("config.json", "processor_config.json"):
        bundled, fresh = (json.loads((folder / name).read_text()) for folder in (CHECKPOINT, tiny_glip_checkpoint))
        assert bundled["auto_map"] == fresh["auto_map"]
    processor_config = json.loads((CHECKPOINT / "processor_config.json").read_text())
    assert processor_config["image_processor"]["auto_map"] == {"AutoImageProcessor": "image_processing_glip.GLIPImageProcessor"}
    code = sorted(CHECKPOINT.glob("*.py"))
    assert [path.name for path in code] == sorted(path.name for path in tiny_glip_checkpoint.glob("*.py")), "run `make demo-checkpoint`"
    for path in code:
        assert path.is_symlink() and not Path(os.readlink(path)).is_absolute(), path
        source = path.resolve()
        assert source.name == path.name and source.parent.parent == ROOT and source.parent.name in demo.PACKAGES, source
    # the checkpoint folder is flat: a module name in both packages (e.g. two auto_map.py) would make one link ambiguous
    modules = [{path.name for path in (ROOT / package).glob("*.py")} - {"__init__.py"} for package in demo.PACKAGES]
    assert not set.intersection(*modules)


def test_remote_code_from_the_bundled_checkpoint_detects_as_the_package(model, tmp_path):
    """Loaded with trust_remote_code=True in a fresh interpreter where our packages cannot be imported, the checkpoint's
    own code (the linked files) gives the same detections as the package's model."""
    image = shapes.render_scene(shapes.sample_scene(np.random.default_rng(11)))[0]
    labels = ["red star", "blue ring", "green square"]
    np.save(tmp_path / "pixels.npy", np.asarray(image))
    result = run_isolated(REMOTE_DETECT_SCRIPT, str(CHECKPOINT), json.dumps(labels), str(tmp_path / "pixels.npy"))
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert remote["modules"][0].startswith("transformers_modules.") and remote["modules"][1].endswith(".processing_glip")
    processor = AutoProcessor.from_pretrained(CHECKPOINT)
    inputs = processor(images=[image], text=[labels])
    with torch.no_grad():
        outputs = model(**inputs)
    local = processor.post_process_grounded_object_detection(outputs, inputs, threshold=0.1, target_sizes=[image.size[::-1]])[0]
    assert len(local["scores"]) > 0 and remote["text_labels"] == local["text_labels"]
    torch.testing.assert_close(torch.tensor(remote["scores"]), local["scores"], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(remote["boxes"]), local["boxes"], atol=1e-3, rtol=0)


REMOTE_DETECT_SCRIPT = """
import json, sys
sys.modules["modeling_glip"] = None  # our packages must not be importable: everything comes from the checkpoint
sys.modules["processing"] = None
import numpy as np, torch
from PIL import Image
from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor
path, labels, pixels = sys.argv[1], json.loads(sys.argv[2]), np.load(sys.argv[3])
model = AutoModelForZeroShotObjectDetection.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
image = Image.fromarray(pixels)
inputs = processor(images=[image], text=[labels])
with torch.no_grad():
    outputs = model(**inputs)
found = processor.post_process_grounded_object_detection(outputs, inputs, threshold=0.1, target_sizes=[image.size[::-1]])[0]
print(json.dumps({"modules": [type(model).__module__, type(processor).__module__], "scores": found["scores"].tolist(),
                  "boxes": found["boxes"].tolist(), "text_labels": list(found["text_labels"])}))
"""


def test_loads_in_float32_through_auto_classes(model):
    assert type(model).__name__ == "GLIPModel"
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    # the shipped config asks for float32 even though the weights are stored in fp16
    assert AutoModelForZeroShotObjectDetection.from_pretrained(CHECKPOINT).dtype == torch.float32
    processor = AutoProcessor.from_pretrained(CHECKPOINT)
    assert processor.image_processor.min_size == 160
    # a long prompt (all 48 names) is neither truncated nor padded to a fixed length
    names = [category["name"] for category in shapes.categories()]
    inputs = processor(images=[Image.new("RGB", (160, 160))], text=names)
    assert inputs["input_ids"].shape[0] == 1 and 100 < inputs["input_ids"].shape[1] < 256


SEEN_LABELS = [shapes.category_name(*combination) for combination in shapes.SEEN_COMBINATIONS]


def test_one_pass_pipeline_finds_each_object_of_a_fresh_scene(one_pass):
    image, annotations = demo.fresh_scene(1)  # four shapes: purple cross, purple star, purple ring, yellow diamond
    assert len(annotations) == 4
    detections = one_pass(image, candidate_labels=SEEN_LABELS)
    for annotation in annotations:
        assert demo.named_first(detections, annotation), (annotation, detections)


def test_one_pass_pipeline_names_most_objects_of_fresh_scenes(one_pass):
    """Over 20 fresh scenes (51 objects) at least 90% get the right name first (the shipped checkpoint: 50 / 51; 95 / 99
    over 40 scenes; the previous one: 48 / 51)."""
    found = total = 0
    for index in range(20):
        image, annotations = demo.fresh_scene(index)
        detections = one_pass(image, candidate_labels=SEEN_LABELS)
        found += sum(demo.named_first(detections, annotation) for annotation in annotations)
        total += len(annotations)
    assert total == 51 and found / total >= 0.9, f"{found} / {total}"


def test_stock_pipeline_loads_and_runs():
    """transformers' stock pipeline runs one forward per label with that label alone as the prompt."""
    detector = pipeline("zero-shot-object-detection", model=str(CHECKPOINT))
    image, annotations = shapes.render_scene(demo.demo_scene_spec())
    labels = [annotation["name"] for annotation in annotations]
    detections = detector(image, candidate_labels=labels)
    assert detections and {d["label"] for d in detections} <= set(labels)
    for detection in detections:
        assert 0 <= detection["score"] <= 1 and set(detection["box"]) == {"xmin", "ymin", "xmax", "ymax"}
    scores = [d["score"] for d in detections]
    assert scores == sorted(scores, reverse=True)


def test_single_name_prompts_score_the_right_name_above_word_sharing_wrong_names():
    """One name per prompt (the stock pipeline), on 20 fresh scenes (51 objects): the right name scores >= 0.5 for at
    least 90% of the objects (shipped: 98%; the previous checkpoint: 84%) and outscores both wrong names that share a
    word with it (its colour with another shape, its shape with another colour) for at least 95% (shipped: 100%;
    previous: 96%), by a median margin of at least 0.12 (shipped: 0.16; previous: 0.10); at most 20% of those wrong
    names reach 0.5 (shipped: 12%). Medians: right 0.60, same colour 0.42, same shape 0.36."""
    measured = demo.demo_measurements(str(CHECKPOINT), 20)
    assert measured["objects"] == 51 and measured["single_name_right_at_least_0.5"] >= 0.9, measured
    assert measured["single_name_right_above_both_wrong"] >= 0.95 and measured["single_name_margin_median"] >= 0.12, measured
    assert measured["single_name_wrong_at_least_0.5"] <= 0.2, measured
    right = measured["single_name_right_median"]
    assert measured["single_name_same_color_median"] <= right - 0.12 and measured["single_name_same_shape_median"] <= right - 0.18, measured


def test_bundled_demo_scene_is_the_builders():
    image, _ = shapes.render_scene(demo.demo_scene_spec())
    assert np.array_equal(np.asarray(Image.open(ROOT / "examples" / "demo_scene.png").convert("RGB")), np.asarray(image))


@pytest.mark.parametrize("name", sorted(demo.APP_SCENE_SEEDS))
def test_bundled_app_scenes_are_the_builders(name):
    image, _ = demo.app_scene(name)
    assert np.array_equal(np.asarray(Image.open(ROOT / "examples" / "app" / name).convert("RGB")), np.asarray(image))


def test_app_examples_find_what_is_in_their_scene(tmp_path):
    """Each example of glip-app's page finds exactly the objects of its scene (by name; names absent from the scene
    are not reported)."""
    from modeling_glip import app

    scenes = {"demo_scene.png": shapes.render_scene(demo.demo_scene_spec())[1]}
    scenes.update({f"app/{name}": demo.app_scene(name)[1] for name in demo.APP_SCENE_SEEDS})
    assert {row[0] for row in app.EXAMPLES} == set(scenes) and app.DEMO_LABELS == demo.demo_labels()
    for image, *arguments in app.EXAMPLES:
        _, rows, _, _ = app.run_detection(ROOT / "examples" / image, *arguments, model_path=str(CHECKPOINT), output_root=tmp_path)
        assert sorted(row[0] for row in rows) == sorted(annotation["name"] for annotation in scenes[image]), (image, rows)


def _make_demo_arguments():
    """The glip-detect arguments of the Makefile's `demo` target."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE).group(1)
    command = next(line for line in recipe.splitlines() if "glip-detect" in line)
    words = shlex.split(command)
    return words[words.index(next(w for w in words if w.endswith("glip-detect"))) + 1 :]


def test_make_demo_command_runs(tmp_path, capsys):
    arguments = _make_demo_arguments()
    assert arguments[0] == "examples/demo_scene.png" and "--model" not in arguments  # the bundled checkpoint by default
    output = tmp_path / "demo"
    arguments[arguments.index("--output_dir") + 1] = str(output)
    arguments[0] = str(ROOT / arguments[0])
    assert glip_detect(arguments) == 0
    printed = capsys.readouterr().out
    _, annotations = shapes.render_scene(demo.demo_scene_spec())
    for annotation in annotations:
        assert annotation["name"] in printed
    for absent in demo.DEMO_ABSENT_LABELS:
        assert absent not in printed
    assert Image.open(output / "demo_scene_detections.png").size == (480, 480)  # the 160 px scene drawn enlarged
    info = json.loads((output / "detections_info.json").read_text())
    names = [category["name"] for category in info["categories"]]
    detected = {names[result["category_id"] - 1] for result in json.loads((output / "detections.json").read_text())}
    assert detected == {a["name"] for a in annotations}


def _card_commands():
    """The model card's Reproduce block as argv lists: `$PY` and `$COMMON` (a multi-line quoted value) expanded,
    continuation lines joined, comments dropped."""
    card = (CHECKPOINT / "README.md").read_text()
    block = card.split("## Reproduce", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    variables = {"PY": ".venv/bin/python", "COMMON": " ".join(re.search(r'COMMON="([^"]*)"', block).group(1).split())}
    block = re.sub(r'COMMON="[^"]*"', "", block).replace("\\\n", " ")
    lines = [line.strip() for line in block.splitlines() if line.strip().startswith("$PY ")]
    return [shlex.split(re.sub(r"\$(\w+)", lambda match: variables.get(match.group(1), match.group(0)), line)) for line in lines]


def test_the_cards_training_commands_are_valid_flags_of_the_scripts():
    """Every `pretrain_glip.py` command of the card's Reproduce block parses with the script's own parser (no
    abbreviation, the right types) and its `--config_overrides` pass the config's checks; the stages chain (each starts
    from a folder an earlier command writes), and the packaged model is the last stage's EMA."""
    from tests.training_fixtures import load_script

    script = load_script()
    parser = script.build_parser("card")
    commands = _card_commands()
    stages = [command[2:] for command in commands if command[1] == "examples/pretrain_glip.py"]
    assert len(stages) == 7, commands
    written = {"runs/glip-demo-init/glip_config.json", "runs/glip-demo-init/text_encoder"}
    for argv in stages:
        args = parser.parse_args(argv)
        start = args.model_name_or_path or args.config
        assert start in written or any(start.startswith(folder + "/") for folder in written), (start, written)
        if args.config_overrides:
            script.override_config(modeling_glip.GLIPConfig(), args.config_overrides)
        written.add(args.output_dir)
        written.update(command[command.index("--output") + 1] for command in commands if "export" in command and "--output" in command)
    assert [stage for stage in stages if "--config_overrides" in stage] and "focal_alpha=0.5" in stages[5]
    package = next(command for command in commands if "package" in command)
    assert package[package.index("--model") + 1] == parser.parse_args(stages[-1]).output_dir + "/model_ema"
