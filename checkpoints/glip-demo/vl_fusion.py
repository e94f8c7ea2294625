"""VLFuse: GLIP's deep vision-language fusion (bi-directional cross-attention between image regions and words).

Section 5.2 of glip_architecture.md. Visual tokens are all five pyramid levels flattened (row-major h, w) and
concatenated (P3 first); both directions share one clamped score matrix.
"""

import torch
from timm.layers import DropPath
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

# The original's additive text mask value (section 5.2 / quirk 11.5).
TEXT_MASK_FILL = -9e15
# exp(-x) is 0 in every floating dtype (float64 included) for x above ~745: the text->image softmax relies on it.
MIN_CLAMP_VALUE = 1000.0


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
        self.v_proj = nn.Linear(vision_dim, embed_dim)
        self.l_proj = nn.Linear(text_dim, embed_dim)
        self.values_v_proj = nn.Linear(vision_dim, embed_dim)
        self.values_l_proj = nn.Linear(text_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, vision_dim)
        self.out_l_proj = nn.Linear(embed_dim, text_dim)

    def forward(self, vision: torch.Tensor, text: torch.Tensor, text_attention_mask: torch.Tensor):
        """vision (B, N, C), text (B, T, D), text_attention_mask (B, T) 0/1 -> (delta_vision (B, N, C), delta_text (B, T, D)).

        Same function as the original's per-head form (section 5.2), with the products re-associated so that no
        (B, heads, N, head_dim) tensor is ever formed. With q_h = (v Wq_h^T + bq_h) * s, k_h = l Wk_h^T + bk_h, ...:
          scores_h = q_h k_h^T = v (s k_h Wq_h)^T + s k_h bq_h            -> one (N, C) x (C, heads*T) product
          out_v    = sum_h P_h (vl_h Wo_h^T) + bo                         -> one (N, heads*T) x (heads*T, C) product
          P'_h vv_h = (P'_h v) Wvv_h^T + (P'_h 1) bvv_h                     -> one (heads*T, N) x (N, C) product
        The scores of all heads sit side by side in one (N, heads*T) matrix per image, which both softmax directions
        read in place; images are processed one at a time so the score buffers stay at one image's size.
        """
        batch, num_tokens = text.shape[:2]
        heads, head_dim, channels = self.num_heads, self.head_dim, vision.shape[-1]
        width = heads * num_tokens

        key = self.l_proj(text).view(batch, num_tokens, heads, head_dim)
        query_weight = self.v_proj.weight.view(heads, head_dim, channels)
        # (B, heads*T, C) and (B, heads*T): the query projection folded into the keys (q is scaled, as in the original)
        score_weight = torch.einsum("bthd,hdc->bhtc", key, query_weight).reshape(batch, width, channels) * self.scale
        score_bias = torch.einsum("bthd,hd->bht", key, self.v_proj.bias.view(heads, head_dim)).reshape(batch, width) * self.scale
        # (B, heads*T, C): the text values already projected by each head's slice of out_v_proj
        value_text = self.values_l_proj(text).view(batch, num_tokens, heads, head_dim)
        text_values = torch.einsum("bthd,chd->bhtc", value_text, self.out_v_proj.weight.view(channels, heads, head_dim))
        text_values = text_values.reshape(batch, width, channels)
        # image->text mask: the original adds +1 to valid tokens and -9e15 to padded ones (quirk 11.5); a constant
        # added to a whole softmax row cancels, so valid tokens get 0 here
        fill = max(TEXT_MASK_FILL, torch.finfo(vision.dtype).min)
        text_mask = torch.zeros(text_attention_mask.shape, dtype=vision.dtype, device=vision.device)
        text_mask = text_mask.masked_fill(text_attention_mask == 0, fill)

        delta_vision, attended, attended_mass = [], [], []
        for image in range(batch):
            scores = torch.addmm(score_bias[image], vision[image], score_weight[image].T)  # (N, heads*T)
            scores = scores.clamp_(-self.clamp_value, self.clamp_value)  # quirk 11.6

            # words attend to image positions: a softmax over N of every (head, token) column, no mask at all (quirk
            # 11.4). The original first subtracts the column max and clamps to +-clamp again: softmax subtracts the max
            # itself, and the second clamp only moves entries below -clamp, whose exp is 0 before and after
            # (clamp_value >= MIN_CLAMP_VALUE).
            probs_text = nn.functional.dropout(scores.softmax(dim=0), p=self.dropout, training=self.training)
            attended.append(torch.mm(probs_text.T, vision[image]))  # (heads*T, C) = P'_h v for every head
            attended_mass.append(probs_text.sum(dim=0))  # (heads*T,) = P'_h 1: ones, unless dropout rescaled

            # image positions attend to words: a softmax over each head's T tokens
            scores = scores.view(-1, heads, num_tokens).add_(text_mask[image])
            probs_vision = nn.functional.dropout(scores.softmax(dim=-1), p=self.dropout, training=self.training)
            delta_vision.append(torch.addmm(self.out_v_proj.bias, probs_vision.view(-1, width), text_values[image]))

        attended = torch.stack(attended).view(batch, heads, num_tokens, channels)
        attended_mass = torch.stack(attended_mass).view(batch, heads, num_tokens)
        value_weight = self.values_v_proj.weight.view(heads, head_dim, channels)
        value_bias = self.values_v_proj.bias.view(heads, head_dim)
        text_update = torch.einsum("bhtc,hdc->bthd", attended, value_weight) + torch.einsum("bht,hd->bthd", attended_mass, value_bias)
        delta_text = self.out_l_proj(text_update.reshape(batch, num_tokens, heads * head_dim))
        return torch.stack(delta_vision), delta_text


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

    def forward(self, vision: torch.Tensor, text: torch.Tensor, text_attention_mask: torch.Tensor):
        """vision (B, N, C) flattened levels, text (B, T, D), text_attention_mask (B, T) -> fused (vision, text)."""
        vision = self.layer_norm_v(vision)
        text = self.layer_norm_l(text)
        delta_vision, delta_text = self.attn(vision, text, text_attention_mask)
        vision = vision + self.drop_path(self.gamma_v * delta_vision)
        text = text + self.drop_path(self.gamma_l * delta_text)
        return vision, text
