"""DyConv: DyHead's scale-aware / spatial-aware block over the five pyramid levels (section 5.4).

For each level l it convolves the level itself, the next finer level (stride 2) and the next coarser level
(upsampled), all with modulated deformable 3x3 convolutions whose offsets are predicted at level l, then fuses the
terms with scale-aware attention and applies DyReLU.
"""

from typing import List, Optional

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import DeformConv2d, deform_conv2d


def make_divisible(value: float, divisor: int) -> int:
    """Round `value` to a multiple of `divisor` without going below 90% of it (DyReLU's squeeze width)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class DyReLU(nn.Module):
    """Dynamic ReLU (K=2, with bias): out = max(x * a1 + b1, x * a2 + b2), coefficients from global context."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.channels = channels
        squeeze = make_divisible(channels // reduction, 4)
        self.fc1 = nn.Linear(channels, squeeze)
        self.fc2 = nn.Linear(squeeze, 4 * channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the average includes the zero-padded border of the batch canvas (section 5.4)
        context = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, C)
        coeffs = F.hardsigmoid(self.fc2(F.relu(self.fc1(context))))  # (B, 4C)
        a1, b1, a2, b2 = coeffs[:, :, None, None].split(self.channels, dim=1)
        a1 = (a1 - 0.5) * 2.0 + 1.0
        a2 = (a2 - 0.5) * 2.0
        b1 = b1 - 0.5
        b2 = b2 - 0.5
        return torch.maximum(x * a1 + b1, x * a2 + b2)


class ModulatedDeformConv2d(DeformConv2d):
    """torchvision's modulated deformable convolution, run in float32 for half-precision inputs.

    torchvision's CPU kernel implements neither float16 nor bfloat16, so those inputs are upcast (and the output cast
    back); float32 / float64 inputs take torchvision's path unchanged.
    """

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float32, torch.float64):
            return super().forward(x, offset, mask)
        with torch.autocast(x.device.type, enabled=False):
            out = deform_conv2d(
                x.float(),
                offset.float(),
                self.weight.float(),
                None if self.bias is None else self.bias.float(),
                stride=self.stride,
                padding=self.padding,
                dilation=self.dilation,
                mask=mask.float(),
            )
        return out.to(x.dtype)


class Conv3x3Norm(nn.Module):
    """3x3 (modulated deformable) convolution followed by GroupNorm."""

    def __init__(self, channels: int, stride: int, deformable: bool, num_groups: int, eps: float):
        super().__init__()
        conv_cls = ModulatedDeformConv2d if deformable else nn.Conv2d
        self.conv = conv_cls(channels, channels, kernel_size=3, stride=stride, padding=1)
        self.norm = nn.GroupNorm(num_groups, channels, eps=eps)

    def forward(self, x: torch.Tensor, offset: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if isinstance(self.conv, DeformConv2d):
            x = self.conv(x, offset, mask)
        else:
            x = self.conv(x)
        return self.norm(x)


class ScaleAwareAttention(nn.Module):
    """Per-term weight h_sigmoid(relu(conv1x1(avgpool(f)))) (DyHead's scale-aware attention, AttnConv)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, kernel_size=1)

    def forward(self, terms: torch.Tensor) -> torch.Tensor:
        """terms (K, B, C, H, W) -> weighted mean over K, (B, C, H, W)."""
        k, b = terms.shape[:2]
        flat = terms.flatten(0, 1)
        weights = F.hardsigmoid(F.relu(self.conv(F.adaptive_avg_pool2d(flat, 1))))  # (K*B, 1, 1, 1)
        return (terms * weights.view(k, b, 1, 1, 1)).mean(dim=0)


class DyConv(nn.Module):
    """One DyHead block applied to all levels.

    `convs[0]` convolves the next coarser level (stride 1, then bilinear upsampling), `convs[1]` the level itself,
    `convs[2]` the next finer level (stride 2); all three use the offsets / masks predicted at the current level.
    """

    def __init__(self, config):
        super().__init__()
        channels = config.hidden_size
        self.use_deformable_conv = config.use_deformable_conv
        self.convs = nn.ModuleList(
            Conv3x3Norm(channels, stride, config.use_deformable_conv, config.group_norm_num_groups, config.group_norm_eps)
            for stride in (1, 1, 2)
        )
        # 27 = 18 offsets ((dy, dx) per tap, torchvision layout) + 9 mask logits
        self.offset = nn.Conv2d(channels, 27, kernel_size=3, padding=1) if config.use_deformable_conv else None
        self.scale_attention = ScaleAwareAttention(channels) if config.use_dyfuse else None
        self.activation = DyReLU(channels, config.dyrelu_reduction) if config.use_dyrelu else nn.ReLU()

    def forward(self, features: List[torch.Tensor]) -> List[torch.Tensor]:
        """features: per level (B, C, H_l, W_l), finest first -> same shapes."""
        outputs = []
        for level, feature in enumerate(features):
            offset = mask = offset_mask = None
            if self.offset is not None:
                offset_mask = self.offset(feature)  # (B, 27, H, W)
                offset = offset_mask[:, :18]
                mask = offset_mask[:, 18:].sigmoid()

            terms = [self.convs[1](feature, offset, mask)]
            if level > 0:
                terms.append(self.convs[2](features[level - 1], offset, mask))
            if level < len(features) - 1:
                coarser = features[level + 1]
                coarse_offset = coarse_mask = None
                if offset_mask is not None:
                    coarse_offset, coarse_mask = _read_as_raw_memory(offset_mask, mask, coarser.shape[-2:])
                upsampled = F.interpolate(
                    self.convs[0](coarser, coarse_offset, coarse_mask),
                    size=feature.shape[-2:],
                    mode="bilinear",
                    align_corners=True,  # F.upsample_bilinear in the original (quirk 11.2)
                )
                terms.append(upsampled)

            stacked = torch.stack(terms)  # (K, B, C, H, W), K = 2 or 3
            fused = self.scale_attention(stacked) if self.scale_attention is not None else stacked.mean(dim=0)
            outputs.append(self.activation(fused))
        return outputs


def _read_as_raw_memory(offset_mask: torch.Tensor, mask: torch.Tensor, size):
    """Offsets / masks for the coarser level, read the way GLIP's CUDA kernel reads mis-sized buffers (quirk 11.1).

    The kernel takes the first 18*h*w (offset) and 9*h*w (mask) numbers of each image's level-l buffer in flat
    order. The offset is a channel slice of the (B, 27, H, W) conv output, whose first 18*H*W numbers per image are
    exactly the offset channels; the mask is its own contiguous sigmoid tensor.
    """
    h, w = size
    batch = offset_mask.shape[0]
    offset = offset_mask.flatten(1)[:, : 18 * h * w].reshape(batch, 18, h, w)
    mask = mask.flatten(1)[:, : 9 * h * w].reshape(batch, 9, h, w)
    return offset, mask
