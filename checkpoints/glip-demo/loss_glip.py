"""GLIP's training losses: ATSS anchor assignment + token-level region-word alignment (glip_architecture.md section 8).

Port of the original `ATSSLossComputation` for the GLIP-T/L configuration (dot-product token loss, GIoU box loss,
centerness BCE). Pieces:

* `box_iou_legacy`: IoU with the legacy Detectron "+1" box areas.
* `ATSSAssigner`: the matcher; adaptive training sample selection, one gt index (or -1) per anchor.
* `GLIPLoss`: the loss module called by the model with the flattened head outputs.
"""

from typing import Dict, List

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from .box_coder import BoxCoder


def box_iou_legacy(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU of (N, 4) and (M, 4) xyxy boxes -> (N, M), widths/heights counted as x2 - x1 + 1.

    Hand-written because `torchvision.ops.box_iou` uses continuous widths (x2 - x1); ATSS thresholds are computed on
    the +1 IoU in the original (legacy +1, glip_architecture.md section 8).
    """
    area1 = (boxes1[:, 2] - boxes1[:, 0] + 1) * (boxes1[:, 3] - boxes1[:, 1] + 1)
    area2 = (boxes2[:, 2] - boxes2[:, 0] + 1) * (boxes2[:, 3] - boxes2[:, 1] + 1)
    lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt + 1).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[:, None] + area2 - inter)


class ATSSAssigner:
    """Adaptive Training Sample Selection (Zhang et al. 2020) as used by GLIP (glip_architecture.md section 8).

    For every gt box: on each pyramid level take the `topk` anchors whose centres are closest (L2) to the gt centre;
    the IoU threshold is mean + std (unbiased) of these candidates' IoUs; a candidate is positive when its IoU reaches
    the threshold and its centre lies strictly inside the gt (by more than 0.01 px). An anchor that is positive for
    several gts takes the one with the highest IoU (ties: the lowest gt index, as `Tensor.max`).

    Assumes one anchor per location (GLIP: one aspect ratio, one scale), so `topk` anchors are taken per level.
    """

    def __init__(self, topk: int = 9):
        self.topk = topk

    @torch.no_grad()
    def __call__(self, anchors: Tensor, num_anchors_per_level: List[int], gt_boxes: Tensor) -> Tensor:
        """
        Args:
            anchors: (N, 4) xyxy anchors, pyramid levels concatenated.
            num_anchors_per_level: anchors per level, sums to N.
            gt_boxes: (M, 4) xyxy gt boxes in the same frame; M may be 0.

        Returns:
            (N,) int64: index of the matched gt box for positive anchors, -1 for negatives.
        """
        num_gt = gt_boxes.shape[0]
        matched_idxs = torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device)
        if num_gt == 0:
            return matched_idxs

        ious = box_iou_legacy(anchors, gt_boxes)  # (N, M)
        gt_centers = (gt_boxes[:, 2:] + gt_boxes[:, :2]) / 2.0
        anchor_centers = (anchors[:, 2:] + anchors[:, :2]) / 2.0
        distances = (anchor_centers[:, None, :] - gt_centers[None, :, :]).pow(2).sum(-1).sqrt()  # (N, M)

        candidate_idxs = []
        start = 0
        for num_anchors in num_anchors_per_level:
            level_distances = distances[start : start + num_anchors]
            _, level_idxs = level_distances.topk(min(self.topk, num_anchors), dim=0, largest=False)
            candidate_idxs.append(level_idxs + start)
            start += num_anchors
        candidate_idxs = torch.cat(candidate_idxs, dim=0)  # (K, M), K = sum of per-level topk

        candidate_ious = ious.gather(0, candidate_idxs)
        iou_thresh = candidate_ious.mean(0) + candidate_ious.std(0)
        is_pos = candidate_ious >= iou_thresh[None, :]

        candidate_centers = anchor_centers[candidate_idxs]  # (K, M, 2)
        ltrb = torch.stack(
            (
                candidate_centers[..., 0] - gt_boxes[:, 0],
                candidate_centers[..., 1] - gt_boxes[:, 1],
                gt_boxes[:, 2] - candidate_centers[..., 0],
                gt_boxes[:, 3] - candidate_centers[..., 1],
            ),
            dim=-1,
        )
        is_pos &= ltrb.min(dim=-1).values > 0.01  # centre strictly inside the gt (section 8)

        # IoU of every (anchor, gt) pair that is not a positive candidate is -inf, so the max over gts picks the
        # highest-IoU gt among those the anchor is positive for (the original uses -1e8; only the sign matters).
        gt_idxs = torch.arange(num_gt, device=anchors.device).expand_as(candidate_idxs)
        pos_anchor_idxs, pos_gt_idxs = candidate_idxs[is_pos], gt_idxs[is_pos]
        masked_ious = torch.full_like(ious, float("-inf"))
        masked_ious[pos_anchor_idxs, pos_gt_idxs] = ious[pos_anchor_idxs, pos_gt_idxs]
        best_ious, best_gt = masked_ious.max(dim=1)
        return torch.where(best_ious > float("-inf"), best_gt, matched_idxs)


def _reduce_mean(tensor: Tensor) -> Tensor:
    """Sum over processes / world size when torch.distributed is initialised, identity otherwise (section 8)."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor / dist.get_world_size()


class GLIPLoss(nn.Module):
    """GLIP's ATSS training losses (glip_architecture.md section 8).

    Returns the three terms the released GLIP models were trained with:

    * `loss_dot_product_token`: sigmoid focal loss (alpha, gamma) between the region-word logits and the binary
      token targets (the matched gt's positive-map row), summed over anchors x valid tokens, / num_pos.
    * `loss_reg`: GIoU loss on positive anchors between the decoded prediction and the decoded target box, weighted
      by the centerness targets and normalised by their sum, x `reg_loss_weight`.
    * `loss_centerness`: BCE-with-logits (sum) between centerness logits and centerness targets on positives, / num_pos.

    num_pos = max(#positives summed over processes / world size, 1). GLIP's `loss_cls` (focal loss on the frozen
    80-way `cls_logits`, returned multiplied by 0.0) is omitted: it is identically zero.

    Args:
        box_coder: the legacy +1 `BoxCoder` used by the head.
        topk: ATSS candidates per pyramid level (MODEL.ATSS.TOPK).
        focal_alpha, focal_gamma: token focal loss parameters (FUSE_CONFIG.TOKEN_ALPHA / TOKEN_GAMMA).
        reg_loss_weight: MODEL.ATSS.REG_LOSS_WEIGHT.
        centerness_loss_weight: multiplier of `loss_centerness` (1.0 in GLIP).
        token_loss_weight: FUSE_CONFIG.DOT_PRODUCT_TOKEN_LOSS_WEIGHT.
        max_text_len: MAX_QUERY_LEN; the original's "[NoObj]" target sits at token index max_text_len - 1.
    """

    def __init__(
        self,
        box_coder: BoxCoder,
        topk: int = 9,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        reg_loss_weight: float = 2.0,
        centerness_loss_weight: float = 1.0,
        token_loss_weight: float = 1.0,
        max_text_len: int = 256,
    ):
        super().__init__()
        self.box_coder = box_coder
        self.assigner = ATSSAssigner(topk)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.reg_loss_weight = reg_loss_weight
        self.centerness_loss_weight = centerness_loss_weight
        self.token_loss_weight = token_loss_weight
        self.max_text_len = max_text_len

    def centerness_targets(self, target_boxes: Tensor, anchors: Tensor) -> Tensor:
        """(P, 4) target boxes and (P, 4) anchors -> (P,) sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)) from the
        anchor centre to the box."""
        anchor_cx = (anchors[:, 2] + anchors[:, 0]) / 2
        anchor_cy = (anchors[:, 3] + anchors[:, 1]) / 2
        left_right = torch.stack((anchor_cx - target_boxes[:, 0], target_boxes[:, 2] - anchor_cx), dim=1)
        top_bottom = torch.stack((anchor_cy - target_boxes[:, 1], target_boxes[:, 3] - anchor_cy), dim=1)
        return torch.sqrt(
            (left_right.min(dim=1).values / left_right.max(dim=1).values)
            * (top_bottom.min(dim=1).values / top_bottom.max(dim=1).values)
        )

    def forward(
        self,
        logits: Tensor,
        box_regression: Tensor,
        centerness: Tensor,
        anchors: Tensor,
        num_anchors_per_level: List[int],
        attention_mask: Tensor,
        targets: List[Dict[str, Tensor]],
    ) -> Dict[str, Tensor]:
        """
        Args:
            logits: (B, N, T) region-word logits, levels P3..P7 concatenated (each level row-major h, w).
            box_regression: (B, N, 4) deltas (dx, dy, dw, dh) w.r.t. the anchors, for `box_coder`.
            centerness: (B, N) centerness logits.
            anchors: (N, 4) xyxy anchors in pixels, shared by all images.
            num_anchors_per_level: anchors per level (sums to N).
            attention_mask: (B, T) 1 for real prompt tokens, 0 for padding.
            targets: B dicts with "boxes" (M, 4) xyxy gt boxes (resized, unpadded image frame) and
                "positive_map" (M, T) binary map of each box's phrase tokens; M may be 0.

        Returns:
            dict with 0-d tensors "loss_reg", "loss_centerness", "loss_dot_product_token" (weights applied).
        """
        num_tokens = logits.shape[-1]
        token_targets, matched_gt_boxes, positive = [], [], []
        for target in targets:
            matched_idxs = self.assigner(anchors, num_anchors_per_level, target["boxes"])
            is_pos = matched_idxs >= 0
            image_token_targets = logits.new_zeros((anchors.shape[0], num_tokens))
            image_token_targets[is_pos] = target["positive_map"][matched_idxs[is_pos]].to(logits.dtype)
            if num_tokens >= self.max_text_len:
                # "[NoObj]" target of negatives at the last of the original's 256 padded tokens (section 8 / 11.13)
                image_token_targets[~is_pos, self.max_text_len - 1] = 1.0
            token_targets.append(image_token_targets)
            matched_gt_boxes.append(target["boxes"][matched_idxs[is_pos]])
            positive.append(is_pos)
        token_targets = torch.stack(token_targets)  # (B, N, T)
        matched_gt_boxes = torch.cat(matched_gt_boxes).to(box_regression.dtype)  # (P, 4), image-major, anchor order
        positive = torch.stack(positive)  # (B, N)

        num_pos = _reduce_mean(positive.sum().to(logits.dtype)).clamp(min=1.0)

        # the original selects the valid-token columns with masked_select before the focal loss (section 8)
        text_mask = (attention_mask > 0)[:, None, :].expand_as(logits)
        loss_token = sigmoid_focal_loss(
            logits[text_mask], token_targets[text_mask], alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
        )

        pos_anchors = anchors.to(box_regression.dtype)[None].expand(positive.shape[0], -1, -1)[positive]
        pos_deltas = box_regression[positive]
        pos_centerness = centerness[positive]
        # the target box is the gt encoded and decoded again with the anchor (section 8)
        target_boxes = self.box_coder.decode(self.box_coder.encode(matched_gt_boxes, pos_anchors), pos_anchors)
        centerness_targets = self.centerness_targets(target_boxes, pos_anchors)
        # all processes join this reduction, with or without positives, as in the original
        centerness_norm = _reduce_mean(centerness_targets.sum().detach())

        if pos_deltas.shape[0] > 0:
            pred_boxes = self.box_coder.decode(pos_deltas, pos_anchors)
            # predicted x2, y2 are raised to at least x1, y1 (section 8)
            pred_boxes = torch.cat((pred_boxes[:, :2], torch.max(pred_boxes[:, :2], pred_boxes[:, 2:])), dim=1)
            # torchvision adds eps 1e-7 to the denominators, GLIP to union and enclosing area: bitwise equal in float32
            # whenever those areas are >= 2 px^2 (adding 1e-7 is then a no-op), checked in the tests
            giou_loss = generalized_box_iou_loss(pred_boxes, target_boxes, reduction="none", eps=1e-7)
            loss_reg = (giou_loss * centerness_targets).sum() / centerness_norm
        else:
            loss_reg = pos_deltas.sum()  # no positives: zero, still in the graph (section 8)
        loss_centerness = F.binary_cross_entropy_with_logits(pos_centerness, centerness_targets, reduction="sum")

        return {
            "loss_reg": loss_reg * self.reg_loss_weight,
            "loss_centerness": loss_centerness / num_pos * self.centerness_loss_weight,
            "loss_dot_product_token": loss_token / num_pos * self.token_loss_weight,
        }
