"""GLIP's training transforms (the original `build_transforms(cfg, is_train=True)`): a random multi-scale resize and a
horizontal flip, applied to a PIL image, its boxes and (for grounding samples) its caption.

Boxes use the original's legacy pixel convention (maskrcnn_benchmark `BoxList`, TO_REMOVE = 1): a COCO box
(x, y, w, h) covers pixels x .. x + w - 1, so its corners are (x, y, x + w - 1, y + h - 1)
(`legacy_xyxy_from_coco`). These are the xyxy targets the original's ATSS loss sees (glip_architecture.md section 8).
"""

import random
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import PIL.Image
import torch

from .image_processing_glip import get_resize_output_size

# AUGMENT.MULT_MIN_SIZE_TRAIN of the GLIP pre-training configs, INPUT.MAX_SIZE_TRAIN, AUGMENT.FLIP_PROB_TRAIN
GLIP_TRAIN_MIN_SIZES = (480, 560, 640, 720, 800)
GLIP_TRAIN_MAX_SIZE = 1333
GLIP_FLIP_PROB = 0.5

_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)
_SWAP = {"left": "right", "right": "left"}

Span = Tuple[int, int]


def legacy_xyxy_from_coco(boxes_xywh: torch.Tensor, width: int, height: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(M, 4) COCO (x, y, w, h) -> the original's (M, 4) float32 xyxy and a (M,) keep mask.

    As `ConvertCocoPolysToMask` / `BoxList.convert("xyxy")` + `clip_to_image(remove_empty=True)`: x2 = x + w - 1,
    y2 = y + h - 1, every corner clamped to [0, width - 1] x [0, height - 1]; a box is kept when x2 > x1 and y2 > y1
    (so boxes of width or height <= 1 px, or outside the image, are dropped as in the original).
    """
    boxes = boxes_xywh.to(torch.float32).clone()
    boxes[:, 2:] += boxes[:, :2] - 1  # TO_REMOVE = 1 (legacy +1 convention, section 8)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=width - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=height - 1)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes, keep


def swap_left_right(caption: str, spans: Sequence[Span]) -> Tuple[str, List[Span]]:
    """Swap the whole words "left" and "right" (case kept) in a caption and move the [start, end) spans with the text.

    Raises:
        ValueError: a span boundary falls strictly inside a swapped word (the caption cannot be kept consistent).
    """
    pieces, shifts, last, delta = [], [], 0, 0  # shifts: (old end of a swapped word, total length change up to it)
    for match in _LEFT_RIGHT.finditer(caption):
        word = match.group(0)
        swapped = _SWAP[word.lower()]
        swapped = swapped.upper() if word.isupper() else swapped.capitalize() if word[0].isupper() else swapped
        pieces += [caption[last : match.start()], swapped]
        for start, end in spans:
            for boundary in (start, end):
                if match.start() < boundary < match.end():
                    raise ValueError(f"span ({start}, {end}) cuts the word {word!r} of {caption!r}")
        delta += len(swapped) - len(word)
        shifts.append((match.end(), delta))
        last = match.end()
    pieces.append(caption[last:])

    def moved(position: int) -> int:
        """Old -> new character position: shifted by the length change of every swapped word that ends before it."""
        return position + next((shift for end, shift in reversed(shifts) if end <= position), 0)

    return "".join(pieces), [(moved(start), moved(end)) for start, end in spans]


@dataclass
class GLIPTrainTransform:
    """Random multi-scale resize then random horizontal flip, as the original training pipeline (sections 1 and 8).

    Args:
        min_sizes: short-side lengths to choose from, uniformly (AUGMENT.MULT_MIN_SIZE_TRAIN).
        max_size: cap on the long side (INPUT.MAX_SIZE_TRAIN).
        flip_prob: probability of a horizontal flip (AUGMENT.FLIP_PROB_TRAIN).

    Deviation from the original: its flip never looks at the caption, so a grounding caption saying "the left dog"
    describes the right dog after a flip. Here "left" and "right" are swapped in flipped captions (their phrase spans
    follow the text); a caption whose spans cut such a word is not flipped.
    """

    min_sizes: Sequence[int] = GLIP_TRAIN_MIN_SIZES
    max_size: int = GLIP_TRAIN_MAX_SIZE
    flip_prob: float = GLIP_FLIP_PROB

    def __post_init__(self):
        if len(self.min_sizes) == 0 or min(self.min_sizes) < 1:
            raise ValueError(f"min_sizes must be a non-empty list of positive sizes, got {self.min_sizes}")
        if self.max_size < max(self.min_sizes):
            raise ValueError(f"max_size ({self.max_size}) must be >= every min size {tuple(self.min_sizes)}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")

    def __call__(
        self,
        image: PIL.Image.Image,
        boxes: torch.Tensor,
        rng: random.Random,
        caption: Optional[str] = None,
        spans: Sequence[Span] = (),
    ) -> Tuple[PIL.Image.Image, torch.Tensor, Optional[str], List[Span]]:
        """
        Args:
            image: the RGB image.
            boxes: (M, 4) legacy xyxy boxes in the image's pixel frame.
            rng: the sample's random generator (size choice, flip).
            caption, spans: a grounding caption and its phrase spans, updated by the flip; None for detection prompts
                (class names are not mirrored).

        Returns:
            the resized (and maybe flipped) image, its (M, 4) legacy xyxy boxes, the caption and spans.
        """
        spans = list(spans)
        # Resize (section 1's size arithmetic, bilinear PIL as the original F.resize on a PIL image)
        height, width = get_resize_output_size(image.height, image.width, rng.choice(list(self.min_sizes)), self.max_size)
        ratio_width, ratio_height = width / image.width, height / image.height
        image = image.resize((width, height), resample=PIL.Image.BILINEAR)
        # BoxList.resize multiplies by the Python-float ratios, i.e. by their float32 values
        boxes = boxes * torch.tensor([ratio_width, ratio_height, ratio_width, ratio_height], dtype=boxes.dtype)
        # RandomHorizontalFlip
        if rng.random() < self.flip_prob:
            if caption is not None:
                try:
                    caption, spans = swap_left_right(caption, spans)
                except ValueError:
                    return image, boxes, caption, spans
            image = image.transpose(PIL.Image.FLIP_LEFT_RIGHT)
            # BoxList.transpose: x1' = W - x2 - 1, x2' = W - x1 - 1 (TO_REMOVE = 1, section 8)
            boxes = torch.stack((width - boxes[:, 2] - 1, boxes[:, 1], width - boxes[:, 0] - 1, boxes[:, 3]), dim=1)
        return image, boxes, caption, spans
