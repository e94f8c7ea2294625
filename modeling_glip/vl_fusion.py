"""VLFuse: GLIP's deep vision-language fusion (bi-directional cross-attention between image regions and words).

Section 5.2 of glip_architecture.md. Visual tokens are all five pyramid levels flattened (row-major h, w) and
concatenated (P3 first); both directions share one clamped score matrix.

The attention is computed in a re-associated form that never builds the (B, heads, N, head_dim) query / value tensors
of the image side (N is ~22k positions for an 800x1333 image). The three image-side projections are therefore used
through their transposes; each is a `nn.Linear` subclass whose own `forward` does that algebra, so that every weight is
read inside the forward of the module that owns it (what Accelerate's offload hooks and `device_map` rely on) and the
checkpoint keys stay the original's (`v_proj`, `values_v_proj`, `out_v_proj`).
"""

from typing import Tuple

import torch
from timm.layers import DropPath
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

# The original's additive text mask value (section 5.2 / quirk 11.5).
TEXT_MASK_FILL = -9e15
# exp(-x) is 0 in every floating dtype (float64 included) for x above ~745: the text->image softmax relies on it.
MIN_CLAMP_VALUE = 1000.0


def explicit_softmax_applies(scores: torch.Tensor) -> bool:
    """Whether the fusion's two softmaxes run as `explicit_softmax`: fp32 inference on CPU, outside tracing.

    There, over the (B, N, heads * T) scores (N ~22k positions), `torch.softmax` along dim 1 takes 2.2x the explicit
    passes and sums less accurately (max error against float64 6.5e-5, explicit 2.7e-7, at N = 22400), and along
    the last dim it allocates a second score-sized buffer where the explicit form reuses the scores' own memory
    (benchmarks/README.md). Autograd, half precision, other devices, torch.compile and ONNX export keep the fused
    `torch.softmax`; the two forms agree within rounding (1e-6 relative), not bit for bit, so a forward with autograd
    on can differ from one under `torch.no_grad()` in the last digits.
    """
    return (
        scores.device.type == "cpu"
        and scores.dtype == torch.float32
        and not (torch.is_grad_enabled() and scores.requires_grad)
        and not torch.compiler.is_compiling()
        and not torch.onnx.is_in_onnx_export()
    )


def explicit_softmax(scores: torch.Tensor, dim: int, in_place: bool) -> torch.Tensor:
    """softmax(scores, dim) as exp(scores - max) / sum in three passes; `in_place` overwrites `scores` with it."""
    shifted = scores.sub_(scores.amax(dim, keepdim=True)) if in_place else torch.sub(scores, scores.amax(dim, keepdim=True))
    shifted.exp_()
    return shifted.div_(shifted.sum(dim, keepdim=True))


class HeadwiseLinear(nn.Linear):
    """A `nn.Linear` between a feature space and `num_heads` concatenated head spaces of `head_dim` each."""

    def __init__(self, in_features: int, out_features: int, num_heads: int):
        super().__init__(in_features, out_features)
        self.num_heads = num_heads


