"""Bad inputs at the inference entry points: post-processing (grounded and stock paths), the one-pass pipeline and the
loading of GLIP configs. Each test feeds one kind of bad input and checks the error type and that the message names
the problem; the threshold tests check that reported scores never depend on the final `threshold`."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertTokenizer, pipeline

from modeling_glip import GLIPConfig, GLIPModel
from processing import GLIPImageProcessor, GLIPProcessor, GLIPZeroShotObjectDetectionPipeline, post_process_grounded
from processing.post_processing_glip import target_size_rows


@pytest.fixture(scope="module")
def processor(bert_vocab_dir):
    return GLIPProcessor(GLIPImageProcessor(min_size=64, max_size=96), BertTokenizer.from_pretrained(str(bert_vocab_dir)))


def synthetic_outputs(input_ids, seed=0):
    """Random model outputs for the rows of `input_ids` over 21 anchors (levels 4x4, 2x2 and 1x1)."""
    generator = torch.Generator().manual_seed(seed)
    rows, tokens = input_ids.shape
    centers = torch.rand(rows, 21, 2, generator=generator) * 0.8 + 0.1
    sizes = torch.rand(rows, 21, 2, generator=generator) * 0.3 + 0.05
    return {
        "logits": torch.randn(rows, 21, tokens, generator=generator) * 2,
        "pred_boxes": torch.cat((centers, sizes), dim=-1),
        "centerness": torch.randn(rows, 21, generator=generator),
        "spatial_shapes": torch.tensor([[4, 4], [2, 2], [1, 1]]),
        "image_sizes": torch.tensor([[80, 120]]).expand(rows, 2),
        "input_ids": input_ids,
    }


@pytest.fixture(scope="module")
def batch(processor):
    inputs = processor(text=[["cat", "remote control"], ["dog", "couch", "person"]])
    return inputs, synthetic_outputs(inputs["input_ids"])


def post_process(processor, batch, **kwargs):
    inputs, outputs = batch
    return processor.post_process_grounded_object_detection(outputs, inputs, **{"candidate_threshold": 0.0, **kwargs})


# --- post-processing: the outputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, index", [("logits", (1, 3, 1)), ("pred_boxes", (0, 7, 2)), ("centerness", (1, 20))])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_outputs_are_refused(processor, batch, field, index, bad):
    inputs, outputs = batch
    corrupted = {**outputs, field: outputs[field].clone()}
    corrupted[field][index] = bad
    with pytest.raises(ValueError, match=rf"`{field}` of text row {index[0]} hold 1 non-finite"):
        post_process(processor, (inputs, corrupted))


def test_non_finite_logits_of_unscored_tokens_are_ignored(processor, batch):
    """Padding / special tokens are not scored: a -inf there (a masking convention) changes nothing."""
    inputs, outputs = batch
    masked = {**outputs, "logits": outputs["logits"].clone()}
    masked["logits"][0, :, 0] = -math.inf  # [CLS] of row 0
    masked["logits"][0, :, -1] = math.nan  # padding of row 0 (the shorter prompt)
    assert inputs["attention_mask"][0, -1] == 0
    expected, actual = post_process(processor, batch), post_process(processor, (inputs, masked))
    assert all(torch.equal(e["scores"], a["scores"]) for e, a in zip(expected, actual))


def test_empty_image_is_refused(processor, batch):
    """An all-zero pixel_mask gives image_sizes (0, 0) and NaN pred_boxes: an error, never NaN boxes."""
    inputs, outputs = batch
    image_sizes = outputs["image_sizes"].clone()
    image_sizes[1] = 0
    with pytest.raises(ValueError, match=r"image_sizes.*all-zero pixel_mask"):
        post_process(processor, (inputs, {**outputs, "image_sizes": image_sizes}))


def test_outputs_of_another_prompt_are_refused(processor, batch):
    inputs, outputs = batch
    other = processor(text=[["car", "remote controls"], ["dog", "couch", "person"]])  # same token counts
    assert other["input_ids"].shape == inputs["input_ids"].shape
    with pytest.raises(ValueError, match="another prompt"):
        processor.post_process_grounded_object_detection(outputs, other)
    with pytest.raises(ValueError, match="another prompt"):
        post_process_grounded(outputs, inputs["positive_map"], input_ids=inputs["input_ids"][:, :-1])


def test_inputs_without_prompt_are_refused(processor, batch):
    _, outputs = batch
    with pytest.raises(ValueError, match=r"lacks \['positive_map'"):
        processor.post_process_grounded_object_detection(outputs, {"input_ids": outputs["input_ids"]})


def test_inconsistent_output_shapes_are_refused(processor, batch):
    inputs, outputs = batch
    with pytest.raises(ValueError, match=r"`centerness` must have shape \(2, 21\)"):
        post_process(processor, (inputs, {**outputs, "centerness": outputs["centerness"][:, :20]}))


# --- post-processing: the arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"max_detections": 0.5}, TypeError, "max_detections.*integer.*0.5"),
        ({"max_detections": True}, TypeError, "max_detections.*integer.*True"),
        ({"max_detections": -1}, ValueError, "max_detections"),
        ({"pre_nms_top_n": 10.0}, TypeError, "pre_nms_top_n.*integer"),
        ({"pre_nms_top_n": 0}, ValueError, "pre_nms_top_n.*>= 1"),
        ({"threshold": "0.3"}, TypeError, "threshold must be a number"),
        ({"threshold": 1.5}, ValueError, r"threshold must be in \[0, 1\]"),
        ({"threshold": math.nan}, ValueError, "threshold"),
        ({"candidate_threshold": 1.0}, ValueError, r"candidate_threshold must be in \[0, 1\)"),
        ({"nms_threshold": -0.1}, ValueError, "nms_threshold"),
        ({"score_aggregation": "median"}, ValueError, "score_aggregation"),
        ({"treshold": 0.3}, TypeError, "treshold"),
    ],
)
def test_bad_limits(processor, batch, kwargs, error, message):
    with pytest.raises(error, match=message):
        post_process(processor, batch, **kwargs)


@pytest.mark.parametrize(
    "target_sizes, expected",
    [
        ((150, 200), [(150, 200)]),
        ([150, 200], [(150, 200)]),
        (torch.tensor([150, 200]), [(150, 200)]),
        (torch.tensor([[150.0, 200.0]]), [(150, 200)]),
        (np.array([[150, 200]], dtype=np.int32), [(150, 200)]),
        ([torch.tensor([150, 200])], [(150, 200)]),
    ],
)
def test_target_sizes_forms_for_one_image(target_sizes, expected):
    assert target_size_rows(target_sizes, 1) == expected


@pytest.mark.parametrize(
    "target_sizes, error, message",
    [
        ((150, 200), ValueError, r"single \(height, width\) pair, but there are 2 images"),
        ([(150, 200)], ValueError, "one .height, width. pair per image .2., got 1"),
        ([(150, 200), (10, 0)], ValueError, r"target_sizes\[1\] must be a positive whole number"),
        ([(150, 200), (10.5, 20)], ValueError, r"target_sizes\[1\] must be a positive whole number.*10.5"),
        ([(150, 200), (True, 20)], ValueError, r"target_sizes\[1\]"),
        ([(150, 200), (10, 20, 30)], ValueError, r"target_sizes\[1\] must be a \(height, width\) pair"),
        (torch.tensor([[150, 200, 1], [1, 2, 3]]), ValueError, r"target_sizes\[0\] must be a \(height, width\) pair"),
        ("150x200", TypeError, "target_sizes must be a"),
    ],
)
def test_bad_target_sizes(processor, batch, target_sizes, error, message):
    with pytest.raises(error, match=message):
        post_process(processor, batch, target_sizes=target_sizes)


# --- threshold semantics ---------------------------------------------------------------------------------------------


def _as_set(result):
    return sorted(zip(result["scores"].tolist(), result["labels"].tolist(), map(tuple, result["boxes"].tolist())))


def test_threshold_cuts_final_scores_and_never_changes_them(processor, batch):
    everything = post_process(processor, batch, max_detections=3)
    scores = torch.cat([result["scores"] for result in everything])
    cut = scores.median().item()
    kept = post_process(processor, batch, max_detections=3, threshold=cut)
    for full, part in zip(everything, kept):
        assert (part["scores"] >= cut).all()
        assert _as_set(part) == [item for item in _as_set(full) if item[0] >= cut]  # same boxes, same scores
    assert sum(len(result["scores"]) for result in kept) < len(scores)


def test_stock_path_threshold_is_a_final_score_cut_and_checks_its_arguments(processor):
    """`GLIPImageProcessor.post_process_object_detection`, what transformers' stock pipeline calls (one label per row)."""
    inputs = processor.tokenizer(["cat", "remote control"], padding=True, return_tensors="pt")
    outputs = {**synthetic_outputs(inputs["input_ids"]), "attention_mask": inputs["attention_mask"]}
    image_processor = processor.image_processor
    everything = image_processor.post_process_object_detection(outputs, candidate_threshold=0.0)
    cut = torch.cat([result["scores"] for result in everything]).median().item()
    kept = image_processor.post_process_object_detection(outputs, threshold=cut, candidate_threshold=0.0)
    for full, part in zip(everything, kept):
        assert torch.equal(part["scores"], full["scores"][full["scores"] >= cut])
    assert sum(len(result["scores"]) for result in kept) > 0
    with pytest.raises(TypeError, match="max_detections"):
        image_processor.post_process_object_detection(outputs, max_detections=2.5)
    with pytest.raises(ValueError, match="single .height, width. pair, but there are 2"):
        image_processor.post_process_object_detection(outputs, target_sizes=(10, 20))
    with pytest.raises(ValueError, match="pred_boxes"):
        image_processor.post_process_object_detection({**outputs, "pred_boxes": outputs["pred_boxes"] * math.nan})


