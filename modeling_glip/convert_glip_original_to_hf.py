"""Convert an original microsoft/GLIP checkpoint (GeneralizedVLRCNN state dict) into a `GLIPModel` checkpoint.

Usage:
    python -m modeling_glip.convert_glip_original_to_hf --checkpoint glip_tiny_model_o365_goldg.pth --output glip-t \\
        [--config_yaml glip_Swin_T_O365_GoldG.yaml] [--push_to_hub org/name]

(the checkpoint and the YAML configs are those released in the microsoft/GLIP repository)

The checkpoint is the original's `.pth` (loaded with torch.load(weights_only=True); a file that needs full unpickling
is refused unless --allow_unsafe_pickle is given for a trusted file) or a `.safetensors` copy of its state dict.
Every original key is either mapped or explicitly dropped (recomputed buffers); anything else is an error, and so is a
missing key. Without --config_yaml the architecture is inferred from the key shapes. The output folder is written
completely or not at all: it must not exist, be empty, or hold an earlier conversion (which is replaced). See the
README section "Converting the official weights"; the key mapping is `_rename` in
modeling_glip/convert_glip_original_to_hf.py, tested in tests/test_converter.py. Flags use underscores; the dashed
spellings (`--config-yaml`, ...) are accepted too.
"""

import json
import os
import re
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import yaml
from huggingface_hub.errors import StrictDataclassError
from transformers import BertConfig

from .anchor_generator import cell_anchors_per_level
from .command_line import GLIPArgumentParser
from .configuration_glip import GLIPConfig, swin_backbone_config

# Original keys that are recomputed, not loaded.
DROPPED_KEYS = (
    re.compile(r"^backbone\.body\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_index$"),  # recomputed by HF Swin
    re.compile(r"^backbone\.body\.layers\.\d+\.blocks\.\d+\.attn_mask$"),  # shift masks (older Swin code)
    re.compile(r"^language_backbone\.body\.model\.embeddings\.position_ids$"),  # persistent buffer in old transformers
    re.compile(r"^language_backbone\.body\.model\.pooler\."),  # GLIP builds BERT without using the pooler
    re.compile(r"^rpn\.anchor_generator\.cell_anchors\.\d+$"),  # recomputed (checked against ours in convert)
)

_SWIN_BLOCK_RENAMES = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.o_proj",
    "attn.relative_position_bias_table": "attention.relative_position_bias.relative_position_bias_table",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_DYCONV_RENAMES = {
    r"DyConv\.(\d)\.conv\.": r"dyconv.convs.\1.conv.",
    r"DyConv\.(\d)\.bn\.": r"dyconv.convs.\1.norm.",
    r"AttnConv\.1\.": "dyconv.scale_attention.conv.",
    r"relu\.fc\.0\.": "dyconv.activation.fc1.",
    r"relu\.fc\.2\.": "dyconv.activation.fc2.",
    r"offset\.": "dyconv.offset.",
}


