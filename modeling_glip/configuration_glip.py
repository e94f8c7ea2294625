"""GLIP configuration: every hyper-parameter of the original GLIP-T / GLIP-L detectors as a named field."""

import math

from huggingface_hub.dataclasses import strict
import torch
from transformers import AutoConfig, BertConfig, PreTrainedConfig, SwinConfig, TimmBackboneConfig
from transformers.configuration_utils import SubConfigSpec

# GLIP consumes Swin stages 3..5 (strides 8, 16, 32); transformers names them stage2..stage4 (swin_backbone.md).
GLIP_SWIN_OUT_FEATURES = ["stage2", "stage3", "stage4"]

DEFORMABLE_CONV_IMPLEMENTATIONS = ("auto", "embedding_bag", "torchvision")

# Fields that, for given weights, change the model's outputs or which weights exist (anchors, box decoding, clamps,
# fusion / DyHead layout, GroupNorm, prompt tuning). A saved config always has them; a config dict or JSON that lacks
# one would silently fall back to the GLIP-T default, which may not be what the weights were trained with, so
# `from_dict` / `from_pretrained` refuse it. Training-only fields (losses, dropout, initialisation) and post-processing
# / preprocessing defaults are not in the list: their defaults are GLIP's.
WEIGHT_DEPENDENT_FIELDS = (
    "backbone_config",
    "text_config",
    "hidden_size",
    "num_fusion_layers",
    "fusion_num_heads",
    "fusion_embed_dim",
    "clamp_value",
    "use_dyrelu",
    "use_dyfuse",
    "use_deformable_conv",
    "group_norm_num_groups",
    "group_norm_eps",
    "dyrelu_reduction",
    "num_classes_cls_logits",
    "anchor_sizes",
    "anchor_strides",
    "anchor_aspect_ratios",
    "anchor_octave",
    "anchor_scales_per_octave",
    "box_coder_weights",
    "bbox_xform_clip",
    "text_prompt_length",
)


