"""Deterministic synthetic grounding data: coloured shapes with COCO boxes and grounding captions.

Scenes hold 1-4 shapes (`SHAPES`) in colours (`COLORS`) and sizes (`SIZES`), drawn anti-aliased with PIL on a plain
background, a noisy one, or (about a third of the images) a crop of one of scikit-image's bundled public-domain / CC0
photos (`PHOTOS`, read offline). Shapes never overlap, so every box is the exact tight bound of its shape's drawn
pixels (pixels whose anti-aliasing coverage is below `MIN_COVERAGE` are not drawn at all).

Every colour-shape combination is one detection category ("red star"). `UNSEEN_COMBINATIONS`, a fixed ~20% of them
that leaves every colour and every shape in training, never appears in `train` or `test_seen`: `test_unseen` holds
only those (compositional zero-shot).

Layout written by `generate_dataset` / the CLI (`file_name`s are relative to the output folder):

```
OUTPUT/metadata.json                 seed, image size, colours, shapes, seen / unseen combinations, split sizes
OUTPUT/train/000001.png ...          images of each split (PNG, lossless)
OUTPUT/train_detection.json          COCO detection: images, annotations (bbox [x, y, w, h], category_id), categories
OUTPUT/train_grounding.json          MDETR-style grounding over the same images: images carry `caption`,
                                     annotations carry `tokens_positive` [[start, end)] spans of their phrase
OUTPUT/test_seen/..., test_seen_detection.json
OUTPUT/test_unseen/..., test_unseen_detection.json
OUTPUT/captions/metadata.jsonl       optional captions-only split (`--caption-images`): images with captions, boxes
                                     withheld; an `imagefolder` (`file_name`, `caption`) for pseudo-labelling
OUTPUT/captions_withheld_grounding.json   its withheld boxes (MDETR-style), for measuring pseudo-label quality only
```

The captions-only split stands for web image-text pairs (GLIP's self-training data): its scenes use every
colour-shape combination, the held-out ones included, as captions mention concepts that the box-labelled data lacks.

All files use the same `categories` list (ids 1..48, every combination), so `processing.training_data.
load_training_records` reads any of them, or the train detection + grounding files together. A caption mentions every
box of its image, e.g. "a small red star left of a blue ring" or "two green squares and a large purple cross"; all
boxes of a plural phrase share its span.

Everything is a pure function of the seed: scene i of a split is drawn from its own generator
(`scene_for(seed, split, i)`), and `render_scene(spec)` is a pure function of the spec, so two runs write identical
bytes. Usage:

    python examples/synthetic_shapes.py --output data/shapes [--train_images 2000] [--test_images 200]
        [--caption_images 0] [--image_size 160] [--seed 0]
"""

import functools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import PIL.Image
import PIL.ImageDraw

# Base RGB of each colour name (each name is one bert-base-uncased token); drawn with a small per-shape jitter.
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 160, 60),
    "blue": (35, 85, 215),
    "yellow": (240, 205, 30),
    "purple": (135, 55, 185),
    "orange": (245, 130, 20),
}
COLOR_JITTER = 12  # max per-channel offset from the base RGB

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "heart")
PLURALS: Dict[str, str] = {shape: shape + ("es" if shape.endswith("s") else "s") for shape in SHAPES}

# Shape extent (the larger side of its unrotated box) as a fraction of the image side.
SIZES: Dict[str, Tuple[float, float]] = {"small": (0.12, 0.18), "large": (0.28, 0.38)}
MAX_ROTATION = 20.0  # degrees; small enough that a square never turns into a diamond

# Held out of `train` and `test_seen`: 10 of the 48 combinations, each colour at most twice and each shape at most
# twice, so every colour is trained with >= 6 shapes and every shape with >= 4 colours.
UNSEEN_COMBINATIONS: Tuple[Tuple[str, str], ...] = (
    ("red", "triangle"),
    ("red", "diamond"),
    ("green", "star"),
    ("blue", "circle"),
    ("blue", "heart"),
    ("yellow", "cross"),
    ("purple", "square"),
    ("purple", "circle"),
    ("orange", "ring"),
    ("orange", "star"),
)
ALL_COMBINATIONS: Tuple[Tuple[str, str], ...] = tuple((color, shape) for color in COLORS for shape in SHAPES)
SEEN_COMBINATIONS: Tuple[Tuple[str, str], ...] = tuple(c for c in ALL_COMBINATIONS if c not in UNSEEN_COMBINATIONS)

