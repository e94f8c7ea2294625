#!/usr/bin/env python
"""Pre-train or fine-tune GLIP with Accelerate on detection (COCO json) and grounding (MDETR json / jsonl) data.

    accelerate launch examples/pretrain_glip.py --config glip_t --text_encoder path/to/bert \
        --train_files o365.jsonl goldg.jsonl --categories o365_categories.json --image_root images/ \
        --output_dir runs/glip --max_steps 100000 --checkpointing_steps 2500

The recipe follows `configs/pretrain/glip_Swin_T_O365_GoldG.yaml` (glip_architecture.md sections 8 and 9):
AdamW (lr 1e-4, text encoder 1e-5, weight decay 1e-4; biases: 2x lr, no decay), linear warm-up from 0.001x over
2000 steps then x0.1 at 67% and 89% of training, full-model gradient clipping at norm 1.0, EMA of the weights (0.999),
multi-scale 480-800 / 1333 with flips, detection prompts with up to 85 sampled negative classes. Mixed precision,
devices and processes come from `accelerate launch` (DDP, FSDP and DeepSpeed need no code change; resuming is refused
under FSDP, DeepSpeed and Megatron-LM, whose checkpoint loaders unpickle files without `weights_only`).

Fine-tuning modes (`--tuning`, the original's SOLVER.TUNING_HIGHLEVEL_OVERRIDE): `full`; `prompt` (language_prompt_v2:
only the per-position text offsets `text_prompt` train, every other module is frozen and in eval mode);
`linear_probe` (linear_prob: only the head's output layers train; backbone, FPN and text encoder frozen, in eval mode).

Exact resume: `--resume_from_checkpoint latest` restores model, optimizer, scheduler, EMA, RNG states and the data
position (epoch + batches done) from the newest complete checkpoint; every sample's augmentation is a function of
(seed, epoch, index), so a killed and resumed run ends with the same weights as an uninterrupted one. A checkpoint
that cannot give an exact resume (missing or unreadable RNG states or EMA, another number of processes) is an error
unless `--allow_inexact_resume` is given.

Checkpoints are written atomically: into `checkpoint-N.incomplete`, every file flushed to disk, then renamed to
`checkpoint-N`; `trainer_state.json` (written last) lists every file with its size. Nothing in a checkpoint is
unpickled beyond `torch.load(weights_only=True)`: the model and the EMA are safetensors, the trainer state is JSON.

Training stops with an error, before the optimizer step, at the first non-finite loss or gradient norm (all processes
agree; `--skip_nonfinite_steps` skips and counts such steps instead), and when an epoch gives no optimizer step at all
(e.g. every sample skipped: the error shows the skip counts by reason). `--checkpoints_total_limit N` keeps the newest
N complete checkpoints (and always the one the run resumed from).

Resolution and the saved processor: a new model trains at GLIP's multi-scale 480-800 / 1333; a run that starts from a
checkpoint (`--model_name_or_path`) trains at the checkpoint's resolution (its processor's min_size as the largest of
GLIP's five scales, x0.6 .. x1.0, and its max_size) and with its processor's image settings and tokenizer. The model
is meant to run at the test size of its training resolution (the original's pairing: MIN_SIZE_TEST = the largest
training size, MAX_SIZE_TEST = MAX_SIZE_TRAIN): evaluation during training and the processor saved with the model use
max(--min_sizes) / --max_size unless --eval_min_size / --eval_max_size say otherwise.

Processes: the run logs its world size, device, mixed precision and effective batch size at start, and refuses to
run as one process when `accelerate launch` was asked for several (`accelerate launch --cpu --num_processes 2` starts
ONE process; several CPU processes: `accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision
no --dynamo_backend no examples/pretrain_glip.py --cpu ...`).
"""

import argparse
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
from bisect import bisect_right
from collections import Counter
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.tracking import GeneralTracker
from accelerate.utils import RNG_STATE_NAME, DistributedType, broadcast_object_list, gather_object, set_seed
from accelerate.utils import load as accelerate_load
from huggingface_hub.errors import StrictDataclassError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import BertConfig, BertModel, BertTokenizer

from modeling_glip.command_line import GLIPArgumentParser, checked_model_path, load_processor, resized
from modeling_glip.configuration_glip import GLIPConfig, timm_backbone_config
from modeling_glip.convert_glip_original_to_hf import save_folder_atomically
from modeling_glip.modeling_glip import GLIPModel, non_finite_tensors
from processing import GLIPImageProcessor, GLIPProcessor
from processing.atomic_files import fsync_path
from processing.evaluation import coco_references, load_coco_evaluation_set, metrics_table, predict_coco
from processing.train_transforms import GLIP_FLIP_PROB, GLIP_TRAIN_MAX_SIZE, GLIP_TRAIN_MIN_SIZES, GLIPTrainTransform
from processing.training_data import (
    GLIP_RANDOM_SAMPLE_NEG,
    INCOMPLETE_LAST_BATCH,
    UNNAMED_IN_PROMPT,
    GLIPTrainingCollator,
    IndexedDataset,
    IndexedIterableDataset,
    coco_categories,
    is_empty_batch,
    load_training_records,
)

logger = get_logger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
COCO_METRIC = REPO_ROOT / "metrics" / "coco_detection" / "coco_detection.py"
TUNING_MODES = ("full", "prompt", "linear_probe")
# the original's linear probe keeps these head parameters trainable (GeneralizedVLRCNN.train, MODEL.LINEAR_PROB)
LINEAR_PROBE_PARAMETERS = ("head.bbox_pred.", "head.centerness.", "head.dot_product_projection_text.", "head.log_scale", "head.bias_lang", "head.bias0")
TRAINER_STATE = "trainer_state.json"
EMA_WEIGHTS = "ema.safetensors"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
PARTIAL_SUFFIX = ".incomplete"
DELETING_SUFFIX = ".deleting"  # a rotated-out checkpoint between its rename and its removal
# the variables a launcher sets to the number of processes it started (torchrun / MPI), read by Accelerate
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
CPU_LAUNCH_RECIPE = (
    "accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no "
    "examples/pretrain_glip.py --cpu ..."
)
# samples of a usable batch dropped because another process's batch was empty (all processes skip that step)
DROPPED_WITH_EMPTY_PEER_BATCH = "dropped_with_empty_peer_batch"
# skipped non-finite steps logged one by one per epoch (then every 100th); every one is counted and tracked
NONFINITE_WARNINGS = 5
# their loaders unpickle checkpoint files without weights_only (torch.distributed.checkpoint's .metadata, DeepSpeed)
UNSAFE_RESUME_TYPES = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)