@strict
class GLIPConfig(PreTrainedConfig):
    r"""
    Configuration of a [`GLIPModel`]: Swin backbone + FPN (P3-P7), BERT text encoder, VLDyHead fusion tower and ATSS head.

    Defaults reproduce GLIP-T (`glip_Swin_T_O365_GoldG.yaml`); see `GLIPConfig.glip_t()` and `GLIPConfig.glip_l()`.
    A config loaded from a dict or file (`from_dict`, `from_pretrained`, the Auto classes) must hold every field of
    `WEIGHT_DEPENDENT_FIELDS` (anchors, box coder, clamp, fusion / DyHead layout, GroupNorm, prompt tuning, the
    sub-configs): a missing one is a ValueError instead of a silent GLIP-T default. `save_pretrained` always writes them.
    Section numbers refer to `docs/glip_architecture.md` (the porting report).

    Args:
        backbone_config (`SwinConfig` or dict): vision backbone; any `AutoBackbone` config whose last three
            `out_features` have strides 8, 16 and 32.
        text_config (`BertConfig` or dict): text encoder; the head's language layers use the same architecture.
        hidden_size (`int`, defaults to 256): FPN / head channels (BACKBONE.OUT_CHANNELS = DYHEAD.CHANNELS).
        num_fusion_layers (`int`, defaults to 6): DYHEAD.NUM_CONVS (8 for GLIP-L).
        fusion_num_heads (`int`, defaults to 8): heads of the bi-directional fusion attention (hard-coded in GLIP).
        fusion_embed_dim (`int`, defaults to 2048): inner width of the fusion attention (hard-coded in GLIP).
        fusion_dropout (`float`, defaults to 0.1): dropout on both fusion attention probability matrices.
        fusion_drop_path (`float`, defaults to 0.0): stochastic depth of the fusion residuals.
        fusion_layer_scale_init (`float`, *optional*): init of `gamma_v` / `gamma_l`; `None` means 1 / num_fusion_layers.
        clamp_value (`float`, defaults to 50000.0): the +-clamp applied to fusion attention logits, head BERT-layer
            scores and dot-product logits (section 11.6).
        use_dyrelu / use_dyfuse / use_deformable_conv (`bool`): DyHead switches (all on in GLIP-T/L).
        deformable_conv_implementation (`str`, defaults to "auto"): how the modulated deformable convolutions run, one
            function either way (tests/test_fast_paths.py): "embedding_bag" (one `F.embedding_bag` + one matmul, 3x
            torchvision's CPU kernel), "torchvision" (`torchvision.ops.deform_conv2d`: its CUDA kernel on a GPU) or
            "auto": embedding_bag on CPU, torchvision on other devices (`benchmarks/gpu_check.py` times both on a GPU).
        group_norm_num_groups (`int`, defaults to 16), group_norm_eps (`float`, defaults to 1e-5): DyConv GroupNorm.
        dyrelu_reduction (`int`, defaults to 4): squeeze ratio of DyReLU.
        num_classes_cls_logits (`int`, defaults to 80): width of the frozen `cls_logits` conv (kept for checkpoints).
        prior_prob (`float`, defaults to 0.01): initial foreground probability (bias0 = -log((1 - p) / p)).
        log_scale_init (`float`, defaults to 0.0): initial dot-product temperature (LOG_SCALE).
        anchor_sizes / anchor_strides / anchor_aspect_ratios / anchor_octave / anchor_scales_per_octave: ATSS anchors.
        box_coder_weights (`list[float]`, defaults to (10, 10, 5, 5)), bbox_xform_clip (`float`, log(1000/16)).
        max_text_len (`int`, defaults to 256): MAX_QUERY_LEN; longest prompt the released models were trained with.
        atss_topk (`int`, 9), focal_alpha (0.25), focal_gamma (2.0), reg_loss_weight (2.0),
            centerness_loss_weight (1.0), token_loss_weight (1.0): training losses (section 8).
        fpn_drop_block_prob (`float`, 0.3), fpn_drop_block_size (`int`, 3): FPN DropBlock in training (section 4).
        inference_threshold (0.05), pre_nms_top_n (1000), nms_threshold (0.6), detections_per_image (100),
            score_aggregation ("mean"): ATSS post-processing defaults (section 7), read by the processor.
        min_size_test (800), max_size_test (1333), size_divisibility (32): the original test transform.
        initializer_range (`float`, 0.02): std of the normal init of the head's language layers.
        text_prompt_length (`int`, defaults to 0): prompt tuning (the original's `language_prompt_v2`,
            FUSE_CONFIG.ADD_LINEAR_LAYER): a zero-initialised, learnable (text_prompt_length, D) offset added to the
            text encoder output at each token position (the original uses 1000 rows); 0 = none.
    """

    model_type = "glip"
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="swin"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
    }

    backbone_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    hidden_size: int = 256
    num_fusion_layers: int = 6
    fusion_num_heads: int = 8
    fusion_embed_dim: int = 2048
    fusion_dropout: float = 0.1
    fusion_drop_path: float = 0.0
    fusion_layer_scale_init: float | None = None
    clamp_value: float = 50000.0
    use_dyrelu: bool = True
    use_dyfuse: bool = True
    use_deformable_conv: bool = True
    deformable_conv_implementation: str = "auto"
    group_norm_num_groups: int = 16
    group_norm_eps: float = 1e-5
    dyrelu_reduction: int = 4
    num_classes_cls_logits: int = 80
    prior_prob: float = 0.01
    log_scale_init: float = 0.0
    anchor_sizes: list[int] | tuple[int, ...] = (64, 128, 256, 512, 1024)
    anchor_strides: list[int] | tuple[int, ...] = (8, 16, 32, 64, 128)
    anchor_aspect_ratios: list[float] | tuple[float, ...] = (1.0,)
    anchor_octave: float = 2.0
    anchor_scales_per_octave: int = 1
    box_coder_weights: list[float] | tuple[float, ...] = (10.0, 10.0, 5.0, 5.0)
    bbox_xform_clip: float = math.log(1000.0 / 16)
    max_text_len: int = 256
    atss_topk: int = 9
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    reg_loss_weight: float = 2.0
    centerness_loss_weight: float = 1.0
    token_loss_weight: float = 1.0
    fpn_drop_block_prob: float = 0.3
    fpn_drop_block_size: int = 3
    inference_threshold: float = 0.05
    pre_nms_top_n: int = 1000
    nms_threshold: float = 0.6
    detections_per_image: int = 100
    score_aggregation: str = "mean"
    min_size_test: int = 800
    max_size_test: int = 1333
    size_divisibility: int = 32
    initializer_range: float = 0.02
    text_prompt_length: int = 0

    def __post_init__(self, **kwargs):
        if self.backbone_config is None:
            self.backbone_config = swin_backbone_config()
        if self.text_config is None:
            self.text_config = BertConfig()
        super().__post_init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "GLIPConfig":
        """A config from a saved dict (`from_pretrained` and the Auto classes come here): every field of
        `WEIGHT_DEPENDENT_FIELDS` must be in `config_dict` (or in `kwargs`), else ValueError naming the missing ones.
        Configs built in code (`GLIPConfig(...)`, `glip_t()`, `glip_l()`) keep their defaults."""
        missing = [name for name in WEIGHT_DEPENDENT_FIELDS if name not in config_dict and name not in kwargs]
        if missing:
            raise ValueError(
                f"This GLIP config lacks {missing}, on which the weights' outputs depend; their defaults (GLIP-T) may not "
                "be the values the weights were trained with. Add them to config.json with the training values (a config "
                "saved by GLIPConfig.save_pretrained has them all; for the released GLIP-T / GLIP-L see "
                "GLIPConfig.glip_t().to_dict() / glip_l().to_dict()), or pass them to from_pretrained as keyword arguments."
            )
        return super().from_dict(config_dict, **kwargs)

    def validate_architecture(self):
        """Checks the relations between fields that the original hard-wires."""
        if len(self.anchor_sizes) != len(self.anchor_strides):
            raise ValueError(f"anchor_sizes {self.anchor_sizes} and anchor_strides {self.anchor_strides} differ in length")
        if len(self.anchor_strides) != 5:
            raise ValueError(f"GLIP predicts on 5 levels (P3-P7); got {len(self.anchor_strides)} anchor strides")
        if self.fusion_embed_dim % self.fusion_num_heads:
            raise ValueError(f"fusion_embed_dim {self.fusion_embed_dim} is not divisible by fusion_num_heads {self.fusion_num_heads}")
        if self.hidden_size % self.group_norm_num_groups:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by group_norm_num_groups {self.group_norm_num_groups}")
        if self.text_prompt_length < 0:
            raise ValueError(f"text_prompt_length must be >= 0, got {self.text_prompt_length}")
        if self.deformable_conv_implementation not in DEFORMABLE_CONV_IMPLEMENTATIONS:
            raise ValueError(f"deformable_conv_implementation must be one of {DEFORMABLE_CONV_IMPLEMENTATIONS}, got {self.deformable_conv_implementation!r}")
        if self.score_aggregation not in ("mean", "max"):
            raise ValueError(f"score_aggregation must be 'mean' or 'max', got {self.score_aggregation!r}")

    def validate_loss(self):
        """The training losses' settings: a focal weight outside [0, 1] or a negative exponent / weight trains nonsense."""
        if not 0.0 <= self.focal_alpha <= 1.0:
            raise ValueError(f"focal_alpha must be in [0, 1], got {self.focal_alpha}")
        for name in ("focal_gamma", "reg_loss_weight", "centerness_loss_weight", "token_loss_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")

    @property
    def layer_scale_init(self) -> float:
        """Init of the fusion layer scale: 1 / NUM_CONVS unless set (section 5.2)."""
        if self.fusion_layer_scale_init is not None:
            return self.fusion_layer_scale_init
        return 1.0 / self.num_fusion_layers

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.anchor_aspect_ratios) * self.anchor_scales_per_octave

    @classmethod
    def glip_t(cls, **kwargs) -> "GLIPConfig":
        """GLIP-T (`glip_tiny_model_o365_goldg*.pth`): Swin-T, BERT-base, 6 fusion layers."""
        return cls(**{"backbone_config": swin_backbone_config(), "text_config": BertConfig(), **kwargs})

    @classmethod
    def glip_l(cls, **kwargs) -> "GLIPConfig":
        """GLIP-L (`glip_large_model.pth`): Swin-L (window 12), BERT-base, 8 fusion layers."""
        backbone = swin_backbone_config(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12, drop_path_rate=0.4)
        return cls(**{"backbone_config": backbone, "text_config": BertConfig(), "num_fusion_layers": 8, **kwargs})


