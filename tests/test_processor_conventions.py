"""GLIPProcessor / GLIPImageProcessor follow transformers 5 processor conventions: keyword forms, return_tensors,
save / load round trips, model_input_names, the image processor's do_* switches and Auto registration."""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import BertTokenizer
from transformers.tokenization_utils_base import TruncationStrategy
from transformers.utils import TensorType

from processing import GLIPImageProcessor, GLIPProcessor

REPO_ROOT = Path(__file__).resolve().parents[1]
MEAN = torch.tensor([103.530, 116.280, 123.675])[:, None, None]
STD = torch.tensor([57.375, 57.120, 58.395])[:, None, None]
NAMES = ["cat", "remote control", "coffee_cup"]  # "[CLS] cat . remote control . coffee cup [SEP]": 9 tokens


@pytest.fixture(scope="module")
def tokenizer(bert_vocab_dir):
    return BertTokenizer.from_pretrained(str(bert_vocab_dir))


@pytest.fixture(scope="module")
def processor(tokenizer):
    return GLIPProcessor(GLIPImageProcessor(min_size=64, max_size=96), tokenizer, max_text_len=64)


def random_image(height=60, width=90, seed=0):
    return PIL.Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8"))


def bgr(image: PIL.Image.Image) -> torch.Tensor:
    """(3, h, w) float BGR on the 0..255 scale: what GLIP normalises."""
    return torch.from_numpy(np.asarray(image)[..., ::-1].copy()).permute(2, 0, 1).float()


def assert_same(first, second):
    assert first.keys() == second.keys()
    for key in first:
        assert first[key] == second[key] if key == "text_labels" else torch.equal(first[key], second[key]), key


# -- processor keyword forms --------------------------------------------------------------------------------------------
def test_flat_padding_goes_to_the_tokenizer(processor):
    """The reported bug: `padding=` was forwarded to the image processor (TypeError)."""
    default = processor(images=random_image(), text=NAMES)
    padded = processor(images=random_image(), text=NAMES, padding="max_length")
    assert padded["input_ids"].shape == (1, 64) and padded["positive_map"].shape == (1, 3, 64)  # max_text_len
    assert torch.equal(padded["pixel_values"], default["pixel_values"])
    assert torch.equal(padded["input_ids"][:, :9], default["input_ids"]) and (padded["input_ids"][:, 9:] == 0).all()
    assert torch.equal(padded["positive_map"][..., :9], default["positive_map"]) and padded["positive_map"][..., 9:].sum() == 0
    assert padded["attention_mask"].sum() == default["attention_mask"].sum() == 9


def test_flat_nested_and_common_kwargs_are_equivalent(processor):
    image = random_image()
    flat = processor(images=image, text=NAMES, padding="max_length", max_length=16, min_size=32, return_tensors="np")
    nested = processor(
        images=image,
        text=NAMES,
        text_kwargs={"padding": "max_length", "max_length": 16},
        images_kwargs={"min_size": 32},
        common_kwargs={"return_tensors": "np"},
    )
    assert flat.keys() == nested.keys()
    for key in flat:
        assert flat[key] == nested[key] if key == "text_labels" else np.array_equal(flat[key], nested[key]), key
    assert flat["input_ids"].shape == (1, 16) and flat["pixel_values"].shape == (1, 3, 32, 64)
    with pytest.raises(ValueError, match="passed two times"):
        processor(images=image, text=NAMES, max_length=16, text_kwargs={"max_length": 16}, padding="max_length")


def test_saved_image_processor_settings_are_the_defaults(tokenizer, tmp_path):
    GLIPProcessor(GLIPImageProcessor(min_size=160, max_size=200), tokenizer).save_pretrained(tmp_path)
    loaded = GLIPProcessor.from_pretrained(tmp_path)
    image = random_image(100, 100)
    assert loaded(images=image, text=NAMES)["pixel_values"].shape == (1, 3, 160, 160)
    assert loaded(images=image, text=NAMES, min_size=96, max_size=96)["pixel_values"].shape == (1, 3, 96, 96)
    assert loaded(images=image, text=NAMES)["pixel_values"].shape == (1, 3, 160, 160)  # a call does not change them
    assert loaded.image_processor.min_size == 160


def test_pad_to_multiple_of_and_positive_maps(processor):
    inputs = processor(text=[NAMES, ["dog"]], pad_to_multiple_of=8)
    assert inputs["input_ids"].shape == (2, 16) and inputs["positive_map"].shape == (2, 3, 16)
    assert inputs["attention_mask"].sum(1).tolist() == [9, 3]
    assert [inputs["positive_map"][0, i].nonzero().squeeze(1).tolist() for i in range(3)] == [[1], [3, 4], [6, 7]]


