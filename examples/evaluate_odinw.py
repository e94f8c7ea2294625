#!/usr/bin/env python
"""Object Detection in the Wild (ODinW): zero-shot COCO AP of a GLIPModel on a folder of ODinW data sets, with the
ODinW-13 / ODinW-35 averages, and the few-shot training subsets (k shots per class, several seeds).

    python examples/evaluate_odinw.py evaluate --model path/to/glip --odinw_root DATASET/odinw_coco \
        [--prompts odinw_prompts.json] [--datasets Raccoon_Raccoon.v2-raw.coco pothole] [--output odinw.json]
    python examples/evaluate_odinw.py few_shot --annotations DATASET/odinw_coco/pothole/train.json \
        --output_dir fewshot/pothole --shots 1 3 5 10 --seeds 3 30 300

Data layout: `--odinw_root` holds one folder per data set, named as the original's config stems (configs/odinw_35/
*.yaml of microsoft/GLIP, e.g. `Aquarium_Aquarium_Combined.v2-raw-1024.coco`), each with a COCO-format
`annotations.json` (the test split) whose `file_name`s are relative to that folder; or `--datasets_file`, a JSON list
of {"name", "annotations", "images"} (paths relative to the list file).

Prompts list every class of a data set in category-id order (the original's `create_queries_and_maps`). `--prompts`
is a JSON {data set: {category name: prompt text}}: the text replaces the name in the prompt, as the original
configs' DATASETS.OVERRIDE_CATEGORY (e.g. {"EgoHands_generic": {"hand": "hand of a person"}}). The original's
CAPTION_PROMPT prefix / suffix make only the name a positive span; here the whole prompt text is the class phrase.

The few-shot protocol of the original (DATASETS.FEW_SHOT, data/datasets/modulated_coco.py): images are visited in a
seeded random order and one is taken when any class it holds still has fewer than k images; every annotation of a
taken image is kept. Each (k, seed) is written as `<output_dir>/fewshot_train_shot{k}_seed{seed}.json` (COCO format,
`file_name`s unchanged), the training file of `examples/finetune_glip.py` (see README, "Reproducing the paper's
evaluations").
"""

import argparse
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import evaluate
import numpy as np
import torch
from transformers import AutoProcessor

from modeling_glip.modeling_glip import GLIPModel
from processing import post_processing_limits
from processing.atomic_files import write_json_atomically
from processing.evaluation import coco_references, load_coco_evaluation_set, predict_coco

METRICS = Path(__file__).resolve().parents[1] / "metrics"

# microsoft/GLIP configs/odinw_13/*.yaml (the data sets of the GLIP paper's ODinW table) and configs/odinw_35/_all.json
ODINW_13 = (
    "AerialMaritimeDrone_large", "Aquarium_Aquarium_Combined.v2-raw-1024.coco", "CottontailRabbits", "EgoHands_generic",
    "NorthAmericaMushrooms_North_American_Mushrooms.v1-416x416.coco", "Packages_Raw", "PascalVOC", "Raccoon_Raccoon.v2-raw.coco",
    "ShellfishOpenImages_raw", "VehiclesOpenImages_416x416", "pistols_export", "pothole", "thermalDogsAndPeople",
)
ODINW_35 = (
    "AerialMaritimeDrone_large", "AerialMaritimeDrone_tiled", "AmericanSignLanguageLetters_American_Sign_Language_Letters.v1-v1.coco",
    "Aquarium_Aquarium_Combined.v2-raw-1024.coco", "BCCD_BCCD.v3-raw.coco", "ChessPieces_Chess_Pieces.v23-raw.coco", "CottontailRabbits",
    "DroneControl_Drone_Control.v3-raw.coco", "EgoHands_generic", "EgoHands_specific", "HardHatWorkers_raw", "MaskWearing_raw",
    "MountainDewCommercial", "NorthAmericaMushrooms_North_American_Mushrooms.v1-416x416.coco", "OxfordPets_by-breed", "OxfordPets_by-species",
    "PKLot_640", "Packages_Raw", "PascalVOC", "Raccoon_Raccoon.v2-raw.coco", "ShellfishOpenImages_raw", "ThermalCheetah", "UnoCards_raw",
    "VehiclesOpenImages_416x416", "WildfireSmoke", "boggleBoards_416x416AutoOrient_export_", "brackishUnderwater_960x540",
    "dice_mediumColor_export", "openPoetryVision_512x512", "pistols_export", "plantdoc_416x416", "pothole",
    "selfdrivingCar_fixedLarge_export_", "thermalDogsAndPeople", "websiteScreenshots",
)
SUITES = {"ODinW-13": ODINW_13, "ODinW-35": ODINW_35}
SHOTS = (1, 3, 5, 10)
SEEDS = (3, 30, 300)  # the seeds of the original's fewshot_train_shot{k}_seed{s}.json files


