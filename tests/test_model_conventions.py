"""GLIPModel behaves like a model that lives inside transformers: text features as a model output, hidden states and
attentions as tuples of tensors, input embeddings (resize_token_embeddings), Accelerate big-model loading with CPU +
disk offload, eager / sdpa attention, torch.compile and torch.export."""

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from modeling_glip.modeling_glip import CLAMPED_ATTENTION, GLIPModel
from tests.test_modeling_glip import make_inputs, tiny_config

ATOL = 1e-5


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("glip-conventions")
    GLIPModel(tiny_config()).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def eager(saved):
    return GLIPModel.from_pretrained(saved, attn_implementation="eager").eval()


def padded_inputs(batch=2):
    inputs = make_inputs(batch=batch, tokens=7)
    inputs["attention_mask"][-1, 5:] = 0  # the last prompt is padded
    return inputs


def test_get_text_features_is_a_model_output(eager):
    inputs = padded_inputs()
    with torch.no_grad():
        features = eager.get_text_features(inputs["input_ids"], inputs["attention_mask"], output_hidden_states=True, output_attentions=True)
        as_tuple = eager.get_text_features(inputs["input_ids"], inputs["attention_mask"], return_dict=False)
        encoder = eager.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert isinstance(features, BaseModelOutputWithPooling) and features.pooler_output is None
    layers = eager.config.text_config.num_hidden_layers
    assert torch.equal(features.last_hidden_state, encoder.last_hidden_state)
    assert len(features.hidden_states) == layers + 1 and len(features.attentions) == layers
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], features.last_hidden_state)


def test_prompt_tuning_offsets_are_part_of_the_text_features():
    torch.manual_seed(0)
    model = GLIPModel(tiny_config(text_prompt_length=16)).eval()
    with torch.no_grad():
        model.text_prompt.normal_()
        inputs = make_inputs()
        features = model.get_text_features(inputs["input_ids"])
        encoder = model.text_model(input_ids=inputs["input_ids"]).last_hidden_state
        expected, reused = model(**inputs), model(**inputs, text_encoder_hidden_state=features)
    assert torch.allclose(features.last_hidden_state, encoder + model.text_prompt[:7])
    assert torch.equal(reused.logits, expected.logits)


def test_hidden_states_and_attentions_are_tuples_of_tensors(eager):
    inputs = padded_inputs()
    with torch.no_grad():
        plain = eager(**inputs)
        out = eager(**inputs, output_hidden_states=True, output_attentions=True)
    config, (batch, tokens) = eager.config, inputs["input_ids"].shape
    num_anchors, layers = out.logits.shape[1], config.num_fusion_layers
    # recording changes nothing
    assert torch.equal(out.logits, plain.logits) and torch.equal(out.pred_boxes, plain.pred_boxes)

    assert len(out.vision_hidden_states) == len(out.text_hidden_states) == 2 * layers + 1
    assert all(state.shape == (batch, num_anchors, config.hidden_size) for state in out.vision_hidden_states)
    assert all(state.shape == (batch, tokens, config.text_config.hidden_size) for state in out.text_hidden_states)
    assert torch.equal(out.text_hidden_states[-1], out.text_hidden_state)
    assert len(out.backbone_feature_maps) == 3
    # the first vision state is the FPN output; its level maps are what the backbone + FPN give
    with torch.no_grad():
        _, pyramid, _ = eager._encode_images(inputs["pixel_values"], output_attentions=False)
    for level, expected in zip(out.vision_levels(out.vision_hidden_states[0]), pyramid):
        assert torch.equal(level, expected)

    heads = config.fusion_num_heads
    assert [a.shape for a in out.vision_to_text_attentions] == [(batch, heads, num_anchors, tokens)] * layers
    assert [a.shape for a in out.text_to_vision_attentions] == [(batch, heads, tokens, num_anchors)] * layers
    assert [a.shape for a in out.text_attentions] == [(batch, config.text_config.num_attention_heads, tokens, tokens)] * layers
    assert len(out.text_encoder_attentions) == config.text_config.num_hidden_layers
    assert len(out.backbone_attentions) == len(config.backbone_config.depths)
    for maps, axis in ((out.vision_to_text_attentions, -1), (out.text_to_vision_attentions, -1), (out.text_attentions, -1)):
        for probs in maps:  # probabilities: every row sums to 1
            assert torch.allclose(probs.sum(axis), torch.ones(()), atol=1e-5)
    # image positions never attend to padded words
    assert (out.vision_to_text_attentions[0][-1, :, :, 5:] == 0).all()

    with torch.no_grad():  # as `out` (with autograd on, the fusion's softmax takes its fused form: equal within 1e-6, not bit for bit)
        as_tuple = eager(**inputs, output_hidden_states=True, output_attentions=True, return_dict=False)
    assert len(as_tuple) == len(out.to_tuple()) and all(
        torch.equal(a, b) if torch.is_tensor(a) else len(a) == len(b) for a, b in zip(as_tuple, out.to_tuple())
    )


