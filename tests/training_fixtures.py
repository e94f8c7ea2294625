"""Synthetic data and tiny configs shared by the training tests: coloured squares on grey 64x64 images, in COCO
detection and MDETR-style grounding form, a GLIP config small enough to train a few steps on CPU, and helpers that run
the example training scripts."""

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import PIL.Image
import PIL.ImageDraw
from transformers import BertConfig

from modeling_glip.configuration_glip import GLIPConfig, swin_backbone_config

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60)}
CATEGORIES = [{"id": 11, "name": "red square"}, {"id": 12, "name": "blue square"}, {"id": 13, "name": "green square"}]


def tiny_training_config(deterministic: bool = False, **kwargs) -> GLIPConfig:
    """A ~1.3M-parameter GLIP with the real bert-base-uncased vocabulary size; `deterministic` switches every
    stochastic module off (dropout, DropBlock, drop path) so that runs differ only by arithmetic."""
    dropout = 0.0 if deterministic else 0.1
    return GLIPConfig(
        backbone_config=swin_backbone_config(embed_dim=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), drop_path_rate=0.0 if deterministic else 0.2),
        text_config=BertConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, max_position_embeddings=64,
            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        ),
        hidden_size=32,
        num_fusion_layers=2,
        fusion_embed_dim=64,
        fusion_num_heads=4,
        fusion_dropout=dropout,
        fpn_drop_block_prob=0.0 if deterministic else 0.3,
        **kwargs,
    )


def draw_squares(path: Path, squares: List[tuple], size: int = 64):
    """squares: (colour, x, y, side) -> a grey PNG with filled squares."""
    image = PIL.Image.new("RGB", (size, size), (128, 128, 128))
    draw = PIL.ImageDraw.Draw(image)
    for colour, x, y, side in squares:
        draw.rectangle([x, y, x + side - 1, y + side - 1], fill=COLOURS[colour])
    image.save(path)


def make_detection_set(root: Path, num_images: int = 8, seed: int = 0, name: str = "train.json", size: int = 64) -> Path:
    """A COCO detection json of `num_images` images, each with one or two squares of distinct colours."""
    rng = random.Random(seed)
    images, annotations = [], []
    for index in range(num_images):
        colours = rng.sample(sorted(COLOURS), 1 + index % 2)
        squares = []
        for slot, colour in enumerate(colours):
            side = rng.randint(18, 26)
            x = rng.randint(2, size // 2 - side // 2) if slot == 0 else rng.randint(size // 2, size - side - 2)
            y = rng.randint(2, size - side - 2)
            squares.append((colour, x, y, side))
        file_name = f"{Path(name).stem}_{index}.png"
        draw_squares(root / file_name, squares, size)
        images.append({"id": index + 1, "file_name": file_name, "width": size, "height": size})
        for colour, x, y, side in squares:
            category = next(c["id"] for c in CATEGORIES if c["name"] == f"{colour} square")
            annotations.append(
                {"id": len(annotations) + 1, "image_id": index + 1, "bbox": [x, y, side, side], "category_id": category, "iscrowd": 0, "area": side * side}
            )
    path = root / name
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return path


def grounding_record(file_name: str, caption: str, phrases: List[tuple], width: Optional[int] = 64, height: Optional[int] = 64) -> dict:
    """phrases: (phrase text, bbox) -> a grounding record whose spans point at the first occurrence of each phrase."""
    return {
        "file_name": file_name,
        "width": width,
        "height": height,
        "caption": caption,
        "annotations": [{"bbox": list(bbox), "tokens_positive": [[caption.index(text), caption.index(text) + len(text)]]} for text, bbox in phrases],
    }


REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "pretrain_glip.py"
# `accelerate launch` flags of the README's multi-process CPU recipe (2 gloo ranks; the script also needs --cpu)
CPU_MULTIPROCESS_FLAGS = ("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def load_script(name: str = "pretrain_glip"):
    """An examples/ script as a module (finetune_glip imports its sibling pretrain_glip)."""
    sys.path.insert(0, str(REPO / "examples"))
    try:
        spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "examples"))
    return module


def common_args(root: Path, vocab: Path, config: str, **overrides) -> List[str]:
    """pretrain_glip.py flags of a 6-step CPU run on `root/train.json`; `overrides` replace or add flags (None: a switch)."""
    args = {
        "--cpu": None, "--config": str(root / config), "--tokenizer": str(vocab), "--train_files": str(root / "train.json"),
        "--image_root": str(root), "--max_steps": "6", "--num_workers": "0", "--min_sizes": ["48", "64"], "--max_size": "80",
        "--warmup_steps": "2", "--logging_steps": "1", "--checkpointing_steps": "3", "--per_device_batch_size": "2",
    }
    args.update(overrides)
    argv = []
    for flag, value in args.items():
        argv += [flag] + ([] if value is None else value if isinstance(value, list) else [value])
    return argv


def run(argv: List[str], launcher=(sys.executable,), expect_rc=0, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run pretrain_glip.py; assert its return code (a negative one: killed by that signal)."""
    result = subprocess.run([*launcher, str(SCRIPT), *argv], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == expect_rc, result.stdout[-3000:] + result.stderr[-5000:]
    return result
