"""The original -> HF checkpoint converter: full GLIP-T / GLIP-L key sets (on the meta device), file formats, CLI, errors."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig

from modeling_glip.configuration_glip import GLIPConfig
from modeling_glip.convert_glip_original_to_hf import (
    config_from_original_yaml,
    convert_original_state_dict,
    infer_config_from_state_dict,
    load_original_checkpoint,
    main,
)
from modeling_glip.modeling_glip import GLIPModel
from tests.test_parity_original import TINY_TEXT_CONFIG, pixel_mask_for


def meta_state_dict(path):
    """A state dict of meta tensors with the key / shape / dtype list of a released architecture."""
    state_dict = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        state_dict[key] = torch.empty(tuple(int(x) for x in re.findall(r"\d+", shape)), dtype=getattr(torch, dtype), device="meta")
    return state_dict


@pytest.mark.parametrize("name, preset", [("glip_t_keys.txt", GLIPConfig.glip_t), ("glip_l_keys.txt", GLIPConfig.glip_l)])
def test_every_released_key_maps_onto_the_model(reference_dir, name, preset):
    original = meta_state_dict(reference_dir / name)
    config = infer_config_from_state_dict(original)
    expected = preset()
    for field in ("embed_dim", "depths", "num_heads", "window_size", "drop_path_rate"):
        assert getattr(config.backbone_config, field) == getattr(expected.backbone_config, field), field
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        assert getattr(config.text_config, field) == getattr(expected.text_config, field), field
    assert (config.num_fusion_layers, config.hidden_size, config.fusion_embed_dim) == (expected.num_fusion_layers, 256, 2048)

    converted = convert_original_state_dict(original, config)
    with torch.device("meta"):
        model = GLIPModel(config)
    reference = model.state_dict()
    assert set(converted) == set(reference), (set(converted) ^ set(reference))
    assert all(converted[key].shape == reference[key].shape for key in converted)
    # parameter count of the original (header of the key list): 231.78M (T) / 430.42M (L)
    header = (reference_dir / name).read_text().splitlines()[-1]
    assert sum(p.numel() for p in model.parameters()) == int(re.search(r"params=(\d+)", header)[1])


@pytest.fixture(scope="module")
def tiny_original(reference_dir):
    return load_file(str(reference_dir / "tiny_glip_original.safetensors"))


@pytest.fixture(scope="module")
def tiny_config(reference_dir):
    return config_from_original_yaml(reference_dir / "tiny_config.yaml", BertConfig(**TINY_TEXT_CONFIG))


def test_training_checkpoint_wrapping_is_unwrapped(tiny_original, tiny_config):
    plain = convert_original_state_dict(tiny_original, tiny_config)
    wrapped = convert_original_state_dict({"model": {f"module.{k}": v for k, v in tiny_original.items()}, "iteration": 5}, tiny_config)
    assert plain.keys() == wrapped.keys() and all(torch.equal(plain[k], wrapped[k]) for k in plain)


def test_unknown_key_is_refused(tiny_original, tiny_config):
    with pytest.raises(ValueError, match="no GLIPModel counterpart.*rpn.head.mystery"):
        convert_original_state_dict({**tiny_original, "rpn.head.mystery.weight": torch.zeros(1)}, tiny_config)


def test_missing_key_is_refused(tiny_original, tiny_config, tmp_path):
    from safetensors.torch import save_file

    incomplete = {k: v for k, v in tiny_original.items() if k != "rpn.head.bias0"}
    save_file(incomplete, str(tmp_path / "incomplete.safetensors"))
    from modeling_glip.convert_glip_original_to_hf import convert

    with pytest.raises(ValueError, match="missing.*head.bias0"):
        convert(tmp_path / "incomplete.safetensors", tmp_path / "out", text_config=BertConfig(**TINY_TEXT_CONFIG), config_yaml=None)


def test_offline_without_a_tokenizer_folder_is_a_clear_error(tiny_config):
    from modeling_glip.convert_glip_original_to_hf import build_processor

    with pytest.raises(ValueError, match="--tokenizer"):
        build_processor(tiny_config, "/no/such/tokenizer")


def test_wrong_anchor_templates_are_refused(tiny_original, tiny_config):
    wrong = {**tiny_original, "rpn.anchor_generator.cell_anchors.0": torch.tensor([[0.0, 0.0, 63.0, 63.0]])}
    with pytest.raises(ValueError, match="Anchor template of level 0"):
        convert_original_state_dict(wrong, tiny_config)


def test_pth_is_loaded_weights_only_and_pickles_need_opt_in(tiny_original, tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"model": {f"module.{k}": v for k, v in tiny_original.items()}, "iteration": 3}, path)
    assert load_original_checkpoint(path).keys() == tiny_original.keys()

    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": dict(tiny_original), "cfg": _Opaque()}, unsafe)
    with pytest.raises(ValueError, match="--allow-unsafe-pickle"):
        load_original_checkpoint(unsafe)
    assert load_original_checkpoint(unsafe, allow_unsafe_pickle=True).keys() == tiny_original.keys()
    with pytest.raises(FileNotFoundError):
        load_original_checkpoint(tmp_path / "absent.pth")


class _Opaque:
    """A pickled object that torch.load(weights_only=True) refuses."""


def test_unsupported_original_configs_are_refused(tmp_path):
    yaml_path = tmp_path / "cfg.yaml"
    yaml_path.write_text("MODEL:\n  DYHEAD:\n    FUSE_CONFIG:\n      TYPE: MHA-S\n")
    with pytest.raises(ValueError, match="TYPE=MHA-S"):
        config_from_original_yaml(yaml_path)
    yaml_path.write_text("MODEL:\n  LANGUAGE_BACKBONE:\n    LANG_DIM: 80\n")
    with pytest.raises(ValueError, match="text_config"):
        config_from_original_yaml(yaml_path)


def test_stock_style_yaml_takes_glip_t_defaults(tmp_path):
    yaml_path = tmp_path / "glip_Swin_L_like.yaml"
    yaml_path.write_text(
        "MODEL:\n  SWINT:\n    EMBED_DIM: 192\n    DEPTHS: [2, 2, 18, 2]\n    NUM_HEADS: [6, 12, 24, 48]\n    WINDOW_SIZE: 12\n"
        "    DROP_PATH_RATE: 0.4\n  DYHEAD:\n    NUM_CONVS: 8\n"
    )
    config = config_from_original_yaml(yaml_path)
    assert config.to_diff_dict() == GLIPConfig.glip_l().to_diff_dict()


def test_command_line_conversion_gives_a_loadable_checkpoint(reference_dir, fixture_tensors, bert_vocab_dir, tmp_path):
    text_config = tmp_path / "text_config.json"
    text_config.write_text(json.dumps(BertConfig(**TINY_TEXT_CONFIG).to_dict()))
    output = tmp_path / "glip-tiny"
    main(
        [
            "--checkpoint", str(reference_dir / "tiny_glip_original.safetensors"),
            "--output", str(output),
            "--config-yaml", str(reference_dir / "tiny_config.yaml"),
            "--text-config", str(text_config),
            "--tokenizer", str(bert_vocab_dir),
        ]
    )  # fmt: skip
    model, info = GLIPModel.from_pretrained(output, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        out = model.eval()(
            fixture_tensors["input.images_tensor"], fixture_tensors["input.input_ids"], fixture_tensors["input.attention_mask"],
            pixel_mask=pixel_mask_for(fixture_tensors),
        )  # fmt: skip
    expected = torch.cat([fixture_tensors[f"head.dot_product_logits.{level}"] for level in ("p3", "p4", "p5", "p6", "p7")], dim=1)
    assert (out.logits - expected).abs().max() < 1e-4

    # the processor saved beside it reproduces the original's preprocessing and prompt
    from PIL import Image

    from processing import GLIPProcessor

    processor = GLIPProcessor.from_pretrained(output)
    inputs = processor(images=[Image.open(reference_dir / "input_image.png")], text=["person", "cat", "rocket", "coffee_cup", "american flag (US)"])
    valid = int(fixture_tensors["input.attention_mask"].sum())
    assert torch.equal(inputs["input_ids"], fixture_tensors["input.input_ids"][:, :valid])
    assert (inputs["pixel_values"] - fixture_tensors["input.images_tensor"]).abs().max() < 1e-5
