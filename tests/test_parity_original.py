"""Parity of the converted tiny model with the ORIGINAL GLIP code (fixture in ../shared/reference).

Every intermediate recorded by the original is compared at atol 1e-4; the max abs diff per tensor is printed
(`pytest -s` shows them).
"""

import pytest
import torch
from safetensors.torch import load_file
from timm.layers import DropPath
from torch import nn
from torchvision.ops import DropBlock2d
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertSelfAttention
from transformers.models.swin.modeling_swin import SwinDropPath

from modeling_glip.convert_glip_original_to_hf import config_from_original_yaml, convert_original_state_dict
from modeling_glip.modeling_glip import GLIPModel
from modeling_glip.vl_fusion import BiMultiHeadAttention

ATOL = 1e-4
LEVELS = ["p3", "p4", "p5", "p6", "p7"]
# The tiny fixture's "bert-base-uncased" is a local stand-in with this architecture (reference/README.md).
TINY_TEXT_CONFIG = dict(hidden_size=80, num_hidden_layers=2, num_attention_heads=4, intermediate_size=320, max_position_embeddings=512)


def assert_close(name, actual, expected, atol=ATOL):
    diff = (actual.float() - expected.float()).abs().max().item()
    print(f"{name:45s} max abs diff {diff:.3e}")
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert diff <= atol, f"{name}: max abs diff {diff} > {atol}"


@pytest.fixture(scope="module")
def tiny_model(reference_dir):
    config = config_from_original_yaml(reference_dir / "tiny_config.yaml", BertConfig(**TINY_TEXT_CONFIG))
    state_dict = convert_original_state_dict(load_file(str(reference_dir / "tiny_glip_original.safetensors")), config)
    model = GLIPModel(config).eval()
    result = model.load_state_dict(state_dict, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    return model


def pixel_mask_for(fixture_tensors):
    images = fixture_tensors["input.images_tensor"]
    h, w = fixture_tensors["input.image_sizes_hw"][0].tolist()
    mask = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.long)
    mask[:, :h, :w] = 1
    return mask


@pytest.fixture(scope="module")
def outputs(tiny_model, fixture_tensors):
    with torch.no_grad():
        return tiny_model(
            fixture_tensors["input.images_tensor"],
            fixture_tensors["input.input_ids"],
            fixture_tensors["input.attention_mask"],
            pixel_mask=pixel_mask_for(fixture_tensors),
            output_hidden_states=True,
        )


def test_config_from_merged_yaml(tiny_model, manifest):
    config = tiny_model.config
    assert config.num_fusion_layers == 2 and config.hidden_size == 64
    assert config.layer_scale_init == 0.5
    assert config.inference_threshold == manifest["postprocess"]["INFERENCE_TH"]
    assert (config.min_size_test, config.max_size_test) == (320, 533)
    assert config.backbone_config.embed_dim == 24 and config.backbone_config.depths == [2, 2, 2, 2]


def test_swin_stages(tiny_model, fixture_tensors):
    with torch.no_grad():
        out = tiny_model.backbone(fixture_tensors["input.images_tensor"], output_hidden_states=True)
    # GLIP stage2 (norm0 = Identity) is the raw first-stage output, HF hidden_states[1] (swin_backbone.md)
    stage2 = out.reshaped_hidden_states[1] if out.hidden_states[1].dim() == 3 else out.hidden_states[1]
    assert_close("backbone.swin.stage2", stage2, fixture_tensors["backbone.swin.stage2"])
    for index, stage in enumerate(["stage3", "stage4", "stage5"]):
        assert_close(f"backbone.swin.{stage}", out.feature_maps[index], fixture_tensors[f"backbone.swin.{stage}"])


def test_fpn_and_language(outputs, fixture_tensors):
    for index, level in enumerate(LEVELS):
        assert_close(f"backbone.fpn.{level}", outputs.vision_levels(outputs.vision_hidden_states[0])[index], fixture_tensors[f"backbone.fpn.{level}"])
    assert_close("language.hidden", outputs.text_hidden_states[0], fixture_tensors["language.hidden"])


def test_every_tower_module(outputs, fixture_tensors, manifest):
    modules = manifest["dyhead_tower_modules"]
    vision_step = text_step = 1
    for index, kind in enumerate(modules):
        prefix = f"head.tower.{index:02d}.{kind}"
        if kind in ("VLFuse", "DyConv"):
            for level_index, level in enumerate(LEVELS):
                level_map = outputs.vision_levels(outputs.vision_hidden_states[vision_step])[level_index]
                assert_close(f"{prefix}.visual.{level}", level_map, fixture_tensors[f"{prefix}.visual.{level}"])
            vision_step += 1
        if kind in ("VLFuse", "BertEncoderLayer"):
            assert_close(f"{prefix}.lang_hidden", outputs.text_hidden_states[text_step], fixture_tensors[f"{prefix}.lang_hidden"])
            text_step += 1
    assert vision_step == len(outputs.vision_hidden_states) and text_step == len(outputs.text_hidden_states)