@pytest.mark.parametrize("truncation", [True, "longest_first", "only_first", TruncationStrategy.ONLY_SECOND])
def test_truncation_is_refused(processor, truncation):
    with pytest.raises(ValueError, match="never truncates prompts .*split into several text rows"):
        processor(text=NAMES, truncation=truncation)
    with pytest.raises(ValueError, match="truncation must be one of"):
        processor(text=NAMES, truncation="shortest")


@pytest.mark.parametrize("truncation", [False, "do_not_truncate", TruncationStrategy.DO_NOT_TRUNCATE])
def test_no_truncation_is_accepted(processor, truncation):
    assert processor(text=NAMES, truncation=truncation)["input_ids"].shape == (1, 9)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"padding": "max_length", "max_length": 8}, "max_length=8 is shorter than the longest text row \\(9 tokens\\)"),
        ({"padding": "max_length", "max_length": 65}, "max_length=65 is more than max_text_len=64"),
        ({"padding": "max_length", "max_length": 0}, "max_length must be a positive integer"),
        ({"max_length": 16}, "is the padded length of padding='max_length' \\(GLIP never truncates\\)"),
        ({"pad_to_multiple_of": 80}, "pad_to_multiple_of=80 pads the rows to 80 tokens, more than max_text_len=64"),
        ({"pad_to_multiple_of": 0}, "pad_to_multiple_of must be a positive integer"),
        ({"padding": False}, "padding must be 'longest' or 'max_length'"),
        ({"padding": "do_not_pad"}, "padding must be 'longest' or 'max_length'"),
        ({"padding": "everything"}, "padding must be one of .*got padding='everything'"),
        ({"padding_side": "left"}, "padding_side='right'"),
        ({"add_special_tokens": False}, "add_special_tokens=True"),
        ({"return_attention_mask": False}, "return_attention_mask=True"),
        ({"return_offsets_mapping": True}, "return_offsets_mapping"),
        ({"text_kwargs": {"is_split_into_words": True}}, "is_split_into_words"),
        ({"phrases": "a cat"}, "phrases"),
        ({"names_per_chunk": 0}, "names_per_chunk must be >= 1"),
        ({"names_per_chunk": "2"}, "names_per_chunk"),
    ],
)
def test_bad_text_options(processor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        processor(text=NAMES, **kwargs)


def test_names_per_chunk_is_for_class_names(processor):
    with pytest.raises(ValueError, match="names_per_chunk applies to class-name prompts"):
        processor(text="a cat on a mat", phrases=["a cat"], names_per_chunk=2)
    assert processor(text=NAMES, names_per_chunk=2)["chunk_to_image"].tolist() == [0, 0]


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"foo": 1}, "'foo'"),
        ({"images_kwargs": {"foo": 1}}, "images_kwargs\\['foo'\\]"),
        ({"text_kwargs": {"min_size": 32}}, "text_kwargs\\['min_size'\\]"),  # an image option in the text options
        ({"common_kwargs": {"max_length": 16}}, "common_kwargs\\['max_length'\\]"),  # not valid for the images
        ({"videos_kwargs": {"fps": 1}}, "'videos_kwargs'"),
        ({"sampling_rate": 16000}, "'sampling_rate'"),
    ],
)
def test_unknown_keywords_are_a_type_error(processor, kwargs, named):
    with pytest.raises(TypeError, match=f"unexpected keyword arguments .*{named}"):
        processor(images=random_image(), text=NAMES, **kwargs)


