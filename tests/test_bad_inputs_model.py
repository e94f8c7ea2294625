"""Bad input at the model's entry (`GLIPModel.forward`, `get_text_features`, `from_pretrained`): every kind is a
TypeError / ValueError that names the argument, never a crash deep in torch or NaN in the outputs."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from safetensors.torch import load_file, save_file

from modeling_glip.configuration_glip import GLIPConfig
from modeling_glip.dyconv import modulated_deform_conv2d
from modeling_glip.modeling_glip import GLIPModel
from tests.test_modeling_glip import make_inputs, make_labels, tiny_config

VOCAB = tiny_config().text_config.vocab_size  # 120


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GLIPModel(tiny_config()).eval()


def _nan_at(tensor, index=(0,)):
    tensor = tensor.clone()
    tensor[index] = float("nan")
    return tensor


@pytest.mark.parametrize(
    "change, error, message",
    [
        # images
        (lambda i: i.update(pixel_values=_nan_at(i["pixel_values"], (0, 0, 5, 5))), ValueError, "`pixel_values` contains NaN or infinite values \\(1 of"),
        (lambda i: i.update(pixel_values=i["pixel_values"].index_fill(3, torch.tensor([2]), float("inf"))), ValueError, "`pixel_values` contains NaN or infinite"),
        (lambda i: i.update(pixel_values=(i["pixel_values"] * 100).to(torch.uint8)), TypeError, "`pixel_values` must be a floating-point tensor, got dtype torch.uint8"),
        (lambda i: i.update(pixel_values=i["pixel_values"].tolist()), TypeError, "`pixel_values` must be a torch.Tensor, got list"),
        (lambda i: i.update(pixel_values=torch.zeros(1, 3, 0, 128)), ValueError, "non-empty canvas"),
        (lambda i: i.update(pixel_mask=torch.zeros(1, 96, 128, dtype=torch.long)), ValueError, "`pixel_mask` marks no image pixel for images \\[0\\]"),
        (lambda i: i.update(pixel_mask=torch.full((1, 96, 128), 2, dtype=torch.long)), ValueError, "`pixel_mask` must hold only 0 and 1"),
        (lambda i: i.update(pixel_mask=torch.ones(1, 96, 128)), TypeError, "`pixel_mask` must be an integer"),
        # text
        (lambda i: i.update(input_ids=i["input_ids"].index_fill(1, torch.tensor([3]), VOCAB)), ValueError, "`input_ids` holds ids \\[120\\] outside the text encoder's range 0..119"),
        (lambda i: i.update(input_ids=i["input_ids"].index_fill(1, torch.tensor([3]), -1)), ValueError, "`input_ids` holds ids \\[-1\\]"),
        (lambda i: i.update(input_ids=i["input_ids"].float()), TypeError, "`input_ids` must be an integer"),
        (lambda i: i.update(token_type_ids=torch.full((1, 7), 5)), ValueError, "`token_type_ids` holds ids \\[5\\] outside the text encoder's range 0..1"),
        (lambda i: i.update(attention_mask=torch.full((1, 7), 3)), ValueError, "`attention_mask` must hold only 0 and 1"),
        (lambda i: i.update(attention_mask=torch.ones(1, 7)), TypeError, "`attention_mask` must be an integer"),
    ],
)
def test_bad_model_inputs(model, change, error, message):
    inputs = make_inputs()
    change(inputs)
    with pytest.raises(error, match=message):
        model(**inputs)


def test_bad_text_encoder_hidden_state(model):
    inputs = make_inputs()
    features = model.get_text_features(inputs["input_ids"]).last_hidden_state
    with pytest.raises(ValueError, match="`text_encoder_hidden_state` contains NaN"):
        model(**inputs, text_encoder_hidden_state=_nan_at(features, (0, 2, 3)))
    with pytest.raises(TypeError, match="`text_encoder_hidden_state` must be a floating-point"):
        model(**inputs, text_encoder_hidden_state=features.long())
    with pytest.raises(ValueError, match="`input_ids` holds ids"):
        model.get_text_features(torch.full((1, 4), VOCAB + 7))


@pytest.mark.parametrize(
    "labels, error, message",
    [
        ({"boxes": [[0.5, 0.5, 0.2, 0.2]], "positive_map": torch.ones(1, 7)}, TypeError, "`labels\\[0\\]\\['boxes'\\]` must be a torch.Tensor, got list"),
        ({"boxes": torch.tensor([[0.5, 0.5, float("inf"), 0.2]]), "positive_map": torch.ones(1, 7)}, ValueError, "`labels\\[0\\]\\['boxes'\\]` contains NaN or infinite"),
        ({"boxes": torch.tensor([[0.5, 0.5, 0.0, 0.2]]), "positive_map": torch.ones(1, 7)}, ValueError, "zero or negative width / height"),
        ({"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "positive_map": torch.full((1, 7), 5.0)}, ValueError, "`labels\\[0\\]\\['positive_map'\\]` must hold only 0 and 1"),
        ({"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "positive_map": [[1] * 7]}, TypeError, "`labels\\[0\\]\\['positive_map'\\]` must be a torch.Tensor"),
        ({"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}, ValueError, "must be a dict with `boxes` and `positive_map`; got \\['boxes'\\]"),
        ([0.5, 0.5, 0.2, 0.2], ValueError, "must be a dict with `boxes` and `positive_map`; got list"),
    ],
)
def test_bad_labels(model, labels, error, message):
    with pytest.raises(error, match=message):
        model(**make_inputs(), labels=[labels])


def test_labels_must_be_a_list(model):
    with pytest.raises(TypeError, match="`labels` must be a list of dicts"):
        model(**make_inputs(), labels=make_labels()[0])


def test_a_checkpoint_with_non_finite_weights_is_refused_at_load(model, tmp_path):
    model.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    name = "head.layers.0.dyconv.offset.weight"  # a damaged byte in the deformable-conv offsets
    weights[name] = _nan_at(weights[name], (0, 0, 0, 0))
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"NaN or infinite values in 1 tensors \\({name}\\)"):
        GLIPModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_deformable_offsets_propagate_instead_of_crashing(bad):
    """NaN / inf inside the network (weights corrupted in memory, a half-precision overflow) never becomes a garbage tap
    index (an IndexError deep in embedding_bag, or a device-side assert on CUDA): it reaches the outputs, where
    post-processing refuses non-finite values with a clear error."""
    x = torch.randn(1, 4, 6, 6)
    offset = torch.zeros(1, 18, 6, 6)
    offset[0, 3, 2, 2] = bad
    out = modulated_deform_conv2d(x, offset, torch.ones(1, 9, 6, 6), torch.randn(4, 4, 3, 3), None, (1, 1), (1, 1), (1, 1))
    assert not torch.isfinite(out[0, :, 2, 2]).all()  # the output position that read the bad tap
    finite = torch.ones(6, 6, dtype=torch.bool)
    finite[2, 2] = False
    assert torch.isfinite(out[0][:, finite]).all()  # every other position is untouched


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"focal_alpha": 1.5}, r"focal_alpha must be in \[0, 1\], got 1.5"),
        ({"focal_gamma": -1.0}, r"focal_gamma must be a finite number >= 0, got -1.0"),
        ({"token_loss_weight": float("inf")}, r"token_loss_weight must be a finite number >= 0, got inf"),
        ({"fusion_embed_dim": 30, "fusion_num_heads": 4}, r"fusion_embed_dim 30 is not divisible by fusion_num_heads 4"),
        ({"anchor_sizes": (32, 64), "anchor_strides": (8, 16)}, r"GLIP predicts on 5 levels"),
        ({"score_aggregation": "sum"}, r"score_aggregation must be 'mean' or 'max', got 'sum'"),
    ],
)
def test_bad_config_values_are_refused_naming_the_field(fields, message):
    """GLIPConfig's class validators (transformers' strict-dataclass convention: StrictDataclassClassValidationError
    carrying the ValueError) run at construction and on `validate()` after a change."""
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        GLIPConfig(**fields)
    config = GLIPConfig()
    for name, value in fields.items():
        setattr(config, name, value)
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        config.validate()