def find_datasets(odinw_root: Optional[str], datasets_file: Optional[str]) -> List[dict]:
    """-> [{"name", "annotations", "images"}] sorted by name, from a folder of data sets or a JSON list file."""
    if datasets_file:
        base = Path(datasets_file).parent
        entries = json.loads(Path(datasets_file).read_text())
        if not isinstance(entries, list) or not all(isinstance(e, dict) and {"name", "annotations"} <= set(e) for e in entries):
            raise ValueError(f"--datasets_file {datasets_file} must be a JSON list of {{'name', 'annotations', 'images'}} objects")
        found = [{"name": e["name"], "annotations": base / e["annotations"], "images": base / e.get("images", ".")} for e in entries]
    else:
        root = Path(odinw_root)
        if not root.is_dir():
            raise ValueError(f"--odinw_root {root} is not a folder")
        folders = [d for d in sorted(root.iterdir()) if (d / "annotations.json").is_file()]
        found = [{"name": d.name, "annotations": d / "annotations.json", "images": d} for d in folders]
    names = [entry["name"] for entry in found]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"data sets listed twice: {duplicates}")
    missing = [str(entry["annotations"]) for entry in found if not Path(entry["annotations"]).is_file()]
    if missing:
        raise ValueError(f"annotation files not found: {missing[:5]}")
    if not found:
        raise ValueError(f"no data set found: {datasets_file or odinw_root} holds no <name>/annotations.json")
    return sorted(found, key=lambda entry: entry["name"])


def read_prompts(path: Optional[str], categories_of: Dict[str, List[dict]]) -> Dict[str, Dict[str, str]]:
    """The --prompts JSON, checked against the data sets: every data set and category name must exist."""
    if not path:
        return {}
    prompts = json.loads(Path(path).read_text())
    if not isinstance(prompts, dict):
        raise ValueError(f"--prompts {path} must be a JSON object {{data set: {{category name: prompt text}}}}")
    for dataset, overrides in prompts.items():
        if dataset not in categories_of:
            raise ValueError(f"--prompts {path}: data set {dataset!r} is not among the evaluated ones {sorted(categories_of)}")
        if not isinstance(overrides, dict):
            raise ValueError(f"--prompts {path}: the entry of {dataset!r} must be an object {{category name: prompt text}}")
        names = {category["name"] for category in categories_of[dataset]}
        for name, text in overrides.items():
            if name not in names:
                raise ValueError(f"--prompts {path}: {dataset!r} has no category {name!r} (its categories: {sorted(names)})")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"--prompts {path}: the prompt of {dataset!r} / {name!r} must be a non-empty string, got {text!r}")
    return prompts


def suite_averages(results: Dict[str, dict], metric: str = "mAP") -> Dict[str, dict]:
    """Mean `metric` over the evaluated members of each suite, with how many of its data sets were present."""
    averages = {}
    for suite, members in SUITES.items():
        present = [results[name][metric] for name in members if name in results]
        if present:
            averages[suite] = {metric: float(np.mean(present)), "datasets": len(present), "complete": len(present) == len(members)}
    return averages