def swin_backbone_config(
    embed_dim: int = 96,
    depths=(2, 2, 6, 2),
    num_heads=(3, 6, 12, 24),
    window_size: int = 7,
    drop_path_rate: float = 0.2,
) -> SwinConfig:
    """transformers `SwinConfig` equal to GLIP's Swin (swin_backbone.md): no APE, LN eps 1e-5, stages 3..5 out."""
    return SwinConfig(
        embed_dim=embed_dim,
        depths=list(depths),
        num_heads=list(num_heads),
        window_size=window_size,
        patch_size=4,
        mlp_ratio=4.0,
        qkv_bias=True,
        use_absolute_embeddings=False,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        drop_path_rate=drop_path_rate,
        out_features=GLIP_SWIN_OUT_FEATURES,
    )


def timm_backbone_config(name: str, **kwargs) -> TimmBackboneConfig:
    """transformers `TimmBackboneConfig` of any timm model whose `features_only` levels of strides 8, 16 and 32 become
    GLIP's C3-C5 (the FPN builds P3-P5 from them, P6-P7 on top); random init (`pretrained` weights need the Hub).

    Raises:
        ValueError: the model has no feature levels at strides 8, 16 and 32.
    """
    import timm

    with torch.device("meta"):
        reductions = timm.create_model(name, pretrained=False, features_only=True).feature_info.reduction()
    try:
        out_indices = [reductions.index(stride) for stride in (8, 16, 32)]
    except ValueError:
        raise ValueError(f"timm model {name!r} has feature strides {reductions}; GLIP needs levels at strides 8, 16 and 32") from None
    return TimmBackboneConfig(backbone=name, out_indices=out_indices, **kwargs)


__all__ = ["GLIPConfig", "swin_backbone_config", "timm_backbone_config"]