# --- the one-pass pipeline -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_pass(tiny_glip_checkpoint):
    return pipeline("zero-shot-object-detection", model=str(tiny_glip_checkpoint), pipeline_class=GLIPZeroShotObjectDetectionPipeline)


def random_image(height=60, width=90, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8"))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"batch_size": -1}, ValueError, "batch_size must be an integer >= 1, got -1"),
        ({"batch_size": 0}, ValueError, "batch_size must be an integer >= 1, got 0"),
        ({"batch_size": 2.0}, TypeError, "batch_size must be an integer"),
        ({"top_k": -1}, ValueError, "top_k must be an integer >= 1, got -1"),
        ({"top_k": 0}, ValueError, "top_k"),
        ({"top_k": 2.5}, TypeError, "top_k"),
        ({"treshold": 0.3}, TypeError, r"unexpected keyword argument\(s\) \['treshold'\]"),
        ({"num_workers": 2}, TypeError, "num_workers"),
        ({"threshold": 1.5}, ValueError, "threshold"),
        ({"candidate_threshold": -0.5}, ValueError, "candidate_threshold"),
        ({"max_detections": 0.5}, TypeError, "max_detections"),
        ({"timeout": -1}, ValueError, "timeout"),
        ({"candidate_labels": 5}, TypeError, "candidate_labels"),
        ({"candidate_labels": ["cat", "cat"]}, ValueError, "duplicate"),
    ],
)
def test_one_pass_pipeline_refuses_bad_arguments_before_running(one_pass, kwargs, error, message):
    calls = []
    handle = one_pass.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(error, match=message):
            one_pass([random_image(), random_image(seed=1)], **{"candidate_labels": ["cat", "dog"], **kwargs})
    finally:
        handle.remove()
    assert not calls