def evaluate_datasets(model, processor, datasets: Sequence[dict], prompts: Dict[str, Dict[str, str]], limits: dict, max_images=None) -> dict:
    """Zero-shot COCO metrics of every data set (processing.evaluation's predict_coco + metrics/coco_detection)."""
    metric = evaluate.load(str(METRICS / "coco_detection" / "coco_detection.py"))
    results = {}
    for entry in datasets:
        records, categories = load_coco_evaluation_set(entry["annotations"])
        records = records[:max_images]
        overrides = prompts.get(entry["name"], {})
        prompted = [{**category, "name": overrides.get(category["name"], category["name"])} for category in categories]
        predictions = predict_coco(
            model,
            processor,
            records,
            prompted,
            entry["images"],
            candidate_threshold=limits["candidate_threshold"],
            max_detections=limits["max_detections"],
        )
        results[entry["name"]] = metric.compute(predictions=predictions, references=coco_references(records))
    return results


def sample_few_shot(data: dict, shots: int, seed: int) -> dict:
    """A COCO dict restricted to the original's k-shot image sample (see the module docstring); deterministic per seed."""
    categories_of: Dict[int, set] = {}
    for annotation in data["annotations"]:
        categories_of.setdefault(annotation["image_id"], set()).add(annotation["category_id"])
    needed = {category["id"]: shots for category in data["categories"]}
    unknown = sorted({c for cats in categories_of.values() for c in cats} - set(needed))
    if unknown:
        raise ValueError(f"annotations use category ids {unknown[:10]} that `categories` does not list")
    images = sorted(data["images"], key=lambda image: image["id"])
    taken = set()
    for index in np.random.default_rng(seed).permutation(len(images)):
        image_id = images[index]["id"]
        present = categories_of.get(image_id, set())
        if any(needed[c] > 0 for c in present):
            taken.add(image_id)
            for c in present:
                needed[c] -= 1
    return {
        **{key: value for key, value in data.items() if key not in ("images", "annotations")},
        "images": [image for image in images if image["id"] in taken],
        "annotations": [annotation for annotation in data["annotations"] if annotation["image_id"] in taken],
    }


def write_few_shot_sets(annotations: str, output_dir: str, shots: Sequence[int], seeds: Sequence[int]) -> List[dict]:
    """Every (k, seed) subset of a training file -> its COCO file; returns per file the classes short of k images."""
    data = json.loads(Path(annotations).read_text())
    if not isinstance(data, dict) or not all(isinstance(data.get(key), list) for key in ("images", "annotations", "categories")):
        raise ValueError(f"--annotations {annotations} is not a COCO detection file (images, annotations, categories)")
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    written = []
    for k in shots:
        for seed in seeds:
            subset = sample_few_shot(data, k, seed)
            path = Path(output_dir) / f"fewshot_train_shot{k}_seed{seed}.json"
            write_json_atomically(path, subset, indent=None)
            images_of: Dict[int, set] = {}
            for annotation in subset["annotations"]:
                images_of.setdefault(annotation["category_id"], set()).add(annotation["image_id"])
            short = {c["name"]: len(images_of.get(c["id"], ())) for c in data["categories"] if len(images_of.get(c["id"], ())) < k}
            written.append({"file": str(path), "shots": k, "seed": seed, "images": len(subset["images"]), "classes_short_of_k": short})
    return written