# -- return_tensors -----------------------------------------------------------------------------------------------------
def test_return_tensors(processor):
    assert GLIPProcessor.text_kwargs["return_tensors"] == GLIPProcessor.images_kwargs["return_tensors"] == "pt"  # default
    image = random_image()
    torch_out = processor(images=image, text=NAMES)
    assert all(isinstance(torch_out[key], torch.Tensor) for key in torch_out if key != "text_labels")
    for return_tensors in ("np", TensorType.NUMPY):
        numpy_out = processor(images=image, text=NAMES, return_tensors=return_tensors)
        assert numpy_out["text_labels"] == [NAMES]  # strings are never converted
        for key in torch_out:
            if key != "text_labels":
                assert isinstance(numpy_out[key], np.ndarray) and np.array_equal(numpy_out[key], torch_out[key].numpy()), key
                assert numpy_out[key].dtype == torch_out[key].numpy().dtype, key
    python_out = processor(images=image, text=NAMES, return_tensors=None)
    for key in torch_out:
        expected = torch_out[key] if key == "text_labels" else torch_out[key].tolist()
        assert python_out[key] == expected and isinstance(python_out[key], list), key


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"return_tensors": "mlx"}, "'pt' \\(default\\), 'np' or None"),
        ({"return_tensors": "tf"}, "return_tensors must be one of .*got return_tensors='tf'"),
        ({"text_kwargs": {"return_tensors": "np"}}, "return_tensors differs between text_kwargs and images_kwargs"),
    ],
)
def test_unsupported_return_tensors(processor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        processor(images=random_image(), text=NAMES, **kwargs)


# -- save / load ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("registered", [False, True], ids=["plain", "register_for_auto_class"])
def test_to_dict_survives_two_round_trips(tokenizer, tmp_path, monkeypatch, registered):
    monkeypatch.setattr(GLIPProcessor, "_auto_class", "AutoProcessor" if registered else None)
    monkeypatch.setattr(GLIPImageProcessor, "_auto_class", "AutoImageProcessor" if registered else None)
    original = GLIPProcessor(GLIPImageProcessor(min_size=48, max_size=80, do_pad=False), tokenizer, max_text_len=100)
    before_save = original.to_dict()
    original.save_pretrained(tmp_path / "first")
    first = GLIPProcessor.from_pretrained(tmp_path / "first")
    first.save_pretrained(tmp_path / "second")
    second = GLIPProcessor.from_pretrained(tmp_path / "second")
    second.save_pretrained(tmp_path / "third")
    assert before_save == original.to_dict() == first.to_dict() == second.to_dict()
    files = [json.loads((tmp_path / name / "processor_config.json").read_text()) for name in ("first", "second", "third")]
    assert files[0] == files[1] == files[2]
    assert (second.max_text_len, second.image_processor.min_size, second.image_processor.do_pad) == (100, 48, False)
    if registered:
        assert files[0]["auto_map"] == {"AutoProcessor": "processing_glip.GLIPProcessor"}
        # the image processor's own entry only, not the processor's AutoProcessor entry
        assert files[0]["image_processor"]["auto_map"] == {"AutoImageProcessor": "image_processing_glip.GLIPImageProcessor"}
        assert (tmp_path / "third" / "processing_glip.py").is_file()
    else:
        assert "auto_map" not in files[0] and "auto_map" not in files[0]["image_processor"]


def test_image_processor_round_trip(tmp_path):
    original = GLIPImageProcessor(
        min_size=40, max_size=70, do_rescale=True, rescale_factor=0.5, image_mean=[50.0, 60.0, 70.0], pad_size={"height": 96, "width": 96}
    )
    original.save_pretrained(tmp_path / "first")
    first = GLIPImageProcessor.from_pretrained(tmp_path / "first")
    first.save_pretrained(tmp_path / "second")
    second = GLIPImageProcessor.from_pretrained(tmp_path / "second")
    assert original.to_dict() == first.to_dict() == second.to_dict()
    assert "size" not in second.to_dict() and second.pad_size.height == 96 and second.rescale_factor == 0.5
    image = random_image()
    assert torch.equal(original(image)["pixel_values"], second(image)["pixel_values"])


# -- model inputs ---------------------------------------------------------------------------------------------------------
def test_model_input_names_are_the_returned_model_inputs(processor):
    from modeling_glip import GLIPModel
    from modeling_glip.modeling_glip import PROCESSOR_ONLY_KEYS

    expected = ["pixel_values", "pixel_mask", "input_ids", "token_type_ids", "attention_mask", "chunk_to_image"]
    assert sorted(processor.model_input_names) == sorted(expected)
    returned = set(processor(images=[random_image(), random_image(seed=1)], text=NAMES).keys())
    assert returned == set(processor.model_input_names) | set(processor.prompt_metadata_names)
    assert not set(processor.model_input_names) & set(processor.prompt_metadata_names)
    assert set(processor.model_input_names) <= set(inspect.signature(GLIPModel.forward).parameters)
    assert set(processor.prompt_metadata_names) == PROCESSOR_ONLY_KEYS  # the keys GLIPModel.forward accepts and ignores


# -- GLIPImageProcessor do_* switches -------------------------------------------------------------------------------------
def test_defaults_are_the_original_transform():
    image_processor = GLIPImageProcessor()
    assert (image_processor.do_resize, image_processor.do_rescale, image_processor.do_normalize, image_processor.do_pad) == (True, False, True, True)
    image = random_image(100, 150)
    out = image_processor(image, min_size=64, max_size=1000)["pixel_values"][0]
    expected = (bgr(image.resize((96, 64), PIL.Image.BILINEAR)) - MEAN) / STD
    assert out.shape == (3, 64, 96) and torch.allclose(out, expected, atol=1e-5)


def test_do_resize():
    image = random_image(50, 70)
    out = GLIPImageProcessor(do_resize=False)(image)
    assert out["pixel_values"].shape == (1, 3, 64, 96) and out["pixel_mask"][0].sum() == 50 * 70
    assert torch.allclose(out["pixel_values"][0, :, :50, :70], (bgr(image) - MEAN) / STD, atol=1e-5)


def test_do_rescale_and_do_normalize():
    image = random_image(50, 70)
    kwargs = {"do_resize": False, "do_pad": False}
    raw = GLIPImageProcessor(do_normalize=False, **kwargs)(image)["pixel_values"][0]
    assert torch.equal(raw, bgr(image))  # 0..255 BGR, untouched
    rescaled = GLIPImageProcessor(do_normalize=False, do_rescale=True, rescale_factor=0.5, **kwargs)(image)["pixel_values"][0]
    assert torch.equal(rescaled, bgr(image) * 0.5)
    default = GLIPImageProcessor(**kwargs)(image)["pixel_values"]
    # mean / std given on the rescaled scale: the same normalised values
    on_unit_scale = GLIPImageProcessor(do_rescale=True, image_mean=(MEAN / 255).flatten().tolist(), image_std=(STD / 255).flatten().tolist(), **kwargs)
    assert torch.allclose(on_unit_scale(image)["pixel_values"], default, atol=1e-5)
    custom = GLIPImageProcessor(image_mean=[10.0, 20.0, 30.0], image_std=2.0, **kwargs)(image)["pixel_values"][0]
    assert torch.allclose(custom, (bgr(image) - torch.tensor([10.0, 20.0, 30.0])[:, None, None]) / 2.0)


def test_do_pad_and_pad_size():
    small, large = random_image(40, 40), random_image(60, 90, seed=1)
    no_pad = GLIPImageProcessor(do_resize=False, do_pad=False)
    out = no_pad([small, random_image(40, 40, seed=2)])
    assert out["pixel_values"].shape == (2, 3, 40, 40) and out["pixel_mask"].all()  # not rounded to 32
    with pytest.raises(ValueError, match="without do_pad, every image must have the same size"):
        no_pad([small, large])
    padded = GLIPImageProcessor(do_resize=False)([small, large])
    assert padded["pixel_values"].shape == (2, 3, 64, 96)  # batch maximum rounded up to size_divisibility
    fixed = GLIPImageProcessor(do_resize=False, pad_size={"height": 128, "width": 96})([small, large])
    assert fixed["pixel_values"].shape == (2, 3, 128, 96) and fixed["pixel_mask"].sum((1, 2)).tolist() == [1600, 5400]
    assert torch.equal(fixed["pixel_values"][:, :, :64], padded["pixel_values"]) and (fixed["pixel_values"][:, :, 64:] == 0).all()
    with pytest.raises(ValueError, match="image 1 is 60x90 .* larger than pad_size 64x64"):
        GLIPImageProcessor(do_resize=False)([small, large], pad_size={"height": 64, "width": 64})
    with pytest.raises(ValueError, match="multiples of size_divisibility=32"):
        GLIPImageProcessor(pad_size={"height": 100, "width": 96})
    assert GLIPImageProcessor(do_resize=False, pad_size={"height": 100, "width": 96}, size_divisibility=1)(small)["pixel_values"].shape == (1, 3, 100, 96)


def test_size_is_the_conventional_spelling_of_min_and_max_size(tmp_path):
    image = random_image(100, 150)
    by_size = GLIPImageProcessor(size={"shortest_edge": 64, "longest_edge": 80})
    assert (by_size.min_size, by_size.max_size) == (64, 80) and "size" not in by_size.to_dict()
    expected = GLIPImageProcessor(min_size=64, max_size=80)(image)["pixel_values"]
    assert torch.equal(by_size(image)["pixel_values"], expected)
    assert torch.equal(GLIPImageProcessor()(image, size={"shortest_edge": 64, "longest_edge": 80})["pixel_values"], expected)
    GLIPImageProcessor(min_size=32, max_size=48).save_pretrained(tmp_path)
    loaded = GLIPImageProcessor.from_pretrained(tmp_path, size={"shortest_edge": 64, "longest_edge": 80})
    assert (loaded.min_size, loaded.max_size) == (64, 80)
    with pytest.raises(ValueError, match="contradicts min_size=32"):
        GLIPImageProcessor(min_size=32, size={"shortest_edge": 64, "longest_edge": 80})
    with pytest.raises(ValueError, match="size must be \\{'shortest_edge'"):
        GLIPImageProcessor(size={"height": 64, "width": 64})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_size": -1}, "min_size must be a positive integer"),
        ({"min_size": 800.0}, "min_size"),
        ({"min_size": "800"}, "min_size"),
        ({"max_size": 10, "min_size": 20}, "max_size must be an integer >= min_size"),
        ({"size_divisibility": 0}, "size_divisibility must be a positive integer"),
        ({"do_rescale": True, "rescale_factor": 0.0, "image_mean": [0.5] * 3}, "rescale_factor must be a positive finite number"),
        ({"do_rescale": True}, "image_mean=.* outside the range of the pixel values \\[0, 1\\]"),
        ({"image_mean": [0.0, 1.0]}, "image_mean must be a number or 3 numbers"),
        ({"image_mean": [float("nan")] * 3}, "image_mean must contain finite numbers"),
        ({"image_mean": [-1.0, 0.0, 0.0]}, "image_mean=.* outside the range"),
        ({"image_std": [1.0, 0.0, 1.0]}, "image_std must be positive"),
        ({"image_std": [1.0] * 4}, "image_std must be a number or 3 numbers"),
        ({"pad_size": {"height": 0, "width": 32}}, "pad_size must be"),
        ({"pad_size": {"shortest_edge": 32}}, "pad_size must be"),
        ({"do_center_crop": True}, "does not crop"),
        ({"crop_size": {"height": 32, "width": 32}}, "does not crop"),
        ({"data_format": "channels_last"}, "data_format='channels_last'"),
        ({"do_convert_rgb": False}, "do_convert_rgb=False"),
        ({"do_pad": "yes"}, "do_pad"),
    ],
)
def test_bad_image_processor_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GLIPImageProcessor(**kwargs)
    with pytest.raises(ValueError, match=message):
        GLIPImageProcessor()(random_image(), **kwargs)


