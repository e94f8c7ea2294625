"""DyConv: DyHead's scale-aware / spatial-aware block over the five pyramid levels (section 5.4).

For each level l it convolves the level itself, the next finer level (stride 2) and the next coarser level
(upsampled), all with modulated deformable 3x3 convolutions whose offsets are predicted at level l, then fuses the
terms with scale-aware attention and applies DyReLU.
"""

from contextlib import nullcontext
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


def _bilinear_taps(offset: torch.Tensor, mask: torch.Tensor, size, kernel_size, stride, padding, dilation):
    """Where every tap of a modulated deformable convolution samples, as 4 weighted pixels of the input map.

    offset (B, 2K, Ho, Wo) holds (dy, dx) of tap k = i * kw + j at channels 2k, 2k + 1 (torchvision / GLIP layout),
    mask (B, K, Ho, Wo). Returns indices into the flattened input map framed by a one-pixel zero border,
    (H + 2) * (W + 2) pixels, and their weights (bilinear weight times mask), both (B, Ho * Wo * K, 4), rows ordered
    (output position, tap). A corner outside the map is moved onto the zero border, so it contributes 0 exactly like
    torchvision's `bilinear_interpolate` (whose early "return 0" for y <= -1, y >= H, ... is the case where all four
    corners are outside or carry weight 0).
    """
    batch, _, out_h, out_w = offset.shape
    height, width = size
    (kernel_h, kernel_w), (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w) = kernel_size, stride, padding, dilation
    dtype, device = offset.dtype, offset.device
    tap_y = (torch.arange(kernel_h, device=device) * dil_h).repeat_interleave(kernel_w).to(dtype)  # (K,)
    tap_x = (torch.arange(kernel_w, device=device) * dil_w).repeat(kernel_h).to(dtype)
    out_y = (torch.arange(out_h, device=device) * stride_h - pad_h).to(dtype)
    out_x = (torch.arange(out_w, device=device) * stride_w - pad_w).to(dtype)
    # (B, Ho, Wo, K): the rows of one output position are its K taps
    offset = offset.unflatten(1, (kernel_h * kernel_w, 2)).permute(0, 3, 4, 1, 2)
    y = (out_y[:, None, None] + tap_y) + offset[..., 0]  # summed in torchvision's order
    x = (out_x[:, None] + tap_x) + offset[..., 1]
    y_low, x_low = y.floor(), x.floor()
    frac_y, frac_x = y - y_low, x - x_low
    corner = torch.tensor([0.0, 1.0], dtype=dtype, device=device)
    # corners (low, high) per axis, outside ones clamped onto the border row / column; +1 for the border. A NaN / inf
    # offset (NaN weights or activations) must not become a garbage index: it reads the zero border, and its NaN
    # bilinear weight carries the NaN into the output (where post-processing refuses it), without a host sync here.
    rows = ((y_low.nan_to_num(-1.0)[..., None] + corner).clamp(-1, height) + 1).long()  # (B, Ho, Wo, K, 2)
    cols = ((x_low.nan_to_num(-1.0)[..., None] + corner).clamp(-1, width) + 1).long()
    weight_y = torch.stack((1 - frac_y, frac_y), dim=-1) * mask.permute(0, 2, 3, 1)[..., None]
    weight_x = torch.stack((1 - frac_x, frac_x), dim=-1)
    indices = rows[..., :, None] * (width + 2) + cols[..., None, :]  # (B, Ho, Wo, K, 2, 2)
    weights = weight_y[..., :, None] * weight_x[..., None, :]
    return indices.reshape(batch, -1, 4), weights.reshape(batch, -1, 4)


def modulated_deform_conv2d(
    x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation
) -> torch.Tensor:
    """Modulated deformable convolution (DCNv2) with one offset group: `torchvision.ops.deform_conv2d`'s function.

    x (B, C, H, W), offset (B, 2K, Ho, Wo), mask (B, K, Ho, Wo), weight (O, C, kh, kw), bias (O,) or None
    -> (B, O, Ho, Wo), channels-last in memory. Each tap's masked bilinear sample is a weighted sum of 4 rows of
    the channels-last input framed by zeros, ((H + 2) * (W + 2), C) per image; one `embedding_bag` builds the
    (B * Ho * Wo, K * C) columns of the batch and one matrix product with the (K * C, O) weights finishes it
    (torchvision's CPU kernel samples channel by channel).
    """
    batch, channels, height, width = x.shape
    out_channels, _, kernel_h, kernel_w = weight.shape
    out_h, out_w = offset.shape[-2:]
    taps = kernel_h * kernel_w
    if offset.shape[1] != 2 * taps or mask.shape[1] != taps or weight.shape[1] != channels:
        raise ValueError(
            f"one offset / weight group supported: offset {tuple(offset.shape)}, mask {tuple(mask.shape)}, "
            f"weight {tuple(weight.shape)} for input {tuple(x.shape)}"
        )
    indices, tap_weights = _bilinear_taps(offset, mask, (height, width), (kernel_h, kernel_w), stride, padding, dilation)
    framed = (height + 2) * (width + 2)
    pixels = x.new_zeros(batch, height + 2, width + 2, channels)
    pixels[:, 1:-1, 1:-1] = x.permute(0, 2, 3, 1)
    # one table of every image's framed pixels; each image's bags index its own rows
    indices = indices + torch.arange(batch, device=indices.device)[:, None, None] * framed
    columns = F.embedding_bag(indices.flatten(0, 1), pixels.view(batch * framed, channels), per_sample_weights=tap_weights.flatten(0, 1), mode="sum")
    columns = columns.view(batch * out_h * out_w, taps * channels)
    kernel = weight.permute(0, 2, 3, 1).reshape(out_channels, taps * channels)  # columns ordered (tap, channel)
    out = columns @ kernel.T if bias is None else torch.addmm(bias, columns, kernel.T)
    return out.view(batch, out_h, out_w, out_channels).permute(0, 3, 1, 2)