def test_head_outputs_and_anchors(outputs, fixture_tensors):
    batch = 1
    expected_logits = torch.cat([fixture_tensors[f"head.dot_product_logits.{level}"] for level in LEVELS], dim=1)
    expected_deltas = torch.cat([fixture_tensors[f"head.bbox_reg.{level}"].permute(0, 2, 3, 1).reshape(batch, -1, 4) for level in LEVELS], dim=1)
    expected_centerness = torch.cat([fixture_tensors[f"head.centerness.{level}"].reshape(batch, -1) for level in LEVELS], dim=1)
    assert_close("head.dot_product_logits", outputs.logits, expected_logits)
    assert_close("head.bbox_reg", outputs.box_regression, expected_deltas)
    assert_close("head.centerness", outputs.centerness, expected_centerness)
    assert_close("anchors", outputs.anchors[0], torch.cat([fixture_tensors[f"anchors.{level}"] for level in LEVELS]), atol=0)
    assert outputs.spatial_shapes[0].tolist() == [list(fixture_tensors[f"head.centerness.{level}"].shape[-2:]) for level in LEVELS]
    assert outputs.image_sizes.tolist() == fixture_tensors["input.image_sizes_hw"].tolist()


def test_pred_boxes_are_the_legacy_decoded_boxes(tiny_model, outputs):
    from transformers.image_transforms import center_to_corners_format

    h, w = outputs.image_sizes[0].tolist()
    boxes = center_to_corners_format(outputs.pred_boxes[0]) * torch.tensor([w, h, w, h])
    expected = tiny_model.box_coder.decode(outputs.box_regression[0], outputs.anchors[0])
    assert_close("pred_boxes -> legacy xyxy", boxes, expected, atol=1e-3)  # pixels up to ~1e3: float32 round trip


def test_unpadded_prompt_gives_the_same_valid_logits(tiny_model, outputs, fixture_tensors):
    """The original pads to 256; we run the 13 real tokens only. Valid-token outputs must agree."""
    valid = int(fixture_tensors["input.attention_mask"].sum())
    with torch.no_grad():
        short = tiny_model(
            fixture_tensors["input.images_tensor"],
            fixture_tensors["input.input_ids"][:, :valid],
            fixture_tensors["input.attention_mask"][:, :valid],
            pixel_mask=pixel_mask_for(fixture_tensors),
        )
    assert short.logits.shape[-1] == valid
    assert_close("logits, unpadded vs padded prompt", short.logits, outputs.logits[..., :valid], atol=1e-5)
    assert_close("pred_boxes, unpadded vs padded prompt", short.pred_boxes, outputs.pred_boxes, atol=1e-5)
    assert_close("centerness, unpadded vs padded prompt", short.centerness, outputs.centerness, atol=1e-5)


def deterministic_train_mode(model):
    """model.train() with every stochastic module off, as the fixture's loss run (manifest['loss'])."""
    model.train()
    for module in model.modules():
        if isinstance(module, (nn.Dropout, DropPath, SwinDropPath, DropBlock2d, BiMultiHeadAttention, BertSelfAttention)):
            module.eval()
    return model


def test_training_losses_and_gradients(tiny_model, fixture_tensors):
    model = deterministic_train_mode(tiny_model)
    try:
        h, w = fixture_tensors["input.image_sizes_hw"][0].tolist()
        boxes = fixture_tensors["loss.gt_boxes_xyxy_resized"]
        from transformers.image_transforms import corners_to_center_format

        labels = [{"boxes": corners_to_center_format(boxes) / torch.tensor([w, h, w, h]), "positive_map": fixture_tensors["loss.positive_map"]}]
        model.zero_grad()
        output = model(
            fixture_tensors["input.images_tensor"],
            fixture_tensors["input.input_ids"],
            fixture_tensors["input.attention_mask"],
            pixel_mask=pixel_mask_for(fixture_tensors),
            labels=labels,
        )
        for name in ("loss_reg", "loss_centerness", "loss_dot_product_token"):
            assert_close(f"loss.{name}", output.loss_dict[name], fixture_tensors[f"loss.{name}"], atol=1e-5)
        output.loss.backward()
        head = model.head
        assert_close("grad log_scale", head.log_scale.grad, fixture_tensors["loss.grad.rpn.head.log_scale"])
        assert_close("grad bias_lang", head.bias_lang.grad, fixture_tensors["loss.grad.rpn.head.bias_lang"])
        assert_close("grad bias0", head.bias0.grad, fixture_tensors["loss.grad.rpn.head.bias0"])
        assert_close("grad centerness.bias", head.centerness.bias.grad, fixture_tensors["loss.grad.rpn.head.centerness.bias"])
        assert_close("grad scales.0", head.scales.grad[:1], fixture_tensors["loss.grad.rpn.head.scales.0.scale"])
    finally:
        model.zero_grad()
        model.eval()