def build_parser(description: str, overrides: Optional[Dict[str, dict]] = None) -> argparse.ArgumentParser:
    """The training flags, shared by `pretrain_glip.py` and `finetune_glip.py`.

    Args:
        overrides: per destination, `add_argument` keywords that replace the defaults here (`default`, `help`), and
            `aliases`: extra option strings, listed first (e.g. finetune's `--train_annotations` for `--train_files`).
    """
    overrides = overrides or {}
    # no abbreviations (`--learning` must not silently mean `--learning_rate`), defaults in --help, `--a-b` read as `--a_b`
    parser = GLIPArgumentParser(description=description)

    def add(group, *flags, **kwargs):
        dest = kwargs.pop("dest", flags[0].lstrip("-"))
        change = dict(overrides.get(dest, {}))
        group.add_argument(*change.pop("aliases", ()), *flags, dest=dest, **{**kwargs, **change})

    model = parser.add_argument_group("model")
    add(model, "--model_name_or_path", help="a converted / trained GLIPModel folder to start from")
    add(model, "--config", help="new model: a GLIPConfig JSON file or a preset (glip_t, glip_l)")
    add(model, "--timm_backbone", help="new model: replace the backbone by this timm model (random init)")
    add(model, "--text_encoder", help="new model: BertModel folder whose config and weights initialise the text encoder")
    add(model, "--tokenizer", help="BERT tokenizer folder (default: --model_name_or_path or --text_encoder)")
    add(model, "--config_overrides", help="comma-separated key=value changes of the model's config, e.g. focal_alpha=0.5 (PretrainedConfig.update_from_string); from a checkpoint, a change that leaves any of its weights unused or re-initialised is refused")
    add(model, "--tuning", choices=TUNING_MODES, default="full", help="which parameters train")
    add(model, "--freeze", nargs="*", default=[], help="module prefixes to freeze (e.g. backbone text_model fpn)")
    add(model, "--gradient_checkpointing", action="store_true", help="activation checkpointing of the BERT / Swin layers")
    data = parser.add_argument_group("data")
    add(data, "--train_files", nargs="+", required=True, help="COCO / MDETR .json files or .jsonl record shards")
    add(data, "--image_root", help="folder that the records' file_name are relative to (default: the current directory)")
    add(data, "--categories", help="COCO json whose `categories` name the detection labels (default: the train json's)")
    add(data, "--streaming", action="store_true", help="stream .jsonl shards instead of loading them")
    add(data, "--max_negatives", type=int, default=GLIP_RANDOM_SAMPLE_NEG, help="sampled negative classes per prompt; -1: every class")
    add(data, "--partial_positive_prob", type=float, default=0.0, help="probability that a detection prompt names only some of the image's classes (the others are background; not in the original: 0)")
    add(data, "--shuffle_classes", dest="shuffle_classes", action="store_true", default=True, help="shuffle the classes of detection prompts")
    add(data, "--no_shuffle_classes", dest="shuffle_classes", action="store_false", default=True, help="keep class-id order in detection prompts")
    add(data, "--min_sizes", type=int, nargs="+", help=f"short sides of the multi-scale training resize (AUGMENT.MULT_MIN_SIZE_TRAIN; default: {' '.join(map(str, GLIP_TRAIN_MIN_SIZES))}, or x0.6 .. x1.0 of the --model_name_or_path processor's min_size)")
    add(data, "--max_size", type=int, help=f"cap on the long side (INPUT.MAX_SIZE_TRAIN; default: {GLIP_TRAIN_MAX_SIZE}, or the --model_name_or_path processor's max_size)")
    add(data, "--flip_prob", type=float, default=GLIP_FLIP_PROB, help="horizontal flip probability")
    add(data, "--per_device_batch_size", type=int, default=2, help="images per process and step")
    add(data, "--num_workers", type=int, default=2, help="data-loading worker processes per process")
    optim = parser.add_argument_group("optimisation")
    add(optim, "--learning_rate", type=float, default=1e-4, help="AdamW learning rate (BASE_LR)")
    add(optim, "--text_learning_rate", type=float, default=1e-5, help="learning rate of the text encoder (LANG_LR)")
    add(optim, "--weight_decay", type=float, default=1e-4, help="AdamW weight decay")
    add(optim, "--bias_lr_factor", type=float, default=2.0, help="SOLVER.BIAS_LR_FACTOR (biases also get no weight decay)")
    add(optim, "--max_grad_norm", type=float, default=1.0, help="0: no clipping (the norm is still checked)")
    add(optim, "--max_steps", type=int, help="optimizer steps (default: num_epochs x batches per epoch)")
    add(optim, "--num_epochs", type=int, default=1, help="epochs, when --max_steps is not given")
    add(optim, "--gradient_accumulation_steps", type=int, default=1, help="batches per optimizer step")
    add(optim, "--warmup_steps", type=int, default=2000, help="linear warm-up steps (WARMUP_ITERS)")
    add(optim, "--warmup_factor", type=float, default=0.001, help="learning-rate factor at step 0 of the warm-up")
    add(optim, "--lr_steps", type=float, nargs="*", default=[0.67, 0.89], help="fractions of max_steps where lr x gamma")
    add(optim, "--lr_gamma", type=float, default=0.1, help="learning-rate factor at each of --lr_steps")
    add(optim, "--ema_decay", type=float, default=0.999, help="0 disables the EMA")
    add(optim, "--skip_nonfinite_steps", action="store_true", help="skip (and count) optimizer steps with a non-finite loss or gradient norm instead of stopping")
    run = parser.add_argument_group("run")
    add(run, "--output_dir", required=True, help="checkpoints, metrics and the final model(s)")
    add(run, "--seed", type=int, default=0, help="seed of the data order, augmentation and initialisation")
    add(run, "--mixed_precision", choices=("no", "fp16", "bf16"), help="default: accelerate launch's setting")
    add(run, "--cpu", action="store_true", help="train on CPU (also with several processes: gloo)")
    add(run, "--find_unused_parameters", action="store_true", help="DDP find_unused_parameters")
    add(run, "--checkpointing_steps", type=int, default=0, help="save_state every N steps (0: only at the end)")
    add(run, "--checkpoints_total_limit", type=int, help="keep only the newest N complete checkpoints (and the one resumed from); default: keep all")
    add(run, "--resume_from_checkpoint", help="a checkpoint folder, or 'latest': the newest complete one in output_dir")
    add(run, "--allow_inexact_resume", action="store_true", help="resume from a checkpoint without (readable) RNG states or EMA, or saved by another number of processes")
    add(run, "--logging_steps", type=int, default=10, help="log mean losses and skip counts every N steps")
    add(run, "--report_to", default="jsonl", help="Accelerate trackers (tensorboard, wandb, ...); 'jsonl' writes output_dir/metrics.jsonl")
    add(run, "--eval_annotations", help="COCO json of a detection validation set")
    add(run, "--eval_image_root", help="folder of the validation images")
    add(run, "--eval_steps", type=int, default=0, help="evaluate every N steps (and at the end) when --eval_annotations is set")
    add(run, "--eval_min_size", type=int, help="resize of the evaluation and of the processor saved with the model: short side (default: the largest of --min_sizes)")
    add(run, "--eval_max_size", type=int, help="resize of the evaluation and of the saved processor: long-side cap (default: --max_size)")
    add(run, "--eval_names_per_chunk", type=int, help="class names per prompt chunk at evaluation")
    add(run, "--early_stopping_patience", type=int, default=0, help="stop once the evaluation mAP has been below the best for N evaluations in a row (the original's SOLVER.AUTO_TERMINATE_PATIENCE; needs --eval_steps); the best evaluated weights are kept in output_dir/model_best. 0: off")
    add(run, "--kill_after_steps", type=int, help="testing aid: hard-exit (os._exit, no cleanup) after this many steps")
    add(run, "--kill_during_save", type=int, help="testing aid: SIGKILL while the checkpoint of this step is being written")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Checks of the parsed flags that argparse cannot express (`parser.error` names the flag and the value)."""
    if (args.model_name_or_path is None) == (args.config is None):
        parser.error("give exactly one of --model_name_or_path (start from a model) or --config (new model)")
    if args.max_steps is None and args.streaming:
        parser.error("--streaming needs --max_steps (a stream has no length)")
    at_least = {
        "per_device_batch_size": 1, "gradient_accumulation_steps": 1, "num_epochs": 1, "logging_steps": 1, "max_size": 1,
        "num_workers": 0, "checkpointing_steps": 0, "warmup_steps": 0, "eval_steps": 0, "max_steps": 1,
        "checkpoints_total_limit": 1, "eval_min_size": 1, "eval_max_size": 1, "early_stopping_patience": 0,
    }
    for name, minimum in at_least.items():
        value = getattr(args, name)
        if value is not None and value < minimum:
            parser.error(f"--{name} must be >= {minimum}, got {value}")
    if args.min_sizes is not None and min(args.min_sizes) < 1:
        parser.error(f"--min_sizes must be positive, got {args.min_sizes}")
    try:
        for name in ("model_name_or_path", "tokenizer", "text_encoder"):
            if getattr(args, name) is not None:
                setattr(args, name, checked_model_path(getattr(args, name), f"--{name}"))
    except ValueError as error:
        parser.error(str(error))
    for name in ("learning_rate", "text_learning_rate", "weight_decay", "bias_lr_factor", "max_grad_norm", "warmup_factor", "lr_gamma", "ema_decay"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            parser.error(f"--{name} must be a finite number >= 0, got {value}")
    if not 0 <= args.ema_decay < 1 or not 0 <= args.flip_prob <= 1:
        parser.error(f"--ema_decay must be in [0, 1) and --flip_prob in [0, 1], got {args.ema_decay} and {args.flip_prob}")
    if not 0 <= args.partial_positive_prob <= 1:
        parser.error(f"--partial_positive_prob must be in [0, 1], got {args.partial_positive_prob}")
    if args.early_stopping_patience and not (args.eval_annotations and args.eval_steps):
        parser.error(f"--early_stopping_patience {args.early_stopping_patience} needs evaluations: give --eval_annotations and --eval_steps")
    if args.config_overrides is not None:
        try:
            override_config(GLIPConfig(), args.config_overrides)
        except ValueError as error:
            parser.error(f"--config_overrides {args.config_overrides!r}: {error}")
    return args


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser(__doc__.split("\n\n")[0])
    return check_args(parser, parser.parse_args(argv))


# ----------------------------------------------------------------------------------------------------------------------
# model, tokenizer, tuning modes
# ----------------------------------------------------------------------------------------------------------------------
def override_config(config: GLIPConfig, overrides: str) -> GLIPConfig:
    """`config` changed by `key=value,...` (`PretrainedConfig.update_from_string`: existing keys only, values of the
    field's type) and checked by its validators; every refusal is a ValueError."""
    malformed = [item for item in overrides.split(",") if item.count("=") != 1 or not item.split("=")[0].strip()]
    if malformed:
        raise ValueError(f"expected key=value pairs separated by commas, got {malformed}")
    try:
        config.update_from_string(overrides)
        config.validate()
    except (TypeError, StrictDataclassError) as error:  # a strict-dataclass error carries the validator's own error
        raise ValueError(str(error.__cause__ or error)) from None
    return config


def build_model(args) -> GLIPModel:
    """A GLIPModel from a checkpoint, or a new one from a config (+ timm backbone, + pretrained text encoder), with
    `--config_overrides` applied."""
    prompt_length = None
    if args.tuning == "prompt":  # the original's tunable_linear has 1000 rows; only the first T are ever used
        prompt_length = 1000
    if args.model_name_or_path is not None:
        kwargs = {"text_prompt_length": prompt_length} if prompt_length else {}
        config = GLIPConfig.from_pretrained(args.model_name_or_path, **kwargs)
        if not args.config_overrides:
            return GLIPModel.from_pretrained(args.model_name_or_path, config=config)
        override_config(config, args.config_overrides)
        model, info = GLIPModel.from_pretrained(args.model_name_or_path, config=config, output_loading_info=True, ignore_mismatched_sizes=True)
        # an override that changes the architecture would leave weights unused or re-initialised with only a warning
        changed = sorted({*info["missing_keys"], *info["unexpected_keys"], *(key for key, *_ in info["mismatched_keys"])} - {"text_prompt"})
        if changed:
            raise ValueError(
                f"--config_overrides {args.config_overrides!r} changes the weights of {args.model_name_or_path} ({len(changed)} "
                f"tensors, e.g. {changed[0]}): from a checkpoint, override only fields that keep its weights (loss, assignment, "
                "post-processing settings)"
            )
        return model
    if args.config in ("glip_t", "glip_l"):
        config = getattr(GLIPConfig, args.config)()
    elif Path(args.config).is_file():
        config = GLIPConfig.from_json_file(args.config)
    else:
        raise ValueError(f"--config {args.config!r} is neither a preset (glip_t, glip_l) nor a JSON file")
    if args.timm_backbone:
        config.backbone_config = timm_backbone_config(args.timm_backbone)
    if args.text_encoder:
        config.text_config = BertConfig.from_pretrained(args.text_encoder)
    if prompt_length:
        config.text_prompt_length = prompt_length
    if args.config_overrides:
        override_config(config, args.config_overrides)
    model = GLIPModel(config)
    if args.text_encoder:
        text_model = BertModel.from_pretrained(args.text_encoder, add_pooling_layer=False)
        missing, unexpected = model.text_model.load_state_dict(text_model.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(f"--text_encoder {args.text_encoder}: missing {missing}, unexpected {unexpected} weights")
    return model


def build_processor(args) -> Tuple[GLIPProcessor, str]:
    """The run's processor, and one line that describes the run's resolution.

    Fills in the training resolution that was not given (`args.min_sizes`, `args.max_size`): GLIP's for a new model,
    the --model_name_or_path processor's for a run that starts from a checkpoint (its min_size as the largest of
    GLIP's five scales). The returned processor (the checkpoint's image settings and tokenizer, or GLIP's defaults
    and --tokenizer / --text_encoder's) resizes to the run's test size: --eval_min_size / --eval_max_size, by default
    max(--min_sizes) / --max_size. It is the processor of the evaluations and the one saved with the model.
    """
    if args.model_name_or_path is not None:
        processor, origin = load_processor(args.model_name_or_path, args.tokenizer)
        origin = f"{args.model_name_or_path}, {origin}"
        start = processor.image_processor
        scale = start.min_size / GLIP_TRAIN_MIN_SIZES[-1]
        default_sizes, default_max = sorted({max(1, round(size * scale)) for size in GLIP_TRAIN_MIN_SIZES}), start.max_size
    else:
        source = args.tokenizer or args.text_encoder
        if source is None:
            raise ValueError("no tokenizer: give --tokenizer (a folder with the bert-base-uncased vocab.txt)")
        processor = GLIPProcessor(GLIPImageProcessor(), BertTokenizer.from_pretrained(source))
        origin = f"a new model with GLIP's image settings and the tokenizer of {source}"
        default_sizes, default_max = list(GLIP_TRAIN_MIN_SIZES), GLIP_TRAIN_MAX_SIZE
    args.min_sizes = args.min_sizes or default_sizes
    args.max_size = args.max_size or default_max
    test_size = {"min_size": args.eval_min_size or max(args.min_sizes), "max_size": args.eval_max_size or args.max_size}
    processor.image_processor = resized(processor.image_processor, **test_size)
    summary = (
        f"training resolution: short side {' '.join(map(str, args.min_sizes))}, long side <= {args.max_size}; evaluation and the "
        f"saved processor: min_size {test_size['min_size']}, max_size {test_size['max_size']}. Start: {origin}"
    )
    return processor, summary


def configure_tuning(model: GLIPModel, mode: str, freeze: Sequence[str] = ()) -> List[str]:
    """Set `requires_grad` for a tuning mode (the original's TUNING_HIGHLEVEL_OVERRIDE) and return the top-level
    modules that are frozen as a whole; `set_train_mode` keeps those in eval mode (as `GeneralizedVLRCNN.train`).

    Raises:
        ValueError: unknown mode, a prompt mode on a model without `text_prompt`, an unknown freeze prefix.
    """
    if mode not in TUNING_MODES:
        raise ValueError(f"unknown tuning mode {mode!r}; choose one of {TUNING_MODES}")
    names = dict(model.named_parameters())
    for prefix in freeze:
        if not any(name.startswith(prefix) for name in names):
            raise ValueError(f"--freeze {prefix!r} matches no parameter (top-level modules: {sorted({n.split('.')[0] for n in names})})")
    if mode == "prompt" and model.text_prompt is None:
        raise ValueError("prompt tuning needs a model with config.text_prompt_length > 0")
    frozen_modules = {"full": [], "prompt": ["backbone", "fpn", "text_model", "head"], "linear_probe": ["backbone", "fpn", "text_model"]}[mode]
    for name, parameter in names.items():
        if mode == "prompt":
            trainable = name == "text_prompt"
        elif mode == "linear_probe":
            trainable = name.startswith(LINEAR_PROBE_PARAMETERS)
        else:
            trainable = not name.startswith("head.cls_logits.")  # computed nowhere, always frozen (section 5.5)
        parameter.requires_grad_(trainable and not name.startswith(tuple(freeze)))
    return frozen_modules + [prefix for prefix in freeze if prefix not in frozen_modules]


def check_finite_parameters(model: torch.nn.Module, where: str):
    """Raise ValueError naming the parameters / buffers of `model` that hold NaN or inf values."""
    bad = non_finite_tensors(model)
    if bad:
        raise ValueError(f"the model {where} has non-finite values in {len(bad)} tensors: {bad[:5]}{' ...' if len(bad) > 5 else ''}")


def set_train_mode(model: torch.nn.Module, frozen_modules: Sequence[str]):
    """`model.train()`, with the frozen modules in eval mode (no dropout, DropBlock or BatchNorm updates there)."""
    model.train()
    for name in frozen_modules:
        model.get_submodule(name).eval()


def parameter_groups(model: torch.nn.Module, learning_rate: float, text_learning_rate: float, weight_decay: float, bias_lr_factor: float) -> List[dict]:
    """AdamW groups as the original's `make_optimizer`: the text encoder at its own rate (LANG_LR); biases at
    `bias_lr_factor` x the rate without weight decay (BIAS_LR_FACTOR, WEIGHT_DECAY_BIAS = 0)."""
    groups: Dict[tuple, List[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        lr = text_learning_rate if name.startswith("text_model.") else learning_rate
        # `"bias" in key` in the original: every `.bias`, and also head.bias_lang / head.bias0
        key = (lr * bias_lr_factor, 0.0) if "bias" in name else (lr, weight_decay)
        groups.setdefault(key, []).append(parameter)
    if not groups:
        raise ValueError("no parameter is trainable")
    return [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]


def warmup_multistep_factor(step: int, warmup_steps: int, warmup_factor: float, milestones: Sequence[int], gamma: float) -> float:
    """The original's WarmupMultiStepLR (linear warm-up) as a LambdaLR factor of optimizer step `step`."""
    factor = 1.0
    if step < warmup_steps:
        alpha = step / warmup_steps
        factor = warmup_factor * (1 - alpha) + alpha
    return factor * gamma ** bisect_right(milestones, step)


class ExponentialMovingAverage:
    """EMA of every floating-point entry of a model's state dict (the original's `ModelEma`, SOLVER.MODEL_EMA); saved
    in checkpoints as `ema.safetensors` (`save_checkpoint`)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {key: value.detach().clone() for key, value in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                self.shadow[key].mul_(self.decay).add_(value.detach(), alpha=1 - self.decay)
            else:
                self.shadow[key].copy_(value)

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, state_dict: dict):
        if state_dict.keys() != self.shadow.keys():
            raise ValueError(f"EMA weights do not match the model: missing {sorted(self.shadow.keys() - state_dict.keys())[:5]}, unexpected {sorted(state_dict.keys() - self.shadow.keys())[:5]}")
        for key, value in state_dict.items():
            self.shadow[key].copy_(value)


class JSONLinesTracker(GeneralTracker):
    """A dependency-free Accelerate tracker: one JSON line per `log` call in `<logging_dir>/metrics.jsonl`."""

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str):
        super().__init__()
        self.run_name = run_name
        self.path = Path(logging_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict):
        (self.path.parent / "run_config.json").write_text(json.dumps(values, indent=1, default=str))

    def log(self, values: dict, step: Optional[int] = None, **kwargs):
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, **{k: float(v) if hasattr(v, "__float__") else v for k, v in values.items()}}) + "\n")


# ----------------------------------------------------------------------------------------------------------------------
# data and evaluation
# ----------------------------------------------------------------------------------------------------------------------
def build_train_loader(args, processor: GLIPProcessor, num_processes: int):
    records, categories = load_training_records(args.train_files, streaming=args.streaming)
    if args.categories:
        categories = coco_categories(args.categories)
    transform = GLIPTrainTransform(tuple(args.min_sizes), args.max_size, args.flip_prob)
    collator_kwargs = dict(
        image_root=args.image_root,
        transform=transform,
        max_negatives=None if args.max_negatives < 0 else args.max_negatives,
        shuffle_classes=args.shuffle_classes,
        partial_positive_prob=args.partial_positive_prob,
        seed=args.seed,
    )
    if categories:
        collator = GLIPTrainingCollator.from_categories(processor, categories, **collator_kwargs)
    else:
        collator = GLIPTrainingCollator(processor, **collator_kwargs)
    # a stream drops (and counts) its incomplete last global batch itself
    dataset = IndexedIterableDataset(records, args.per_device_batch_size * num_processes) if args.streaming else IndexedDataset(records)
    loader = DataLoader(
        dataset,
        batch_size=args.per_device_batch_size,
        shuffle=not args.streaming,
        collate_fn=collator,
        num_workers=args.num_workers,
        drop_last=True,  # every process sees full batches: the same global batch as one process
        # the loader's own generator: creating an iterator (also after a resume) must not draw from the global RNG
        generator=torch.Generator().manual_seed(args.seed),
    )
    return dataset, loader, categories


def log_evaluation(accelerator: Accelerator, model: GLIPModel, processor: GLIPProcessor, args, step: int, history: List[Tuple[int, dict]]):
    """Evaluate (`evaluate_detection`), log the metrics to the trackers as `eval_<name>` and, on the main process,
    print every evaluation of the run so far as a table (one row per step)."""
    results = evaluate_detection(accelerator, model, processor, args)  # {} on the other processes
    accelerator.log({f"eval_{name}": value for name, value in results.items()}, step=step)
    history.append((step, results))  # on every process, so that all of them know which steps were evaluated
    if accelerator.is_main_process:
        tqdm.write(f"\nevaluation on {args.eval_annotations} (min_size {processor.image_processor.min_size}, max_size {processor.image_processor.max_size}):\n{metrics_table(history)}\n")


def save_trained_model(model: GLIPModel, processor: GLIPProcessor, folder: Path, state_dict: Optional[dict] = None) -> None:
    """`model` (or `state_dict` in its shape) with the run's processor into `folder`, replaced atomically; its config
    records the test transform it is meant to run with (the processor's min_size / max_size)."""
    model.config.min_size_test, model.config.max_size_test = processor.image_processor.min_size, processor.image_processor.max_size

    def save(staging: Path):
        model.save_pretrained(staging, state_dict=state_dict)
        processor.save_pretrained(staging)

    save_folder_atomically(folder, save)


def track_best_evaluation(accelerator: Accelerator, model: GLIPModel, processor: GLIPProcessor, output_dir: Path, state: dict, step: int, results: Dict[str, float]) -> None:
    """The original's auto-termination bookkeeping (engine/trainer.py, SOLVER.AUTO_TERMINATE_PATIENCE): an evaluation
    whose mAP is not below the best so far becomes the best (its weights replace `output_dir/model_best`, atomically)
    and resets `evaluations_below_best`; one below it adds one. `results` is the main process's (empty elsewhere); every
    process must call this, and all of them keep the same `state`."""
    mean_ap = broadcast_object_list([results.get("mAP")])[0]
    if state["best_eval_mAP"] is None or mean_ap >= state["best_eval_mAP"]:
        state.update(best_eval_mAP=mean_ap, best_eval_step=step, evaluations_below_best=0)
        if accelerator.is_main_process:
            save_trained_model(model, processor, output_dir / "model_best")
    else:
        state["evaluations_below_best"] += 1


def stops_early(args, state: dict) -> bool:
    """True once --early_stopping_patience evaluations in a row were below the best (also for a resumed run)."""
    return bool(args.early_stopping_patience) and state["evaluations_below_best"] >= args.early_stopping_patience


def evaluate_detection(accelerator: Accelerator, model: GLIPModel, processor: GLIPProcessor, args) -> Dict[str, float]:
    """COCO mAP of `model` on --eval_annotations; images are split over processes and gathered."""
    import evaluate

    records, categories = load_coco_evaluation_set(args.eval_annotations)
    shard = records[accelerator.process_index :: accelerator.num_processes]
    was_training = model.training
    model.eval()
    predictions = predict_coco(model, processor, shard, categories, args.eval_image_root, args.eval_names_per_chunk)
    model.train(was_training)
    predictions = gather_object(predictions)
    if not accelerator.is_main_process:
        return {}
    metric = evaluate.load(str(COCO_METRIC))
    by_id = {prediction["image_id"]: prediction for prediction in predictions}
    return metric.compute(predictions=[by_id[record["image_id"]] for record in records], references=coco_references(records))


# ----------------------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------------------
def global_counts(accelerator: Accelerator, counts: Counter) -> Counter:
    """The sum over processes of a per-process Counter (a collective: every process must call it)."""
    total = Counter()
    for process_counts in gather_object([dict(counts)]):
        total.update(process_counts)
    return total


def checkpoint_problem(folder: Path) -> Optional[str]:
    """Why `folder` is not a complete checkpoint of this script, or None: its `trainer_state.json` (written last) must
    parse and every file it lists must be there with the size it was written with."""
    try:
        state = json.loads((folder / TRAINER_STATE).read_text())
    except FileNotFoundError:
        return f"it has no {TRAINER_STATE} (its save did not finish, or it is not a checkpoint of this script)"
    except (OSError, ValueError) as error:
        return f"its {TRAINER_STATE} cannot be read: {error}"
    files = state.get("files") if isinstance(state, dict) else None
    if not isinstance(files, dict) or not files:
        return f"its {TRAINER_STATE} lists no files (written by an older version of this script?)"
    counters = ("global_step", "epoch", "batches_in_epoch", "nonfinite_steps_skipped", "num_processes")
    bad = [key for key in counters if not (isinstance(state.get(key), int) and state[key] >= 0)]
    if bad or not isinstance(state.get("skipped"), dict) or not all(isinstance(v, int) for v in state["skipped"].values()):
        return f"its {TRAINER_STATE} has invalid fields: {bad or ['skipped']}"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    """The newest complete `checkpoint-<int>` in `output_dir`; other names are ignored, incomplete checkpoints and
    interrupted saves (`checkpoint-N.incomplete`) are skipped with a warning."""
    candidates = []
    for path in output_dir.iterdir() if output_dir.is_dir() else ():
        match = CHECKPOINT_NAME.fullmatch(path.name)
        if match and path.is_dir():
            candidates.append((int(match.group(1)), path))
        elif path.name.startswith("checkpoint-") and path.name.endswith(PARTIAL_SUFFIX):
            logger.warning(f"skipping {path}: a checkpoint save that was interrupted")
    for _, path in sorted(candidates, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning(f"skipping incomplete checkpoint {path}: {problem}")
    return None


def rotate_checkpoints(output_dir: Path, limit: int, keep: Optional[Path] = None) -> List[Path]:
    """Delete the complete checkpoints of `output_dir` older than its newest `limit` ones, except `keep` (the checkpoint
    the run resumed from); returns them. Each is first renamed to `checkpoint-N.deleting`, which `latest_checkpoint`
    never takes, then removed, so a crash in between never leaves a half-deleted folder that looks like a checkpoint;
    such leftovers are removed here too. Incomplete checkpoints are neither counted nor deleted."""
    complete = []
    for path in output_dir.iterdir():
        match = CHECKPOINT_NAME.fullmatch(path.name)
        if match and path.is_dir() and checkpoint_problem(path) is None:
            complete.append((int(match.group(1)), path))
    rotated = [path for _, path in sorted(complete)[:-limit] if keep is None or path.resolve() != keep.resolve()]
    for path in rotated:
        os.replace(path, path.with_name(path.name + DELETING_SUFFIX))
    fsync_path(output_dir)
    for leftover in output_dir.glob(f"checkpoint-*{DELETING_SUFFIX}"):
        shutil.rmtree(leftover)
    return rotated


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    state: dict,
    ema: Optional[ExponentialMovingAverage],
    kill_during_save: Optional[int] = None,
    total_limit: Optional[int] = None,
    keep: Optional[Path] = None,
) -> Path:
    """Write `output_dir/checkpoint-<global_step>` atomically (every process must call it).

    Accelerate's state (model safetensors, optimizer, scheduler, RNG states) and the EMA (safetensors) go to
    `checkpoint-N.incomplete`; then the main process writes `trainer_state.json` (`state` plus the list of files and
    their sizes), flushes every file and the folder to disk and renames the folder to `checkpoint-N`. A crash at any
    point leaves either the previous checkpoints and an `.incomplete` folder, or the finished checkpoint. With a
    `total_limit`, the older checkpoints beyond it (not `keep`) are then deleted (`rotate_checkpoints`), only once the
    new one is complete.
    """
    final = output_dir / f"checkpoint-{state['global_step']}"
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)  # left by an interrupted save
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if accelerator.is_main_process and ema is not None:
        save_file({key: value.detach().cpu().contiguous() for key, value in ema.state_dict().items()}, str(partial / EMA_WEIGHTS))
    accelerator.wait_for_everyone()
    if kill_during_save == state["global_step"]:
        os.kill(os.getpid(), signal.SIGKILL)  # testing aid: a crash with the state files written, before the rename
    if accelerator.is_main_process:
        files = {str(path.relative_to(partial)): path.stat().st_size for path in sorted(partial.rglob("*")) if path.is_file()}
        for name in files:
            fsync_path(partial / name)
        (partial / TRAINER_STATE).write_text(json.dumps({**state, "num_processes": accelerator.num_processes, "files": files}, indent=1))
        fsync_path(partial / TRAINER_STATE)
        fsync_path(partial)
        replaced = final.with_name(final.name + ".replaced")
        if final.exists():  # the same step saved again (a resumed run): a folder cannot be renamed over a full one
            os.replace(final, replaced)
        os.replace(partial, final)
        fsync_path(output_dir)
        shutil.rmtree(replaced, ignore_errors=True)
        if total_limit is not None:
            for path in rotate_checkpoints(output_dir, total_limit, keep):
                logger.info(f"deleted {path} (--checkpoints_total_limit {total_limit})")
    accelerator.wait_for_everyone()
    return final


def _rng_state_problem(folder: Path, process_index: int) -> Optional[str]:
    """Why this process's RNG states in `folder` cannot be restored, or None (read as `load_state` reads them)."""
    path = folder / f"{RNG_STATE_NAME}_{process_index}.pkl"
    if not path.is_file():
        return f"{path.name} (the RNG states of process {process_index}) is missing"
    try:
        states = accelerate_load(path)  # torch.load(weights_only=True), numpy arrays allowed
    except Exception as error:  # noqa: BLE001 - any failure means the same thing: no exact resume
        return f"{path.name} cannot be read with weights_only=True ({type(error).__name__}: {str(error)[:200]})"
    required = {"random_state", "numpy_random_seed", "torch_manual_seed"} | ({"torch_cuda_manual_seed"} if torch.cuda.is_available() else set())
    if not isinstance(states, dict) or not required <= states.keys():
        return f"{path.name} lacks the RNG states {sorted(required - set(states if isinstance(states, dict) else ()))}"
    return None


def load_checkpoint(accelerator: Accelerator, folder: Path, model, ema: Optional[ExponentialMovingAverage], allow_inexact_resume: bool = False) -> dict:
    """Restore a `save_checkpoint` folder into the prepared objects and return its trainer state (every process must
    call it; all of them raise together).

    Nothing is unpickled beyond `torch.load(weights_only=True)`: model and EMA are safetensors, optimizer, scheduler
    and RNG states go through Accelerate's `load` with `weights_only=True`, and a folder with Accelerate custom-state
    pickles is refused (no custom object is registered).

    Raises:
        ValueError: an incomplete or unsafe checkpoint, one that cannot give an exact resume (unless
            `allow_inexact_resume`), or any file that fails to load.
    """
    if accelerator.distributed_type in UNSAFE_RESUME_TYPES:
        raise ValueError(f"resuming is not supported with {accelerator.distributed_type}: its checkpoint loader unpickles files without weights_only")
    problem = checkpoint_problem(folder)
    inexact = []
    if problem is None:
        state = json.loads((folder / TRAINER_STATE).read_text())
        if state.get("num_processes") != accelerator.num_processes:
            inexact.append(f"it was saved by {state.get('num_processes')} processes, this run has {accelerator.num_processes}")
        rng_problem = _rng_state_problem(folder, accelerator.process_index)
        if rng_problem:
            inexact.append(rng_problem)
        if ema is not None and not (folder / EMA_WEIGHTS).is_file():
            inexact.append(f"it has no {EMA_WEIGHTS} (the EMA would restart from the resumed weights)")
    problems = [item for process in gather_object([[problem]]) for item in process if item]
    inexact = sorted({item for process in gather_object([inexact]) for item in process})
    if problems:
        raise ValueError(f"cannot resume from {folder}: {problems[0]}")
    if inexact:
        if not allow_inexact_resume:
            raise ValueError(f"{folder} cannot give an exact resume: {'; '.join(inexact)}. Pass --allow_inexact_resume to resume anyway")
        logger.warning(f"inexact resume from {folder}: {'; '.join(inexact)}")
    try:
        accelerator.load_state(str(folder), load_kwargs={"weights_only": True})
        if ema is not None and (folder / EMA_WEIGHTS).is_file():
            ema.load_state_dict(load_file(str(folder / EMA_WEIGHTS)))
    except Exception as error:  # noqa: BLE001 - one message naming the checkpoint, the cause chained
        raise ValueError(f"cannot resume from {folder}: {type(error).__name__}: {str(error)[:500]}") from error
    if ema is not None and not (folder / EMA_WEIGHTS).is_file():  # an allowed inexact resume: restart the EMA
        ema.shadow = {key: value.detach().clone() for key, value in accelerator.unwrap_model(model).state_dict().items()}
    check_finite_parameters(accelerator.unwrap_model(model), f"in {folder}")
    return state


def optimizer_step_if_finite(accelerator: Accelerator, model, optimizer, losses_finite: bool, max_grad_norm: float) -> Tuple[bool, float]:
    """At a gradient-synchronising step: clip the full model's gradients (CLIP_TYPE full_model; max_grad_norm 0: no
    clipping) and step the optimizer only if, on every process, the losses since the last step and the gradient norm
    are finite. Gradients are cleared either way.

    With fp16 loss scaling the gradient norm is left to the GradScaler (it skips overflowing steps and lowers the
    scale); the losses are still checked.

    Returns:
        (whether the optimizer stepped, this process's gradient norm or NaN when not measured).
    """
    norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf)
    measured = norm is not None and accelerator.scaler is None  # DeepSpeed clips inside its engine and returns None
    norm = float(norm) if norm is not None else math.nan
    finite = losses_finite and (not measured or math.isfinite(norm))
    nonfinite_processes = accelerator.reduce(torch.tensor(0.0 if finite else 1.0, device=accelerator.device), reduction="sum")
    stepped = float(nonfinite_processes) == 0
    if stepped:
        optimizer.step()
    optimizer.zero_grad()
    return stepped, norm


def no_progress_error(epoch: int, progress: Counter, skipped: Counter, global_batch: int) -> ValueError:
    return ValueError(
        f"epoch {epoch} gave no optimizer step ({progress['batches']} batches of {global_batch} records over all processes; "
        f"{progress['empty_batches']} with every sample of a process skipped, {progress['nonfinite_steps']} non-finite steps skipped). "
        f"Skipped so far, by reason: {dict(sorted(skipped.items()))}. Check --train_files / --image_root and the warnings above"
    )


def launcher_problem(num_processes: int, environ: Mapping[str, str]) -> Optional[str]:
    """Why this run has another number of processes than its launcher asked for, or None.

    A launcher that starts several processes tells each one how many (`WORLD_SIZE`, MPI's `PMI_SIZE`, ...). `accelerate
    launch --cpu --num_processes N` (without `--multi_gpu` or an MPI hostfile) starts ONE plain process: the only
    trace of the requested N > 1 is the `MASTER_ADDR` / `MASTER_PORT` pair it sets for N > 1 (its
    `ACCELERATE_MIXED_PRECISION` shows the process came from `accelerate launch`).
    """
    for name in WORLD_SIZE_VARIABLES:
        if environ.get(name, "").isdigit() and int(environ[name]) != num_processes:
            return f"the launcher started {environ[name]} processes ({name}), Accelerate runs {num_processes}"
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in environ
    if launched_by_accelerate and num_processes == 1 and "MASTER_PORT" in environ and not any(name in environ for name in WORLD_SIZE_VARIABLES):
        return (
            "`accelerate launch` was asked for more than one process (it set MASTER_ADDR / MASTER_PORT) but started only this "
            "one: `accelerate launch --cpu --num_processes N` runs ONE process. Several CPU processes: "
            f"`{CPU_LAUNCH_RECIPE}`; one process: drop --num_processes (if MASTER_ADDR / MASTER_PORT come from your own "
            "environment, unset them)"
        )
    return None


def run_summary(accelerator: Accelerator, args: argparse.Namespace) -> str:
    """World size, device, mixed precision and the effective batch size of the run (logged at start)."""
    effective = args.per_device_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    return (
        f"world size {accelerator.num_processes}{'' if accelerator.num_processes == 1 else f' ({accelerator.distributed_type.value})'}, device {accelerator.device}, mixed precision "
        f"{accelerator.mixed_precision}, effective batch size {effective} = {args.per_device_batch_size} per device x "
        f"{accelerator.num_processes} process(es) x {args.gradient_accumulation_steps} accumulation step(s)"
    )


def main(argv: Optional[Sequence[str]] = None):
    train(parse_args(argv))


def train(args: argparse.Namespace):
    """Train with parsed flags (`parse_args` here, or `finetune_glip.parse_args`)."""
    output_dir = Path(args.output_dir)
    trackers = [JSONLinesTracker("glip", str(output_dir))] if args.report_to == "jsonl" else (None if args.report_to == "none" else args.report_to)
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=trackers,
        project_dir=str(output_dir),
        # a seeded sampler makes the data order a function of (seed, epoch): needed for exact resume
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed, dispatch_batches=False),
        # the schedule counts optimizer steps, whatever the number of processes
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.find_unused_parameters)],
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    problem = launcher_problem(accelerator.num_processes, os.environ)
    if problem:
        raise ValueError(problem)
    logger.info(run_summary(accelerator, args))
    set_seed(args.seed)

    processor, resolution = build_processor(args)
    logger.info(resolution)
    model = build_model(args)
    check_finite_parameters(model, "to train")
    frozen_modules = configure_tuning(model, args.tuning, args.freeze)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    dataset, loader, categories = build_train_loader(args, processor, accelerator.num_processes)
    optimizer = torch.optim.AdamW(parameter_groups(model, args.learning_rate, args.text_learning_rate, args.weight_decay, args.bias_lr_factor))

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    global_batch = args.per_device_batch_size * accelerator.num_processes
    batches_per_epoch = None if args.streaming else len(loader)
    steps_per_epoch = None if batches_per_epoch is None else max(batches_per_epoch // args.gradient_accumulation_steps, 1)
    max_steps = args.max_steps or args.num_epochs * steps_per_epoch
    # records a map-style epoch never shows (drop_last); a stream counts its own dropped tail (IndexedIterableDataset)
    dropped_per_epoch = 0 if args.streaming else len(dataset) - batches_per_epoch * global_batch
    milestones = [round(fraction * max_steps) for fraction in args.lr_steps]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_multistep_factor(step, args.warmup_steps, args.warmup_factor, milestones, args.lr_gamma)
    )
    scheduler = accelerator.prepare(scheduler)
    ema = ExponentialMovingAverage(accelerator.unwrap_model(model), args.ema_decay) if args.ema_decay > 0 else None

    state = {"global_step": 0, "epoch": 0, "batches_in_epoch": 0, "skipped": {}, "nonfinite_steps_skipped": 0}
    best = {"best_eval_mAP": None, "best_eval_step": None, "evaluations_below_best": 0}  # track_best_evaluation
    checkpoint = None  # the one resumed from: never rotated out
    if args.resume_from_checkpoint:
        checkpoint = latest_checkpoint(output_dir) if args.resume_from_checkpoint == "latest" else Path(args.resume_from_checkpoint)
        if checkpoint is None:
            raise ValueError(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}")
        state = load_checkpoint(accelerator, checkpoint, model, ema, args.allow_inexact_resume)
        logger.info(f"resumed from {checkpoint} at step {state['global_step']}")
    state = {**best, **state}  # a checkpoint saved before early stopping existed has no best-evaluation fields
    # per process: skipped samples / boxes since the start of the run (the resumed totals are the main process's)
    skipped = Counter(state["skipped"] if accelerator.is_main_process else {})

    def checkpoint_now():
        totals = global_counts(accelerator, skipped)
        save_checkpoint(accelerator, output_dir, {**state, "skipped": dict(totals)}, ema, args.kill_during_save, args.checkpoints_total_limit, checkpoint)

    run_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list))}
    run_config.update(num_processes=accelerator.num_processes, effective_batch_size=global_batch * args.gradient_accumulation_steps)
    accelerator.init_trackers("glip", config=run_config)
    evaluations: List[Tuple[int, dict]] = []  # (step, metrics) of the run's evaluations, printed as a table
    progress = tqdm(total=max_steps, initial=state["global_step"], disable=not accelerator.is_local_main_process, desc="train")
    set_train_mode(model, frozen_modules)
    running: Counter = Counter()  # loss sums of the applied steps since the last log
    window: Counter = Counter()  # loss sums of the batches accumulated since the last optimizer step
    losses_finite, logged_skips = True, Counter()
    while state["global_step"] < max_steps and not stops_early(args, state):
        epoch, resumed_batches = state["epoch"], state["batches_in_epoch"]
        dataset.set_epoch(epoch)
        loader.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, resumed_batches) if resumed_batches else loader
        epoch_progress = Counter()
        for batch in epoch_loader:
            state["batches_in_epoch"] += 1
            epoch_progress["batches"] += 1
            skipped.update(batch.pop("skipped"))
            # a batch whose samples were all skipped on some process: every process skips the step together
            empty = torch.tensor([is_empty_batch(batch)], device=accelerator.device)
            if bool(accelerator.gather(empty).any()):
                epoch_progress["empty_batches"] += 1
                if not is_empty_batch(batch):
                    skipped[DROPPED_WITH_EMPTY_PEER_BATCH] += len(batch["labels"])
                continue
            with accelerator.accumulate(model):
                outputs = model(**batch)
                losses_finite = losses_finite and bool(torch.isfinite(outputs.loss.detach()))
                window.update({name: value.detach().item() for name, value in outputs.loss_dict.items()})
                window["loss"] += outputs.loss.detach().item()
                window["batches"] += 1
                accelerator.backward(outputs.loss)
                if not accelerator.sync_gradients:
                    continue
                stepped, grad_norm = optimizer_step_if_finite(accelerator, model, optimizer, losses_finite, args.max_grad_norm)
            losses_finite = True
            if not stepped:
                where = f"optimizer step {state['global_step'] + 1} (epoch {epoch}, batch {state['batches_in_epoch']})"
                what = f"mean loss {window['loss'] / window['batches']:.6g}, gradient norm {grad_norm:.6g} on this process"
                window.clear()
                if not args.skip_nonfinite_steps:
                    raise FloatingPointError(
                        f"non-finite loss or gradient norm at {where} ({what}); the weights were not updated. Lower the "
                        "learning rate or check the data; --skip_nonfinite_steps skips such steps instead"
                    )
                state["nonfinite_steps_skipped"] += 1
                epoch_progress["nonfinite_steps"] += 1
                if epoch_progress["nonfinite_steps"] <= NONFINITE_WARNINGS or epoch_progress["nonfinite_steps"] % 100 == 0:
                    logger.warning(f"skipped {where}: non-finite loss or gradient norm ({what}); {state['nonfinite_steps_skipped']} such steps so far")
                accelerator.log({"nonfinite_steps_skipped": state["nonfinite_steps_skipped"]}, step=state["global_step"])
                continue
            running.update(window)
            window.clear()
            scheduler.step()
            if ema is not None:
                ema.update(accelerator.unwrap_model(model))
            state["global_step"] += 1
            epoch_progress["steps"] += 1
            progress.update(1)

            step = state["global_step"]
            if step % args.logging_steps == 0 or step == max_steps:
                means = {name: value / running["batches"] for name, value in running.items() if name != "batches"}
                means = {name: accelerator.reduce(torch.tensor(value, device=accelerator.device), reduction="mean").item() for name, value in means.items()}
                means["lr"] = scheduler.get_last_lr()[0]
                totals = global_counts(accelerator, skipped)
                means.update({f"skipped_{reason}": count for reason, count in totals.items()})
                means["nonfinite_steps_skipped"] = state["nonfinite_steps_skipped"]
                accelerator.log(means, step=step)
                problems = Counter({reason: count for reason, count in totals.items() if reason != UNNAMED_IN_PROMPT})  # not a data problem
                if problems != logged_skips:  # one aggregated line, not one per sample
                    logger.warning(f"step {step}: skipped so far, by reason: {dict(sorted(problems.items()))}")
                    logged_skips = problems
                progress.set_postfix(loss=f"{means['loss']:.4f}")
                running.clear()
            if args.eval_annotations and args.eval_steps and step % args.eval_steps == 0:
                log_evaluation(accelerator, accelerator.unwrap_model(model), processor, args, step, evaluations)
                if args.early_stopping_patience:
                    track_best_evaluation(accelerator, accelerator.unwrap_model(model), processor, output_dir, state, step, evaluations[-1][1])
                set_train_mode(model, frozen_modules)
            if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                checkpoint_now()
            if args.kill_after_steps is not None and step >= args.kill_after_steps:
                os._exit(1)  # simulated crash: no cleanup, no final save
            if stops_early(args, state):
                logger.info(
                    f"stopping early at step {step}: mAP below the best ({state['best_eval_mAP']:.4f}, step {state['best_eval_step']}) for "
                    f"{state['evaluations_below_best']} evaluations in a row (--early_stopping_patience); its weights are in {output_dir / 'model_best'}"
                )
            if step >= max_steps or stops_early(args, state):
                break
        else:
            if accelerator.is_main_process and dropped_per_epoch:
                skipped[INCOMPLETE_LAST_BATCH] += dropped_per_epoch
            # an epoch seen from its start without one optimizer step (none pending either) can never make progress
            if resumed_batches == 0 and epoch_progress["steps"] == 0 and window["batches"] == 0:
                raise no_progress_error(epoch, epoch_progress, global_counts(accelerator, skipped), global_batch)
            state["epoch"] += 1
            state["batches_in_epoch"] = 0
            continue
        break
    progress.close()

    if not args.checkpointing_steps or state["global_step"] % args.checkpointing_steps:
        checkpoint_now()
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.num_processes > 1:  # diagnostic: DDP keeps every process's weights identical
        weights = torch.cat([p.detach().float().flatten() for p in unwrapped.parameters()])
        spread = (accelerator.gather(weights[None]) - weights).abs().max()
        accelerator.log({"final_rank_weight_max_diff": spread.item()}, step=state["global_step"])
    if args.eval_annotations and not (evaluations and evaluations[-1][0] == state["global_step"]) and not stops_early(args, state):
        log_evaluation(accelerator, unwrapped, processor, args, state["global_step"], evaluations)
        if args.early_stopping_patience:
            track_best_evaluation(accelerator, unwrapped, processor, output_dir, state, state["global_step"], evaluations[-1][1])
    totals = global_counts(accelerator, skipped)
    if accelerator.is_main_process:
        save_trained_model(unwrapped, processor, output_dir / "model")
        if ema is not None:
            save_trained_model(unwrapped, processor, output_dir / "model_ema", state_dict=ema.state_dict())
        if totals[UNNAMED_IN_PROMPT]:
            logger.info(f"boxes left out of partial prompts on purpose (--partial_positive_prob): {totals[UNNAMED_IN_PROMPT]}")
        problems = {reason: count for reason, count in totals.items() if reason != UNNAMED_IN_PROMPT}
        if problems or state["nonfinite_steps_skipped"]:
            logger.warning(f"skipped during training, by reason: {dict(sorted(problems.items()))}; non-finite steps skipped: {state['nonfinite_steps_skipped']}")
    accelerator.wait_for_everyone()
    accelerator.end_training()


def exit_without_teardown():
    """gloo ranks may abort at interpreter exit after finishing correctly (environment.md): flush and leave."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
    exit_without_teardown()
