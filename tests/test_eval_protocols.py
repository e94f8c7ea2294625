"""The LVIS evaluation routine (processing/lvis_evaluation.py) and the ODinW script (examples/evaluate_odinw.py) on tiny
synthetic data sets and the bundled demo checkpoint."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from processing import GLIPProcessor
from processing.lvis_evaluation import (
    DetectionCache,
    cached_predictions,
    load_lvis_evaluation_set,
    lvis_detector,
    run_detection,
    xyxy_to_lvis_xywh,
)

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "glip-demo"


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


shapes = _load("synthetic_shapes", ROOT / "examples" / "synthetic_shapes.py")
sys.path.insert(0, str(ROOT / "examples"))
odinw = _load("evaluate_odinw", ROOT / "examples" / "evaluate_odinw.py")


@pytest.fixture(scope="module")
def demo():
    from modeling_glip.modeling_glip import GLIPModel

    return GLIPModel.from_pretrained(CHECKPOINT).eval(), GLIPProcessor.from_pretrained(CHECKPOINT)


def lvis_file(tmp_path, images=3):
    """A tiny LVIS-format set: images of 40 x 30 px, one box each, federated fields, v1-style coco_url."""
    folder = tmp_path / "val2017"
    folder.mkdir()
    entries, annotations = [], []
    for image_id in range(1, images + 1):
        Image.new("RGB", (40, 30), (image_id * 40, 0, 0)).save(folder / f"{image_id:012d}.jpg")
        entries.append(
            {
                "id": image_id,
                "coco_url": f"http://images.cocodataset.org/val2017/{image_id:012d}.jpg",
                "neg_category_ids": [3],
                "not_exhaustive_category_ids": [],
            }
        )
        annotations.append({"id": image_id, "image_id": image_id, "bbox": [2, 2, 10, 10], "area": 100.0, "category_id": 1 + image_id % 2})
    categories = [{"id": i, "name": n, "frequency": f} for i, n, f in ((1, "red square", "r"), (2, "blue circle", "c"), (3, "green star", "f"))]
    path = tmp_path / "lvis_minival.json"
    path.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": categories}))
    return path


class CountingDetector:
    """Stands in for the model: one fixed detection per image (xyxy), counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        boxes, scores = torch.tensor([[2.0, 2.0, 12.0, 12.0], [0.0, 0.0, 5.0, 5.0]]), torch.tensor([0.9, 0.2])
        return [{"boxes": boxes, "scores": scores, "labels": torch.tensor([0, 1]), "text_labels": ["a", "b"]} for _ in images]


def test_lvis_set_cache_resume_and_skipped_images(tmp_path):
    records, categories, references = load_lvis_evaluation_set(lvis_file(tmp_path))
    assert [r["file_name"] for r in records] == [f"val2017/{i:012d}.jpg" for i in (1, 2, 3)]
    assert [c["frequency"] for c in categories] == ["r", "c", "f"] and references[0]["neg_category_ids"] == [3]
    (tmp_path / records[2]["file_name"]).write_bytes(b"not an image")  # a damaged file: skipped and counted
    settings = {"model": "m", "names_per_chunk": 40}
    cache = DetectionCache(tmp_path / "cache", settings)
    detector = CountingDetector()
    ids = [c["id"] for c in categories]
    first = run_detection(detector, records[:1], ids, cache, tmp_path, progress=False)
    again = run_detection(detector, records, ids, DetectionCache(tmp_path / "cache", settings), tmp_path, progress=False)  # resumed
    assert first == {"computed": 1, "cached": 0, "skipped": {}}
    assert again["computed"] == 1 and again["cached"] == 1 and list(again["skipped"]) == [3] and detector.calls == 2
    assert not list((tmp_path / "cache").glob(".*tmp"))  # atomic writes leave no temporary files
    cached = cache.get(1)
    assert torch.equal(cached["boxes"], torch.tensor([[2.0, 2.0, 10.0, 10.0], [0.0, 0.0, 5.0, 5.0]]))  # xywh, no +1
    assert cached["labels"].tolist() == [1, 2]  # name indices -> category ids
    with pytest.raises(ValueError, match=r"other settings \(names_per_chunk: cached 40, now 20\)"):
        DetectionCache(tmp_path / "cache", {"model": "m", "names_per_chunk": 20})
    cache.path(2).write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match=r"2.safetensors cannot be read .*delete the file"):
        cache.get(2)