class ModulatedDeformConv2d(DeformConv2d):
    """Modulated deformable 3x3 convolution with torchvision's parameters and semantics, in one of two forms of the
    same function (tests/test_fast_paths.py): `modulated_deform_conv2d` ("embedding_bag") or torchvision's own
    `deform_conv2d` ("torchvision"). `implementation="auto"` (`GLIPConfig.deformable_conv_implementation`) runs the
    embedding_bag form on CPU, where it is 3x torchvision's channel-by-channel kernel, and torchvision's elsewhere,
    which on CUDA is a dedicated kernel like the original's (`benchmarks/gpu_check.py` times both on a GPU).

    Half-precision inputs are computed in float32 and the output is cast back (the reference, torchvision's CPU
    kernel, has no half-precision version).

    While `torch.onnx.export` traces the model it always runs torchvision's form, which torch.onnx writes as one ONNX
    `DeformConv` node (opset 19): the `embedding_bag` with per-sample weights becomes an ONNX `Loop` over bags (64
    channels, a 40x60 map, 2 threads: 37 s in ONNX Runtime against 0.035 s for `DeformConv`; tests/test_onnx_export.py).
    """

    def __init__(self, *args, implementation: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.implementation = implementation

    def uses_torchvision(self, device: torch.device) -> bool:
        """Whether a call on `device` runs torchvision's form."""
        if self.implementation == "auto":
            return device.type != "cpu" or torch.onnx.is_in_onnx_export()
        return self.implementation == "torchvision" or torch.onnx.is_in_onnx_export()

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x_c, offset_c, mask_c = x.to(compute_dtype), offset.to(compute_dtype), mask.to(compute_dtype)
        weight, bias = self.weight.to(compute_dtype), None if self.bias is None else self.bias.to(compute_dtype)
        # autocast is switched off only where it is on: an autocast region, even a disabled one, becomes a
        # higher-order op under torch.export whose splitting pass re-generates the whole graph's code per region
        with torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type) else nullcontext():
            if self.uses_torchvision(x.device):
                out = deform_conv2d(x_c, offset_c, weight, bias, self.stride, self.padding, self.dilation, mask=mask_c)
            else:
                out = modulated_deform_conv2d(x_c, offset_c, mask_c, weight, bias, self.stride, self.padding, self.dilation)
        return out.to(x.dtype)


class Conv3x3Norm(nn.Module):
    """3x3 (modulated deformable) convolution followed by GroupNorm."""

    def __init__(self, channels: int, stride: int, deformable: bool, num_groups: int, eps: float, implementation: str = "auto"):
        super().__init__()
        if deformable:
            self.conv = ModulatedDeformConv2d(channels, channels, kernel_size=3, stride=stride, padding=1, implementation=implementation)
        else:
            self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=stride, padding=1)
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

    def forward(self, terms: List[torch.Tensor]) -> torch.Tensor:
        """terms: K maps (B, C, H, W) -> their mean weighted by the attention of each, (B, C, H, W).

        The original stacks the terms (and first computes a plain mean that it overwrites, section 5.4); the weighted
        sum is accumulated in place here instead.
        """
        fused = None
        for term in terms:
            weight = F.hardsigmoid(F.relu(self.conv(F.adaptive_avg_pool2d(term, 1))))  # (B, 1, 1, 1)
            fused = term * weight if fused is None else fused.addcmul_(term, weight)
        return fused.div_(len(terms))


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
            Conv3x3Norm(
                channels, stride, config.use_deformable_conv, config.group_norm_num_groups, config.group_norm_eps, config.deformable_conv_implementation
            )
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

            # K = 2 or 3 terms
            fused = self.scale_attention(terms) if self.scale_attention is not None else sum(terms) / len(terms)
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
