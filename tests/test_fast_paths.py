"""Every fast path of the model against a literal transcription of the original computation (small sizes, fp32).

The whole model is also checked against the original's own fixture in test_parity_original.py; these tests cover
the corner cases the fixture does not reach (active clamps, padded tokens, out-of-bounds deformable taps, batches).
"""

import pytest
import torch
from torch import nn
from torchvision.ops import deform_conv2d

from modeling_glip.configuration_glip import GLIPConfig
from modeling_glip.dyconv import DyConv, ModulatedDeformConv2d, modulated_deform_conv2d
from modeling_glip.modeling_glip import GLIPModel
from modeling_glip.vl_fusion import TEXT_MASK_FILL, BiMultiHeadAttention, explicit_softmax, explicit_softmax_applies
from tests.test_modeling_glip import make_inputs, tiny_config

ATOL = 1e-4


def reference_bi_attention(attn: BiMultiHeadAttention, vision, text, text_attention_mask):
    """The original's per-head BiMultiHeadAttention (glip_architecture.md 5.2), dropout off: (delta_vision,
    delta_text, image->text probabilities (B, heads, N, T), text->image probabilities (B, heads, T, N))."""
    heads, head_dim = attn.num_heads, attn.head_dim

    def linear(module, x):  # the plain projection (our image-side modules apply their weights in folded forms)
        return nn.functional.linear(x, module.weight, module.bias)

    def split(x):  # (B, L, E) -> (B, heads, L, head_dim)
        return x.view(x.shape[0], x.shape[1], heads, head_dim).transpose(1, 2)

    def merge(x):  # (B, heads, L, head_dim) -> (B, L, E)
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], heads * head_dim)

    query = split(linear(attn.v_proj, vision) * attn.scale)
    key, value_vision, value_text = split(attn.l_proj(text)), split(linear(attn.values_v_proj, vision)), split(attn.values_l_proj(text))
    scores = (query @ key.transpose(-1, -2)).clamp(-attn.clamp_value, attn.clamp_value)
    scores_text = scores.transpose(-1, -2)
    scores_text = (scores_text - scores_text.amax(dim=-1, keepdim=True)).clamp(-attn.clamp_value, attn.clamp_value)
    mask = text_attention_mask.to(scores.dtype).masked_fill(text_attention_mask == 0, TEXT_MASK_FILL)  # +1 / -9e15
    probs_vision = (scores + mask[:, None, None, :]).softmax(dim=-1)
    probs_text = scores_text.softmax(dim=-1)
    delta_vision = linear(attn.out_v_proj, merge(probs_vision @ value_text))
    return delta_vision, attn.out_l_proj(merge(probs_text @ value_vision)), probs_vision, probs_text


def make_attention(clamp_value=50000.0, weight_std=0.05, seed=0):
    torch.manual_seed(seed)
    attn = BiMultiHeadAttention(64, 48, 256, 8, dropout=0.1, clamp_value=clamp_value).eval()
    for parameter in attn.parameters():
        nn.init.normal_(parameter, std=weight_std)
    return attn