def _rename(key: str, num_fusion_layers: int) -> Optional[str]:
    """Original key -> GLIPModel key (None when the key is unknown). `qkv` and `scales` are handled by the caller."""
    if m := re.match(r"^backbone\.body\.patch_embed\.(proj|norm)\.(weight|bias)$", key):
        return f"backbone.swin.embeddings.{'patch_embeddings.projection' if m[1] == 'proj' else 'norm'}.{m[2]}"
    if m := re.match(r"^backbone\.body\.layers\.(\d+)\.blocks\.(\d+)\.(norm[12]|attn\.proj|attn\.relative_position_bias_table|mlp\.fc[12])(\.weight|\.bias)?$", key):
        return f"backbone.swin.encoder.layers.{m[1]}.blocks.{m[2]}.{_SWIN_BLOCK_RENAMES[m[3]]}{m[4] or ''}"
    if m := re.match(r"^backbone\.body\.layers\.(\d+)\.downsample\.(norm|reduction)\.(weight|bias)$", key):
        return f"backbone.swin.encoder.layers.{m[1]}.downsample.{m[2]}.{m[3]}"
    if m := re.match(r"^backbone\.body\.norm([123])\.(weight|bias)$", key):
        # GLIP norm1..3 = outputs of stages 3..5 = HF stage2..4 (quirk 11.14; norm0 is Identity)
        return f"backbone.hidden_states_norms.stage{int(m[1]) + 1}.{m[2]}"
    if m := re.match(r"^backbone\.fpn\.fpn_(inner|layer)([234])\.(weight|bias)$", key):
        # fpn_inner2 consumes C3 (names shifted by one, quirk 11.14)
        return f"fpn.{m[1]}_blocks.{int(m[2]) - 2}.0.{m[3]}"
    if m := re.match(r"^backbone\.fpn\.top_blocks\.(p6|p7)\.(weight|bias)$", key):
        return f"fpn.extra_blocks.{m[1]}.{m[2]}"
    if key.startswith("language_backbone.body.model."):
        return "text_model." + key[len("language_backbone.body.model.") :]
    if m := re.match(r"^rpn\.head\.(log_scale|bias_lang|bias0)$", key):
        return f"head.{m[1]}"
    if m := re.match(r"^rpn\.head\.(cls_logits|bbox_pred|centerness|dot_product_projection_text)\.(weight|bias)$", key):
        return f"head.{m[1]}.{m[2]}"
    if m := re.match(r"^rpn\.head\.dyhead_tower\.(\d+)\.(.+)$", key):
        index, rest = int(m[1]), m[2]
        layer, kind = divmod(index, 3)
        if layer >= num_fusion_layers:
            return None
        prefix = f"head.layers.{layer}."
        if kind == 0 and rest.startswith("b_attn."):
            return prefix + "vl_fuse." + rest[len("b_attn.") :]
        if kind == 1:
            return prefix + "text_layer." + rest
        if kind == 2:
            for pattern, replacement in _DYCONV_RENAMES.items():
                if re.match(pattern, rest):
                    return prefix + re.sub("^" + pattern, replacement, rest)
    return None


# key prefixes of the original GeneralizedVLRCNN, and prefixes only a GLIPModel state dict has
ORIGINAL_PREFIXES = ("backbone.body.", "backbone.fpn.", "language_backbone.", "rpn.")
CONVERTED_PREFIXES = ("text_model.", "head.")


def unwrap_state_dict(checkpoint: Dict) -> Dict[str, torch.Tensor]:
    """Take the model state dict out of a training checkpoint (`{"model": ...}` and a `module.` prefix on all keys) and
    check that it is an original GLIP state dict of tensors; ValueError saying what the file is otherwise."""
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError("The checkpoint holds no state dict (expected a mapping of tensors, or one under 'model').")
    if all(isinstance(key, str) and key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module.") :]: value for key, value in state_dict.items()}
    not_tensors = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"The checkpoint's state dict has {len(not_tensors)} entries that are not tensors (first: {not_tensors[:5]}); "
            "it is not a model state dict."
        )
    if not any(key.startswith(ORIGINAL_PREFIXES) for key in state_dict):
        if any(key.startswith(CONVERTED_PREFIXES) for key in state_dict):
            raise ValueError(
                "This is a checkpoint already converted to GLIPModel (keys such as "
                f"{sorted(state_dict)[:2]}), not an original GLIP one: load its folder with GLIPModel.from_pretrained "
                "(or AutoModelForZeroShotObjectDetection.from_pretrained) instead of converting it."
            )
        raise ValueError(
            f"This is not an original GLIP checkpoint: none of its {len(state_dict)} keys starts with {ORIGINAL_PREFIXES} "
            f"(first keys: {sorted(state_dict)[:5]}). Pass the microsoft/GLIP .pth (e.g. glip_tiny_model_o365_goldg.pth)."
        )
    return state_dict


