"""GLIP: Swin + FPN (P3-P7), BERT, VLDyHead deep fusion and a dot-product ATSS head (Li et al., CVPR 2022).

Numerically equivalent to microsoft/GLIP (see tests/test_parity_original.py); section numbers refer to
`docs/glip_architecture.md` (the porting report, shared with this project).
"""

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import DeformConv2d, DropBlock2d, FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from transformers import AttentionInterface, AutoBackbone, BertModel, PreTrainedModel
from transformers import initialization as init
from transformers.image_transforms import center_to_corners_format, corners_to_center_format
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.bert.modeling_bert import BertLayer, BertSelfAttention
from transformers.utils import ModelOutput
from transformers.utils.import_utils import is_torchdynamo_compiling
from transformers.utils.output_capturing import OutputRecorder, capture_outputs, install_output_capuring_hook

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
    Output of [`GLIPModel`]. B = prompt rows, N = number of anchors over P3..P7 (each level row-major (h, w), one anchor
    per location for the released models), T = prompt length (never padded to 256 by the model), C = `hidden_size`,
    D = text width, L = `num_fusion_layers`.

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
    image_sizes (`torch.LongTensor` of shape `(B, 2)`): unpadded (h, w) of each row's image (from `pixel_mask`).
    input_ids, attention_mask (`torch.LongTensor` of shape `(B, T)`): the prompt, for post-processing.
    text_hidden_state (`torch.FloatTensor` of shape `(B, T, D)`): the fused text features after the last layer.

    With `output_hidden_states=True`:

    backbone_feature_maps (`tuple[torch.FloatTensor]`): the backbone outputs fed to the FPN (C3, C4, C5), each
        `(B, C_l, H_l, W_l)`.
    vision_hidden_states (`tuple[torch.FloatTensor]`): 2L + 1 tensors of shape `(B, N, C)`, the image tokens of all
        five levels flattened (row-major per level, P3 first, the order of `logits`): the FPN output, then after the
        VLFuse and after the DyConv of each layer. `vision_levels(state)` splits one back into five `(B, C, H_l, W_l)`
        maps.
    text_hidden_states (`tuple[torch.FloatTensor]`): 2L + 1 tensors of shape `(B, T, D)`: the text encoder output
        (what the tower receives), then after the VLFuse and after the BERT layer of each layer.

    With `output_attentions=True` (probabilities after dropout, as transformers returns them):

    backbone_attentions (`tuple[torch.FloatTensor]`): the vision backbone's attentions, as its own model returns
        them (Swin: the last block of each stage, `(I * windows, heads, window_area, window_area)` per image I).
    text_encoder_attentions (`tuple[torch.FloatTensor]`): L_text tensors `(B, heads, T, T)` of the text encoder
        (empty unless the text encoder runs with `attn_implementation="eager"`: sdpa does not expose them).
    vision_to_text_attentions (`tuple[torch.FloatTensor]`): L tensors `(B, fusion_heads, N, T)`, each image position's
        attention over the words in the fusion layers.
    text_to_vision_attentions (`tuple[torch.FloatTensor]`): L tensors `(B, fusion_heads, T, N)`, each word's attention
        over the image positions (a softmax over N; padded words attend too, as in the original).
    text_attentions (`tuple[torch.FloatTensor]`): L tensors `(B, heads, T, T)` of the head's BERT layers.
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
    vision_hidden_states: Optional[Tuple[torch.FloatTensor, ...]] = None
    text_hidden_states: Optional[Tuple[torch.FloatTensor, ...]] = None
    backbone_attentions: Optional[Tuple[torch.FloatTensor, ...]] = None
    text_encoder_attentions: Optional[Tuple[torch.FloatTensor, ...]] = None
    vision_to_text_attentions: Optional[Tuple[torch.FloatTensor, ...]] = None
    text_to_vision_attentions: Optional[Tuple[torch.FloatTensor, ...]] = None
    text_attentions: Optional[Tuple[torch.FloatTensor, ...]] = None

    def vision_levels(self, state: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """One `(B, N, C)` entry of `vision_hidden_states` -> its five level maps `(B, C, H_l, W_l)` (views)."""
        return unflatten_levels(state, [tuple(shape) for shape in self.spatial_shapes[0].tolist()])


class ValueChecks:
    """Data-dependent input checks (finite, 0/1, in range...) of one call, decided with ONE host synchronisation.

    Each check is a pair of callables: `ok()` -> a boolean tensor on the inputs' device, `error()` -> the exception
    naming the argument and its bad values (built only when raised). `raise_first_failure` stacks every `ok()` and reads
    them back at once, then raises the first failure in the order added; under torch.compile / torch.export it checks
    nothing, since a data-dependent branch cannot be traced.
    """

    def __init__(self):
        self._checks: List[Tuple[Callable[[], torch.Tensor], Callable[[], Exception]]] = []

    def add(self, ok: Callable[[], torch.Tensor], error: Callable[[], Exception]):
        self._checks.append((ok, error))

    def raise_first_failure(self):
        if not self._checks or is_torchdynamo_compiling():
            return
        oks = [ok().reshape(()) for ok, _ in self._checks]
        flags = torch.stack([ok.to(oks[0].device) for ok in oks]).tolist()  # the one device -> host copy
        for flag, (_, error) in zip(flags, self._checks):
            if not flag:
                raise error()


def flatten_levels(maps: List[torch.Tensor]) -> torch.Tensor:
    """Per-level maps (B, C, H_l, W_l) -> one (B, N, C) token tensor, row-major per level, finest level first."""
    return torch.cat([feature.permute(0, 2, 3, 1).flatten(1, 2) for feature in maps], dim=1)


def unflatten_levels(tokens: torch.Tensor, shapes: List[Tuple[int, int]]) -> Tuple[torch.Tensor, ...]:
    """(B, N, C) tokens -> per-level (B, C, H_l, W_l) maps, views that are channels-last in memory."""
    sizes = [h * w for h, w in shapes]
    return tuple(level.unflatten(1, tuple(shape)).permute(0, 3, 1, 2) for level, shape in zip(tokens.split(sizes, dim=1), shapes))


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

    def forward(self, vision: torch.Tensor, text: torch.Tensor, text_attention_mask: torch.Tensor, extended_mask: torch.Tensor, shapes: List[Tuple[int, int]]):
        """vision (B, N, C) tokens of the levels of `shapes`, text (B, T, D) -> the same after this layer."""
        vision, text = self.vl_fuse(vision, text, text_attention_mask)
        text = self.text_layer(text, extended_mask)
        # the deformable convolutions read each level as a channels-last view of the fused tokens
        vision = flatten_levels(self.dyconv(list(unflatten_levels(vision, shapes))))
        return vision, text


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

    def forward(self, tokens: torch.Tensor, shapes: List[Tuple[int, int]], text: torch.Tensor, text_attention_mask: torch.Tensor):
        """tokens (B, N, C): the FPN levels of (h, w) `shapes` flattened (`flatten_levels`); text (B, T, D) unmasked
        text encoder output; text_attention_mask (B, T).

        Returns logits (B, N, T), box_regression (B, N, 4), centerness (B, N), the final text (B, T, D); the states
        after each tower module are recorded by `GLIPModel`'s output recorders.
        """
        # HF extended mask: 0 for valid tokens, dtype-min for padded ones (5.3)
        extended_mask = (1.0 - text_attention_mask[:, None, None, :].to(text.dtype)) * torch.finfo(text.dtype).min
        for layer in self.layers:
            tokens, text = layer(tokens, text, text_attention_mask, extended_mask, shapes)

        # 1x1 convolutions of all levels at once: the tokens as a (B, C, N, 1) channels-last map
        column = tokens.transpose(1, 2)[..., None]
        deltas = self.bbox_pred(column)[..., 0].transpose(1, 2)  # (B, N, 4A)
        sizes = [h * w for h, w in shapes]
        box_regression = torch.cat([level * self.scales[index] for index, level in enumerate(deltas.split(sizes, dim=1))], dim=1)
        centerness = self.centerness(column)[:, :, :, 0].transpose(1, 2)  # (B, N, A)

        # region-word alignment on the fused text (USE_FUSED_FEATURES_DOT_PRODUCT; quirk 11.7)
        embedding = F.normalize(text, p=2, dim=-1)
        proj_tokens = self.dot_product_projection_text(embedding / 2.0)  # (B, T, A*C)
        token_bias = torch.matmul(embedding, self.bias_lang) + self.bias0  # (B, T)
        # image tokens are not normalised (quirk 11.7)
        logits = torch.matmul(tokens, proj_tokens.transpose(-1, -2)) / self.log_scale.exp() + token_bias[:, None, :]
        logits = logits.clamp(-self.clamp_value, self.clamp_value)  # quirk 11.6
        batch = tokens.shape[0]
        return logits, box_regression.reshape(batch, -1, 4), centerness.reshape(batch, -1), text


def non_finite_tensors(module: nn.Module) -> List[str]:
    """Names of the floating-point parameters / buffers of any `module` that hold NaN or inf (meta tensors skipped)."""
    return [
        name
        for name, tensor in module.state_dict().items()
        if tensor.is_floating_point() and tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all())
    ]


