"""GLIP's box coder: the legacy Detectron "+1" box parametrisation used by the ATSS head.

torchvision's `BoxCoder` (models/detection/_utils.py) uses continuous widths (x2 - x1); GLIP's released weights were
trained with widths x2 - x1 + 1 and boxes that end at centre + (w - 1) / 2, so that arithmetic is hand-written here
(glip_architecture.md section 7, quirk 11.10).
"""

import math
from typing import Tuple

import torch


class BoxCoder:
    """Encodes boxes as (dx, dy, dw, dh) deltas against anchors and decodes them back, legacy "+1" convention.

    Args:
        weights: divisors of the deltas (wx, wy, ww, wh); GLIP hard-codes (10, 10, 5, 5).
        bbox_xform_clip: upper clamp of dw / dh before `exp`; GLIP uses log(1000 / 16).
    """

    def __init__(self, weights: Tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0), bbox_xform_clip: float = math.log(1000.0 / 16)):
        self.weights = tuple(float(w) for w in weights)
        self.bbox_xform_clip = float(bbox_xform_clip)

    @staticmethod
    def _centers_and_sizes(boxes: torch.Tensor):
        widths = boxes[..., 2] - boxes[..., 0] + 1  # legacy +1 (section 7)
        heights = boxes[..., 3] - boxes[..., 1] + 1
        ctr_x = (boxes[..., 2] + boxes[..., 0]) / 2
        ctr_y = (boxes[..., 3] + boxes[..., 1]) / 2
        return ctr_x, ctr_y, widths, heights

    def encode(self, boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """(..., 4) xyxy target boxes and matching (..., 4) xyxy anchors -> (..., 4) deltas."""
        wx, wy, ww, wh = self.weights
        ex_ctr_x, ex_ctr_y, ex_widths, ex_heights = self._centers_and_sizes(anchors)
        gt_ctr_x, gt_ctr_y, gt_widths, gt_heights = self._centers_and_sizes(boxes)
        dx = wx * (gt_ctr_x - ex_ctr_x) / ex_widths
        dy = wy * (gt_ctr_y - ex_ctr_y) / ex_heights
        dw = ww * torch.log(gt_widths / ex_widths)
        dh = wh * torch.log(gt_heights / ex_heights)
        return torch.stack((dx, dy, dw, dh), dim=-1)

    def decode(self, deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """(..., 4) deltas and (..., 4) xyxy anchors (broadcastable) -> (..., 4) xyxy boxes in pixels."""
        anchors = anchors.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        ctr_x, ctr_y, widths, heights = self._centers_and_sizes(anchors)
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=self.bbox_xform_clip)
        dh = (deltas[..., 3] / wh).clamp(max=self.bbox_xform_clip)
        pred_ctr_x = dx * widths + ctr_x
        pred_ctr_y = dy * heights + ctr_y
        pred_w = torch.exp(dw) * widths
        pred_h = torch.exp(dh) * heights
        return torch.stack(
            (
                pred_ctr_x - 0.5 * (pred_w - 1),  # legacy: the box ends at centre + (w - 1) / 2 (section 7)
                pred_ctr_y - 0.5 * (pred_h - 1),
                pred_ctr_x + 0.5 * (pred_w - 1),
                pred_ctr_y + 0.5 * (pred_h - 1),
            ),
            dim=-1,
        )