def test_one_pass_pipeline_refuses_unknown_constructor_arguments(tiny_glip_checkpoint):
    with pytest.raises(TypeError, match="treshold"):
        pipeline("zero-shot-object-detection", model=str(tiny_glip_checkpoint), pipeline_class=GLIPZeroShotObjectDetectionPipeline, treshold=0.3)


def test_one_pass_pipeline_names_an_image_too_elongated_to_resize(one_pass):
    with pytest.raises(ValueError, match="image 1: an image of 2x2000"):
        one_pass([random_image(), random_image(2, 2000)], candidate_labels=["cat"])


def test_one_pass_pipeline_scores_do_not_depend_on_threshold(one_pass):
    image, labels = random_image(), ["cat", "dog", "couch"]
    everything = one_pass(image, candidate_labels=labels, threshold=0.0)
    cut = float(np.median([d["score"] for d in everything]))
    kept = one_pass(image, candidate_labels=labels, threshold=cut)
    assert kept == [d for d in everything if d["score"] >= cut] and 0 < len(kept) < len(everything)
    assert one_pass(image, candidate_labels=labels, threshold=0.0, top_k=2) == everything[:2]


def test_stock_pipeline_threshold_is_a_final_score_cut(tiny_glip_checkpoint):
    detector = pipeline("zero-shot-object-detection", model=str(tiny_glip_checkpoint))
    everything = detector(random_image(), candidate_labels=["cat", "dog"], threshold=0.0)
    cut = float(np.median([d["score"] for d in everything]))
    kept = detector(random_image(), candidate_labels=["cat", "dog"], threshold=cut)
    assert kept and all(d["score"] >= cut for d in kept)
    assert sorted(d["score"] for d in kept) == sorted(d["score"] for d in everything if d["score"] >= cut)