def convert_original_state_dict(state_dict: Dict[str, torch.Tensor], config: GLIPConfig) -> Dict[str, torch.Tensor]:
    """Map an original GLIP state dict to `GLIPModel` keys; raises ValueError on any unknown key."""
    state_dict = unwrap_state_dict(state_dict)
    converted, unexpected, scales = {}, [], {}
    for key, value in state_dict.items():
        if any(pattern.match(key) for pattern in DROPPED_KEYS):
            continue
        if m := re.match(r"^backbone\.body\.layers\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key):
            prefix = f"backbone.swin.encoder.layers.{m[1]}.blocks.{m[2]}.attention"
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                converted[f"{prefix}.{name}.{m[3]}"] = part.clone()
            continue
        if m := re.match(r"^rpn\.head\.scales\.(\d+)\.scale$", key):
            scales[int(m[1])] = value.reshape(())
            continue
        new_key = _rename(key, config.num_fusion_layers)
        if new_key is None:
            unexpected.append(key)
        else:
            converted[new_key] = value
    if unexpected:
        raise ValueError(
            f"{len(unexpected)} checkpoint keys have no GLIPModel counterpart: {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''} "
            "(an architecture this port does not implement, or a config with fewer fusion layers than the checkpoint)"
        )
    if scales:
        if sorted(scales) != list(range(len(config.anchor_strides))):
            raise ValueError(f"Expected one `rpn.head.scales.{{0..{len(config.anchor_strides) - 1}}}.scale`, got levels {sorted(scales)}")
        converted["head.scales"] = torch.stack([scales[level] for level in sorted(scales)])
    _check_anchor_templates(state_dict, config)
    return converted


def _check_anchor_templates(state_dict: Dict[str, torch.Tensor], config: GLIPConfig) -> None:
    """The checkpoint's saved anchor templates must equal the ones we recompute from the config."""
    for level, cells in enumerate(cell_anchors_per_level(config)):
        saved = state_dict.get(f"rpn.anchor_generator.cell_anchors.{level}")
        if saved is not None and saved.device.type != "meta" and not torch.equal(saved.float(), cells):
            raise ValueError(f"Anchor template of level {level} in the checkpoint {saved.tolist()} differs from the config's {cells.tolist()}")


def _max_index(state_dict, pattern: str) -> int:
    indices = [int(m[1]) for key in state_dict if (m := re.match(pattern, key))]
    return max(indices) + 1 if indices else 0


_TEXT_PREFIX = "language_backbone.body.model."


def _keys_for_inference(num_stages: int, needs_text_config: bool) -> List[str]:
    """The original keys whose shapes `infer_config_from_state_dict` reads."""
    keys = [
        "backbone.body.patch_embed.proj.weight",
        "backbone.fpn.fpn_inner4.weight",
        "rpn.head.dyhead_tower.0.b_attn.attn.v_proj.weight",
        "rpn.head.cls_logits.weight",
    ]
    keys += [f"backbone.body.layers.{i}.blocks.0.attn.relative_position_bias_table" for i in range(max(num_stages, 1))]
    keys.append(_TEXT_PREFIX + "embeddings.word_embeddings.weight")
    if needs_text_config:
        suffixes = ("encoder.layer.0.intermediate.dense.weight", "embeddings.position_embeddings.weight", "embeddings.token_type_embeddings.weight")
        keys += [_TEXT_PREFIX + suffix for suffix in suffixes]
    return keys


def _require_keys(state_dict: Dict[str, torch.Tensor], keys: List[str]) -> None:
    missing = [key for key in keys if key not in state_dict]
    if missing:
        raise ValueError(
            f"Cannot infer the architecture: the checkpoint lacks {missing}. It is an incomplete or non-GLIP checkpoint "
            "(--config_yaml reads the architecture from the original YAML instead, but every weight must still be present)."
        )


def infer_config_from_state_dict(state_dict: Dict[str, torch.Tensor], text_config: Optional[BertConfig] = None, **kwargs) -> GLIPConfig:
    """Build a `GLIPConfig` from the key shapes of an original state dict (Swin, FPN, BERT and head sizes).

    The number of BERT heads is not visible in the shapes: it is hidden_size / 64 (as in every BERT) unless
    `text_config` is given.
    """
    sd = unwrap_state_dict(state_dict)
    num_stages = _max_index(sd, r"^backbone\.body\.layers\.(\d+)\.")
    _require_keys(sd, _keys_for_inference(num_stages, text_config is None))
    embed_dim = sd["backbone.body.patch_embed.proj.weight"].shape[0]
    depths = [_max_index(sd, rf"^backbone\.body\.layers\.{i}\.blocks\.(\d+)\.") for i in range(num_stages)]
    num_heads = [sd[f"backbone.body.layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1] for i in range(num_stages)]
    window_size = (round(sd["backbone.body.layers.0.blocks.0.attn.relative_position_bias_table"].shape[0] ** 0.5) + 1) // 2
    backbone = swin_backbone_config(embed_dim, depths, num_heads, window_size, drop_path_rate=0.4 if embed_dim >= 192 else 0.2)

    prefix = _TEXT_PREFIX
    hidden = sd[prefix + "embeddings.word_embeddings.weight"].shape[1]
    if text_config is None:
        if hidden % 64:
            raise ValueError(f"Cannot infer the BERT head count for hidden size {hidden}: pass a text config.")
        text_config = BertConfig(
            vocab_size=sd[prefix + "embeddings.word_embeddings.weight"].shape[0],
            hidden_size=hidden,
            num_hidden_layers=_max_index(sd, rf"^{re.escape(prefix)}encoder\.layer\.(\d+)\."),
            num_attention_heads=hidden // 64,
            intermediate_size=sd[prefix + "encoder.layer.0.intermediate.dense.weight"].shape[0],
            max_position_embeddings=sd[prefix + "embeddings.position_embeddings.weight"].shape[0],
            type_vocab_size=sd[prefix + "embeddings.token_type_embeddings.weight"].shape[0],
        )
    num_fusion_layers = _max_index(sd, r"^rpn\.head\.dyhead_tower\.(\d+)\.") // 3  # [VLFuse, BERT layer, DyConv] per layer
    derived = {
        "backbone_config": backbone,
        "text_config": text_config,
        "hidden_size": sd["backbone.fpn.fpn_inner4.weight"].shape[0],
        "num_fusion_layers": num_fusion_layers,
        "fusion_embed_dim": sd["rpn.head.dyhead_tower.0.b_attn.attn.v_proj.weight"].shape[0],
        "num_classes_cls_logits": sd["rpn.head.cls_logits.weight"].shape[0],
        "use_deformable_conv": "rpn.head.dyhead_tower.2.offset.weight" in sd,
        "use_dyfuse": "rpn.head.dyhead_tower.2.AttnConv.1.weight" in sd,
        "use_dyrelu": "rpn.head.dyhead_tower.2.relu.fc.0.weight" in sd,
    }
    return GLIPConfig(**{**derived, **kwargs})


def _load_yaml(path: Path, chain: Tuple[Path, ...] = ()) -> dict:
    """An original YAML config merged over its `_BASE_` chain (each base relative to the file naming it)."""
    path = path.resolve()
    if path in chain:
        raise ValueError(f"_BASE_ cycle in the GLIP YAML configs: {' -> '.join(str(p) for p in (*chain, path))}")
    if not path.is_file():
        raise FileNotFoundError(f"GLIP YAML config {path} does not exist" + (f" (the _BASE_ of {chain[-1]})" if chain else ""))
    try:
        cfg = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a valid YAML file: {' '.join(str(error).split())}") from None
    cfg = {} if cfg is None else cfg
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is not a GLIP YAML config: its top level is a {type(cfg).__name__}, not a mapping")
    base = cfg.pop("_BASE_", None)
    if base in (None, ""):
        return cfg
    if not isinstance(base, str):
        raise ValueError(f"{path}: _BASE_ must be a path relative to this file, got {base!r}")
    merged = _load_yaml(path.parent / base, (*chain, path))
    _deep_update(merged, cfg)
    return merged


def _deep_update(target: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


def config_from_original_yaml(path: Union[str, Path], text_config: Optional[Union[BertConfig, dict]] = None) -> GLIPConfig:
    """Read an original GLIP YAML (a stock config such as `glip_Swin_T_O365_GoldG.yaml`, or a merged `cfg.dump()`).

    Keys absent from the file take the GLIP-T values (the stock YAMLs only list overrides of maskrcnn_benchmark's
    defaults). Configurations this port does not implement are refused. The BERT architecture comes from
    LANGUAGE_BACKBONE.MODEL_TYPE (bert-base-uncased); for another text model pass `text_config`.

    Raises:
        FileNotFoundError: the file or one of its `_BASE_`s does not exist.
        ValueError (naming the file): malformed YAML, a `_BASE_` cycle, a section or value of the wrong type, or a
            configuration the port does not implement.
    """
    cfg = _load_yaml(Path(path))
    try:
        return _config_from_cfg(cfg, text_config)
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise ValueError(f"{path}: {' '.join(str(error).split())}") from error


def _section(mapping: dict, key: str) -> dict:
    """`mapping[key]` as a mapping ({} when absent or empty); ValueError when it is something else."""
    value = mapping.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a mapping of settings, got {type(value).__name__} {value!r}")
    return value


def _config_from_cfg(cfg: dict, text_config: Optional[Union[BertConfig, dict]]) -> GLIPConfig:
    model = _section(cfg, "MODEL")
    get = lambda section, key, default: _section(model, section).get(key, default)  # noqa: E731
    fuse = _section(_section(model, "DYHEAD"), "FUSE_CONFIG")

    unsupported = []
    if model.get("RPN_ARCHITECTURE", "VLDYHEAD") != "VLDYHEAD":
        unsupported.append(f"MODEL.RPN_ARCHITECTURE={model['RPN_ARCHITECTURE']}")
    if fuse.get("TYPE", "MHA-B") != "MHA-B":
        unsupported.append(f"FUSE_CONFIG.TYPE={fuse['TYPE']}")
    for flag in ("USE_DOT_PRODUCT_TOKEN_LOSS", "USE_FUSED_FEATURES_DOT_PRODUCT", "EARLY_FUSE_ON"):
        if not fuse.get(flag, True):
            unsupported.append(f"FUSE_CONFIG.{flag}=False")
    if get("SWINT", "VERSION", "v1") != "v1":
        unsupported.append(f"SWINT.VERSION={get('SWINT', 'VERSION', None)}")
    if not str(get("BACKBONE", "CONV_BODY", "SWINT-FPN-RETINANET")).startswith("SWINT-FPN-RETINANET"):
        unsupported.append(f"BACKBONE.CONV_BODY={get('BACKBONE', 'CONV_BODY', None)}")
    if unsupported:
        raise ValueError(f"This GLIP configuration is not supported by the port: {', '.join(unsupported)}")

    lang_dim = get("LANGUAGE_BACKBONE", "LANG_DIM", 768)
    if text_config is None:
        model_type = get("LANGUAGE_BACKBONE", "MODEL_TYPE", "bert-base-uncased")
        if model_type != "bert-base-uncased" or lang_dim != 768:
            raise ValueError(f"LANGUAGE_BACKBONE {model_type} with LANG_DIM {lang_dim}: pass its BertConfig as `text_config`.")
        text_config = BertConfig()
    elif isinstance(text_config, dict):
        text_config = BertConfig(**text_config)
    if text_config.hidden_size != lang_dim:
        raise ValueError(f"text_config.hidden_size {text_config.hidden_size} differs from LANGUAGE_BACKBONE.LANG_DIM {lang_dim}")

    channels = get("DYHEAD", "CHANNELS", 256)
    if get("BACKBONE", "OUT_CHANNELS", channels) != channels or fuse.get("JOINT_EMB_SIZE", channels) != channels:
        raise ValueError("BACKBONE.OUT_CHANNELS, DYHEAD.CHANNELS and FUSE_CONFIG.JOINT_EMB_SIZE must be equal in GLIP")
    backbone = swin_backbone_config(
        embed_dim=get("SWINT", "EMBED_DIM", 96),
        depths=get("SWINT", "DEPTHS", (2, 2, 6, 2)),
        num_heads=get("SWINT", "NUM_HEADS", (3, 6, 12, 24)),
        window_size=get("SWINT", "WINDOW_SIZE", 7),
        drop_path_rate=get("SWINT", "DROP_PATH_RATE", 0.2),
    )
    group_norm = _section(model, "GROUP_NORM")
    test = _section(cfg, "TEST")
    inputs = _section(cfg, "INPUT")
    return GLIPConfig(
        backbone_config=backbone,
        text_config=text_config,
        hidden_size=channels,
        num_fusion_layers=get("DYHEAD", "NUM_CONVS", 6),
        use_dyrelu=get("DYHEAD", "USE_DYRELU", True),
        use_dyfuse=get("DYHEAD", "USE_DYFUSE", True),
        use_deformable_conv=get("DYHEAD", "USE_DFCONV", True),
        group_norm_num_groups=group_norm.get("NUM_GROUPS", 16),
        group_norm_eps=group_norm.get("EPSILON", 1e-5),
        num_classes_cls_logits=get("DYHEAD", "NUM_CLASSES", 81) - 1,
        prior_prob=get("DYHEAD", "PRIOR_PROB", 0.01),
        log_scale_init=get("DYHEAD", "LOG_SCALE", 0.0),
        anchor_sizes=list(get("RPN", "ANCHOR_SIZES", (64, 128, 256, 512, 1024))),
        anchor_strides=list(get("RPN", "ANCHOR_STRIDE", (8, 16, 32, 64, 128))),
        anchor_aspect_ratios=list(get("RPN", "ASPECT_RATIOS", (1.0,))),
        anchor_octave=get("RPN", "OCTAVE", 2.0),
        anchor_scales_per_octave=get("RPN", "SCALES_PER_OCTAVE", 1),
        max_text_len=get("LANGUAGE_BACKBONE", "MAX_QUERY_LEN", 256),
        atss_topk=get("ATSS", "TOPK", 9),
        focal_alpha=fuse.get("TOKEN_ALPHA", 0.25),
        focal_gamma=fuse.get("TOKEN_GAMMA", 2.0),
        reg_loss_weight=get("ATSS", "REG_LOSS_WEIGHT", 2.0),
        token_loss_weight=fuse.get("DOT_PRODUCT_TOKEN_LOSS_WEIGHT", 1.0),
        inference_threshold=get("ATSS", "INFERENCE_TH", 0.05),
        pre_nms_top_n=get("ATSS", "PRE_NMS_TOP_N", 1000),
        nms_threshold=get("ATSS", "NMS_TH", 0.6),
        detections_per_image=get("ATSS", "DETECTIONS_PER_IMG", 100),
        score_aggregation=str(get("DYHEAD", "SCORE_AGG", "MEAN")).lower(),
        min_size_test=inputs.get("MIN_SIZE_TEST", 800),
        max_size_test=inputs.get("MAX_SIZE_TEST", 1333),
        size_divisibility=_section(cfg, "DATALOADER").get("SIZE_DIVISIBILITY", 32),
        **({"detections_per_image": test["DETECTIONS_PER_IMG"]} if "DETECTIONS_PER_IMG" in test else {}),
    )


def _checkpoint_format(path: Path) -> Optional[str]:
    """"torch" (a zip archive or a legacy pickle), "safetensors" or None, from the file's first bytes."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if zipfile.is_zipfile(path) or head[:1] == b"\x80":  # pickle protocol marker
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":  # 8-byte header length, then the JSON header
        return "safetensors"
    return None


def _torch_load(path: Path, allow_unsafe_pickle: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_unsafe_pickle)
    except Exception as error:  # torch raises UnpicklingError / RuntimeError / KeyError on bad files
        message = " ".join(str(error).split())
        refused = re.search(r"GLOBAL ([\w.]+) was not an allowed global", message)
        if refused and not allow_unsafe_pickle:
            raise ValueError(
                f"{path} is a PyTorch checkpoint that also pickles Python objects ({refused[1]}), which "
                "torch.load(weights_only=True) refuses to run. Only if you trust the file, pass --allow_unsafe_pickle "
                "(allow_unsafe_pickle=True) to unpickle it fully."
            ) from error
        raise ValueError(
            f"{path} cannot be read as a PyTorch checkpoint ({type(error).__name__}: {message[:200]}): it is corrupt or not a checkpoint"
        ) from error


def load_original_checkpoint(path: Union[str, Path], allow_unsafe_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """Load an original checkpoint: a `.pth` (weights only unless explicitly allowed) or a `.safetensors` state dict,
    told apart by content. Raises FileNotFoundError, or ValueError saying what the file is and what to do (not a
    checkpoint, a corrupt one, one pickling Python objects, an already converted GLIPModel, not GLIP)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}")
    file_format = _checkpoint_format(path)
    if file_format == "torch":
        checkpoint = _torch_load(path, allow_unsafe_pickle)
    elif file_format == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            checkpoint = load_file(str(path))
        except SafetensorError as error:
            raise ValueError(f"{path} is not a readable safetensors file ({error}): it is corrupt or truncated") from error
    else:
        raise ValueError(
            f"{path} is neither a PyTorch checkpoint (.pth: a zip archive or a pickle) nor a safetensors file; pass the "
            "original GLIP checkpoint (e.g. glip_tiny_model_o365_goldg.pth)"
        )
    try:
        return unwrap_state_dict(checkpoint)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def build_processor(config: GLIPConfig, tokenizer: str = "bert-base-uncased"):
    """The `GLIPProcessor` of a converted checkpoint: the original test transform sizes and GLIP's BERT tokenizer."""
    from transformers import BertTokenizer

    from processing import GLIPImageProcessor, GLIPProcessor

    try:
        bert_tokenizer = BertTokenizer.from_pretrained(tokenizer)
    except OSError as error:
        raise ValueError(
            f"Cannot load the tokenizer {tokenizer!r} ({str(error).splitlines()[0]}); offline, pass --tokenizer with a "
            "folder holding the bert-base-uncased vocab.txt / tokenizer.json."
        ) from error
    image_processor = GLIPImageProcessor(min_size=config.min_size_test, max_size=config.max_size_test, size_divisibility=config.size_divisibility)
    return GLIPProcessor(image_processor=image_processor, tokenizer=bert_tokenizer, max_text_len=config.max_text_len)


def check_output_folder(output_dir: Path) -> None:
    """The output must not exist, be an empty folder, or hold an earlier GLIP conversion (replaced on success): the
    converter never mixes its files into, or deletes, any other folder."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise ValueError(f"output {output_dir} exists and is not a folder")
    if not any(output_dir.iterdir()):
        return
    try:
        model_type = json.loads((output_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if model_type != "glip":
        raise ValueError(f"output {output_dir} is a folder that holds other files than a GLIP checkpoint; choose a new folder or empty it")


def save_folder_atomically(output_dir: Path, save: Callable[[Path], None]) -> None:
    """`save(folder)` into a new folder beside `output_dir`, then rename it to `output_dir` (an earlier checkpoint
    there is swapped out and deleted only then): a failure leaves neither a partial folder nor a damaged target."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging = output_dir.with_name(f".{output_dir.name}.partial-{tag}")
    previous = output_dir.with_name(f".{output_dir.name}.previous-{tag}")
    staging.mkdir()
    try:
        save(staging)
        if output_dir.exists():
            os.replace(output_dir, previous)
            try:
                os.replace(staging, output_dir)
            except BaseException:
                os.replace(previous, output_dir)
                raise
            shutil.rmtree(previous)
        else:
            os.replace(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def convert(
    checkpoint_path: Union[str, Path],
    output_dir: Union[str, Path],
    config_yaml: Optional[Union[str, Path]] = None,
    text_config: Optional[BertConfig] = None,
    allow_unsafe_pickle: bool = False,
    push_to_hub: Optional[str] = None,
    tokenizer: str = "bert-base-uncased",
) -> Tuple["GLIPModel", GLIPConfig]:  # noqa: F821
    """Checkpoint -> `GLIPModel` + `GLIPProcessor` saved in `output_dir` (config.json, model.safetensors, processor and
    tokenizer files), all or nothing (see `check_output_folder`); returns the model and its config."""
    from .modeling_glip import GLIPModel

    output_dir = Path(output_dir)
    check_output_folder(output_dir)  # before the minutes of loading a large checkpoint
    state_dict = load_original_checkpoint(checkpoint_path, allow_unsafe_pickle)
    config = config_from_original_yaml(config_yaml, text_config) if config_yaml else infer_config_from_state_dict(state_dict, text_config)
    converted = convert_original_state_dict(state_dict, config)
    model = GLIPModel(config)
    result = model.load_state_dict(converted, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"The checkpoint does not fill the GLIPModel its config describes: {len(result.missing_keys)} weights missing "
            f"{result.missing_keys[:20]}, {len(result.unexpected_keys)} unexpected {result.unexpected_keys[:20]} (an "
            "incomplete checkpoint, or a --config_yaml of another architecture)"
        )
    model.eval()
    processor = build_processor(config, tokenizer)
    save_folder_atomically(output_dir, lambda folder: (model.save_pretrained(folder), processor.save_pretrained(folder)))
    if push_to_hub:
        model.push_to_hub(push_to_hub)
        processor.push_to_hub(push_to_hub)
    return model, config


def main(argv=None):
    parser = GLIPArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="original .pth or .safetensors checkpoint")
    parser.add_argument("--output", required=True, help="output directory for the HF checkpoint")
    parser.add_argument("--config_yaml", help="original YAML config (stock or merged dump); inferred from key shapes if omitted")
    parser.add_argument("--text_config", help="BertConfig json (or folder with config.json) when the text model is not bert-base-uncased")
    parser.add_argument("--tokenizer", default="bert-base-uncased", help="BERT tokenizer (repo id or folder with the bert-base-uncased vocab)")
    parser.add_argument("--allow_unsafe_pickle", action="store_true", help="fully unpickle a .pth that weights_only refuses (trusted files only)")
    parser.add_argument("--push_to_hub", metavar="REPO", help="also push the converted model to this Hub repo")
    args = parser.parse_args(argv)
    try:
        text_config = BertConfig.from_pretrained(args.text_config) if args.text_config else None
    except (OSError, ValueError) as error:
        parser.error(f"--text_config {args.text_config}: {' '.join(str(error).split())}")
    try:
        convert(args.checkpoint, args.output, args.config_yaml, text_config, args.allow_unsafe_pickle, args.push_to_hub, args.tokenizer)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(1, f"{parser.prog}: error: {' '.join(str(error).split())}\n")
    print(f"Saved GLIPModel to {args.output}")


if __name__ == "__main__":
    main()