class FoldedQueryProjection(HeadwiseLinear):
    """The image query projection q = v W_q^T + b_q (C -> heads * d), folded into each head's keys.

    Per head h, q_h . k = v . (W_q,h^T k) + b_q,h . k: the scores of N image positions against T words are one
    (N, C) x (C, heads * T) product with the returned key-side matrix, and no (N, heads * d) query tensor is formed.
    """

    def forward(self, key: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """key (B, T, heads, d) -> scale * (W_q,h^T k_t) as (B, heads * T, C) and scale * (b_q,h . k_t) as (B, heads * T)."""
        batch, num_tokens, heads, head_dim = key.shape
        weight = self.weight.view(heads, head_dim, self.in_features)
        score_weight = torch.einsum("bthd,hdc->bhtc", key, weight).reshape(batch, heads * num_tokens, self.in_features)
        score_bias = torch.einsum("bthd,hd->bht", key, self.bias.view(heads, head_dim)).reshape(batch, heads * num_tokens)
        return score_weight * scale, score_bias * scale


class FoldedOutputProjection(HeadwiseLinear):
    """The image-side output projection (heads * d -> C) applied to the attention over words.

    out = concat_h(P_h V_h) W_o^T + b_o = sum_h P_h (V_h W_o,h^T) + b_o: each head's word values are projected first
    (heads * T rows), then one (N, heads * T) x (heads * T, C) product per image sums heads and words at once.
    """

    def forward(self, probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """probs (B, N, heads * T) attention of image positions over (head, word); values (B, T, heads, d) -> (B, N, C)."""
        batch, num_tokens, heads, head_dim = values.shape
        weight = self.weight.view(self.out_features, heads, head_dim)
        projected = torch.einsum("bthd,chd->bhtc", values, weight).reshape(batch, heads * num_tokens, self.out_features)
        return torch.baddbmm(self.bias, probs, projected)


class FoldedValueProjection(HeadwiseLinear):
    """The image value projection (C -> heads * d) applied after the words' attention over image positions.

    P'_h (v W_v,h^T + b_v,h) = (P'_h v) W_v,h^T + (P'_h 1) b_v,h: the attention first averages the (N, C) image
    features per (head, word), so no (N, heads * d) value tensor is formed.
    """

    def forward(self, attended: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        """attended (B, heads, T, C) = P'_h v; mass (B, heads, T) = P'_h 1 (ones unless dropout) -> (B, T, heads * d)."""
        heads = self.num_heads
        weight = self.weight.view(heads, -1, self.in_features)
        values = torch.einsum("bhtc,hdc->bthd", attended, weight) + torch.einsum("bht,hd->bthd", mass, self.bias.view(heads, -1))
        return values.flatten(2)


class BiMultiHeadAttention(nn.Module):
    """Bi-directional multi-head attention: image queries attend to words and words attend to image positions.

    Args:
        vision_dim: channels C of the visual tokens; text_dim: width D of the text tokens;
        embed_dim / num_heads: inner attention width and heads (GLIP hard-codes 2048 / 8);
        dropout: dropout on both probability matrices; clamp_value: the +-clamp of the logits (quirk 11.6).
    """

    def __init__(self, vision_dim: int, text_dim: int, embed_dim: int, num_heads: int, dropout: float, clamp_value: float):
        super().__init__()
        if clamp_value < MIN_CLAMP_VALUE:
            raise ValueError(f"clamp_value must be >= {MIN_CLAMP_VALUE} (the original hard-codes 50000), got {clamp_value}")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim**-0.5
        self.dropout = dropout
        self.clamp_value = clamp_value
        self.v_proj = FoldedQueryProjection(vision_dim, embed_dim, num_heads)
        self.l_proj = nn.Linear(text_dim, embed_dim)
        self.values_v_proj = FoldedValueProjection(vision_dim, embed_dim, num_heads)
        self.values_l_proj = nn.Linear(text_dim, embed_dim)
        self.out_v_proj = FoldedOutputProjection(embed_dim, vision_dim, num_heads)
        self.out_l_proj = nn.Linear(embed_dim, text_dim)

    def forward(self, vision: torch.Tensor, text: torch.Tensor, text_attention_mask: torch.Tensor):
        """vision (B, N, C), text (B, T, D), text_attention_mask (B, T) 0/1 ->

        delta_vision (B, N, C), delta_text (B, T, D), and the two attention maps that produced them:
        image -> text probabilities (B, heads, N, T) (each image position over the words) and text -> image
        probabilities (B, heads, T, N) (each word over the image positions). Both maps are views of tensors the
        computation needs anyway; they are recorded only when `output_attentions=True` asks for them.

        Same function as the original's per-head form (section 5.2); see the projection classes for the algebra.
        The scores of all heads sit side by side in one (N, heads * T) matrix per image, which both softmax
        directions read.
        """
        batch, num_tokens = text.shape[:2]
        heads, positions = self.num_heads, vision.shape[1]

        key = self.l_proj(text).view(batch, num_tokens, heads, self.head_dim)
        score_weight, score_bias = self.v_proj(key, self.scale)  # (B, heads*T, C), (B, heads*T); q is scaled as in the original
        scores = torch.baddbmm(score_bias[:, None, :], vision, score_weight.transpose(1, 2))  # (B, N, heads*T)
        scores = scores.clamp_(-self.clamp_value, self.clamp_value)  # quirk 11.6

        # words attend to image positions: a softmax over N of every (head, token) column, no mask at all (quirk 11.4).
        # The original first subtracts the column max and clamps to +-clamp again: softmax subtracts the max itself,
        # and the second clamp only moves entries below -clamp, whose exp is 0 before and after
        # (clamp_value >= MIN_CLAMP_VALUE).
        explicit = explicit_softmax_applies(scores)
        probs_text = explicit_softmax(scores, dim=1, in_place=False) if explicit else scores.softmax(dim=1)
        probs_text = nn.functional.dropout(probs_text, p=self.dropout, training=self.training)
        attended = torch.bmm(probs_text.transpose(1, 2), vision).view(batch, heads, num_tokens, -1)  # P'_h v
        if self.training and self.dropout > 0:  # P'_h 1: dropout rescales the probabilities
            attended_mass = probs_text.sum(dim=1).view(batch, heads, num_tokens)
        else:  # each softmax column sums to 1
            attended_mass = probs_text.new_ones(batch, heads, num_tokens)
        delta_text = self.out_l_proj(self.values_v_proj(attended, attended_mass))

        # image positions attend to words: a softmax over each head's T tokens. The original adds +1 to valid tokens
        # and -9e15 to padded ones (quirk 11.5); a constant added to a whole softmax row cancels, so valid tokens get 0.
        fill = max(TEXT_MASK_FILL, torch.finfo(scores.dtype).min)
        text_mask = torch.zeros(text_attention_mask.shape, dtype=scores.dtype, device=scores.device)
        text_mask = text_mask.masked_fill(text_attention_mask == 0, fill)
        scores = scores.view(batch, positions, heads, num_tokens).add_(text_mask[:, None, None, :])
        probs_vision = explicit_softmax(scores, dim=-1, in_place=True) if explicit else scores.softmax(dim=-1)  # scores are done
        probs_vision = nn.functional.dropout(probs_vision, p=self.dropout, training=self.training)
        value_text = self.values_l_proj(text).view(batch, num_tokens, heads, self.head_dim)
        delta_vision = self.out_v_proj(probs_vision.view(batch, positions, heads * num_tokens), value_text)

        vision_to_text = probs_vision.permute(0, 2, 1, 3)  # (B, heads, N, T)
        text_to_vision = probs_text.view(batch, positions, heads, num_tokens).permute(0, 2, 3, 1)  # (B, heads, T, N)
        return delta_vision, delta_text, vision_to_text, text_to_vision


class VLFuse(GradientCheckpointingLayer):
    """One early-fusion block (GLIP's `BiAttentionBlockForCheckpoint`, MHA-B): pre-norm bi-attention with layer scale.

    The residual is added to the layer-normed input, not to the raw input (quirk 11.3).
    """

    def __init__(self, config):
        super().__init__()
        text_dim = config.text_config.hidden_size
        self.layer_norm_v = nn.LayerNorm(config.hidden_size)
        self.layer_norm_l = nn.LayerNorm(text_dim)
        self.attn = BiMultiHeadAttention(
            config.hidden_size, text_dim, config.fusion_embed_dim, config.fusion_num_heads, config.fusion_dropout, config.clamp_value
        )
        self.drop_path = DropPath(config.fusion_drop_path) if config.fusion_drop_path > 0 else nn.Identity()
        self.gamma_v = nn.Parameter(torch.full((config.hidden_size,), config.layer_scale_init))
        self.gamma_l = nn.Parameter(torch.full((text_dim,), config.layer_scale_init))

    def forward(self, vision: torch.Tensor, text: torch.Tensor, text_attention_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """vision (B, N, C) flattened levels, text (B, T, D), text_attention_mask (B, T) -> fused (vision, text)."""
        vision = self.layer_norm_v(vision)
        text = self.layer_norm_l(text)
        delta_vision, delta_text, _, _ = self.attn(vision, text, text_attention_mask)
        vision = vision + self.drop_path(self.gamma_v * delta_vision)
        text = text + self.drop_path(self.gamma_l * delta_text)
        return vision, text