def attention_inputs(batch=2, positions=300, tokens=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    vision = torch.randn(batch, positions, 64, generator=generator)
    text = torch.randn(batch, tokens, 48, generator=generator)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[1, 6:] = 0  # the second prompt is padded
    return vision, text, mask


def max_diff(actual, expected):
    return max((a - e).abs().max().item() for a, e in zip(actual, expected))


def test_bi_attention_matches_the_original_form():
    attn = make_attention()
    inputs = attention_inputs()
    with torch.no_grad():
        assert max_diff(attn(*inputs), reference_bi_attention(attn, *inputs)) < ATOL


def test_bi_attention_with_active_clamps():
    """Scores beyond +-clamp (both clamps of the original bite) are handled exactly like the original."""
    attn = make_attention(clamp_value=1000.0, weight_std=4.0)
    inputs = attention_inputs()
    with torch.no_grad():
        query = (nn.functional.linear(inputs[0], attn.v_proj.weight, attn.v_proj.bias) * attn.scale).view(2, 300, 1, 8, 32)
        key = attn.l_proj(inputs[1]).view(2, 1, 9, 8, 32)
        assert (query * key).sum(-1).abs().max() > 3000  # beyond both clamps of the text->image side
        expected = reference_bi_attention(attn, *inputs)
        assert max_diff(attn(*inputs), expected) <= ATOL * max(1.0, max(e.abs().max().item() for e in expected))


def test_bi_attention_gradients_match():
    attn = make_attention()
    attn.dropout = 0.0
    attn.train()
    inputs = attention_inputs(positions=120)
    vision = inputs[0].clone().requires_grad_(True)
    grads = []
    for function in (attn, lambda *args: reference_bi_attention(attn, *args)):
        attn.zero_grad()
        vision.grad = None
        delta_vision, delta_text = function(vision, *inputs[1:])[:2]
        (delta_vision.square().sum() + delta_text.square().sum()).backward()
        grads.append([vision.grad.clone()] + [p.grad.clone() for p in attn.parameters()])
    assert max_diff(*grads) < ATOL


@pytest.mark.parametrize("dim", [1, -1])
def test_explicit_softmax_is_torch_softmax(dim):
    scores = torch.randn(2, 500, 24, generator=torch.Generator().manual_seed(0)) * 30
    scores[0, :, 3] = 50000.0  # a column / row of equal, clamped scores
    expected = scores.double().softmax(dim)
    assert (explicit_softmax(scores, dim, in_place=False).double() - expected).abs().max() < 1e-6
    copy = scores.clone()
    result = explicit_softmax(copy, dim, in_place=True)
    assert result.data_ptr() == copy.data_ptr() and (result.double() - expected).abs().max() < 1e-6


def test_explicit_softmax_applies_to_fp32_cpu_inference_only():
    scores = torch.randn(1, 4, 6)
    assert explicit_softmax_applies(scores)
    assert not explicit_softmax_applies(scores.bfloat16())
    assert not explicit_softmax_applies(scores.requires_grad_(True))
    with torch.no_grad():
        assert explicit_softmax_applies(scores)


def test_bi_attention_softmax_forms_are_one_function():
    """The explicit softmax passes (inference) and torch.softmax (autograd) give the same attention."""
    attn = make_attention(clamp_value=1000.0, weight_std=1.0)
    vision, text, mask = attention_inputs()
    with torch.no_grad():
        explicit = attn(vision, text, mask)
    fused = [output.detach() for output in attn(vision.clone().requires_grad_(True), text, mask)]
    assert max_diff(explicit, fused) <= 1e-6 * max(1.0, max(output.abs().max().item() for output in fused))


def test_bi_attention_rejects_a_clamp_too_small_for_its_softmax():
    with pytest.raises(ValueError, match="clamp_value"):
        BiMultiHeadAttention(64, 48, 256, 8, dropout=0.1, clamp_value=10.0)


def test_bi_attention_bfloat16_stays_finite_with_huge_scores():
    attn = make_attention(clamp_value=50000.0, weight_std=3.0).to(torch.bfloat16)
    vision, text, mask = attention_inputs()
    with torch.no_grad():
        delta_vision, delta_text, _, _ = attn(vision.bfloat16() * 100, text.bfloat16() * 100, mask)
    assert torch.isfinite(delta_vision).all() and torch.isfinite(delta_text).all()


def deform_inputs(stride, batch=2, channels=16, size=(11, 14), offset_scale=4.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *size, generator=generator)
    out_size = [(s + 2 - 3) // stride + 1 for s in size]
    offset = torch.randn(batch, 18, *out_size, generator=generator) * offset_scale  # many taps fall outside the map
    offset[0, :, 0, 0] = torch.tensor([-1.0, 0.0, 0.0, -1.0, -2.0, -1.5, 11.0, 0.0, 0.0, 14.0, 10.5, 13.5] + [0.5] * 6)  # exact borders
    mask = torch.rand(batch, 9, *out_size, generator=generator)
    weight = torch.randn(8, channels, 3, 3, generator=generator) * 0.1
    bias = torch.randn(8, generator=generator)
    return x, offset, mask, weight, bias


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_deformable_conv_matches_torchvision(stride, channels_last):
    x, offset, mask, weight, bias = deform_inputs(stride)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = deform_conv2d(x, offset, weight, bias, stride=stride, padding=1, mask=mask)
    actual = modulated_deform_conv2d(x, offset, mask, weight, bias, (stride, stride), (1, 1), (1, 1))
    assert (actual - expected).abs().max() < ATOL


def test_deformable_conv_gradients_match_torchvision():
    tensors = [t.double().requires_grad_(True) for t in deform_inputs(1, offset_scale=1.5)]
    x, offset, mask, weight, bias = tensors
    grads = []
    for result in (
        deform_conv2d(x, offset, weight, bias, padding=1, mask=mask),
        modulated_deform_conv2d(x, offset, mask, weight, bias, (1, 1), (1, 1), (1, 1)),
    ):
        grads.append(torch.autograd.grad(result.square().sum(), tensors))
    assert max_diff(*grads) < 1e-8


def test_dyconv_matches_torchvision_with_the_mis_sized_offsets():
    """DyConv with its deformable convs run by torchvision (the reference) vs our kernel, mis-sized offsets included."""
    config = GLIPConfig(hidden_size=32, group_norm_num_groups=4)
    torch.manual_seed(0)
    dyconv = DyConv(config).eval()
    nn.init.normal_(dyconv.offset.weight, std=0.3)  # non-trivial offsets (they start at zero)
    features = [torch.randn(2, 32, h, w) for h, w in ((20, 28), (10, 14), (5, 7), (3, 4), (2, 2))]
    with torch.no_grad():
        actual = dyconv(features)
        for conv in dyconv.convs:
            conv.conv.forward = lambda x, offset, mask, conv=conv.conv: deform_conv2d(
                x, offset, conv.weight, conv.bias, stride=conv.stride, padding=conv.padding, mask=mask
            )
        expected = dyconv(features)
    assert max_diff(actual, expected) < ATOL


def test_deformable_conv_in_bfloat16_runs_in_float32():
    x, offset, mask, weight, bias = deform_inputs(1)
    conv = ModulatedDeformConv2d(16, 8, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        expected = conv(x, offset, mask)
        conv.to(torch.bfloat16)
        actual = conv(x.bfloat16(), offset.bfloat16(), mask.bfloat16())
    assert actual.dtype == torch.bfloat16 and torch.isfinite(actual).all()
    assert (actual.float() - expected).abs().max() < 0.1


def test_deformable_conv_forms_are_one_function_in_the_whole_model(tiny_model):
    """`deformable_conv_implementation` picks a form; "auto" is embedding_bag on CPU and torchvision elsewhere."""
    inputs = make_inputs(batch=2, tokens=6)
    torchvision_form = GLIPModel(tiny_config(deformable_conv_implementation="torchvision")).eval()
    torchvision_form.load_state_dict(tiny_model.state_dict())
    with torch.no_grad():
        expected, actual = torchvision_form(**inputs), tiny_model(**inputs)
    for name in ("logits", "pred_boxes", "centerness"):
        assert max_diff(getattr(actual, name), getattr(expected, name)) < ATOL, name
    convs = [module for module in tiny_model.modules() if isinstance(module, ModulatedDeformConv2d)]
    assert convs and all(conv.implementation == "auto" and not conv.uses_torchvision(torch.device("cpu")) for conv in convs)
    assert all(conv.uses_torchvision(torch.device("cuda")) for conv in convs)
    assert all(conv.uses_torchvision(torch.device("cpu")) for conv in torchvision_form.modules() if isinstance(conv, ModulatedDeformConv2d))
    with pytest.raises(Exception, match="deformable_conv_implementation"):  # huggingface_hub's strict-dataclass error
        tiny_config(deformable_conv_implementation="cudnn")


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return GLIPModel(tiny_config()).eval()


def test_precomputed_text_features_give_the_same_outputs(tiny_model):
    inputs = make_inputs(batch=2, tokens=6)
    inputs["attention_mask"][1, 4:] = 0
    with torch.no_grad():
        expected = tiny_model(**inputs)
        features = tiny_model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
        from_tensor = tiny_model(**inputs, text_encoder_hidden_state=features.last_hidden_state)
        from_output = tiny_model(**inputs, text_encoder_hidden_state=features)
    assert features.last_hidden_state.shape == (2, 6, tiny_model.config.text_config.hidden_size)
    for actual in (from_tensor, from_output):
        for name in ("logits", "pred_boxes", "centerness", "text_hidden_state"):
            assert torch.equal(getattr(actual, name), getattr(expected, name)), name


def test_precomputed_text_features_of_the_wrong_shape_are_a_clear_error(tiny_model):
    inputs = make_inputs(batch=2, tokens=6)
    text = tiny_model.get_text_features(inputs["input_ids"]).last_hidden_state
    for bad in (text[:1], text[:, :5], text[..., :-1]):
        with pytest.raises(ValueError, match="text_encoder_hidden_state"):
            tiny_model(**inputs, text_encoder_hidden_state=bad)
    with pytest.raises(ValueError, match="input_ids"):
        tiny_model.get_text_features(inputs["input_ids"][0])


def test_chunked_rows_share_one_backbone_pass(tiny_model):
    """Chunked vocabulary: rows 0-2 are prompts of the first image, row 3 of the second (`chunk_to_image`)."""
    first, second = make_inputs(seed=1), make_inputs(seed=2)
    pixel_values = torch.cat([first["pixel_values"], second["pixel_values"]])
    input_ids = torch.randint(5, 120, (4, 7), generator=torch.Generator().manual_seed(3))
    chunk_to_image = torch.tensor([0, 0, 0, 1])
    calls = []
    hook = tiny_model.backbone.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            batched = tiny_model(pixel_values, input_ids, chunk_to_image=chunk_to_image)
    finally:
        hook.remove()
    assert calls == [2] and batched.logits.shape[0] == 4
    with torch.no_grad():
        for row, image in enumerate(chunk_to_image.tolist()):
            alone = tiny_model(pixel_values[image : image + 1], input_ids[row : row + 1])
            assert (batched.logits[row] - alone.logits[0]).abs().max() < ATOL
            assert (batched.pred_boxes[row] - alone.pred_boxes[0]).abs().max() < ATOL


def test_chunk_to_image_is_validated(tiny_model):
    inputs = make_inputs(batch=2)
    with pytest.raises(ValueError, match="Batch size mismatch"):
        tiny_model(inputs["pixel_values"][:1], inputs["input_ids"])
    for bad, message in ((torch.tensor([0]), "shape \\(2,\\)"), (torch.tensor([0, 2]), "outside 0..1")):
        with pytest.raises(ValueError, match=message):
            tiny_model(inputs["pixel_values"], inputs["input_ids"], chunk_to_image=bad)
    with pytest.raises(TypeError, match="`chunk_to_image` must be an integer"):
        tiny_model(inputs["pixel_values"], inputs["input_ids"], chunk_to_image=torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_half_precision_model_stays_finite_and_close(tiny_model, dtype, tolerance):
    """bf16 / fp16 inference on CPU through every fast path (clamps kept; deformable convs in float32)."""
    half = GLIPModel(tiny_model.config).eval()
    half.load_state_dict(tiny_model.state_dict())
    half.to(dtype)
    inputs = make_inputs(batch=2)
    with torch.no_grad():
        out, reference = half(**inputs), tiny_model(**inputs)
    assert out.logits.dtype == dtype
    for name in ("logits", "pred_boxes", "centerness", "text_hidden_state"):
        assert torch.isfinite(getattr(out, name)).all(), name
    assert (out.logits.float() - reference.logits).abs().max() < tolerance
