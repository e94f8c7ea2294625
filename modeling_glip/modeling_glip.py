"""GLIP: Swin + FPN (P3-P7), BERT, VLDyHead deep fusion and a dot-product ATSS head (Li et al., CVPR 2022).

Numerically equivalent to microsoft/GLIP (see tests/test_parity_original.py); section numbers refer to
`docs/glip_architecture.md` (the porting report, shared with this project).
"""

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import DeformConv2d, DropBlock2d, FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from transformers import AttentionInterface, AutoBackbone, BertModel, PreTrainedModel
from transformers import initialization as init
from transformers.image_transforms import center_to_corners_format, corners_to_center_format
from transformers.models.bert.modeling_bert import BertLayer
from transformers.utils import ModelOutput
from transformers.utils.import_utils import is_torchdynamo_compiling

from .anchor_generator import ATSSAnchorGenerator, cell_anchors_per_level
from .box_coder import BoxCoder
from .configuration_glip import GLIPConfig
from .dyconv import DyConv
from .loss_glip import GLIPLoss
from .vl_fusion import BiMultiHeadAttention, VLFuse

CLAMPED_ATTENTION = "glip_clamped_eager"
# Keys of `GLIPProcessor` outputs that describe the prompt for post-processing / training and are not model inputs.
PROCESSOR_ONLY_KEYS = {"positive_map", "label_ids", "text_labels"}