SPLITS: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "train": SEEN_COMBINATIONS,
    "test_seen": SEEN_COMBINATIONS,
    "test_unseen": UNSEEN_COMBINATIONS,
    "captions": ALL_COMBINATIONS,  # captions-only split (boxes withheld): web image-text pairs in miniature
}

# scikit-image's bundled photos (shipped inside the package, public domain or CC0), used as background crops.
PHOTOS: Tuple[str, ...] = (
    "astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass", "gravel", "hubble_deep_field", "rocket",
)
PHOTO_MUTE = 0.2  # photos are blended this much towards mid grey, so that shape colours stand out
BACKGROUNDS = ("plain", "noise", "photo")

SUPERSAMPLING = 4  # shapes are drawn at 4x and box-filtered down: coverage in steps of 1/16
MIN_COVERAGE = 2 / SUPERSAMPLING**2  # pixels covered less than this are left as background
MIN_GAP = 2  # pixels between the (conservative) boxes of two shapes
PLACEMENT_TRIES = 50
MAX_SHAPES = 4
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}


def category_name(color: str, shape: str) -> str:
    return f"{color} {shape}"


def categories() -> List[dict]:
    """COCO `categories` of every colour-shape combination: ids 1..48 in `ALL_COMBINATIONS` order."""
    return [
        {"id": index, "name": category_name(color, shape), "supercategory": shape}
        for index, (color, shape) in enumerate(ALL_COMBINATIONS, start=1)
    ]


@dataclass(frozen=True)
class ShapeSpec:
    """One shape. `center` is in pixels (sub-pixel allowed); `extent` is the larger side of the unrotated shape in
    pixels (default: the middle of its `size` range); `rgb` defaults to the colour's base RGB."""

    shape: str
    color: str
    size: str
    center: Tuple[float, float]
    extent: Optional[float] = None
    rotation: float = 0.0
    rgb: Optional[Tuple[int, int, int]] = None


@dataclass(frozen=True)
class SceneSpec:
    """A whole scene. `background` is "plain" (`background_rgb`), "noise" (`background_rgb` plus smooth blotches and
    pixel noise drawn from `background_seed`) or "photo" (`photo` cropped to the square `photo_crop` (x, y, side))."""

    shapes: Tuple[ShapeSpec, ...]
    image_size: int = 160
    background: str = "plain"
    background_rgb: Tuple[int, int, int] = (128, 128, 128)
    background_seed: int = 0
    photo: Optional[str] = None
    photo_crop: Optional[Tuple[int, int, int]] = None


# -- shapes -----------------------------------------------------------------------------------------------------------
def _regular_polygon(count: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(count) / count
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star() -> np.ndarray:
    outer, inner = _regular_polygon(5, 1.0), _regular_polygon(5, 0.42, -math.pi / 2 + math.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(10, 2)


def _cross(arm: float = 0.3) -> np.ndarray:
    """A plus sign whose arms are `2 * arm` wide."""
    a = arm
    top, right, bottom, left = [(-a, -1), (a, -1)], [(1, -a), (1, a)], [(a, 1), (-a, 1)], [(-1, a), (-1, -a)]
    return np.array(top + [(a, -a)] + right + [(a, a)] + bottom + [(-a, a)] + left + [(-a, -a)], dtype=float)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 96, endpoint=False)
    return np.stack([16 * np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))], axis=1)


def _normalised(points: np.ndarray) -> np.ndarray:
    """Centre the polygon's box on the origin and scale its larger side to 1."""
    low, high = points.min(axis=0), points.max(axis=0)
    return (points - (low + high) / 2) / (high - low).max()


RING_HOLE = 0.55  # inner radius / outer radius
# Each shape: (outline, hole or None) in units of the shape's extent, box centred on the origin.
_OUTLINES: Dict[str, Tuple[np.ndarray, Optional[np.ndarray]]] = {
    "circle": (_normalised(_regular_polygon(96)), None),
    "square": (_normalised(_regular_polygon(4, phase=math.pi / 4)), None),
    "triangle": (_normalised(_regular_polygon(3)), None),
    "star": (_normalised(_star()), None),
    "ring": (_normalised(_regular_polygon(96)), _regular_polygon(96, RING_HOLE / 2)),
    "cross": (_normalised(_cross()), None),
    "diamond": (_normalised(np.array([(0, -1), (0.65, 0), (0, 1), (-0.65, 0)], dtype=float)), None),
    "heart": (_normalised(_heart()), None),
}