class GLIPPreTrainedModel(PreTrainedModel):
    config: GLIPConfig
    base_model_prefix = "glip"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # sdpa / flash only concern the BERT text encoder; the fusion and head text layers keep GLIP's clamped attention
    _supports_sdpa = True
    _supports_flash_attn = False
    # the backbone's and text encoder's own `_no_split_modules` (SwinStage, BertLayer, ...) are collected as well
    _no_split_modules = ["GLIPFusionLayer"]
    # states and attentions of the fusion tower, recorded by hooks on the modules that return them (the initial
    # states and the backbone / text-encoder attentions are added by `GLIPModel.forward`)
    _can_record_outputs = {
        "vision_hidden_states": [OutputRecorder(VLFuse, index=0), OutputRecorder(GLIPFusionLayer, index=0)],
        "text_hidden_states": [OutputRecorder(VLFuse, index=1), OutputRecorder(GLIPFusionLayer, index=1)],
        "vision_to_text_attentions": OutputRecorder(BiMultiHeadAttention, index=2),
        "text_to_vision_attentions": OutputRecorder(BiMultiHeadAttention, index=3),
        "text_attentions": OutputRecorder(BertSelfAttention, index=1),
    }

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, then a check that every loaded weight is finite (a damaged file or a
        diverged training run would otherwise give NaN detections, or fail deep inside the deformable convolutions).

        Raises:
            ValueError: naming the parameters / buffers that hold NaN or infinite values.
        """
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        bad = non_finite_tensors(model)
        if bad:
            raise ValueError(
                f"The checkpoint {args[0] if args else kwargs.get('pretrained_model_name_or_path')!r} holds NaN or infinite values in "
                f"{len(bad)} tensors ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}): the file is damaged or the training "
                "run that wrote it diverged."
            )
        return loaded

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
        self._install_output_recorders()

    def _install_output_recorders(self):
        """Install the recorders of `_can_record_outputs` on GLIP's own modules, once, at construction.

        The sub-models (backbone, text encoder) record their own outputs: a transformers backbone installs its
        recorders when it is built, and transformers' `install_all_output_capturing_hooks`, which `capture_outputs`
        would run on first use, also descends into sub-models and would install theirs a second time (every backbone
        attention recorded twice). So GLIP installs only its own and marks itself as installed.
        """
        sub_models = [name for name, module in self.named_modules() if name and isinstance(module, PreTrainedModel)]
        for name, module in self.named_modules():
            if any(name == sub or name.startswith(sub + ".") for sub in sub_models):
                continue
            for key, recorders in self._can_record_outputs.items():
                for recorder in recorders if isinstance(recorders, list) else [recorders]:
                    if isinstance(module, recorder.target_class):
                        install_output_capuring_hook(module, key, recorder.index, recorder.capture_initial_hidden_state)
        self._output_capturing_hooks_installed = True

    def get_input_embeddings(self) -> nn.Embedding:
        """The text encoder's word embeddings (`resize_token_embeddings` adds tokens there)."""
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding):
        self.text_model.set_input_embeddings(value)

    # ------------------------------------------------------------------------------------------------------------------
    # input validation: shapes and dtypes always (they are static under torch.export / torch.compile); values only in
    # eager mode, where a data-dependent check cannot block tracing, gathered in `ValueChecks` so that one forward
    # waits for the device once, not once per check
    # ------------------------------------------------------------------------------------------------------------------
    @staticmethod
    def _check_tensor(name: str, value, floating: bool):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}.")
        if floating != value.is_floating_point():
            kind = "a floating-point" if floating else "an integer (or bool)"
            raise TypeError(f"`{name}` must be {kind} tensor, got dtype {value.dtype}.")

    @staticmethod
    def _check_finite(checks: "ValueChecks", name: str, value: torch.Tensor):
        checks.add(
            lambda: torch.isfinite(value).all(),
            lambda: ValueError(f"`{name}` contains NaN or infinite values ({int((~torch.isfinite(value)).sum())} of {value.numel()})."),
        )

    @staticmethod
    def _check_binary(checks: "ValueChecks", name: str, value: torch.Tensor):
        checks.add(
            lambda: ((value == 0) | (value == 1)).all(),
            lambda: ValueError(f"`{name}` must hold only 0 and 1; got values {value.unique()[:8].tolist()}."),
        )

    def _validate_inputs(self, checks, pixel_values, input_ids, attention_mask, token_type_ids, pixel_mask, chunk_to_image, text_encoder_hidden_state=None):
        if pixel_values is None or input_ids is None:
            raise ValueError("GLIPModel needs both `pixel_values` (B, 3, H, W) and `input_ids` (B, T).")
        self._check_tensor("pixel_values", pixel_values, floating=True)
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3 or pixel_values.shape[2] == 0 or pixel_values.shape[3] == 0:
            raise ValueError(f"`pixel_values` must have shape (batch, 3, height, width) with a non-empty canvas; got {tuple(pixel_values.shape)}.")
        self._check_finite(checks, "pixel_values", pixel_values)
        self._validate_text_inputs(checks, input_ids, attention_mask, token_type_ids)
        if chunk_to_image is None and input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"Batch size mismatch: {pixel_values.shape[0]} images but {input_ids.shape[0]} prompts. Give one prompt "
                "per image, or `chunk_to_image` (the image index of each prompt row) for several prompt rows per image."
            )
        if chunk_to_image is not None:
            self._check_tensor("chunk_to_image", chunk_to_image, floating=False)
            if chunk_to_image.shape != input_ids.shape[:1] or chunk_to_image.dtype == torch.bool:
                raise ValueError(
                    f"`chunk_to_image` must be an integer tensor of shape ({input_ids.shape[0]},), the image index of each "
                    f"prompt row; got {chunk_to_image.dtype} of shape {tuple(chunk_to_image.shape)}."
                )
            checks.add(
                lambda: ((chunk_to_image >= 0) & (chunk_to_image < pixel_values.shape[0])).all(),
                lambda: ValueError(f"`chunk_to_image` {chunk_to_image.tolist()} indexes images outside 0..{pixel_values.shape[0] - 1}."),
            )
        if pixel_mask is not None:
            self._check_tensor("pixel_mask", pixel_mask, floating=False)
            if pixel_mask.shape != (pixel_values.shape[0], *pixel_values.shape[2:]):
                raise ValueError(f"`pixel_mask` must have shape {(pixel_values.shape[0], *pixel_values.shape[2:])}; got {tuple(pixel_mask.shape)}.")
            self._check_binary(checks, "pixel_mask", pixel_mask)
            checks.add(
                lambda: pixel_mask.flatten(1).any(dim=1).all(),
                lambda: ValueError(
                    f"`pixel_mask` marks no image pixel for images {(~pixel_mask.flatten(1).any(dim=1)).nonzero().flatten().tolist()}: "
                    "an empty canvas has no size to predict boxes in."
                ),
            )
        if text_encoder_hidden_state is not None:
            self._check_tensor("text_encoder_hidden_state", text_encoder_hidden_state, floating=True)
            expected = (*input_ids.shape, self.config.text_config.hidden_size)
            if tuple(text_encoder_hidden_state.shape) != expected:
                raise ValueError(
                    f"`text_encoder_hidden_state` must have shape (batch, tokens, hidden) = {expected} to match `input_ids`; "
                    f"got {tuple(text_encoder_hidden_state.shape)}. Index or expand the rows of `get_text_features` to the batch."
                )
            self._check_finite(checks, "text_encoder_hidden_state", text_encoder_hidden_state)

    @property
    def max_prompt_length(self) -> int:
        """The most tokens a prompt row may have: the text encoder's positions (and the prompt-tuning offsets')."""
        max_positions = self.config.text_config.max_position_embeddings
        if self.config.text_prompt_length:
            max_positions = min(max_positions, self.config.text_prompt_length)
        return max_positions

    def _validate_text_inputs(self, checks, input_ids, attention_mask, token_type_ids):
        if input_ids is None:
            raise ValueError("`input_ids` (batch, tokens) are required.")
        self._check_tensor("input_ids", input_ids, floating=False)
        if input_ids.dim() != 2 or input_ids.dtype == torch.bool:
            raise ValueError(f"`input_ids` must be an integer tensor of shape (batch, tokens); got {input_ids.dtype} of shape {tuple(input_ids.shape)}.")
        if input_ids.shape[1] == 0:
            raise ValueError("The prompt is empty: `input_ids` has no tokens.")
        text_config = self.config.text_config
        max_positions = self.max_prompt_length
        if input_ids.shape[1] > max_positions:
            raise ValueError(
                f"The prompt has {input_ids.shape[1]} tokens but the text encoder has {max_positions} positions; "
                f"split the class names into chunks (GLIP was trained with at most {self.config.max_text_len})."
            )
        for name, tensor in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if tensor is not None:
                self._check_tensor(name, tensor, floating=False)
                if tensor.shape != input_ids.shape:
                    raise ValueError(f"`{name}` has shape {tuple(tensor.shape)} but `input_ids` has {tuple(input_ids.shape)}.")
        for name, tensor, limit in (("input_ids", input_ids, text_config.vocab_size), ("token_type_ids", token_type_ids, text_config.type_vocab_size)):
            if tensor is not None:
                checks.add(
                    lambda tensor=tensor, limit=limit: ((tensor >= 0) & (tensor < limit)).all(),
                    lambda name=name, tensor=tensor, limit=limit: ValueError(
                        f"`{name}` holds ids {tensor[(tensor < 0) | (tensor >= limit)].unique()[:8].tolist()} outside the text encoder's range 0..{limit - 1}."
                    ),
                )
        if attention_mask is not None:
            self._check_binary(checks, "attention_mask", attention_mask)
            checks.add(lambda: (attention_mask.sum(dim=1) > 0).all(), lambda: ValueError("A prompt is empty: its `attention_mask` row has no valid token."))

    def _validate_labels(self, checks, labels, batch_size: int, num_tokens: int):
        if not isinstance(labels, (list, tuple)):
            raise TypeError(f"`labels` must be a list of dicts (one per prompt row), got {type(labels).__name__}.")
        if len(labels) != batch_size:
            raise ValueError(f"`labels` has {len(labels)} entries for {batch_size} prompt rows.")
        for index, target in enumerate(labels):
            if not isinstance(target, dict) or not {"boxes", "positive_map"} <= set(target):
                keys = sorted(target) if isinstance(target, dict) else type(target).__name__
                raise ValueError(f"`labels[{index}]` must be a dict with `boxes` and `positive_map`; got {keys}.")
            boxes, positive_map = target["boxes"], target["positive_map"]
            self._check_tensor(f"labels[{index}]['boxes']", boxes, floating=True)
            if not isinstance(positive_map, torch.Tensor):
                raise TypeError(f"`labels[{index}]['positive_map']` must be a torch.Tensor, got {type(positive_map).__name__}.")
            if boxes.dim() != 2 or boxes.shape[-1] != 4:
                raise ValueError(f"`labels[{index}]['boxes']` must be (num_boxes, 4) normalised cxcywh; got {tuple(boxes.shape)}.")
            if positive_map.shape != (boxes.shape[0], num_tokens):
                raise ValueError(
                    f"`labels[{index}]['positive_map']` must be (num_boxes, tokens) = {(boxes.shape[0], num_tokens)}; got {tuple(positive_map.shape)}."
                )
            self._check_finite(checks, f"labels[{index}]['boxes']", boxes)
            checks.add(
                lambda boxes=boxes: (boxes[:, 2:] > 0).all(),
                lambda index=index, boxes=boxes: ValueError(
                    f"`labels[{index}]['boxes']` has boxes of zero or negative width / height: {boxes[(boxes[:, 2:] <= 0).any(1)][:4].tolist()}."
                ),
            )
            self._check_binary(checks, f"labels[{index}]['positive_map']", positive_map)

    @staticmethod
    def image_sizes_from_mask(pixel_values: torch.Tensor, pixel_mask: Optional[torch.Tensor]) -> torch.LongTensor:
        """(B, 2) unpadded (h, w): the extent of the valid region of `pixel_mask` (the whole canvas without one)."""
        batch, _, height, width = pixel_values.shape
        if pixel_mask is None:
            return torch.tensor([[height, width]], device=pixel_values.device).expand(batch, 2)
        valid = pixel_mask.bool()
        return torch.stack((valid.any(dim=2).sum(dim=1), valid.any(dim=1).sum(dim=1)), dim=1)

    def get_text_features(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.LongTensor] = None,
        token_type_ids: Optional[torch.LongTensor] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ):
        r"""The text features `forward` feeds to the fusion tower, as a `BaseModelOutputWithPooling`:

        - `last_hidden_state` (B, T, D): the text encoder's last hidden state, padded tokens not zeroed (`hidden` of
          GLIP's language backbone, section 3), plus the prompt-tuning offsets when the model has them;
        - `hidden_states` / `attentions`: the text encoder's, when asked for;
        - `pooler_output`: None (GLIP uses no pooled text feature).

        For a fixed label set (or the chunks of a long one) compute it once and pass `last_hidden_state` (or the whole
        output) to every `forward` as `text_encoder_hidden_state` (rows indexed / expanded to each batch): BERT then
        runs once per chunk for a whole image set instead of once per image. With `return_dict=False`, a tuple.
        """
        checks = ValueChecks()
        self._validate_text_inputs(checks, input_ids, attention_mask, token_type_ids)
        checks.raise_first_failure()
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output = self._encode_text(input_ids, attention_mask, token_type_ids, output_hidden_states, output_attentions)
        return output if return_dict else output.to_tuple()

    def _encode_text(self, input_ids, attention_mask, token_type_ids, output_hidden_states, output_attentions) -> BaseModelOutputWithPooling:
        encoded = self.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        text = encoded.last_hidden_state
        if self.text_prompt is not None:
            text = text + self.text_prompt[: text.shape[1]]  # added before the fusion tower, as the original's VLDyHead
        return BaseModelOutputWithPooling(last_hidden_state=text, hidden_states=encoded.hidden_states, attentions=encoded.attentions)

    def _encode_images(self, pixel_values: torch.FloatTensor, output_attentions: bool):
        """Backbone maps (C3, C4, C5) and FPN maps (P3..P7) of every image, each (I, C, H, W), and the backbone's
        attentions (None unless asked for)."""
        backbone_output = self.backbone(pixel_values, output_attentions=True) if output_attentions else self.backbone(pixel_values)
        backbone_maps = list(backbone_output.feature_maps[-3:])  # strides 8, 16, 32
        pyramid = list(self.fpn(OrderedDict((str(i), feature) for i, feature in enumerate(backbone_maps))).values())
        return backbone_maps, pyramid, backbone_output.attentions

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.LongTensor] = None,
        token_type_ids: Optional[torch.LongTensor] = None,
        pixel_mask: Optional[torch.LongTensor] = None,
        chunk_to_image: Optional[torch.LongTensor] = None,
        labels: Optional[List[Dict[str, torch.Tensor]]] = None,
        output_attentions: Optional[bool] = None,
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
        labels (`list[dict]`, *optional*): per prompt row `boxes` (M, 4) normalised (cx, cy, w, h) relative to the
            unpadded image and `positive_map` (M, T) 0/1 (the tokens of each box's phrase). Returns `loss` and
            `loss_dict`.
        output_attentions (`bool`, *optional*): also return the attentions of the backbone, the text encoder, the
            fusion layers (both directions) and the head's BERT layers (see `GLIPObjectDetectionOutput`).
        output_hidden_states (`bool`, *optional*): also return backbone, vision and text hidden states.
        text_encoder_hidden_state (`torch.FloatTensor` of shape `(B, T, D)` or a `get_text_features` output, *optional*):
            the text features of this batch's prompts, computed once for a fixed vocabulary; the text encoder is then
            skipped.
        processor_outputs: the `GLIPProcessor` keys that are not model inputs (`positive_map`, `label_ids`,
            `text_labels`) are accepted so that `model(**inputs)` works; anything else is an error.
        """
        unknown = set(processor_outputs) - PROCESSOR_ONLY_KEYS
        if unknown:
            raise TypeError(f"GLIPModel.forward got unexpected arguments {sorted(unknown)}")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        if isinstance(text_encoder_hidden_state, ModelOutput):
            text_encoder_hidden_state = text_encoder_hidden_state.last_hidden_state
        checks = ValueChecks()
        self._validate_inputs(checks, pixel_values, input_ids, attention_mask, token_type_ids, pixel_mask, chunk_to_image, text_encoder_hidden_state)
        if labels is not None:
            self._validate_labels(checks, labels, input_ids.shape[0], input_ids.shape[1])
        checks.raise_first_failure()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)

        pixel_values = pixel_values.to(self.dtype)
        image_sizes = self.image_sizes_from_mask(pixel_values, pixel_mask)
        backbone_maps, pyramid, backbone_attentions = self._encode_images(pixel_values, output_attentions)
        if chunk_to_image is not None:  # each prompt row reads its image's features
            image_sizes = image_sizes.index_select(0, chunk_to_image)
            backbone_maps = [feature.index_select(0, chunk_to_image) for feature in backbone_maps]
            pyramid = [feature.index_select(0, chunk_to_image) for feature in pyramid]

        text_encoder_attentions = None
        if text_encoder_hidden_state is None:
            text_features = self._encode_text(input_ids, attention_mask, token_type_ids, output_hidden_states=False, output_attentions=output_attentions)
            text, text_encoder_attentions = text_features.last_hidden_state, text_features.attentions
        else:
            text = text_encoder_hidden_state.to(self.dtype)

        tokens = flatten_levels(pyramid)  # (B, N, C)
        shapes = [tuple(feature.shape[-2:]) for feature in pyramid]
        recording = {f"output_{key}": output_attentions if key.endswith("attentions") else output_hidden_states for key in self._can_record_outputs}
        fused = self._fuse_and_predict(tokens, shapes, text, attention_mask, image_sizes, input_ids, labels, return_dict=True, **recording)

        extra = {}
        if output_hidden_states:
            extra["backbone_feature_maps"] = tuple(backbone_maps)
            extra["vision_hidden_states"] = (tokens, *fused.vision_hidden_states)
            extra["text_hidden_states"] = (text, *fused.text_hidden_states)
        if output_attentions:
            extra["backbone_attentions"] = tuple(backbone_attentions or ())
            extra["text_encoder_attentions"] = tuple(text_encoder_attentions or ())
        output = GLIPObjectDetectionOutput(**{**fused, **extra})
        return output if return_dict else output.to_tuple()

    @capture_outputs
    def _fuse_and_predict(self, tokens, shapes, text, attention_mask, image_sizes, input_ids, labels, **recording_flags) -> GLIPObjectDetectionOutput:
        """The fusion tower and the predictions from the encoded image tokens (B, N, C) and text (B, T, D); the tower's
        states and attentions are recorded by `capture_outputs` (`_can_record_outputs`) when `recording_flags` ask."""
        logits, box_regression, centerness, text_out = self.head(tokens, shapes, text, attention_mask)
        batch_size = logits.shape[0]

        anchors = self.anchor_generator(shapes)
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
                logits.float(), box_regression.float(), centerness.float(), anchors, [h * w for h, w in shapes], attention_mask, targets
            )
            loss = sum(loss_dict.values())

        return GLIPObjectDetectionOutput(
            loss=loss,
            loss_dict=loss_dict,
            logits=logits,
            pred_boxes=pred_boxes,
            centerness=centerness,
            box_regression=box_regression,
            anchors=anchors.expand(batch_size, -1, -1),
            spatial_shapes=torch.tensor([list(shape) for shape in shapes], device=logits.device).expand(batch_size, -1, -1),
            image_sizes=image_sizes,
            input_ids=input_ids,
            attention_mask=attention_mask,
            text_hidden_state=text_out,
        )


__all__ = ["GLIPModel", "GLIPPreTrainedModel", "GLIPObjectDetectionOutput"]
