"""transformers integration: Auto classes, remote code, both zero-shot pipelines and an offline Hub round trip."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForZeroShotObjectDetection,
    AutoProcessor,
    pipeline,
)
from transformers.image_utils import SizeDict

import modeling_glip
from processing import GLIPZeroShotObjectDetectionPipeline

REPO_ROOT = Path(__file__).resolve().parents[1]


def random_image(height=60, width=90, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8"))


class ForwardCounter:
    def __init__(self, model):
        self.count = 0
        model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.count += 1


@pytest.fixture(scope="module")
def checkpoint(tiny_glip_checkpoint):
    return tiny_glip_checkpoint


def test_auto_classes_resolve_and_registration_is_idempotent(checkpoint):
    importlib.reload(modeling_glip)  # registering twice is fine (exist_ok)
    assert AutoConfig.from_pretrained(checkpoint).model_type == "glip"
    assert type(AutoModel.from_pretrained(checkpoint)).__name__ == "GLIPModel"
    assert type(AutoModelForZeroShotObjectDetection.from_pretrained(checkpoint)).__name__ == "GLIPModel"
    assert type(AutoImageProcessor.from_pretrained(checkpoint)).__name__ == "GLIPImageProcessor"
    processor = AutoProcessor.from_pretrained(checkpoint)
    assert type(processor).__name__ == "GLIPProcessor" and type(processor.tokenizer).__name__.startswith("BertTokenizer")


def test_checkpoint_carries_auto_map_and_code(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_glip.GLIPConfig",
        "AutoModel": "modeling_glip.GLIPModel",
        "AutoModelForZeroShotObjectDetection": "modeling_glip.GLIPModel",
    }
    processor_config = json.loads((checkpoint / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_glip.GLIPProcessor"
    assert processor_config["image_processor"]["auto_map"]["AutoImageProcessor"] == "image_processing_glip.GLIPImageProcessor"
    for name in ("modeling_glip.py", "configuration_glip.py", "vl_fusion.py", "dyconv.py", "processing_glip.py", "image_processing_glip.py"):
        assert (checkpoint / name).is_file(), name


REMOTE_SCRIPT = """
import sys
sys.modules["modeling_glip"] = None  # our packages must not be importable: everything comes from the checkpoint
sys.modules["processing"] = None
from PIL import Image
from transformers import AutoModel, AutoModelForZeroShotObjectDetection, AutoProcessor
path, trust = sys.argv[1], sys.argv[2] == "trust"
model = AutoModelForZeroShotObjectDetection.from_pretrained(path, trust_remote_code=trust)
processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust)
inputs = processor(images=[Image.new("RGB", (90, 60))], text=[["cat", "remote control"]])
outputs = model(**inputs)
print(type(model).__module__, type(processor).__module__, type(AutoModel.from_pretrained(path, trust_remote_code=trust)).__name__, tuple(outputs.logits.shape))
"""


def run_isolated(script, *args, env=None):
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environment.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})})
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=environment, cwd="/", stdin=subprocess.DEVNULL, timeout=300)


def test_remote_code_loads_without_our_packages(checkpoint):
    result = run_isolated(REMOTE_SCRIPT, str(checkpoint), "trust")
    assert result.returncode == 0, result.stderr[-3000:]
    model_module, processor_module, auto_model, logits_shape = result.stdout.strip().splitlines()[-1].split(" ", 3)
    assert model_module.startswith("transformers_modules.") and model_module.endswith(".modeling_glip")
    assert processor_module.startswith("transformers_modules.") and processor_module.endswith(".processing_glip")
    assert auto_model == "GLIPModel" and logits_shape.startswith("(1, ")


def test_remote_code_needs_trust(checkpoint):
    result = run_isolated(REMOTE_SCRIPT, str(checkpoint), "no-trust")
    assert result.returncode != 0 and "trust_remote_code" in result.stderr


def test_stock_pipeline_runs_one_forward_per_label(checkpoint):
    detector = pipeline("zero-shot-object-detection", model=str(checkpoint))
    counter = ForwardCounter(detector.model)
    results = detector(random_image(), candidate_labels=["cat", "remote control", "couch"], threshold=0.0, top_k=5)
    assert counter.count == 3
    assert 0 < len(results) <= 5 and [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    for result in results:
        assert set(result) == {"score", "label", "box"} and result["label"] in {"cat", "remote control", "couch"}
        box = result["box"]
        assert 0 <= box["xmin"] <= box["xmax"] <= 90 and 0 <= box["ymin"] <= box["ymax"] <= 60


@pytest.fixture(scope="module")
def one_pass(checkpoint):
    return pipeline("zero-shot-object-detection", model=str(checkpoint), pipeline_class=GLIPZeroShotObjectDetectionPipeline)


def test_one_pass_pipeline_runs_one_forward_per_image(one_pass):
    counter = ForwardCounter(one_pass.model)
    results = one_pass(random_image(), candidate_labels=["cat", "remote control", "couch"], threshold=0.0, top_k=7)
    assert counter.count == 1
    assert 0 < len(results) <= 7 and {r["label"] for r in results} <= {"cat", "remote control", "couch"}
    assert all(set(r) == {"score", "label", "box"} for r in results)
    assert one_pass(random_image(), candidate_labels="cat, couch", threshold=0.0)  # comma-separated string
    assert counter.count == 2


def test_one_pass_pipeline_chunks_a_long_vocabulary_into_one_batch(one_pass):
    names = [f"object number {index}" for index in range(300)]
    counter = ForwardCounter(one_pass.model)
    rows = []
    one_pass.model.register_forward_pre_hook(lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    results = one_pass(random_image(), candidate_labels=names, threshold=0.0, max_detections=5)
    assert counter.count == 1 and rows[0] > 1  # several prompt chunks, one forward
    assert results and {r["label"] for r in results} <= set(names)


def test_one_pass_batches_only_images_on_the_same_canvas(one_pass):
    images = [random_image(60, 90, seed=1), random_image(40, 40, seed=2), random_image(60, 90, seed=3)]
    labels = [["cat", "dog"], ["person"], ["dog", "couch", "cat"]]
    one_by_one = [one_pass(image, candidate_labels=names, threshold=0.0) for image, names in zip(images, labels)]
    counter = ForwardCounter(one_pass.model)
    batched = one_pass(images, candidate_labels=labels, threshold=0.0, batch_size=3)
    assert counter.count == 2  # two canvases: images 0 and 2 together, image 1 alone
    assert len(batched) == 3
    for alone, together in zip(one_by_one, batched):
        assert [r["label"] for r in alone] == [r["label"] for r in together]
        assert [r["box"] for r in alone] == [r["box"] for r in together]
        assert np.allclose([r["score"] for r in alone], [r["score"] for r in together], atol=1e-5)


def test_one_pass_groups_by_the_image_processors_own_canvas(checkpoint):
    """With a fixed `pad_size` canvas every image shares one canvas: one forward, same results as one by one."""
    fixed = pipeline("zero-shot-object-detection", model=str(checkpoint), pipeline_class=GLIPZeroShotObjectDetectionPipeline)
    fixed.image_processor.pad_size = SizeDict(height=128, width=128)
    fixed.glip_processor.image_processor = fixed.image_processor
    images = [random_image(60, 90, seed=1), random_image(40, 40, seed=2)]
    assert fixed.image_processor.canvas_size(60, 90) == fixed.image_processor.canvas_size(40, 40) == (128, 128)
    one_by_one = [fixed(image, candidate_labels=["cat", "dog"], threshold=0.0) for image in images]
    counter = ForwardCounter(fixed.model)
    batched = fixed(images, candidate_labels=["cat", "dog"], threshold=0.0, batch_size=2)
    assert counter.count == 1
    for alone, together in zip(one_by_one, batched):
        assert [r["label"] for r in alone] == [r["label"] for r in together]
        assert np.allclose([r["score"] for r in alone], [r["score"] for r in together], atol=1e-5)


def test_one_pass_pipeline_bad_input(one_pass):
    with pytest.raises(ValueError, match="candidate_labels is empty"):
        one_pass(random_image(), candidate_labels=[])
    with pytest.raises(ValueError, match="2 images but 1"):
        one_pass([random_image(), random_image()], candidate_labels=[["cat"]])
    with pytest.raises(ValueError, match="no such file: '/no/such/image.png'"):
        one_pass("/no/such/image.png", candidate_labels=["cat"])


def test_offline_hub_round_trip(checkpoint, tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "hub_roundtrip.py"), str(checkpoint)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    uploaded = set(report["uploaded"])
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"} <= uploaded
    assert {"modeling_glip.py", "configuration_glip.py", "processing_glip.py", "image_processing_glip.py"} <= uploaded
    assert report["auto_map"]["AutoModelForZeroShotObjectDetection"] == "modeling_glip.GLIPModel"
    assert report["model_class"] == "GLIPModel" and report["processor_class"] == "GLIPProcessor" and report["same_weights"]
    assert report["stock_labels"] and report["one_pass_labels"]