def _default_extent(size: str, image_size: int) -> float:
    low, high = SIZES[size]
    return (low + high) / 2 * image_size


def _shape_polygons(shape: ShapeSpec, image_size: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The shape's outline (and hole) in image pixel coordinates."""
    extent = shape.extent if shape.extent is not None else _default_extent(shape.size, image_size)
    angle = math.radians(shape.rotation)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    center = np.asarray(shape.center, dtype=float)
    outline, hole = _OUTLINES[shape.shape]
    outline = outline @ rotation.T * extent + center
    return outline, (hole @ rotation.T * extent + center if hole is not None else None)


def _outer_box(shape: ShapeSpec, image_size: int) -> Tuple[int, int, int, int]:
    """Integer (x0, y0, x1, y1) that contains every pixel the shape can draw (its exact box is inside)."""
    outline, _ = _shape_polygons(shape, image_size)
    (x0, y0), (x1, y1) = np.floor(outline.min(axis=0)), np.ceil(outline.max(axis=0))
    return int(x0), int(y0), int(x1), int(y1)


def _coverage(shape: ShapeSpec, image_size: int) -> Tuple[np.ndarray, int, int]:
    """(coverage in [0, 1] of the pixels of the shape's outer box clipped to the image, x0, y0)."""
    x0, y0, x1, y1 = _outer_box(shape, image_size)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, image_size), min(y1, image_size)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"{shape} lies outside the {image_size}x{image_size} image")
    s = SUPERSAMPLING
    canvas = PIL.Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
    draw = PIL.ImageDraw.Draw(canvas)
    outline, hole = _shape_polygons(shape, image_size)
    # PIL puts integer coordinates on sample centres: image position X maps to canvas position (X - x0) * s - 0.5
    for points, fill in ((outline, 255), (hole, 0)):
        if points is not None:
            draw.polygon([tuple(point) for point in ((points - (x0, y0)) * s - 0.5).tolist()], fill=fill)
    samples = np.asarray(canvas, dtype=np.float32) / 255.0
    coverage = samples.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))
    coverage[coverage < MIN_COVERAGE] = 0.0
    return coverage, x0, y0


# -- backgrounds ------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """One of `PHOTOS` as an (H, W, 3) uint8 array (scikit-image ships them; nothing is downloaded)."""
    import skimage.data

    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; choose from {PHOTOS}")
    image = np.asarray(getattr(skimage.data, name)())
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3].astype(np.uint8))


def render_background(spec: SceneSpec) -> np.ndarray:
    """The scene's background as an (S, S, 3) float32 array in [0, 255]."""
    size = spec.image_size
    if spec.background == "photo":
        if spec.photo is None or spec.photo_crop is None:
            raise ValueError("a photo background needs `photo` and `photo_crop`")
        x, y, side = spec.photo_crop
        photo = PIL.Image.fromarray(load_photo(spec.photo)).crop((x, y, x + side, y + side))
        image = np.asarray(photo.resize((size, size), PIL.Image.Resampling.BILINEAR), dtype=np.float32)
        return (1 - PHOTO_MUTE) * image + PHOTO_MUTE * 128.0
    base = np.broadcast_to(np.asarray(spec.background_rgb, dtype=np.float32), (size, size, 3)).copy()
    if spec.background == "plain":
        return base
    if spec.background == "noise":
        rng = np.random.default_rng(spec.background_seed)
        blotches = rng.uniform(-25, 25, size=(5, 5, 3)).astype(np.float32)
        smooth = np.stack(
            [np.asarray(PIL.Image.fromarray(blotches[:, :, c]).resize((size, size), PIL.Image.Resampling.BICUBIC)) for c in range(3)],
            axis=2,
        )
        pixel_noise = rng.normal(0, 8, size=(size, size, 1)).astype(np.float32)
        return np.clip(base + smooth + pixel_noise, 0, 255)
    raise ValueError(f"unknown background {spec.background!r}; choose from {BACKGROUNDS}")


