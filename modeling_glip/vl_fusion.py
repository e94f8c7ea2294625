"""VLFuse: GLIP's deep vision-language fusion (bi-directional cross-attention between image regions and words).

Section 5.2 of glip_architecture.md. Visual tokens are all five pyramid levels flattened (row-major h, w) and
concatenated (P3 first); both directions share one score matrix.
"""

import torch
from timm.layers import DropPath
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

# The original's additive text mask value (section 5.2 / quirk 11.5).
TEXT_MASK_FILL = -9e15


class BiMultiHeadAttention(nn.Module):
    """Bi-directional multi-head attention: image queries attend to words and words attend to image positions.

    Args:
        vision_dim: channels C of the visual tokens; text_dim: width D of the text tokens;
        embed_dim / num_heads: inner attention width and heads (GLIP hard-codes 2048 / 8);
        dropout: dropout on both probability matrices; clamp_value: the +-clamp of the logits (quirk 11.6).
    """

    def __init__(self, vision_dim: int, text_dim: int, embed_dim: int, num_heads: int, dropout: float, clamp_value: float):
        super().__init__()
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

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # (B, L, E) -> (B, heads, L, head_dim)
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        # (B, heads, L, head_dim) -> (B, L, E)
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], self.num_heads * self.head_dim)

    def forward(self, vision: torch.Tensor, text: torch.Tensor, text_attention_mask: torch.Tensor):
        """vision (B, N, C), text (B, T, D), text_attention_mask (B, T) 0/1 -> (delta_vision (B, N, C), delta_text (B, T, D))."""
        query = self._heads(self.v_proj(vision) * self.scale)  # q is scaled before the product, as in the original
        key = self._heads(self.l_proj(text))
        value_vision = self._heads(self.values_v_proj(vision))
        value_text = self._heads(self.values_l_proj(text))

        scores = torch.matmul(query, key.transpose(-1, -2))  # (B, heads, N, T)
        scores = scores.clamp(-self.clamp_value, self.clamp_value)  # quirk 11.6

        # words attend to image positions: no mask at all, padded pixels included (quirk 11.4)
        scores_text = scores.transpose(-1, -2)  # (B, heads, T, N)
        scores_text = scores_text - scores_text.amax(dim=-1, keepdim=True)
        scores_text = scores_text.clamp(-self.clamp_value, self.clamp_value)  # clamped a second time (quirk 11.6)
        probs_text = scores_text.softmax(dim=-1)

        # image positions attend to words: valid tokens get +1, padded ones -9e15, added (quirk 11.5)
        mask = text_attention_mask.to(scores.dtype)
        mask = mask.masked_fill(text_attention_mask == 0, max(TEXT_MASK_FILL, torch.finfo(scores.dtype).min))
        probs_vision = (scores + mask[:, None, None, :]).softmax(dim=-1)

        probs_vision = nn.functional.dropout(probs_vision, p=self.dropout, training=self.training)
        probs_text = nn.functional.dropout(probs_text, p=self.dropout, training=self.training)

        delta_vision = self.out_v_proj(self._merge(torch.matmul(probs_vision, value_text)))
        delta_text = self.out_l_proj(self._merge(torch.matmul(probs_text, value_vision)))
        return delta_vision, delta_text


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