def test_sdpa_and_eager_give_the_same_outputs_and_the_head_stays_clamped(saved, eager):
    sdpa = GLIPModel.from_pretrained(saved, attn_implementation="sdpa").eval()
    assert sdpa.config.text_config._attn_implementation == "sdpa" and eager.config.text_config._attn_implementation == "eager"
    inputs = padded_inputs()
    with torch.no_grad():
        expected, actual = eager(**inputs), sdpa(**inputs)
    for name in ("logits", "pred_boxes", "centerness", "text_hidden_state"):
        assert (getattr(actual, name) - getattr(expected, name)).abs().max() <= ATOL, name
    for model in (eager, sdpa):
        # GLIP's head BERT layers clamp their scores before the mask (quirk 11.6): always the clamped eager function
        assert {layer.text_layer.attention.self.config._attn_implementation for layer in model.head.layers} == {CLAMPED_ATTENTION}
    sdpa.set_attn_implementation("eager")
    assert sdpa.config.text_config._attn_implementation == "eager"
    assert {layer.text_layer.attention.self.config._attn_implementation for layer in sdpa.head.layers} == {CLAMPED_ATTENTION}


def test_resize_token_embeddings_saves_reloads_and_runs(saved, tmp_path):
    model = GLIPModel.from_pretrained(saved).eval()
    old_vocab = model.config.text_config.vocab_size
    assert model.get_input_embeddings() is model.text_model.embeddings.word_embeddings
    model.resize_token_embeddings(old_vocab + 2)
    assert model.config.text_config.vocab_size == old_vocab + 2 and model.get_input_embeddings().num_embeddings == old_vocab + 2
    inputs = make_inputs()
    inputs["input_ids"][0, 3] = old_vocab + 1  # a new domain token
    with torch.no_grad():
        expected = model(**inputs)
    model.save_pretrained(tmp_path)
    reloaded = GLIPModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        actual = reloaded(**inputs)
    assert torch.equal(actual.logits, expected.logits)
    with pytest.raises(ValueError, match=f"outside the text encoder's range 0..{old_vocab + 1}"):
        reloaded(**{**inputs, "input_ids": inputs["input_ids"].index_fill(1, torch.tensor([2]), old_vocab + 2)})


def test_big_model_loading_with_cpu_and_disk_offload(saved, tmp_path):
    plain = GLIPModel.from_pretrained(saved).eval()
    size = sum(p.numel() * p.element_size() for p in plain.parameters())
    offloaded = GLIPModel.from_pretrained(saved, device_map="auto", max_memory={"cpu": size // 3}, offload_folder=str(tmp_path)).eval()
    placements = set(offloaded.hf_device_map.values())
    assert {"cpu", "disk"} <= placements, offloaded.hf_device_map
    # a fusion layer (and the backbone / text encoder blocks) is never split between placements
    for module in offloaded.hf_device_map:
        assert ".vl_fuse" not in module and ".dyconv" not in module and ".text_layer" not in module, module
    assert {"GLIPFusionLayer", "SwinStage", "BertLayer"} <= set(offloaded._no_split_modules)
    inputs = padded_inputs()
    with torch.no_grad():
        expected, actual = plain(**inputs), offloaded(**inputs)
    for name in ("logits", "pred_boxes", "centerness", "text_hidden_state"):
        assert (getattr(actual, name) - getattr(expected, name)).abs().max() <= ATOL, name


def test_torch_compile_fullgraph_matches_eager(eager):
    inputs = padded_inputs()
    compiled = torch.compile(eager, fullgraph=True)
    with torch.no_grad():
        expected, actual = eager(**inputs), compiled(**inputs)
    for name in ("logits", "pred_boxes", "centerness"):
        assert (getattr(actual, name) - getattr(expected, name)).abs().max() <= 1e-4, name