# -- scenes -----------------------------------------------------------------------------------------------------------
def render_scene(spec: SceneSpec) -> Tuple[PIL.Image.Image, List[dict]]:
    """Draw a scene: -> (RGB image, one annotation per shape in `spec.shapes` order).

    An annotation is {"name": "red star", "color", "shape", "size", "bbox": [x, y, w, h], "area"}: `bbox` is the tight
    integer box of the shape's drawn pixels (COCO convention: pixel edges, so a shape covering columns 3..9 has x = 3,
    w = 7), clipped to the image; `area` is its number of drawn pixels. Shapes are drawn in order, later ones on top
    (`sample_scene` never lets them overlap).
    """
    for shape in spec.shapes:
        if shape.shape not in SHAPES or shape.color not in COLORS or shape.size not in SIZES:
            raise ValueError(f"unknown shape / colour / size in {shape}; choose from {SHAPES}, {tuple(COLORS)}, {tuple(SIZES)}")
    image = render_background(spec)
    annotations = []
    for shape in spec.shapes:
        coverage, x0, y0 = _coverage(shape, spec.image_size)
        rows, columns = np.nonzero(coverage)
        if rows.size == 0:
            raise ValueError(f"{shape} draws no pixel inside the image")
        rgb = np.asarray(shape.rgb if shape.rgb is not None else COLORS[shape.color], dtype=np.float32)
        height, width = coverage.shape
        region = image[y0 : y0 + height, x0 : x0 + width]
        region[:] = region * (1 - coverage[:, :, None]) + rgb * coverage[:, :, None]
        left, top = x0 + int(columns.min()), y0 + int(rows.min())
        box = [left, top, x0 + int(columns.max()) + 1 - left, y0 + int(rows.max()) + 1 - top]
        name = category_name(shape.color, shape.shape)
        annotations.append({"name": name, "color": shape.color, "shape": shape.shape, "size": shape.size, "bbox": box, "area": int(rows.size)})
    return PIL.Image.fromarray(np.round(image).astype(np.uint8)), annotations


def _boxes_apart(a: Tuple[int, int, int, int], b: Tuple[int, int, int, int]) -> bool:
    return a[2] + MIN_GAP <= b[0] or b[2] + MIN_GAP <= a[0] or a[3] + MIN_GAP <= b[1] or b[3] + MIN_GAP <= a[1]


def sample_scene(rng: np.random.Generator, combinations: Sequence[Tuple[str, str]] = SEEN_COMBINATIONS, image_size: int = 160) -> SceneSpec:
    """A random scene of 1-4 non-overlapping shapes whose colour-shape combinations are drawn from `combinations`.

    A shape that finds no free place in `PLACEMENT_TRIES` tries is left out (the first one always fits).
    """
    shapes: List[ShapeSpec] = []
    boxes: List[Tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(1, MAX_SHAPES + 1))):
        color, shape_name = combinations[int(rng.integers(len(combinations)))]
        size = str(rng.choice(tuple(SIZES)))
        extent = float(rng.uniform(*SIZES[size])) * image_size
        rotation = float(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
        rgb = tuple(int(v) for v in np.clip(np.asarray(COLORS[color]) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3), 0, 255))
        for _ in range(PLACEMENT_TRIES):
            center = (float(rng.uniform(0, image_size)), float(rng.uniform(0, image_size)))
            candidate = ShapeSpec(shape_name, color, size, center, extent, rotation, rgb)
            box = _outer_box(candidate, image_size)
            inside = box[0] >= 0 and box[1] >= 0 and box[2] <= image_size and box[3] <= image_size
            if inside and all(_boxes_apart(box, other) for other in boxes):
                shapes.append(candidate)
                boxes.append(box)
                break

    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    # neutral (slightly tinted grey) backgrounds, never one of the shape colours
    background_rgb = tuple(int(v) for v in np.clip(rng.integers(40, 226) + rng.integers(-10, 11, size=3), 0, 255))
    background_seed = int(rng.integers(2**31))
    photo, photo_crop = None, None
    if background == "photo":
        photo = PHOTOS[int(rng.integers(len(PHOTOS)))]
        height, width = load_photo(photo).shape[:2]
        side = int(rng.integers(min(height, width) // 3, min(height, width) + 1))
        photo_crop = (int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1)), side)
    return SceneSpec(tuple(shapes), image_size, background, background_rgb, background_seed, photo, photo_crop)


