"""torch.export of GLIPModel (modeling_glip/export_glip.py): the exported program equals eager on inputs of other
shapes than its example and post-processing finds the same detections on its outputs.

Export is slow (tens of seconds per program on 2 cores, minutes with a dynamic image size; README "Export"): the fast
suite exports one program (dynamic batch and prompt length); the static and dynamic-image-size programs are `slow`.
"""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_glip import GLIPModel
from modeling_glip.configuration_glip import timm_backbone_config
from modeling_glip.export_glip import EXPORT_OUTPUT_NAMES, GLIPForExport, export_dynamic_shapes, export_inputs, export_program, min_dynamic_canvas
from processing import GLIPProcessor

ATOL = 1e-5
NAMES = ["cat", "remote control"]
OTHER_NAMES = ["person", "traffic light", "dog", "coffee cup"]  # more tokens


@pytest.fixture(scope="module")
def glip(tiny_glip_checkpoint):
    return GLIPModel.from_pretrained(tiny_glip_checkpoint).eval(), GLIPProcessor.from_pretrained(tiny_glip_checkpoint)


def images(count, size=(96, 72), seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


def assert_matches_eager(program, model, processor, inputs):
    """The program's outputs equal eager within ATOL, and post-processing gives the same detections."""
    with torch.no_grad():
        exported = dict(zip(EXPORT_OUTPUT_NAMES, program.module()(**export_inputs(inputs))))
        eager = model(**inputs)
    for name in EXPORT_OUTPUT_NAMES:
        assert exported[name].shape == getattr(eager, name).shape, name
        assert (exported[name].double() - getattr(eager, name).double()).abs().max() <= ATOL, name
    found = processor.post_process_grounded_object_detection({**exported, "input_ids": inputs["input_ids"]}, inputs)
    expected = processor.post_process_grounded_object_detection(eager, inputs)
    assert sum(len(d["scores"]) for d in expected) > 0
    for actual, wanted in zip(found, expected):
        assert actual["text_labels"] == wanted["text_labels"]
        torch.testing.assert_close(actual["scores"], wanted["scores"], atol=ATOL, rtol=0)
        torch.testing.assert_close(actual["boxes"], wanted["boxes"], atol=1e-3, rtol=0)  # pixels


def test_dynamic_batch_and_prompt_length(glip):
    model, processor = glip
    example = processor(images=images(2), text=NAMES)
    program = export_program(model, example, dynamic=("batch", "prompt_length"))
    other = processor(images=images(3, seed=1), text=OTHER_NAMES)  # same canvas, 3 images, a longer prompt
    assert other["input_ids"].shape[1] > example["input_ids"].shape[1]
    assert_matches_eager(program, model, processor, other)
    with pytest.raises(Exception, match="pixel_values"):  # the canvas stayed static: the program refuses another one
        program.module()(**export_inputs(processor(images=images(2, size=(72, 96)), text=NAMES)))


@pytest.mark.slow
def test_static_export(glip):
    model, processor = glip
    example = processor(images=images(2), text=NAMES)
    program = export_program(model, example, dynamic=())
    assert_matches_eager(program, model, processor, processor(images=images(2, seed=2), text=NAMES))


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["swin", "timm"])
def test_dynamic_image_size(glip, backbone, tmp_path):
    """Export with height and width dynamic: Swin over 10 min on 2 cores (its window padding), a timm ResNet ~2.5 min."""
    model, processor = glip
    if backbone == "timm":
        config = copy.deepcopy(model.config)
        config.backbone_config = timm_backbone_config("test_resnet")
        torch.manual_seed(0)
        model = GLIPModel(config).eval()
    low = min_dynamic_canvas(model)
    example = processor(images=images(2), text=NAMES, pad_size={"height": low, "width": low + 32})
    program = export_program(model, example, dynamic=("batch", "prompt_length", "image_size"))
    other = processor(images=images(3, seed=3), text=OTHER_NAMES, pad_size={"height": low + 64, "width": low})
    assert_matches_eager(program, model, processor, other)


def test_min_dynamic_canvas_follows_the_swin_window(glip):
    model, _ = glip
    assert min_dynamic_canvas(model) == 256  # window 7: the stride-32 stage needs 8 cells
    config = copy.deepcopy(model.config)
    config.backbone_config = timm_backbone_config("test_resnet")
    assert min_dynamic_canvas(GLIPModel(config)) == 160  # P7 (stride 128) needs 2 cells


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"dynamic": "batch"}, TypeError, "collection of names"),
        ({"dynamic": ("height",)}, ValueError, "unknown dimensions \\['height'\\]"),
        ({"dynamic": ("image_size",), "size_divisibility": 0}, ValueError, "size_divisibility must be a positive integer, got 0"),
        ({"dynamic": ("image_size",)}, ValueError, "from 256 to 4096 pixels per side; got \\(96, 128\\)"),
        ({"dynamic": ("batch",), "batch": 1}, ValueError, "at least 2 rows and images"),
        ({"dynamic": ("prompt_length",), "tokens": 513}, ValueError, "2..512 tokens; got 513"),
    ],
)
def test_export_dynamic_shapes_refuses_bad_requests(glip, kwargs, error, message):
    model, _ = glip
    kwargs = dict(kwargs)
    batch, tokens = kwargs.pop("batch", 2), kwargs.pop("tokens", 5)
    inputs = {
        "pixel_values": torch.zeros(batch, 3, 96, 128),
        "input_ids": torch.ones(batch, tokens, dtype=torch.long),
        "attention_mask": torch.ones(batch, tokens, dtype=torch.long),
    }
    with pytest.raises(error, match=message):
        export_dynamic_shapes(model, inputs, **kwargs)


def test_export_inputs_names_what_is_missing():
    with pytest.raises(ValueError, match="lack \\['attention_mask'\\]"):
        export_inputs({"pixel_values": torch.zeros(1, 3, 8, 8), "input_ids": torch.ones(1, 2, dtype=torch.long)})


def test_wrapper_returns_the_post_processing_fields(glip):
    model, processor = glip
    inputs = processor(images=images(1), text=NAMES)
    with torch.no_grad():
        outputs = GLIPForExport(model)(**export_inputs(inputs))
        eager = model(**inputs)
    assert len(outputs) == len(EXPORT_OUTPUT_NAMES)
    for name, value in zip(EXPORT_OUTPUT_NAMES, outputs):
        assert torch.equal(value, getattr(eager, name)), name