def test_unknown_image_processor_keywords():
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['foo'\\]"):
        GLIPImageProcessor(foo=1)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['padding'\\]"):
        GLIPImageProcessor()(random_image(), padding="max_length")


# -- registration ---------------------------------------------------------------------------------------------------------
FRESH_INTERPRETER = """
import importlib, sys
sys.modules["modeling_glip"] = None  # `import processing` alone must be enough
import processing
from transformers import AutoImageProcessor, AutoProcessor
path = sys.argv[1]
loaded = [processing.GLIPProcessor.from_pretrained(path), AutoProcessor.from_pretrained(path)]
image_processor = AutoImageProcessor.from_pretrained(path)
print(*[type(p).__name__ for p in loaded], type(image_processor).__name__, image_processor.min_size)
del sys.modules["modeling_glip"]
import modeling_glip
importlib.reload(processing), importlib.reload(modeling_glip)  # both registrations, twice: idempotent, coexisting
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
config = modeling_glip.GLIPConfig
assert config.model_type == processing.MODEL_TYPE
assert PROCESSOR_MAPPING._extra_content["glip"] is PROCESSOR_MAPPING._extra_content[config] is processing.GLIPProcessor
assert IMAGE_PROCESSOR_MAPPING._extra_content["glip"] == IMAGE_PROCESSOR_MAPPING._extra_content[config] == {"torchvision": processing.GLIPImageProcessor}
print(type(AutoProcessor.from_pretrained(path)).__name__, type(AutoImageProcessor.from_pretrained(path)).__name__)
"""


def test_import_processing_alone_registers_the_auto_classes(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(GLIPProcessor, "_auto_class", None)  # no auto_map / code copy: the class names must resolve
    monkeypatch.setattr(GLIPImageProcessor, "_auto_class", None)
    GLIPProcessor(GLIPImageProcessor(min_size=160, max_size=200), tokenizer).save_pretrained(tmp_path)
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", FRESH_INTERPRETER, str(tmp_path)], capture_output=True, text=True, env=environment, cwd="/", stdin=subprocess.DEVNULL, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-2] == "GLIPProcessor GLIPProcessor GLIPImageProcessor 160"
    assert lines[-1] == "GLIPProcessor GLIPImageProcessor"
