"""Evaluation: the COCO mAP and grounding recall `evaluate` modules (loaded offline from the repository), chunked
prompts in `predict_coco`, examples/evaluate_glip.py, examples/finetune_glip.py and building a model with a pretrained
text encoder."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import evaluate
import pytest
import torch
from safetensors.torch import load_file
from transformers import BertTokenizer

from modeling_glip.modeling_glip import GLIPModel
from processing import GLIPImageProcessor, GLIPProcessor
from processing.evaluation import coco_references, legacy_xyxy_to_coco, load_coco_evaluation_set, predict_coco
from tests.test_training_script import ENV, load_script
from tests.training_fixtures import grounding_record, make_detection_set, tiny_training_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def coco_metric():
    return evaluate.load(str(REPO / "metrics" / "coco_detection" / "coco_detection.py"))


@pytest.fixture(scope="module")
def recall_metric():
    return evaluate.load(str(REPO / "metrics" / "grounding_recall" / "grounding_recall.py"))


def reference(image_id, boxes, labels, crowd=None):
    return {"image_id": image_id, "boxes": boxes, "labels": labels, "iscrowd": crowd or [0] * len(boxes), "area": [b[2] * b[3] for b in boxes]}


def test_coco_metric(coco_metric):
    references = [reference(1, [[10, 10, 20, 20]], [3]), reference(2, [[30, 30, 25, 25], [0, 0, 60, 60]], [4, 4], [0, 1])]
    perfect = [
        {"image_id": 1, "boxes": [[10, 10, 20, 20]], "scores": [0.9], "labels": [3]},
        {"image_id": 2, "boxes": [[30, 30, 25, 25]], "scores": [0.8], "labels": [4]},
    ]
    assert coco_metric.compute(predictions=perfect, references=references)["mAP"] == pytest.approx(1.0)  # crowd ignored
    # a confident false positive ranked before the true positive of class 3: AP50 of class 3 = 0.5
    worse = [{**perfect[0], "boxes": [[40, 40, 10, 10], [10, 10, 20, 20]], "scores": [0.95, 0.5], "labels": [3, 3]}, perfect[1]]
    assert coco_metric.compute(predictions=worse, references=references)["mAP_50"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="no reference"):
        coco_metric.compute(predictions=[{**perfect[0], "image_id": 7}, perfect[1]], references=references)


def test_grounding_recall_metric(recall_metric):
    references = [{"boxes": [[0, 0, 10, 10]]}, {"boxes": [[0, 0, 10, 10], [20, 0, 30, 10]]}, {"boxes": [[0, 0, 4, 4]]}]
    predictions = [
        {"boxes": [[0, 0, 10, 10]]},  # hit at 1
        {"boxes": [[50, 50, 60, 60]] * 4 + [[20, 0, 30, 10]]},  # hit at 5 (second ground-truth box, "separate")
        {"boxes": []},  # miss
    ]
    result = recall_metric.compute(predictions=predictions, references=references)
    assert result == {"recall@1": pytest.approx(1 / 3), "recall@5": pytest.approx(2 / 3), "recall@10": pytest.approx(2 / 3), "num_phrases": 3}
    merged = recall_metric.compute(predictions=predictions, references=references, merge_boxes=True)
    assert merged["recall@5"] == pytest.approx(1 / 3)  # the enclosing box (0, 0, 30, 10) is not matched at IoU 0.5


GOOD_PREDICTION = {"image_id": 1, "boxes": [[10, 10, 20, 20]], "scores": [0.9], "labels": [3]}


@pytest.mark.parametrize(
    "prediction, reference, kwargs, message",
    [
        ({"boxes": [[float("nan"), 10, 20, 20]]}, {}, {}, r"prediction of image 1: boxes\[0\] = \[nan, .* not finite"),
        ({"boxes": [[10, 10, float("inf"), 20]]}, {}, {}, r"prediction of image 1: boxes\[0\]"),
        ({"scores": [float("nan")]}, {}, {}, r"prediction of image 1: scores\[0\] = nan"),
        ({"boxes": [[10, 10, -5, 20]]}, {}, {}, "prediction of image 1: .*negative width or height"),
        ({}, {"boxes": [[float("nan"), 10, 20, 20]]}, {}, r"reference of image 1: boxes\[0\] .* not finite"),
        ({}, {"boxes": [[10, 10, 20, -1]]}, {}, "reference of image 1: .*negative width or height"),
        ({}, {"area": [float("nan")]}, {}, r"reference of image 1: area\[0\]"),
        ({}, {"iscrowd": [2]}, {}, "iscrowd must be 0 or 1"),
        ({}, {}, {"max_detections": 0}, "max_detections must be an integer >= 10"),
        ({}, {}, {"max_detections": 50.5}, "max_detections"),
    ],
)
def test_coco_metric_refuses_bad_numbers(coco_metric, prediction, reference, kwargs, message):
    """A NaN box used to score as a perfect match (mAP 1.0)."""
    with pytest.raises(ValueError, match=message):
        coco_metric.compute(predictions=[{**GOOD_PREDICTION, **prediction}], references=[{**reference_of_image_1(), **reference}], **kwargs)


def reference_of_image_1():
    return reference(1, [[10, 10, 20, 20]], [3])


def test_coco_metric_refuses_an_image_predicted_twice(coco_metric):
    with pytest.raises(ValueError, match="image_id 1 appears in several predictions"):
        coco_metric.compute(predictions=[GOOD_PREDICTION, GOOD_PREDICTION], references=[reference_of_image_1(), reference(2, [[1, 1, 5, 5]], [3])])


@pytest.mark.parametrize(
    "predictions, references, kwargs, message",
    [
        ([{"boxes": [[0, 0, float("nan"), 10]]}], [{"boxes": [[0, 0, 10, 10]]}], {}, r"prediction of phrase 0: boxes\[0\] .* not finite"),
        ([{"boxes": [[0, 0, 10, 10]]}], [{"boxes": [[0, 0, 10, float("inf")]]}], {}, r"reference of phrase 0: boxes\[0\] .* not finite"),
        ([{"boxes": [[10, 0, 0, 10]]}], [{"boxes": [[0, 0, 10, 10]]}], {}, "x2 < x1"),
        ([{"boxes": [[0, 0, 10, 10]]}], [{"boxes": [[0, 0, 0, 10]]}], {}, "reference of phrase 0: boxes.0. has no area"),
        ([{"boxes": []}], [{"boxes": [[0, 0, 10, 10]]}], {"topk": (0, 5)}, "topk"),
        ([{"boxes": []}], [{"boxes": [[0, 0, 10, 10]]}], {"topk": (1, 1.5)}, "topk"),
        ([{"boxes": []}], [{"boxes": [[0, 0, 10, 10]]}], {"iou_threshold": 0.0}, "iou_threshold"),
        ([{"boxes": []}], [{"boxes": [[0, 0, 10, 10]]}], {"iou_threshold": float("nan")}, "iou_threshold"),
        ([{"boxes": []}], [{"boxes": [[0, 0, 10, 10]]}], {"merge_boxes": "yes"}, "merge_boxes"),
    ],
)
def test_grounding_recall_refuses_bad_numbers(recall_metric, predictions, references, kwargs, message):
    with pytest.raises(ValueError, match=message):
        recall_metric.compute(predictions=predictions, references=references, **kwargs)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, bert_vocab_dir):
    root = tmp_path_factory.mktemp("eval")
    make_detection_set(root, num_images=2, name="val.json")
    torch.manual_seed(0)
    model = GLIPModel(tiny_training_config(deterministic=True))
    model.save_pretrained(root / "model")
    BertTokenizer.from_pretrained(str(bert_vocab_dir)).save_pretrained(root / "model")
    return root


def test_predict_coco_with_chunked_prompts(saved_model, bert_vocab_dir):
    model = GLIPModel.from_pretrained(saved_model / "model").eval()
    processor = GLIPProcessor(GLIPImageProcessor(min_size=64, max_size=64), BertTokenizer.from_pretrained(str(bert_vocab_dir)))
    records, categories = load_coco_evaluation_set(saved_model / "val.json")
    whole = predict_coco(model, processor, records, categories, saved_model, candidate_threshold=0.0, max_detections=5)
    chunked = predict_coco(model, processor, records, categories, saved_model, names_per_chunk=1, candidate_threshold=0.0, max_detections=5)
    for one, split in zip(whole, chunked):
        assert one["image_id"] == split["image_id"] and len(one["boxes"]) == 5
        assert len(split["boxes"]) == 15  # 3 chunks x 5 detections, merged per image
        assert set(split["labels"]) == {11, 12, 13} and set(one["labels"]) <= {11, 12, 13}
    assert coco_references(records)[0]["labels"] == [a["category_id"] for a in records[0]["annotations"]]
    assert legacy_xyxy_to_coco(torch.tensor([[1.0, 2.0, 10.0, 20.0]])).tolist() == [[1.0, 2.0, 10.0, 19.0]]


def test_evaluate_script_detection_and_grounding(saved_model):
    script = load_script("evaluate_glip")
    common = ["--model", str(saved_model / "model"), "--images", str(saved_model), "--min_size", "64", "--max_size", "64"]
    results = script.main(common + ["--annotations", str(saved_model / "val.json"), "--names_per_chunk", "2", "--output", str(saved_model / "m.json")])
    assert set(results) >= {"mAP", "mAP_50", "mAR_100"} and json.loads((saved_model / "m.json").read_text()) == results
    record = grounding_record("val_0.png", "a red square and a blue square", [("red square", (1, 1, 20, 20)), ("blue square", (30, 30, 20, 20))])
    unboxed = {"id": 2, **{k: record[k] for k in ("file_name", "width", "height")}, "caption": "nothing to ground"}
    mdetr = {"images": [{"id": 1, **{k: record[k] for k in ("file_name", "width", "height", "caption")}}, unboxed],
             "annotations": [{"id": i + 1, "image_id": 1, **a} for i, a in enumerate(record["annotations"])]}
    (saved_model / "grounding.json").write_text(json.dumps(mdetr))
    results = script.main(common + ["--annotations", str(saved_model / "grounding.json"), "--task", "grounding"])
    assert results["images_without_phrases"] == 1  # counted, not silently dropped
    assert results["num_phrases"] == 2 and 0.0 <= results["recall@1"] <= results["recall@5"] <= results["recall@10"] <= 1.0


def test_finetune_script_prompt_tuning(saved_model):
    output = saved_model / "ft"
    argv = [
        sys.executable, str(REPO / "examples" / "finetune_glip.py"), "--cpu", "--model_name_or_path", str(saved_model / "model"),
        "--tuning", "prompt", "--train_annotations", str(saved_model / "val.json"), "--train_images", str(saved_model),
        "--max_steps", "2", "--per_device_batch_size", "2", "--num_workers", "0", "--min_sizes", "64", "--max_size", "64",
        "--output_dir", str(output),
    ]
    result = subprocess.run(argv, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    before = load_file(str(saved_model / "model" / "model.safetensors"))
    after = load_file(str(output / "model" / "model.safetensors"))
    assert set(after) - set(before) == {"text_prompt"} and after["text_prompt"].abs().sum() > 0
    assert all(torch.equal(before[key], after[key]) for key in before)  # everything else frozen
    run_config = json.loads((output / "run_config.json").read_text())
    assert run_config["learning_rate"] == 0.05 and run_config["weight_decay"] == 0.25 and run_config["max_negatives"] == -1


def test_new_model_with_a_pretrained_text_encoder(bert_vocab_dir, tmp_path):
    script = load_script()
    tiny_training_config().to_json_file(tmp_path / "config.json")
    args = argparse.Namespace(
        model_name_or_path=None, config=str(tmp_path / "config.json"), timm_backbone="resnet10t", text_encoder=str(bert_vocab_dir), tuning="full",
        config_overrides="focal_alpha=0.5",
    )
    model = script.build_model(args)
    assert model.config.text_config.hidden_size == 384 and model.config.text_config.num_hidden_layers == 6
    assert model.config.focal_alpha == 0.5 and model.criterion.focal_alpha == 0.5  # --config_overrides reaches the loss
    assert model.head.dot_product_projection_text.in_features == 384 and type(model.backbone).__name__ == "TimmBackbone"
    reference = load_file(str(bert_vocab_dir / "model.safetensors"))
    key = next(k for k in reference if k.endswith("embeddings.word_embeddings.weight"))
    assert torch.equal(model.text_model.embeddings.word_embeddings.weight, reference[key])
    with pytest.raises(ValueError, match="neither a preset"):
        script.build_model(argparse.Namespace(**{**vars(args), "config": "nope"}))


def test_config_overrides_of_a_checkpoint_keep_its_weights_or_are_refused(tiny_glip_checkpoint):
    """From a checkpoint, an override of a loss / assignment field loads every weight (prompt tuning's new offsets
    aside); one that changes the architecture is a ValueError naming the flag, not a model with layers silently
    new (more fusion layers) or weights re-initialised (another width)."""
    script = load_script()
    args = argparse.Namespace(model_name_or_path=str(tiny_glip_checkpoint), config=None, tuning="prompt", config_overrides="focal_alpha=0.5,atss_topk=5")
    model = script.build_model(args)
    reference = GLIPModel.from_pretrained(tiny_glip_checkpoint)
    assert (model.criterion.focal_alpha, model.config.atss_topk, model.text_prompt.shape[0]) == (0.5, 5, 1000)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in reference.state_dict().items())
    for override in (f"num_fusion_layers={reference.config.num_fusion_layers + 1}", f"fusion_embed_dim={2 * reference.config.fusion_embed_dim}"):
        with pytest.raises(ValueError, match=rf"--config_overrides '{override}' changes the weights of .* tensors"):
            script.build_model(argparse.Namespace(**{**vars(args), "config_overrides": override}))
