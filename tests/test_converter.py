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
    with pytest.raises(ValueError, match="--allow_unsafe_pickle"):
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


# --- bad inputs: each gives an error saying what the file is and what to do ------------------------------------------


def test_missing_key_without_config_yaml_names_the_keys(tiny_original, tmp_path):
    from modeling_glip.convert_glip_original_to_hf import convert

    incomplete = {k: v for k, v in tiny_original.items() if k not in ("backbone.fpn.fpn_inner4.weight", "rpn.head.cls_logits.weight")}
    with pytest.raises(ValueError, match=r"lacks \['backbone.fpn.fpn_inner4.weight', 'rpn.head.cls_logits.weight'\].*--config_yaml"):
        infer_config_from_state_dict(incomplete, BertConfig(**TINY_TEXT_CONFIG))
    from safetensors.torch import save_file

    save_file(incomplete, str(tmp_path / "incomplete.safetensors"))
    with pytest.raises(ValueError, match="fpn_inner4"):
        convert(tmp_path / "incomplete.safetensors", tmp_path / "out", text_config=BertConfig(**TINY_TEXT_CONFIG))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["incomplete.safetensors"]  # no output, no partial folder


@pytest.mark.parametrize(
    "files, message",
    [
        ({"cfg.yaml": "_BASE_: cfg.yaml\nMODEL: {}\n"}, r"_BASE_ cycle .*cfg.yaml -> .*cfg.yaml"),
        ({"cfg.yaml": "_BASE_: base.yaml\n", "base.yaml": "_BASE_: cfg.yaml\n"}, r"_BASE_ cycle .*cfg.yaml -> .*base.yaml -> .*cfg.yaml"),
        ({"cfg.yaml": "MODEL:\n  SWINT: [unclosed\n"}, r"cfg.yaml is not a valid YAML file"),
        ({"cfg.yaml": "- a\n- b\n"}, r"cfg.yaml is not a GLIP YAML config: its top level is a list"),
        ({"cfg.yaml": "MODEL: [1, 2]\n"}, r"cfg.yaml: MODEL must be a mapping"),
        ({"cfg.yaml": "MODEL:\n  SWINT:\n    EMBED_DIM: big\n"}, r"cfg.yaml: .*embed_dim"),
        ({"cfg.yaml": "_BASE_: [a, b]\n"}, r"_BASE_ must be a path"),
    ],
)
def test_bad_yaml_configs_name_the_file(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        config_from_original_yaml(tmp_path / "cfg.yaml")


def test_missing_base_yaml_names_the_file_that_refers_to_it(tmp_path):
    (tmp_path / "cfg.yaml").write_text("_BASE_: ../configs/base.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"base.yaml does not exist \(the _BASE_ of .*cfg.yaml\)"):
        config_from_original_yaml(tmp_path / "cfg.yaml")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"hello, this is a text file", "neither a PyTorch checkpoint .* nor a safetensors file"),
        (b"\x89PNG\r\n\x1a\n" + bytes(100), "neither a PyTorch checkpoint"),
        (b"\x80\x04" + bytes(50), "cannot be read as a PyTorch checkpoint.*corrupt or not a checkpoint"),
        (b"PK\x03\x04" + bytes(50), "neither a PyTorch checkpoint"),  # not a valid zip archive
        ((20).to_bytes(8, "little") + b'{"broken": ', "not a readable safetensors file"),
    ],
)
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_non_checkpoint_files_are_named_and_never_offered_unsafe_unpickling(tmp_path, content, message):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        load_original_checkpoint(path)
    assert "allow_unsafe_pickle" not in str(error.value)


def test_non_tensor_state_dict_is_refused(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"model": {"backbone.body.patch_embed.proj.weight": [1, 2, 3]}}, path)
    with pytest.raises(ValueError, match="not tensors"):
        load_original_checkpoint(path)


def test_converted_checkpoint_is_recognised(tiny_glip_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="already converted to GLIPModel.*from_pretrained"):
        load_original_checkpoint(tiny_glip_checkpoint / "model.safetensors")
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not an original GLIP checkpoint"):
        load_original_checkpoint(path)


def _convert_tiny(reference_dir, bert_vocab_dir, output):
    from modeling_glip.convert_glip_original_to_hf import convert

    return convert(
        reference_dir / "tiny_glip_original.safetensors", output, reference_dir / "tiny_config.yaml", BertConfig(**TINY_TEXT_CONFIG), tokenizer=str(bert_vocab_dir)
    )


def test_failed_conversion_leaves_no_partial_folder_and_keeps_the_target(reference_dir, bert_vocab_dir, tmp_path, monkeypatch):
    earlier = tmp_path / "glip-tiny"
    earlier.mkdir()
    (earlier / "config.json").write_text(json.dumps({"model_type": "glip", "marker": "earlier conversion"}))

    def save_then_fail(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half written")
        raise OSError("No space left on device")

    from pathlib import Path

    monkeypatch.setattr(GLIPModel, "save_pretrained", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        _convert_tiny(reference_dir, bert_vocab_dir, earlier)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["glip-tiny"]  # no partial folder beside it
    assert sorted(p.name for p in earlier.iterdir()) == ["config.json"] and "earlier conversion" in (earlier / "config.json").read_text()
    with pytest.raises(OSError):
        _convert_tiny(reference_dir, bert_vocab_dir, tmp_path / "new")
    assert not (tmp_path / "new").exists()

    monkeypatch.undo()  # a successful conversion replaces the earlier one as a whole
    _convert_tiny(reference_dir, bert_vocab_dir, earlier)
    assert (earlier / "model.safetensors").is_file() and "marker" not in (earlier / "config.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["glip-tiny"]


def test_output_folder_with_other_files_is_refused_before_loading(tmp_path):
    from modeling_glip.convert_glip_original_to_hf import convert

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files than a GLIP checkpoint"):
        convert(tmp_path / "absent.pth", tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_command_line_errors_are_one_line(tmp_path, capsys):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(path), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "neither a PyTorch checkpoint" in error
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(path), "--output", str(tmp_path / "out"), "--text-config", str(tmp_path / "absent.json")])
    assert exit_info.value.code == 2 and "--text_config" in capsys.readouterr().err


def test_help_refers_only_to_files_in_the_repository(capsys):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for reference in re.findall(r"[\w./-]+\.(?:md|py)\b", text):
        if "/" in reference or reference.endswith(".md"):
            assert (root / reference).is_file() or (root / "modeling_glip" / reference).is_file(), reference
    for section in re.findall(r'README section "([^"]+)"', text):
        assert f"## {section}" in (root / "README.md").read_text()
    assert "glip_architecture.md" not in text and "swin_backbone.md" not in text