def scene_for(seed: int, split: str, index: int, image_size: int = 160) -> SceneSpec:
    """Scene `index` of `split` for `seed`: each scene has its own generator, so any one can be re-made alone."""
    return sample_scene(_generator(seed, split, index, "scene"), SPLITS[split], image_size)


def _generator(seed: int, split: str, index: int, purpose: str) -> np.random.Generator:
    """The generator of one image's scene or caption: independent of every other image and of the other purpose."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {tuple(SPLITS)}")
    return np.random.default_rng([seed, tuple(SPLITS).index(split), index, ("scene", "caption").index(purpose)])


# -- captions ---------------------------------------------------------------------------------------------------------
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _relation(a: List[int], b: List[int]) -> List[str]:
    """Relations "A <relation> B" that hold between two boxes (x, y, w, h) that do not overlap."""
    relations = []
    if a[0] + a[2] <= b[0]:
        relations.append("left of")
    if b[0] + b[2] <= a[0]:
        relations.append("right of")
    if a[1] + a[3] <= b[1]:
        relations.append("above")
    if b[1] + b[3] <= a[1]:
        relations.append("below")
    return relations


def make_caption(annotations: Sequence[dict], rng: np.random.Generator) -> Tuple[str, List[List[int]]]:
    """A caption naming every annotated shape -> (caption, the [start, end) span of each annotation's phrase).

    Shapes of the same colour and shape form one plural phrase ("two green squares", with the size when all share it);
    a single shape is "a [small|large] red star" (size mentioned with probability 0.6). Two single phrases whose boxes
    are apart are joined by a true spatial relation ("left of", "right of", "above", "below") with probability 0.7,
    otherwise phrases are listed ("A, B and C"). Phrases come in random order.
    """
    groups: Dict[Tuple[str, str], List[int]] = {}
    for index, annotation in enumerate(annotations):
        groups.setdefault((annotation["color"], annotation["shape"]), []).append(index)
    keys = list(groups)
    order = rng.permutation(len(keys))
    phrases = []  # (text, annotation indices)
    for key in (keys[i] for i in order):
        members = groups[key]
        color, shape = key
        sizes = {annotations[i]["size"] for i in members}
        with_size = len(sizes) == 1 and rng.random() < 0.6
        adjectives = ([sizes.pop()] if with_size else []) + [color]
        if len(members) == 1:
            words = adjectives + [shape]
            phrases.append((" ".join([_article(words[0])] + words), members))
        else:
            phrases.append((" ".join([NUMBER_WORDS[len(members)]] + adjectives + [PLURALS[shape]]), members))

    relations = []
    if len(phrases) == 2 and all(len(members) == 1 for _, members in phrases):
        relations = _relation(annotations[phrases[0][1][0]]["bbox"], annotations[phrases[1][1][0]]["bbox"])
    if relations and rng.random() < 0.7:
        connectors = [" " + relations[int(rng.integers(len(relations)))] + " "]
    else:
        connectors = [", "] * (len(phrases) - 2) + [" and "] * (len(phrases) > 1)

    caption, spans = "", [[0, 0] for _ in annotations]
    for position, (text, members) in enumerate(phrases):
        if position:
            caption += connectors[position - 1]
        for member in members:
            spans[member] = [len(caption), len(caption) + len(text)]
        caption += text
    return caption, spans


# -- dataset ----------------------------------------------------------------------------------------------------------
def _coco_annotation(annotation_id: int, image_id: int, annotation: dict, category_ids: Dict[str, int]) -> dict:
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": category_ids[annotation["name"]],
        "bbox": annotation["bbox"],
        "area": annotation["area"],
        "iscrowd": 0,
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=None, separators=(",", ":")) + "\n")


def write_split(output: Path, split: str, num_images: int, image_size: int, seed: int) -> dict:
    """Render and save one split and write its annotation files -> split summary.

    `train`: detection + grounding json; test splits: detection json; `captions`: `captions/metadata.jsonl` (an
    `imagefolder` of images and captions, no boxes) and the withheld boxes as a grounding json.
    """
    category_list = categories()
    category_ids = {category["name"]: category["id"] for category in category_list}
    (output / split).mkdir(parents=True, exist_ok=True)
    images, detection, grounding_images, grounding = [], [], [], []
    for index in range(num_images):
        spec = scene_for(seed, split, index, image_size)
        image, annotations = render_scene(spec)
        image_id = index + 1
        file_name = f"{split}/{image_id:06d}.png"
        image.save(output / file_name, format="PNG", compress_level=1)  # fast; lossless like any level
        entry = {"id": image_id, "file_name": file_name, "width": image_size, "height": image_size}
        images.append(entry)
        for annotation in annotations:
            detection.append(_coco_annotation(len(detection) + 1, image_id, annotation, category_ids))
        if split in ("train", "captions"):
            caption, spans = make_caption(annotations, _generator(seed, split, index, "caption"))
            grounding_images.append({**entry, "caption": caption})
            for annotation, span in zip(annotations, spans):
                grounding.append({**_coco_annotation(len(grounding) + 1, image_id, annotation, category_ids), "tokens_positive": [span]})

    if split == "captions":
        files = {"metadata": f"{split}/metadata.jsonl", "withheld": f"{split}_withheld_grounding.json"}
        lines = [json.dumps({"file_name": Path(image["file_name"]).name, "caption": image["caption"]}) for image in grounding_images]
        (output / files["metadata"]).write_text("".join(line + "\n" for line in lines))
        _write_json(output / files["withheld"], {"images": grounding_images, "annotations": grounding, "categories": category_list})
        return {"images": num_images, "annotations": len(detection), **files}
    files = {"detection": f"{split}_detection.json"}
    _write_json(output / files["detection"], {"images": images, "annotations": detection, "categories": category_list})
    if split == "train":
        files["grounding"] = f"{split}_grounding.json"
        _write_json(output / files["grounding"], {"images": grounding_images, "annotations": grounding, "categories": category_list})
    return {"images": num_images, "annotations": len(detection), **files}


def generate_dataset(
    output, train_images: int = 2000, test_images: int = 200, image_size: int = 160, seed: int = 0, caption_images: int = 0
) -> dict:
    """Write the splits and `metadata.json` under `output` (created if missing); the captions-only split only when
    `caption_images` > 0. -> the metadata."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    sizes = {"train": train_images, "test_seen": test_images, "test_unseen": test_images}
    if caption_images:
        sizes["captions"] = caption_images
    metadata = {
        "generator": "examples/synthetic_shapes.py",
        "seed": seed,
        "image_size": image_size,
        "colors": COLORS,
        "shapes": list(SHAPES),
        "sizes": SIZES,
        "seen_combinations": [category_name(*combination) for combination in SEEN_COMBINATIONS],
        "unseen_combinations": [category_name(*combination) for combination in UNSEEN_COMBINATIONS],
        "splits": {split: write_split(output, split, count, image_size, seed) for split, count in sizes.items()},
    }
    (output / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


def main(argv: Optional[Sequence[str]] = None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
    from modeling_glip.command_line import GLIPArgumentParser  # here: importing this module needs neither torch nor transformers

    parser = GLIPArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder to write the images, json files and metadata.json to")
    parser.add_argument("--train_images", type=int, default=2000, help="images of the train split")
    parser.add_argument("--test_images", type=int, default=200, help="images of each test split (test_seen, test_unseen)")
    parser.add_argument("--caption_images", type=int, default=0, help="images of the captions-only split (boxes withheld); 0: none")
    parser.add_argument("--image_size", type=int, default=160, help="side of the square images in pixels (>= 64)")
    parser.add_argument("--seed", type=int, default=0, help="every image is a function of the seed, the split and its index")
    args = parser.parse_args(argv)
    if min(args.train_images, args.test_images, args.caption_images) < 0 or args.image_size < 64:
        parser.error(
            f"image counts must be >= 0 and --image_size >= 64, got --train_images {args.train_images}, --test_images "
            f"{args.test_images}, --caption_images {args.caption_images}, --image_size {args.image_size}"
        )
    start = time.perf_counter()
    metadata = generate_dataset(args.output, args.train_images, args.test_images, args.image_size, args.seed, args.caption_images)
    counts = ", ".join(f"{split}: {info['images']} images / {info['annotations']} boxes" for split, info in metadata["splits"].items())
    print(f"wrote {args.output} in {time.perf_counter() - start:.1f} s ({counts})")


if __name__ == "__main__":
    main()