def test_cached_predictions_apply_the_protocol_caps(tmp_path):
    cache = DetectionCache(tmp_path, {})
    box = torch.tensor([[0.0, 0.0, 4.0, 4.0]])
    cache.put(1, box.repeat(3, 1), torch.tensor([0.5, 0.75, 0.5]), torch.tensor([7, 7, 8]))  # float32-exact
    cache.put(2, box.repeat(2, 1), torch.tensor([0.875, 0.5]), torch.tensor([7, 8]))
    standard = cached_predictions(cache, [1, 2, 3], "standard", max_detections=2)
    assert [p["scores"] for p in standard] == [[0.75, 0.5], [0.875, 0.5], []]  # image 3 has no file: no detections
    assert [p["labels"] for p in standard] == [[7, 7], [7, 8], []]  # the tie at .5 keeps the earlier detection
    fixed = cached_predictions(cache, [1, 2], "fixed", max_detections_per_category=1)
    assert [(p["scores"], p["labels"]) for p in fixed] == [([0.5], [8]), ([0.875], [7])]  # category 8: tie -> image 1
    with pytest.raises(ValueError, match="protocol must be 'standard' or 'fixed', got 'pooled'"):
        cached_predictions(cache, [1], "pooled")


def test_chunked_detector_reuses_text_features_exactly(demo, monkeypatch):
    model, processor = demo
    names = [c["name"] for c in shapes.categories()][:6]
    image, _ = shapes.render_scene(shapes.scene_for(0, "test_seen", 0))
    text_passes = []
    encode = model.get_text_features
    monkeypatch.setattr(model, "get_text_features", lambda **kwargs: text_passes.append(1) or encode(**kwargs))
    detector = lvis_detector(model, processor, names, names_per_chunk=4, max_detections=50)
    (first,), (again,) = detector([image]), detector([image])
    assert len(text_passes) == 1  # the text encoder ran once for both images
    inputs = processor(images=[image], text=names, names_per_chunk=4)
    assert inputs["input_ids"].shape[0] == 2  # 6 names in chunks of 4
    with torch.no_grad():
        outputs = model(**inputs)
        direct = processor.post_process_grounded_object_detection(outputs, inputs, target_sizes=[(image.height, image.width)], max_detections=50)[0]
    for key in ("boxes", "scores", "labels"):
        assert torch.allclose(again[key].float(), direct[key].float(), atol=1e-5), key
        assert torch.equal(first[key], again[key])
    assert len(first["scores"]) > 0 and first["text_labels"] == direct["text_labels"]
    assert torch.equal(xyxy_to_lvis_xywh(torch.tensor([[1.0, 2.0, 4.0, 8.0]])), torch.tensor([[1.0, 2.0, 3.0, 6.0]]))


def odinw_root(tmp_path):
    """Two tiny ODinW-style data sets (synthetic shapes, two images each) named as members of ODinW-13."""
    root = tmp_path / "odinw"
    for seed, name in enumerate(("pothole", "Raccoon_Raccoon.v2-raw.coco")):
        folder = root / name
        shapes.write_split(folder, "test_seen", 2, 160, seed)
        data = json.loads((folder / "test_seen_detection.json").read_text())
        used = {a["category_id"] for a in data["annotations"]}
        data["categories"] = [c for c in data["categories"] if c["id"] in used]  # a short prompt: fast
        (folder / "annotations.json").write_text(json.dumps(data))
    return root


def test_evaluate_odinw_with_the_demo_checkpoint(tmp_path, capsys):
    root = odinw_root(tmp_path)
    name = json.loads((root / "pothole" / "annotations.json").read_text())["categories"][0]["name"]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"pothole": {name: name}}))
    output = tmp_path / "odinw.json"
    argv = ["evaluate", "--model", str(CHECKPOINT), "--odinw_root", str(root), "--prompts", str(prompts), "--output", str(output)]
    results = odinw.main(argv + ["--device", "cpu", "--max_images", "1"])
    assert set(results["datasets"]) == {"pothole", "Raccoon_Raccoon.v2-raw.coco"}
    assert all(0.3 < metrics["mAP"] <= 1 for metrics in results["datasets"].values())  # the demo model knows the shapes
    average = results["averages"]["ODinW-13"]
    assert average["datasets"] == 2 and not average["complete"]
    assert average["mAP"] == pytest.approx(sum(m["mAP"] for m in results["datasets"].values()) / 2)
    assert json.loads(output.read_text()) == results
    assert "partial: 2 of 13" in capsys.readouterr().out


def test_odinw_prompt_overrides_reach_the_prompt(tmp_path, monkeypatch):
    root = odinw_root(tmp_path)
    seen = {}
    def predict_coco(model, processor, records, categories, *args, **kwargs):
        seen[len(seen)] = [category["name"] for category in categories]
        return []

    monkeypatch.setattr(odinw, "predict_coco", predict_coco)
    monkeypatch.setattr(odinw.evaluate, "load", lambda path: type("Metric", (), {"compute": staticmethod(lambda **kwargs: {"mAP": 0.5})})())
    datasets = odinw.find_datasets(str(root), None)
    categories = json.loads((root / "pothole" / "annotations.json").read_text())["categories"]
    prompts = {"pothole": {categories[0]["name"]: "a hole in the road"}}
    results = odinw.evaluate_datasets(None, None, datasets, prompts, {"candidate_threshold": 0.05, "max_detections": 100})
    assert seen[1][0] == "a hole in the road" and seen[1][1:] == [c["name"] for c in categories[1:]]  # sorted: Raccoon first
    assert set(results) == {"pothole", "Raccoon_Raccoon.v2-raw.coco"}


