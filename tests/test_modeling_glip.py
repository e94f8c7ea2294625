"""Model hygiene on tiny random configs: round trips, batching, gradients, init, dtypes and bad input."""

import math

import pytest
import torch
from transformers import BertConfig

from modeling_glip.configuration_glip import GLIPConfig, swin_backbone_config
from modeling_glip.modeling_glip import GLIPModel
from tests.test_parity_original import deterministic_train_mode


def tiny_config(**kwargs) -> GLIPConfig:
    return GLIPConfig(
        backbone_config=swin_backbone_config(embed_dim=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)),
        text_config=BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, max_position_embeddings=64),
        hidden_size=32,
        num_fusion_layers=2,
        fusion_embed_dim=64,
        fusion_num_heads=4,
        **kwargs,
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GLIPModel(tiny_config()).eval()


def make_inputs(batch=1, height=96, width=128, tokens=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(batch, 3, height, width, generator=generator),
        "input_ids": torch.randint(5, 120, (batch, tokens), generator=generator),
        "attention_mask": torch.ones(batch, tokens, dtype=torch.long),
    }


def test_output_shapes(model):
    inputs = make_inputs(batch=2)
    with torch.no_grad():
        out = model(**inputs)
    shapes = out.spatial_shapes[0].tolist()
    assert out.spatial_shapes.shape == (2, 5, 2) and torch.equal(out.anchors[0], out.anchors[1])
    assert shapes == [[12, 16], [6, 8], [3, 4], [2, 2], [1, 1]]
    num_anchors = sum(h * w for h, w in shapes)
    assert out.logits.shape == (2, num_anchors, 7)
    assert out.pred_boxes.shape == (2, num_anchors, 4) and out.box_regression.shape == (2, num_anchors, 4)
    assert out.centerness.shape == (2, num_anchors) and out.anchors.shape == (2, num_anchors, 4)
    assert out.image_sizes.tolist() == [[96, 128], [96, 128]]
    assert out.loss is None and out.vision_hidden_states is None
    with torch.no_grad():
        as_tuple = model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.logits)


def test_hidden_states_layout(model):
    with torch.no_grad():
        out = model(**make_inputs(), output_hidden_states=True)
    layers = model.config.num_fusion_layers
    assert len(out.backbone_feature_maps) == 3
    num_anchors = out.logits.shape[1]
    assert len(out.vision_hidden_states) == 1 + 2 * layers
    assert all(state.shape == (1, num_anchors, model.config.hidden_size) for state in out.vision_hidden_states)
    levels = out.vision_levels(out.vision_hidden_states[-1])
    assert [tuple(level.shape[-2:]) for level in levels] == [tuple(s) for s in out.spatial_shapes[0].tolist()]
    assert len(out.text_hidden_states) == 1 + 2 * layers
    assert torch.equal(out.text_hidden_states[-1], out.text_hidden_state)


def test_save_load_round_trip_and_determinism(model, tmp_path):
    inputs = make_inputs()
    with torch.no_grad():
        first = model(**inputs)
        second = model(**inputs)
    assert torch.equal(first.logits, second.logits)
    model.save_pretrained(tmp_path)
    reloaded = GLIPModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        again = reloaded(**inputs)
    for name in ("logits", "pred_boxes", "centerness"):  # reloaded tensors may take other kernels: ~1e-8 noise
        torch.testing.assert_close(getattr(first, name), getattr(again, name), rtol=0, atol=1e-6)
    assert set(model.state_dict()) == set(reloaded.state_dict())