def _positive_ints(parser, name: str, values: Sequence[int]) -> None:
    if any(value < (1 if name == "--shots" else 0) for value in values):
        parser.error(f"{name} must be {'positive' if name == '--shots' else 'non-negative'} integers, got {list(values)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("evaluate", help="zero-shot COCO AP per data set and the ODinW-13 / 35 averages")
    run.add_argument("--model", required=True, help="GLIPModel folder (save_pretrained / converted checkpoint)")
    where = run.add_mutually_exclusive_group(required=True)
    where.add_argument("--odinw_root", help="folder with one <name>/annotations.json (+ images) per data set")
    where.add_argument("--datasets_file", help="JSON list of {name, annotations, images}")
    run.add_argument("--datasets", nargs="+", help="evaluate only these data sets (names as the folders)")
    run.add_argument("--prompts", help="JSON {data set: {category name: prompt text}}")
    run.add_argument("--candidate_threshold", type=float, help="INFERENCE_TH (default: the model config's)")
    run.add_argument("--max_detections", type=int, help="DETECTIONS_PER_IMG (default: the model config's)")
    run.add_argument("--max_images", type=int, help="the first N images of each data set only (a smoke test, not the protocol)")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--output", help="write the per-data-set metrics and the averages (JSON) here")
    few = commands.add_parser("few_shot", help="write the k-shot training subsets of one data set")
    few.add_argument("--annotations", required=True, help="COCO json of the data set's training split")
    few.add_argument("--output_dir", required=True)
    few.add_argument("--shots", type=int, nargs="+", default=list(SHOTS))
    few.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    return parser


def select_datasets(args) -> tuple:
    """The data sets to evaluate and the checked prompt overrides (before any model is loaded)."""
    datasets = find_datasets(args.odinw_root, args.datasets_file)
    if args.datasets:
        unknown = sorted(set(args.datasets) - {entry["name"] for entry in datasets})
        if unknown:
            raise ValueError(f"--datasets {unknown} not found; available: {[entry['name'] for entry in datasets]}")
        datasets = [entry for entry in datasets if entry["name"] in args.datasets]
    categories_of = {entry["name"]: load_coco_evaluation_set(entry["annotations"])[1] for entry in datasets}
    return datasets, read_prompts(args.prompts, categories_of)


def run_evaluation(args, datasets: Sequence[dict], prompts: Dict[str, Dict[str, str]]) -> dict:
    processor = AutoProcessor.from_pretrained(args.model)
    model = GLIPModel.from_pretrained(args.model).to(args.device).eval()
    limits = post_processing_limits(model.config, candidate_threshold=args.candidate_threshold, max_detections=args.max_detections)
    sizes = processor.image_processor
    print(
        f"model {args.model}: images resized to {sizes.min_size} / {sizes.max_size}; "
        f"candidate_threshold {limits['candidate_threshold']}, max_detections {limits['max_detections']}"
    )
    results = evaluate_datasets(model, processor, datasets, prompts, limits, args.max_images)
    averages = suite_averages(results)
    width = max(len(name) for name in list(results) + list(averages))
    print(f"{'data set'.ljust(width)}  {'AP':>6}  {'AP50':>6}")
    for name, metrics in results.items():
        print(f"{name.ljust(width)}  {metrics['mAP']:6.3f}  {metrics['mAP_50']:6.3f}")
    for suite, average in averages.items():
        note = "" if average["complete"] else f"  (partial: {average['datasets']} of {len(SUITES[suite])} data sets, not the benchmark's average)"
        print(f"{suite.ljust(width)}  {average['mAP']:6.3f}{note}")
    output = {"datasets": results, "averages": averages}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(args.output, output, indent=None)
    return output


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "few_shot":
        _positive_ints(parser, "--shots", args.shots)
        _positive_ints(parser, "--seeds", args.seeds)
        if not Path(args.annotations).is_file():
            parser.error(f"--annotations {args.annotations} is not a file")
        try:
            written = write_few_shot_sets(args.annotations, args.output_dir, args.shots, args.seeds)
        except ValueError as error:
            parser.error(str(error))
        for entry in written:
            short = ""
            if entry["classes_short_of_k"]:  # the whole split has fewer images of these classes
                short = f"; classes with fewer than {entry['shots']} images: {entry['classes_short_of_k']}"
            print(f"{entry['file']}: {entry['images']} images{short}")
        return {"written": written}
    for name in ("max_detections", "max_images"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if args.candidate_threshold is not None and not (math.isfinite(args.candidate_threshold) and 0 <= args.candidate_threshold < 1):
        parser.error(f"--candidate_threshold must be in [0, 1), got {args.candidate_threshold}")
    try:
        datasets, prompts = select_datasets(args)
    except ValueError as error:
        parser.error(str(error))
    return run_evaluation(args, datasets, prompts)


if __name__ == "__main__":
    main()