@pytest.mark.parametrize(
    "prompts, message",
    [
        ({"Aquarium": {"fish": "fish"}}, "data set 'Aquarium' is not among the evaluated ones"),
        ({"pothole": {"unicorn": "a unicorn"}}, "'pothole' has no category 'unicorn'"),
        ({"pothole": []}, "the entry of 'pothole' must be an object"),
    ],
)
def test_odinw_bad_prompts_are_refused_before_loading_a_model(tmp_path, capsys, prompts, message):
    root = odinw_root(tmp_path)
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(prompts))
    with pytest.raises(SystemExit):
        odinw.main(["evaluate", "--model", str(tmp_path / "no_model"), "--odinw_root", str(root), "--prompts", str(path)])
    assert message in capsys.readouterr().err


def test_few_shot_command_refuses_a_file_that_is_not_coco(tmp_path, capsys):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"images": []}))
    for annotations, message in ((path, "is not a COCO detection file"), (tmp_path / "missing.json", "is not a file")):
        with pytest.raises(SystemExit):
            odinw.main(["few_shot", "--annotations", str(annotations), "--output_dir", str(tmp_path / "out")])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        odinw.main(["few_shot", "--annotations", str(path), "--output_dir", str(tmp_path / "out"), "--shots", "0"])
    assert "--shots must be positive" in capsys.readouterr().err


def test_few_shot_sampler(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png"} for i in range(1, 21)]
    # category 1 in every image, category 2 in images 1-4 only, category 3 in image 20 only
    annotations = [{"id": i, "image_id": i, "category_id": 1, "bbox": [0, 0, 1, 1]} for i in range(1, 21)]
    annotations += [{"id": 100 + i, "image_id": i, "category_id": 2, "bbox": [1, 1, 1, 1]} for i in range(1, 5)]
    annotations += [{"id": 200, "image_id": 20, "category_id": 3, "bbox": [2, 2, 1, 1]}]
    data = {"images": images, "annotations": annotations, "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}
    source = tmp_path / "train.json"
    source.write_text(json.dumps(data))
    written = odinw.write_few_shot_sets(str(source), str(tmp_path / "fewshot"), shots=[1, 3], seeds=[3, 30])
    for entry in written:
        subset = json.loads(Path(entry["file"]).read_text())
        per_class = {c: {a["image_id"] for a in subset["annotations"] if a["category_id"] == c} for c in (1, 2, 3)}
        assert all(len(per_class[c]) >= min(entry["shots"], available) for c, available in ((1, 20), (2, 4), (3, 1)))
        taken = {image["id"] for image in subset["images"]}
        assert {a["id"] for a in subset["annotations"]} == {a["id"] for a in annotations if a["image_id"] in taken}  # whole images
        assert entry["classes_short_of_k"] == ({} if entry["shots"] == 1 else {"c3": 1})
    assert Path(written[0]["file"]).name == "fewshot_train_shot1_seed3.json"
    assert odinw.sample_few_shot(data, 3, 3) == odinw.sample_few_shot(data, 3, 3)  # deterministic per seed
    assert odinw.sample_few_shot(data, 3, 3)["images"] != odinw.sample_few_shot(data, 3, 30)["images"]
    with pytest.raises(ValueError, match=r"category ids \[9\] that `categories` does not list"):
        odinw.sample_few_shot({**data, "annotations": annotations + [{"id": 999, "image_id": 1, "category_id": 9}]}, 1, 3)


@pytest.mark.skipif(importlib.util.find_spec("lvis") is None, reason="needs the lvis package (pip install lvis==0.5.3)")
def test_evaluate_glip_task_lvis(tmp_path, capsys):
    """The wiring end to end (resuming from the cache is test_lvis_set_cache_resume_and_skipped_images's)."""
    evaluate_glip = _load("evaluate_glip", ROOT / "examples" / "evaluate_glip.py")
    argv = ["--task", "lvis", "--model", str(CHECKPOINT), "--annotations", str(lvis_file(tmp_path)), "--images", str(tmp_path)]
    argv += ["--cache_dir", str(tmp_path / "cache"), "--min_size", "160", "--max_size", "267", "--device", "cpu"]
    first = evaluate_glip.main(argv)
    assert "LVIS Fixed AP (10,000 per category, no per-image cap) on 3 images" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3
    assert "AR@all" in first and first["images"] == 3 and first["skipped_images"] == 0 and "APr" in first