def test_padded_prompt_does_not_change_valid_tokens(model):
    inputs = make_inputs(tokens=5)
    padded = dict(inputs)
    padded["input_ids"] = torch.cat([inputs["input_ids"], torch.zeros(1, 4, dtype=torch.long)], dim=1)
    padded["attention_mask"] = torch.cat([inputs["attention_mask"], torch.zeros(1, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        short, long = model(**inputs), model(**padded)
    assert (short.logits - long.logits[..., :5]).abs().max() < 1e-5
    assert (short.pred_boxes - long.pred_boxes).abs().max() < 1e-5


def test_batch_with_two_prompts_equals_single_runs_on_the_same_canvas(model):
    """Two images, two prompts of different lengths, on one padded canvas: equal to running each alone there."""
    first, second = make_inputs(tokens=4, seed=1), make_inputs(tokens=7, seed=2)
    pixel_mask = torch.ones(2, 96, 128, dtype=torch.long)
    pixel_mask[1, 64:, :] = 0  # the second image is smaller: its bottom rows are canvas padding
    pixel_values = torch.cat([first["pixel_values"], second["pixel_values"] * pixel_mask[1]])
    input_ids = torch.zeros(2, 7, dtype=torch.long)
    attention_mask = torch.zeros(2, 7, dtype=torch.long)
    input_ids[0, :4], attention_mask[0, :4] = first["input_ids"][0], 1
    input_ids[1], attention_mask[1] = second["input_ids"][0], 1
    with torch.no_grad():
        batched = model(pixel_values, input_ids, attention_mask, pixel_mask=pixel_mask)
        alone0 = model(pixel_values[:1], first["input_ids"], first["attention_mask"], pixel_mask=pixel_mask[:1])
        alone1 = model(pixel_values[1:], second["input_ids"], second["attention_mask"], pixel_mask=pixel_mask[1:])
    assert (batched.logits[0, :, :4] - alone0.logits[0]).abs().max() < 1e-4
    assert (batched.logits[1] - alone1.logits[0]).abs().max() < 1e-4
    assert (batched.pred_boxes[0] - alone0.pred_boxes[0]).abs().max() < 1e-4
    assert (batched.pred_boxes[1] - alone1.pred_boxes[0]).abs().max() < 1e-4
    assert batched.image_sizes.tolist() == [[96, 128], [64, 128]]


def make_labels(tokens=7):
    positive_map = torch.zeros(2, tokens)
    positive_map[0, 1] = 1
    positive_map[1, 2:4] = 1
    return [{"boxes": torch.tensor([[0.3, 0.4, 0.3, 0.5], [0.7, 0.6, 0.4, 0.6]]), "positive_map": positive_map}]


def test_every_trainable_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = GLIPModel(tiny_config()).train()
    out = model(**make_inputs(), labels=make_labels())
    assert set(out.loss_dict) == {"loss_reg", "loss_centerness", "loss_dot_product_token"}
    out.loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["head.cls_logits.weight", "head.cls_logits.bias"]  # computed nowhere (section 5.5)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = deterministic_train_mode(GLIPModel(tiny_config()))
    inputs, labels = make_inputs(), make_labels()

    def gradients():
        model.zero_grad()
        model(**inputs, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.head.layers[0].vl_fuse.gradient_checkpointing and model.head.layers[0].text_layer.gradient_checkpointing
    deterministic_train_mode(model)
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def test_init_weights_initialises_every_parameter_and_buffer():
    config = tiny_config()
    with torch.device("meta"):
        model = GLIPModel(config)
    model.to_empty(device="cpu")
    for tensor in list(model.parameters()) + list(model.buffers()):
        tensor.data.fill_(float("nan")) if tensor.is_floating_point() else tensor.data.fill_(-1)
    for module in model.modules():
        module._is_hf_initialized = False
    model.initialize_weights()
    bad = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if (t.isnan().any() if t.is_floating_point() else (t < 0).any())]
    assert not bad, f"not initialised: {bad}"
    head = model.head
    assert torch.allclose(head.bias0, torch.tensor([-math.log(99.0)]))
    assert torch.equal(head.layers[0].vl_fuse.gamma_v, torch.full_like(head.layers[0].vl_fuse.gamma_v, 0.5))
    assert head.layers[0].dyconv.offset.weight.abs().sum() == 0
    assert torch.equal(model.anchor_generator.cell_anchors_0, torch.tensor([[-28.0, -28.0, 35.0, 35.0]]))


def test_bfloat16_from_pretrained_runs_and_stays_finite(model, tmp_path):
    model.save_pretrained(tmp_path)
    bf16 = GLIPModel.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert bf16.dtype == torch.bfloat16
    with torch.no_grad():
        out = bf16(**make_inputs())
    assert out.logits.dtype == torch.bfloat16
    for name in ("logits", "pred_boxes", "centerness"):
        assert torch.isfinite(getattr(out, name)).all(), name


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i: i.update(pixel_values=torch.randn(1, 1, 96, 128)), "3, height, width"),
        (lambda i: i.update(pixel_values=torch.randn(2, 3, 96, 128)), "Batch size mismatch"),
        (lambda i: i.update(input_ids=torch.randint(5, 100, (1, 65)), attention_mask=None), "positions"),
        (lambda i: i.update(input_ids=torch.zeros(1, 0, dtype=torch.long), attention_mask=None), "empty"),
        (lambda i: i.update(attention_mask=torch.zeros(1, 7, dtype=torch.long)), "no valid token"),
        (lambda i: i.update(attention_mask=torch.ones(1, 6, dtype=torch.long)), "attention_mask"),
        (lambda i: i.update(pixel_mask=torch.ones(1, 95, 128, dtype=torch.long)), "pixel_mask"),
    ],
)
def test_bad_input_is_a_clear_value_error(model, change, message):
    inputs = make_inputs()
    change(inputs)
    with pytest.raises(ValueError, match=message):
        model(**inputs)


def test_processor_metadata_keys_are_accepted_and_typos_are_not(model):
    inputs = make_inputs()
    with torch.no_grad():
        model(**inputs, positive_map=torch.zeros(1, 2, 7), label_ids=torch.zeros(1, 2), text_labels=[["a", "b"]])
    with pytest.raises(TypeError, match="output_hiden_states"):
        model(**inputs, output_hiden_states=True)


def test_labels_must_match_the_batch_and_the_prompt(model):
    with pytest.raises(ValueError, match="labels"):
        model(**make_inputs(batch=2), labels=make_labels())
    with pytest.raises(ValueError, match="positive_map"):
        model(**make_inputs(tokens=5), labels=make_labels(tokens=7))
    with pytest.raises(ValueError, match="boxes"):
        model(**make_inputs(), labels=[{"boxes": torch.zeros(2, 3), "positive_map": torch.zeros(2, 7)}])


def test_presets_reproduce_the_released_architectures():
    glip_t, glip_l = GLIPConfig.glip_t(), GLIPConfig.glip_l()
    assert (glip_t.backbone_config.embed_dim, glip_t.backbone_config.depths, glip_t.num_fusion_layers) == (96, [2, 2, 6, 2], 6)
    assert (glip_l.backbone_config.embed_dim, glip_l.backbone_config.window_size, glip_l.num_fusion_layers) == (192, 12, 8)
    assert glip_l.layer_scale_init == 1 / 8 and glip_t.max_text_len == 256
    with pytest.raises(Exception, match="score_aggregation"):
        GLIPConfig(score_aggregation="median")