def clamped_eager_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention whose scores are clamped to +-clamp BEFORE the mask is added (GLIP's head BERT layers, 5.3)."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    clamp = module.config.attention_score_clamp
    scores = scores.clamp(-clamp, clamp)  # quirk 11.6
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.dropout(scores.softmax(dim=-1), p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


AttentionInterface.register(CLAMPED_ATTENTION, clamped_eager_attention_forward)


@dataclass
class GLIPObjectDetectionOutput(ModelOutput):
    r"""
    Output of [`GLIPModel`]. N = number of anchors over P3..P7 (each level row-major (h, w), one anchor per location
    for the released models), T = prompt length (never padded to 256 by the model).

    loss (`torch.FloatTensor`, *optional*): sum of `loss_dict`, when `labels` are given.
    loss_dict (`dict[str, torch.FloatTensor]`, *optional*): `loss_reg`, `loss_centerness`, `loss_dot_product_token`.
    logits (`torch.FloatTensor` of shape `(B, N, T)`): region-word alignment logits, padded tokens included
        (use `attention_mask` to ignore them).
    pred_boxes (`torch.FloatTensor` of shape `(B, N, 4)`): decoded boxes as normalised (cx, cy, w, h) relative to
        each image's unpadded size `image_sizes`; `center_to_corners_format(pred_boxes) * (w, h, w, h)` gives the
        original's legacy xyxy boxes (not clipped).
    centerness (`torch.FloatTensor` of shape `(B, N)`): centerness logits.
    box_regression (`torch.FloatTensor` of shape `(B, N, 4)`): raw (dx, dy, dw, dh) deltas against `anchors`.
    anchors (`torch.FloatTensor` of shape `(B, N, 4)`): xyxy anchors in canvas pixels (the same for every image; an
        expanded view, batched so that pipelines can split outputs per image).
    spatial_shapes (`torch.LongTensor` of shape `(B, 5, 2)`): (h, w) of P3..P7 (the same for every image).
    image_sizes (`torch.LongTensor` of shape `(B, 2)`): unpadded (h, w) of each image (from `pixel_mask`).
    input_ids, attention_mask (`torch.LongTensor` of shape `(B, T)`): the prompt, for post-processing.
    text_hidden_state (`torch.FloatTensor` of shape `(B, T, D)`): the fused text features after the last layer.
    backbone_feature_maps (`tuple[torch.FloatTensor]`, *optional*): backbone outputs fed to the FPN (C3, C4, C5).
    vision_hidden_states (`tuple[tuple[torch.FloatTensor]]`, *optional*): the five level maps after the FPN, then
        after each tower module that changes them (VLFuse, DyConv of layer 0, VLFuse, DyConv of layer 1, ...).
    text_hidden_states (`tuple[torch.FloatTensor]`, *optional*): the text encoder output, then the text after each
        tower module that changes it (VLFuse, BERT layer of layer 0, ...).
    """

    loss: Optional[torch.FloatTensor] = None
    loss_dict: Optional[Dict[str, torch.FloatTensor]] = None
    logits: Optional[torch.FloatTensor] = None
    pred_boxes: Optional[torch.FloatTensor] = None
    centerness: Optional[torch.FloatTensor] = None
    box_regression: Optional[torch.FloatTensor] = None
    anchors: Optional[torch.FloatTensor] = None
    spatial_shapes: Optional[torch.LongTensor] = None
    image_sizes: Optional[torch.LongTensor] = None
    input_ids: Optional[torch.LongTensor] = None
    attention_mask: Optional[torch.LongTensor] = None
    text_hidden_state: Optional[torch.FloatTensor] = None
    backbone_feature_maps: Optional[Tuple[torch.FloatTensor, ...]] = None
    vision_hidden_states: Optional[Tuple[Tuple[torch.FloatTensor, ...], ...]] = None
    text_hidden_states: Optional[Tuple[torch.FloatTensor, ...]] = None


class GLIPFeaturePyramidNetwork(FeaturePyramidNetwork):
    """torchvision's FPN with P6 from P5 and P7 from relu(P6) (`LastLevelP6P7`, bitwise equal to GLIP's, section 4),
    plus GLIP's training-time DropBlock before every output conv except the top one."""

    def __init__(self, in_channels: List[int], out_channels: int, drop_block_prob: float, drop_block_size: int):
        super().__init__(in_channels, out_channels, extra_blocks=LastLevelP6P7(out_channels, out_channels))
        self.drop_block = DropBlock2d(drop_block_prob, drop_block_size) if drop_block_prob > 0 else nn.Identity()

    def get_result_from_layer_blocks(self, x: torch.Tensor, idx: int) -> torch.Tensor:
        if idx != -1 and idx != len(self.layer_blocks) - 1:  # not on the top (P5) path (section 4)
            x = self.drop_block(x)
        return super().get_result_from_layer_blocks(x, idx)


class GLIPFusionLayer(nn.Module):
    """One VLDyHead layer: VLFuse (image <-> text), a BERT layer on the text, DyConv on the image (section 5.1)."""

    def __init__(self, config: GLIPConfig):
        super().__init__()
        self.vl_fuse = VLFuse(config)
        text_layer_config = copy.deepcopy(config.text_config)
        text_layer_config._attn_implementation = CLAMPED_ATTENTION
        text_layer_config.attention_score_clamp = config.clamp_value
        self.text_layer = BertLayer(text_layer_config)
        self.dyconv = DyConv(config)

    def forward(self, vision: List[torch.Tensor], text: torch.Tensor, text_attention_mask: torch.Tensor, extended_mask: torch.Tensor):
        """vision: 5 maps (B, C, H_l, W_l); text (B, T, D) -> (vision after VLFuse, text after VLFuse, text, vision)."""
        shapes = [feature.shape[-2:] for feature in vision]
        # (B, N, C) tokens, row-major (h, w) per level, P3 first; a view per level for channels-last maps
        flat = torch.cat([feature.permute(0, 2, 3, 1).flatten(1, 2) for feature in vision], dim=1)
        flat, text = self.vl_fuse(flat, text, text_attention_mask)
        sizes = [h * w for h, w in shapes]
        # back to (B, C, H, W) maps that stay channels-last in memory (what the deformable convs read)
        fused_vision = [level.unflatten(1, tuple(shape)).permute(0, 3, 1, 2) for level, shape in zip(flat.split(sizes, dim=1), shapes)]
        fused_text = text
        text = self.text_layer(text, extended_mask)
        vision = self.dyconv(fused_vision)
        return fused_vision, fused_text, text, vision


class GLIPHead(nn.Module):
    """VLDyHead: the fusion tower followed by box, centerness and region-word (dot-product) predictors (5.5)."""

    def __init__(self, config: GLIPConfig):
        super().__init__()
        channels = config.hidden_size
        num_anchors = config.num_anchors_per_location
        text_dim = config.text_config.hidden_size
        self.clamp_value = config.clamp_value
        self.layers = nn.ModuleList(GLIPFusionLayer(config) for _ in range(config.num_fusion_layers))
        # computed nowhere: kept frozen for checkpoint compatibility (its width, 80, bounds labels per prompt; 5.5)
        self.cls_logits = nn.Conv2d(channels, num_anchors * config.num_classes_cls_logits, kernel_size=1)
        self.cls_logits.requires_grad_(False)
        self.bbox_pred = nn.Conv2d(channels, num_anchors * 4, kernel_size=1)
        self.centerness = nn.Conv2d(channels, num_anchors, kernel_size=1)
        self.scales = nn.Parameter(torch.ones(len(config.anchor_strides)))  # one learnable scale per level
        self.dot_product_projection_text = nn.Linear(text_dim, num_anchors * channels)
        self.log_scale = nn.Parameter(torch.tensor([config.log_scale_init]))
        self.bias_lang = nn.Parameter(torch.zeros(text_dim))
        self.bias0 = nn.Parameter(torch.tensor([-math.log((1 - config.prior_prob) / config.prior_prob)]))

    def forward(self, vision: List[torch.Tensor], text: torch.Tensor, text_attention_mask: torch.Tensor, output_hidden_states: bool = False):
        """vision: 5 FPN maps (B, C, H_l, W_l); text (B, T, D) unmasked BERT output; text_attention_mask (B, T).

        Returns (logits (B, N, T), box_regression (B, N, 4), centerness (B, N), final text (B, T, D),
        vision hidden states, text hidden states).
        """
        # HF extended mask: 0 for valid tokens, dtype-min for padded ones (5.3)
        extended_mask = (1.0 - text_attention_mask[:, None, None, :].to(text.dtype)) * torch.finfo(text.dtype).min
        vision_states, text_states = [tuple(vision)], [text]
        for layer in self.layers:
            fused_vision, fused_text, text, vision = layer(vision, text, text_attention_mask, extended_mask)
            if output_hidden_states:
                vision_states += [tuple(fused_vision), tuple(vision)]
                text_states += [fused_text, text]

        # region-word alignment on the fused text (USE_FUSED_FEATURES_DOT_PRODUCT; quirk 11.7)
        embedding = F.normalize(text, p=2, dim=-1)
        proj_tokens = self.dot_product_projection_text(embedding / 2.0)  # (B, T, A*C)
        token_bias = torch.matmul(embedding, self.bias_lang) + self.bias0  # (B, T)

        logits, box_regression, centerness = [], [], []
        for level, feature in enumerate(vision):
            batch = feature.shape[0]
            deltas = self.bbox_pred(feature) * self.scales[level]  # (B, 4A, H, W)
            box_regression.append(deltas.permute(0, 2, 3, 1).reshape(batch, -1, 4))
            centerness.append(self.centerness(feature).permute(0, 2, 3, 1).reshape(batch, -1))
            queries = feature.permute(0, 2, 3, 1).flatten(1, 2)  # (B, HW, C), not normalised (quirk 11.7)
            level_logits = torch.matmul(queries, proj_tokens.transpose(-1, -2)) / self.log_scale.exp() + token_bias[:, None, :]
            logits.append(level_logits.clamp(-self.clamp_value, self.clamp_value))  # quirk 11.6
        return (
            torch.cat(logits, dim=1),
            torch.cat(box_regression, dim=1),
            torch.cat(centerness, dim=1),
            text,
            tuple(vision_states) if output_hidden_states else None,
            tuple(text_states) if output_hidden_states else None,
        )


class GLIPPreTrainedModel(PreTrainedModel):
    config: GLIPConfig
    base_model_prefix = "glip"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # sdpa / flash only concern the BERT text encoder; the fusion and head text layers keep GLIP's clamped attention
    _supports_sdpa = True
    _supports_flash_attn = False
    _no_split_modules = ["GLIPFusionLayer"]

    def save_pretrained(self, save_directory, *args, **kwargs):
        if self._auto_class is not None:  # remote code: let plain AutoModel resolve the class too
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), "AutoModel": f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _initialize_weights(self, module, is_custom_code: bool = False):
        # Our `_init_weights` writes only through `transformers.initialization`, which skips loaded tensors, so the
        # parameter-less GLIP parents (DyConv, FPN, BiMultiHeadAttention) must be visited too; transformers' guard for
        # custom code would mark them initialised without calling `_init_weights`.
        super()._initialize_weights(module, is_custom_code=False)

    @torch.no_grad()
    def _init_weights(self, module):
        """GLIP's initialisation (VLDyHead / DyConv / VLFuse `__init__`s of the original)."""
        # `initialize_weights` visits children before parents, so a parent's branch below overrides its children
        if isinstance(module, GLIPHead):
            prior_bias = -math.log((1 - self.config.prior_prob) / self.config.prior_prob)
            for conv in (module.cls_logits, module.bbox_pred, module.centerness):
                init.normal_(conv.weight, std=0.01)
                init.zeros_(conv.bias)
            init.constant_(module.cls_logits.bias, prior_bias)
            init.ones_(module.scales)
            init.constant_(module.log_scale, self.config.log_scale_init)
            init.zeros_(module.bias_lang)
            init.constant_(module.bias0, prior_bias)
            init.normal_(module.dot_product_projection_text.weight, std=self.config.initializer_range)
            init.zeros_(module.dot_product_projection_text.bias)
        elif isinstance(module, VLFuse):
            init.constant_(module.gamma_v, self.config.layer_scale_init)
            init.constant_(module.gamma_l, self.config.layer_scale_init)
        elif isinstance(module, BiMultiHeadAttention):
            for linear in (module.v_proj, module.l_proj, module.values_v_proj, module.values_l_proj, module.out_v_proj, module.out_l_proj):
                init.xavier_uniform_(linear.weight)
                init.zeros_(linear.bias)
        elif isinstance(module, DyConv):
            for conv in module.modules():
                if isinstance(conv, nn.Conv2d):
                    init.normal_(conv.weight, std=0.01)
                    init.zeros_(conv.bias)
                elif isinstance(conv, DeformConv2d):  # its own reset_parameters in the original (uniform 1/sqrt(fan_in))
                    bound = 1.0 / math.sqrt(conv.weight[0].numel())
                    init.uniform_(conv.weight, -bound, bound)
                    init.zeros_(conv.bias)
            if module.offset is not None:  # offsets start at zero (plain conv behaviour at init)
                init.zeros_(module.offset.weight)
                init.zeros_(module.offset.bias)
        elif isinstance(module, GLIPFeaturePyramidNetwork):
            for conv in module.modules():
                if isinstance(conv, nn.Conv2d):  # conv_with_kaiming_uniform (section 4)
                    init.kaiming_uniform_(conv.weight, a=1)
                    init.zeros_(conv.bias)
        elif isinstance(module, GLIPModel) and module.text_prompt is not None:
            init.zeros_(module.text_prompt)
        elif isinstance(module, ATSSAnchorGenerator):
            for level, cells in enumerate(cell_anchors_per_level(self.config)):
                init.copy_(getattr(module, f"cell_anchors_{level}"), cells)
        else:
            super()._init_weights(module)


class GLIPModel(GLIPPreTrainedModel):
    """GLIP open-vocabulary detector.

    Example:
    ```python
    >>> model = GLIPModel.from_pretrained("path/to/converted-glip-t")
    >>> outputs = model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
    ...                 attention_mask=inputs["attention_mask"], pixel_mask=inputs["pixel_mask"])
    >>> outputs.logits.shape  # (batch, anchors, prompt tokens)
    ```
    """

    def __init__(self, config: GLIPConfig):
        super().__init__(config)
        self.backbone = AutoBackbone.from_config(config.backbone_config)
        if hasattr(getattr(self.backbone, "swin", None), "layernorm"):
            # SwinBackbone never applies the classification norm and GLIP has none (swin_backbone.md): drop it
            self.backbone.swin.layernorm = nn.Identity()
        self.fpn = GLIPFeaturePyramidNetwork(
            list(self.backbone.channels[-3:]),
            config.hidden_size,
            config.fpn_drop_block_prob,
            config.fpn_drop_block_size,
        )
        self.text_model = BertModel(config.text_config, add_pooling_layer=False)
        # prompt tuning (ADD_LINEAR_LAYER, the original's `tunable_linear.weight`): per-position offsets of the text
        self.text_prompt = nn.Parameter(torch.zeros(config.text_prompt_length, config.text_config.hidden_size)) if config.text_prompt_length else None
        self.head = GLIPHead(config)
        self.anchor_generator = ATSSAnchorGenerator(config)
        self.box_coder = BoxCoder(tuple(config.box_coder_weights), config.bbox_xform_clip)
        self.criterion = GLIPLoss(
            self.box_coder,
            topk=config.atss_topk,
            focal_alpha=config.focal_alpha,
            focal_gamma=config.focal_gamma,
            reg_loss_weight=config.reg_loss_weight,
            centerness_loss_weight=config.centerness_loss_weight,
            token_loss_weight=config.token_loss_weight,
            max_text_len=config.max_text_len,
        )
        self.post_init()

    def _validate_inputs(self, pixel_values, input_ids, attention_mask, token_type_ids, pixel_mask, chunk_to_image, text_encoder_hidden_state=None):
        if pixel_values is None or input_ids is None:
            raise ValueError("GLIPModel needs both `pixel_values` (B, 3, H, W) and `input_ids` (B, T).")
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"`pixel_values` must have shape (batch, 3, height, width); got {tuple(pixel_values.shape)}.")
        self._validate_text_inputs(input_ids, attention_mask, token_type_ids)
        if chunk_to_image is None and input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"Batch size mismatch: {pixel_values.shape[0]} images but {input_ids.shape[0]} prompts. Give one prompt "
                "per image, or `chunk_to_image` (the image index of each prompt row) for several prompt rows per image."
            )
        if chunk_to_image is not None:
            if chunk_to_image.shape != input_ids.shape[:1] or chunk_to_image.is_floating_point():
                raise ValueError(
                    f"`chunk_to_image` must be an integer tensor of shape ({input_ids.shape[0]},), the image index of each "
                    f"prompt row; got {chunk_to_image.dtype} of shape {tuple(chunk_to_image.shape)}."
                )
            if not is_torchdynamo_compiling() and not bool(((chunk_to_image >= 0) & (chunk_to_image < pixel_values.shape[0])).all()):
                raise ValueError(f"`chunk_to_image` {chunk_to_image.tolist()} indexes images outside 0..{pixel_values.shape[0] - 1}.")
        if pixel_mask is not None and pixel_mask.shape != (pixel_values.shape[0], *pixel_values.shape[2:]):
            raise ValueError(f"`pixel_mask` must have shape {(pixel_values.shape[0], *pixel_values.shape[2:])}; got {tuple(pixel_mask.shape)}.")
        expected = (*input_ids.shape, self.config.text_config.hidden_size)
        if text_encoder_hidden_state is not None and tuple(text_encoder_hidden_state.shape) != expected:
            raise ValueError(
                f"`text_encoder_hidden_state` must have shape (batch, tokens, hidden) = {expected} to match `input_ids`; "
                f"got {tuple(text_encoder_hidden_state.shape)}. Index or expand the rows of `get_text_features` to the batch."
            )

    def _validate_text_inputs(self, input_ids, attention_mask, token_type_ids):
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must have shape (batch, tokens); got {None if input_ids is None else tuple(input_ids.shape)}.")
        if input_ids.shape[1] == 0:
            raise ValueError("The prompt is empty: `input_ids` has no tokens.")
        max_positions = self.config.text_config.max_position_embeddings
        if self.config.text_prompt_length:
            max_positions = min(max_positions, self.config.text_prompt_length)
        if input_ids.shape[1] > max_positions:
            raise ValueError(
                f"The prompt has {input_ids.shape[1]} tokens but the text encoder has {max_positions} positions; "
                f"split the class names into chunks (GLIP was trained with at most {self.config.max_text_len})."
            )
        for name, tensor in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if tensor is not None and tensor.shape != input_ids.shape:
                raise ValueError(f"`{name}` has shape {tuple(tensor.shape)} but `input_ids` has {tuple(input_ids.shape)}.")
        if attention_mask is not None and not is_torchdynamo_compiling() and not bool((attention_mask.sum(dim=1) > 0).all()):
            raise ValueError("A prompt is empty: its `attention_mask` row has no valid token.")

    @staticmethod
    def _validate_labels(labels, batch_size: int, num_tokens: int):
        if len(labels) != batch_size:
            raise ValueError(f"`labels` has {len(labels)} entries for {batch_size} images.")
        for index, target in enumerate(labels):
            if not {"boxes", "positive_map"} <= set(target):
                raise ValueError(f"`labels[{index}]` needs `boxes` and `positive_map`; got keys {sorted(target)}.")
            boxes, positive_map = target["boxes"], target["positive_map"]
            if boxes.dim() != 2 or boxes.shape[-1] != 4:
                raise ValueError(f"`labels[{index}]['boxes']` must be (num_boxes, 4) normalised cxcywh; got {tuple(boxes.shape)}.")
            if positive_map.shape != (boxes.shape[0], num_tokens):
                raise ValueError(
                    f"`labels[{index}]['positive_map']` must be (num_boxes, tokens) = {(boxes.shape[0], num_tokens)}; got {tuple(positive_map.shape)}."
                )

    @staticmethod
    def image_sizes_from_mask(pixel_values: torch.Tensor, pixel_mask: Optional[torch.Tensor]) -> torch.LongTensor:
        """(B, 2) unpadded (h, w): the extent of the valid region of `pixel_mask` (the whole canvas without one)."""
        batch, _, height, width = pixel_values.shape
        if pixel_mask is None:
            return torch.tensor([[height, width]] * batch, device=pixel_values.device)
        valid = pixel_mask.bool()
        return torch.stack((valid.any(dim=2).sum(dim=1), valid.any(dim=1).sum(dim=1)), dim=1)

    def get_text_features(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.LongTensor] = None,
        token_type_ids: Optional[torch.LongTensor] = None,
    ) -> torch.FloatTensor:
        """The text encoder output that `forward` feeds to the fusion tower: BERT's last hidden state, padded tokens
        not zeroed (`hidden` of GLIP's language backbone, section 3), shape (B, T, D).

        For a fixed label set (or the chunks of a long one) compute it once and pass it to every `forward` as
        `text_encoder_hidden_state` (rows indexed / expanded to each batch): BERT then runs once per chunk for a
        whole image set instead of once per image.
        """
        self._validate_text_inputs(input_ids, attention_mask, token_type_ids)
        return self.text_model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state

    def _pyramid(self, pixel_values: torch.FloatTensor, chunk_to_image: Optional[torch.LongTensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Backbone maps (C3, C4, C5) and FPN maps (P3..P7) of every prompt row, each (R, C, H, W).

        The backbone and FPN run once per image; with `chunk_to_image` (a chunked vocabulary: several prompt rows per
        image) each row then takes its image's maps.
        """
        backbone_maps = self.backbone(pixel_values).feature_maps[-3:]  # strides 8, 16, 32
        pyramid = list(self.fpn(OrderedDict((str(i), feature) for i, feature in enumerate(backbone_maps))).values())
        if chunk_to_image is not None:
            backbone_maps = [feature.index_select(0, chunk_to_image) for feature in backbone_maps]
            pyramid = [feature.index_select(0, chunk_to_image) for feature in pyramid]
        return list(backbone_maps), pyramid

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.LongTensor] = None,
        token_type_ids: Optional[torch.LongTensor] = None,
        pixel_mask: Optional[torch.LongTensor] = None,
        chunk_to_image: Optional[torch.LongTensor] = None,
        labels: Optional[List[Dict[str, torch.Tensor]]] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        text_encoder_hidden_state: Optional[torch.FloatTensor] = None,
        **processor_outputs,
    ):
        r"""
        pixel_values (`torch.FloatTensor` of shape `(I, 3, H, W)`): normalised BGR x255 images on a zero-padded
            canvas (see `GLIPImageProcessor`). Padding changes the outputs exactly as in the original (padded pixels
            enter GroupNorm, pooling and fusion statistics), so batch only images that share a canvas when results
            must not depend on batch mates.
        input_ids (`torch.LongTensor` of shape `(B, T)`): the prompt rows; T may be anything up to the text encoder's
            positions (no forced padding to 256). B = I unless `chunk_to_image` is given.
        attention_mask (`torch.LongTensor` of shape `(B, T)`, *optional*): 1 for real tokens, 0 for padding.
        token_type_ids (`torch.LongTensor` of shape `(B, T)`, *optional*): BERT segment ids (zeros).
        pixel_mask (`torch.LongTensor` of shape `(I, H, W)`, *optional*): 1 on real pixels; gives `image_sizes`.
        chunk_to_image (`torch.LongTensor` of shape `(B,)`, *optional*): the image of each prompt row, when an image
            has several rows (a vocabulary split into prompt chunks by `GLIPProcessor`): the backbone and FPN run once
            per image and every row reads its image's features. Outputs are per prompt row.
        labels (`list[dict]`, *optional*): per image `boxes` (M, 4) normalised (cx, cy, w, h) relative to the unpadded
            image and `positive_map` (M, T) 0/1 (the tokens of each box's phrase). Returns `loss` and `loss_dict`.
        output_hidden_states (`bool`, *optional*): also return backbone, vision and text hidden states.
        text_encoder_hidden_state (`torch.FloatTensor` of shape `(B, T, D)`, *optional*): `get_text_features` of this
            batch's prompts, computed once for a fixed vocabulary; the text encoder is then skipped.
        processor_outputs: the `GLIPProcessor` keys that are not model inputs (`positive_map`, `label_ids`,
            `text_labels`) are accepted so that `model(**inputs)` works; anything else is an error.
        """
        unknown = set(processor_outputs) - PROCESSOR_ONLY_KEYS
        if unknown:
            raise TypeError(f"GLIPModel.forward got unexpected arguments {sorted(unknown)}")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        self._validate_inputs(pixel_values, input_ids, attention_mask, token_type_ids, pixel_mask, chunk_to_image, text_encoder_hidden_state)
        if labels is not None:
            self._validate_labels(labels, input_ids.shape[0], input_ids.shape[1])
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pixel_values = pixel_values.to(self.dtype)
        image_sizes = self.image_sizes_from_mask(pixel_values, pixel_mask)
        if chunk_to_image is not None:
            image_sizes = image_sizes.index_select(0, chunk_to_image)
        batch_size = input_ids.shape[0]

        backbone_maps, pyramid = self._pyramid(pixel_values, chunk_to_image)
        if text_encoder_hidden_state is None:
            text = self.get_text_features(input_ids, attention_mask, token_type_ids)
        else:
            text = text_encoder_hidden_state.to(self.dtype)
        if self.text_prompt is not None:
            text = text + self.text_prompt[: text.shape[1]]  # added before the fusion tower, as the original's VLDyHead

        logits, box_regression, centerness, text, vision_states, text_states = self.head(pyramid, text, attention_mask, output_hidden_states)

        spatial_shapes = [feature.shape[-2:] for feature in pyramid]
        anchors = self.anchor_generator(spatial_shapes)
        boxes_xyxy = self.box_coder.decode(box_regression, anchors[None])  # (B, N, 4) legacy pixels
        scale = image_sizes.flip(-1).repeat(1, 2).to(boxes_xyxy.dtype)[:, None, :]  # (B, 1, 4) = (w, h, w, h)
        pred_boxes = corners_to_center_format(boxes_xyxy) / scale

        loss = loss_dict = None
        if labels is not None:
            targets = [
                {"boxes": center_to_corners_format(target["boxes"].to(scale.dtype)) * scale[i], "positive_map": target["positive_map"]}
                for i, target in enumerate(labels)
            ]
            # the original computes its losses in float32 under AMP (custom_fwd(cast_inputs=float32))
            loss_dict = self.criterion(
                logits.float(), box_regression.float(), centerness.float(), anchors, [h * w for h, w in spatial_shapes], attention_mask, targets
            )
            loss = sum(loss_dict.values())

        output = GLIPObjectDetectionOutput(
            loss=loss,
            loss_dict=loss_dict,
            logits=logits,
            pred_boxes=pred_boxes,
            centerness=centerness,
            box_regression=box_regression,
            anchors=anchors.expand(batch_size, -1, -1),
            spatial_shapes=torch.tensor([list(s) for s in spatial_shapes], device=logits.device).expand(batch_size, -1, -1),
            image_sizes=image_sizes,
            input_ids=input_ids,
            attention_mask=attention_mask,
            text_hidden_state=text,
            backbone_feature_maps=tuple(backbone_maps) if output_hidden_states else None,
            vision_hidden_states=vision_states,
            text_hidden_states=text_states,
        )
        return output if return_dict else output.to_tuple()


__all__ = ["GLIPModel", "GLIPPreTrainedModel", "GLIPObjectDetectionOutput"]