# --- GLIP configs: fields the weights' outputs depend on -------------------------------------------------------------

from modeling_glip.configuration_glip import WEIGHT_DEPENDENT_FIELDS  # noqa: E402


@pytest.mark.parametrize("field", WEIGHT_DEPENDENT_FIELDS)
def test_config_dict_without_a_weight_dependent_field_is_refused(field):
    saved = GLIPConfig().to_dict()
    del saved[field]
    with pytest.raises(ValueError, match=rf"lacks \['{field}'\].*Add them to config.json"):
        GLIPConfig.from_dict(saved)
    assert getattr(GLIPConfig.from_dict(saved, **{field: getattr(GLIPConfig(), field)}), field) == getattr(GLIPConfig(), field)


def test_saved_config_without_anchor_sizes_is_refused_by_from_pretrained_and_auto(tmp_path):
    from transformers import AutoConfig, AutoModelForZeroShotObjectDetection

    GLIPConfig(anchor_sizes=(32, 64, 128, 256, 512)).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["anchor_sizes"], saved["box_coder_weights"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    for load in (GLIPConfig.from_pretrained, AutoConfig.from_pretrained, AutoModelForZeroShotObjectDetection.from_pretrained):
        with pytest.raises(ValueError, match=r"lacks \['anchor_sizes', 'box_coder_weights'\]"):
            load(tmp_path)


@pytest.mark.parametrize("make", [GLIPConfig, GLIPConfig.glip_t, GLIPConfig.glip_l, lambda: GLIPConfig(text_prompt_length=7, use_dyrelu=False)])
def test_every_saved_config_holds_every_weight_dependent_field(make, tmp_path):
    """transformers saves a diff against the base config; GLIP's fields must survive it, defaults included."""
    config = make()
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert [field for field in WEIGHT_DEPENDENT_FIELDS if field not in saved] == []
    config.to_json_file(tmp_path / "other.json")
    assert [field for field in WEIGHT_DEPENDENT_FIELDS if field not in json.loads((tmp_path / "other.json").read_text())] == []
    reloaded = GLIPConfig.from_pretrained(tmp_path)
    as_list = lambda value: list(value) if isinstance(value, tuple) else value  # noqa: E731  (JSON has no tuples)
    assert all(as_list(getattr(reloaded, field)) == as_list(getattr(config, field)) for field in WEIGHT_DEPENDENT_FIELDS[2:])


def test_bundled_demo_config_loads():
    from pathlib import Path

    config = GLIPConfig.from_pretrained(Path(__file__).resolve().parents[1] / "checkpoints" / "glip-demo")
    assert list(config.anchor_sizes) == [32, 64, 128, 256, 512]
