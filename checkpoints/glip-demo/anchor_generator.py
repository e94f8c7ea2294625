"""ATSS anchors of GLIP: one legacy Detectron cell anchor per level, tiled over the feature grid (section 6)."""

import math
from typing import List, Sequence

import torch
from torch import nn


def legacy_cell_anchors(stride: int, sizes: Sequence[float], aspect_ratios: Sequence[float]) -> torch.Tensor:
    """Detectron's `generate_anchors`: (len(ratios) * len(sizes), 4) xyxy anchors centred on the cell [0, stride - 1].

    Widths are rounded and boxes end at centre + (w - 1) / 2 (legacy +1, section 6). For ratio 1 and stride 8,
    size 64 this gives [-28, -28, 35, 35].
    """
    base_size = float(stride)
    center = 0.5 * (base_size - 1)
    anchors = []
    for ratio in aspect_ratios:
        # ratio enumeration keeps the area of the base window (with rounding)
        ratio_w = round(math.sqrt(base_size * base_size / ratio))
        ratio_h = round(ratio_w * ratio)
        for size in sizes:
            scale = size / base_size
            w, h = ratio_w * scale, ratio_h * scale
            anchors.append([center - 0.5 * (w - 1), center - 0.5 * (h - 1), center + 0.5 * (w - 1), center + 0.5 * (h - 1)])
    return torch.tensor(anchors, dtype=torch.float64).float()


def cell_anchors_per_level(config) -> List[torch.Tensor]:
    """The (A, 4) cell anchor template of every level (sizes size * octave^(i / scales_per_octave))."""
    cells = []
    for stride, size in zip(config.anchor_strides, config.anchor_sizes):
        octave_sizes = [size * config.anchor_octave ** (i / config.anchor_scales_per_octave) for i in range(config.anchor_scales_per_octave)]
        cells.append(legacy_cell_anchors(stride, octave_sizes, config.anchor_aspect_ratios))
    return cells


class ATSSAnchorGenerator(nn.Module):
    """Anchors for all levels of a padded canvas, in the order the head emits predictions.

    Per level the order is row-major over (y, x), then anchor index; levels P3..P7 are concatenated.
    The cell templates are recomputed buffers (not saved in checkpoints).
    """

    def __init__(self, config):
        super().__init__()
        self.strides = list(config.anchor_strides)
        for level, cells in enumerate(cell_anchors_per_level(config)):
            self.register_buffer(f"cell_anchors_{level}", cells, persistent=False)

    def forward(self, spatial_shapes: List[torch.Size]) -> torch.Tensor:
        """spatial_shapes: (h, w) per level -> (N, 4) float32 xyxy anchors in canvas pixels, N = sum h * w * A."""
        anchors = []
        for level, ((h, w), stride) in enumerate(zip(spatial_shapes, self.strides)):
            cells = getattr(self, f"cell_anchors_{level}")
            shifts_x = torch.arange(0, w * stride, step=stride, dtype=torch.float32, device=cells.device)
            shifts_y = torch.arange(0, h * stride, step=stride, dtype=torch.float32, device=cells.device)
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shifts = torch.stack((shift_x.reshape(-1), shift_y.reshape(-1), shift_x.reshape(-1), shift_y.reshape(-1)), dim=1)
            anchors.append((shifts[:, None, :] + cells[None, :, :]).reshape(-1, 4))
        return torch.cat(anchors)
