"""Synthetic data and tiny configs shared by the training tests: coloured squares on grey 64x64 images, in COCO
detection and MDETR-style grounding form, and a GLIP config small enough to train a few steps on CPU."""

import json
import random
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
