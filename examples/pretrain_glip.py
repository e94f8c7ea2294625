#!/usr/bin/env python
"""Pre-train or fine-tune GLIP with Accelerate on detection (COCO json) and grounding (MDETR json / jsonl) data.

    accelerate launch examples/pretrain_glip.py --config glip_t --text_encoder path/to/bert \
        --train_files o365.jsonl goldg.jsonl --categories o365_categories.json --image_root images/ \
        --output_dir runs/glip --max_steps 100000 --checkpointing_steps 2500

The recipe follows `configs/pretrain/glip_Swin_T_O365_GoldG.yaml` (glip_architecture.md sections 8 and 9):
AdamW (lr 1e-4, text encoder 1e-5, weight decay 1e-4; biases: 2x lr, no decay), linear warm-up from 0.001x over
2000 steps then x0.1 at 67% and 89% of training, full-model gradient clipping at norm 1.0, EMA of the weights (0.999),
multi-scale 480-800 / 1333 with flips, detection prompts with up to 85 sampled negative classes. Mixed precision,
devices and processes come from `accelerate launch` (DDP, FSDP and DeepSpeed need no code change).

Fine-tuning modes (`--tuning`, the original's SOLVER.TUNING_HIGHLEVEL_OVERRIDE): `full`; `prompt` (language_prompt_v2:
only the per-position text offsets `text_prompt` train, every other module is frozen and in eval mode);
`linear_probe` (linear_prob: only the head's output layers train; backbone, FPN and text encoder frozen, in eval mode).

Exact resume: `--resume_from_checkpoint latest` restores model, optimizer, scheduler, EMA, RNG states and the data
position (epoch + batches done); every sample's augmentation is a function of (seed, epoch, index), so a killed and
resumed run ends with the same weights as an uninterrupted one.
"""

import argparse
import json
import logging
import os
import sys
from bisect import bisect_right
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.tracking import GeneralTracker
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import BertConfig, BertModel, BertTokenizer

from modeling_glip.configuration_glip import GLIPConfig, timm_backbone_config
from modeling_glip.modeling_glip import GLIPModel
from processing import GLIPImageProcessor, GLIPProcessor
from processing.evaluation import coco_references, load_coco_evaluation_set, predict_coco
from processing.train_transforms import GLIP_FLIP_PROB, GLIP_TRAIN_MAX_SIZE, GLIP_TRAIN_MIN_SIZES, GLIPTrainTransform
from processing.training_data import (
    GLIP_RANDOM_SAMPLE_NEG,
    GLIPTrainingCollator,
    IndexedDataset,
    IndexedIterableDataset,
    coco_categories,
    load_training_records,
)

logger = get_logger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
COCO_METRIC = REPO_ROOT / "metrics" / "coco_detection" / "coco_detection.py"
TUNING_MODES = ("full", "prompt", "linear_probe")
# the original's linear probe keeps these head parameters trainable (GeneralizedVLRCNN.train, MODEL.LINEAR_PROB)
LINEAR_PROBE_PARAMETERS = ("head.bbox_pred.", "head.centerness.", "head.dot_product_projection_text.", "head.log_scale", "head.bias_lang", "head.bias0")
TRAINER_STATE = "trainer_state.json"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", help="a converted / trained GLIPModel folder to start from")
    model.add_argument("--config", help="new model: a GLIPConfig JSON file or a preset (glip_t, glip_l)")
    model.add_argument("--timm_backbone", help="new model: replace the backbone by this timm model (random init)")
    model.add_argument("--text_encoder", help="new model: BertModel folder whose config and weights initialise the text encoder")
    model.add_argument("--tokenizer", help="BERT tokenizer folder (default: --model_name_or_path or --text_encoder)")
    model.add_argument("--tuning", choices=TUNING_MODES, default="full", help="which parameters train")
    model.add_argument("--freeze", nargs="*", default=[], help="module prefixes to freeze (e.g. backbone text_model fpn)")
    model.add_argument("--gradient_checkpointing", action="store_true", help="activation checkpointing of the BERT / Swin layers")
    data = parser.add_argument_group("data")
    data.add_argument("--train_files", nargs="+", required=True, help="COCO / MDETR .json files or .jsonl record shards")
    data.add_argument("--image_root", help="folder that the records' file_name are relative to")
    data.add_argument("--categories", help="COCO json whose `categories` name the detection labels (default: the train json's)")
    data.add_argument("--streaming", action="store_true", help="stream .jsonl shards instead of loading them")
    data.add_argument("--max_negatives", type=int, default=GLIP_RANDOM_SAMPLE_NEG, help="sampled negative classes per prompt; -1: every class")
    data.add_argument("--no_shuffle_classes", action="store_true", help="keep class-id order in detection prompts")
    data.add_argument("--min_sizes", type=int, nargs="+", default=list(GLIP_TRAIN_MIN_SIZES))
    data.add_argument("--max_size", type=int, default=GLIP_TRAIN_MAX_SIZE)
    data.add_argument("--flip_prob", type=float, default=GLIP_FLIP_PROB)
    data.add_argument("--per_device_batch_size", type=int, default=2)
    data.add_argument("--num_workers", type=int, default=2)
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--learning_rate", type=float, default=1e-4)
    optim.add_argument("--text_learning_rate", type=float, default=1e-5, help="learning rate of the text encoder (LANG_LR)")
    optim.add_argument("--weight_decay", type=float, default=1e-4)
    optim.add_argument("--bias_lr_factor", type=float, default=2.0, help="SOLVER.BIAS_LR_FACTOR (biases also get no weight decay)")
    optim.add_argument("--max_grad_norm", type=float, default=1.0)
    optim.add_argument("--max_steps", type=int, help="optimizer steps (default: num_epochs x batches per epoch)")
    optim.add_argument("--num_epochs", type=int, default=1)
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--warmup_steps", type=int, default=2000)
    optim.add_argument("--warmup_factor", type=float, default=0.001)
    optim.add_argument("--lr_steps", type=float, nargs="*", default=[0.67, 0.89], help="fractions of max_steps where lr x gamma")
    optim.add_argument("--lr_gamma", type=float, default=0.1)
    optim.add_argument("--ema_decay", type=float, default=0.999, help="0 disables the EMA")
    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", required=True)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), help="default: accelerate launch's setting")
    run.add_argument("--cpu", action="store_true", help="train on CPU (also with several processes: gloo)")
    run.add_argument("--find_unused_parameters", action="store_true")
    run.add_argument("--checkpointing_steps", type=int, default=0, help="save_state every N steps (0: only at the end)")
    run.add_argument("--resume_from_checkpoint", help="a checkpoint folder, or 'latest' in output_dir")
    run.add_argument("--logging_steps", type=int, default=10)
    run.add_argument("--report_to", default="jsonl", help="Accelerate trackers (tensorboard, wandb, ...); 'jsonl' writes output_dir/metrics.jsonl")
    run.add_argument("--eval_annotations", help="COCO json of a detection validation set")
    run.add_argument("--eval_image_root")
    run.add_argument("--eval_steps", type=int, default=0, help="evaluate every N steps (and at the end) when --eval_annotations is set")
    run.add_argument("--eval_min_size", type=int, default=800)
    run.add_argument("--eval_max_size", type=int, default=1333)
    run.add_argument("--eval_names_per_chunk", type=int, help="class names per prompt chunk at evaluation")
    run.add_argument("--kill_after_steps", type=int, help="testing aid: hard-exit (os._exit, no cleanup) after this many steps")
    args = parser.parse_args(argv)
    if (args.model_name_or_path is None) == (args.config is None):
        parser.error("give exactly one of --model_name_or_path (start from a model) or --config (new model)")
    if args.max_steps is None and args.streaming:
        parser.error("--streaming needs --max_steps (a stream has no length)")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# model, tokenizer, tuning modes
# ----------------------------------------------------------------------------------------------------------------------
def build_model(args) -> GLIPModel:
    """A GLIPModel from a checkpoint, or a new one from a config (+ timm backbone, + pretrained text encoder)."""
    prompt_length = None
    if args.tuning == "prompt":  # the original's tunable_linear has 1000 rows; only the first T are ever used
        prompt_length = 1000
    if args.model_name_or_path is not None:
        kwargs = {"text_prompt_length": prompt_length} if prompt_length else {}
        return GLIPModel.from_pretrained(args.model_name_or_path, **kwargs)
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
    model = GLIPModel(config)
    if args.text_encoder:
        text_model = BertModel.from_pretrained(args.text_encoder, add_pooling_layer=False)
        missing, unexpected = model.text_model.load_state_dict(text_model.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(f"--text_encoder {args.text_encoder}: missing {missing}, unexpected {unexpected} weights")
    return model


def build_processor(args) -> GLIPProcessor:
    source = args.tokenizer or args.model_name_or_path or args.text_encoder
    if source is None:
        raise ValueError("no tokenizer: give --tokenizer (a folder with the bert-base-uncased vocab.txt)")
    tokenizer = BertTokenizer.from_pretrained(source)
    return GLIPProcessor(GLIPImageProcessor(min_size=args.eval_min_size, max_size=args.eval_max_size), tokenizer)


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
    """EMA of every floating-point entry of a model's state dict (the original's `ModelEma`, SOLVER.MODEL_EMA);
    `state_dict` / `load_state_dict` make it part of Accelerate checkpoints."""

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
def build_train_loader(args, processor: GLIPProcessor):
    records, categories = load_training_records(args.train_files, streaming=args.streaming)
    if args.categories:
        categories = coco_categories(args.categories)
    transform = GLIPTrainTransform(tuple(args.min_sizes), args.max_size, args.flip_prob)
    collator_kwargs = dict(
        image_root=args.image_root,
        transform=transform,
        max_negatives=None if args.max_negatives < 0 else args.max_negatives,
        shuffle_classes=not args.no_shuffle_classes,
        seed=args.seed,
    )
    if categories:
        collator = GLIPTrainingCollator.from_categories(processor, categories, **collator_kwargs)
    else:
        collator = GLIPTrainingCollator(processor, **collator_kwargs)
    dataset = IndexedIterableDataset(records) if args.streaming else IndexedDataset(records)
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
def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    return checkpoints[-1] if checkpoints else None


def main(argv: Optional[Sequence[str]] = None):
    args = parse_args(argv)
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
    set_seed(args.seed)

    processor = build_processor(args)
    model = build_model(args)
    frozen_modules = configure_tuning(model, args.tuning, args.freeze)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    dataset, loader, categories = build_train_loader(args, processor)
    optimizer = torch.optim.AdamW(parameter_groups(model, args.learning_rate, args.text_learning_rate, args.weight_decay, args.bias_lr_factor))

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    batches_per_epoch = None if args.streaming else len(loader)
    steps_per_epoch = None if batches_per_epoch is None else max(batches_per_epoch // args.gradient_accumulation_steps, 1)
    max_steps = args.max_steps or args.num_epochs * steps_per_epoch
    milestones = [round(fraction * max_steps) for fraction in args.lr_steps]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_multistep_factor(step, args.warmup_steps, args.warmup_factor, milestones, args.lr_gamma)
    )
    scheduler = accelerator.prepare(scheduler)
    ema = ExponentialMovingAverage(accelerator.unwrap_model(model), args.ema_decay) if args.ema_decay > 0 else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    state = {"global_step": 0, "epoch": 0, "batches_in_epoch": 0, "skipped": {}}
    if args.resume_from_checkpoint:
        checkpoint = latest_checkpoint(output_dir) if args.resume_from_checkpoint == "latest" else Path(args.resume_from_checkpoint)
        if checkpoint is None or not (checkpoint / TRAINER_STATE).is_file():
            raise ValueError(f"no checkpoint to resume from ({args.resume_from_checkpoint!r} in {output_dir})")
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
        logger.info(f"resumed from {checkpoint} at step {state['global_step']}")
    skipped = Counter(state["skipped"])

    def save_checkpoint():
        folder = output_dir / f"checkpoint-{state['global_step']}"
        accelerator.save_state(str(folder))
        if accelerator.is_main_process:
            (folder / TRAINER_STATE).write_text(json.dumps({**state, "skipped": dict(skipped)}))
        accelerator.wait_for_everyone()

    accelerator.init_trackers("glip", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list))})
    progress = tqdm(total=max_steps, initial=state["global_step"], disable=not accelerator.is_local_main_process, desc="train")
    set_train_mode(model, frozen_modules)
    running: Counter = Counter()
    while state["global_step"] < max_steps:
        dataset.set_epoch(state["epoch"])
        loader.set_epoch(state["epoch"])
        epoch_loader = accelerator.skip_first_batches(loader, state["batches_in_epoch"]) if state["batches_in_epoch"] else loader
        for batch in epoch_loader:
            state["batches_in_epoch"] += 1
            # a batch whose samples were all skipped: every process skips the step together
            empty = torch.tensor([batch is None], device=accelerator.device)
            if bool(accelerator.gather(empty).any()):
                if batch is not None:
                    skipped.update(batch["skipped"])
                continue
            skipped.update(batch.pop("skipped"))
            with accelerator.accumulate(model):
                outputs = model(**batch)
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)  # CLIP_TYPE full_model
                optimizer.step()
                optimizer.zero_grad()
            running.update({name: value.detach().item() for name, value in outputs.loss_dict.items()})
            running["loss"] += outputs.loss.detach().item()
            running["batches"] += 1
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            if ema is not None:
                ema.update(accelerator.unwrap_model(model))
            state["global_step"] += 1
            progress.update(1)

            step = state["global_step"]
            if step % args.logging_steps == 0 or step == max_steps:
                means = {name: value / running["batches"] for name, value in running.items() if name != "batches"}
                means = {name: accelerator.reduce(torch.tensor(value, device=accelerator.device), reduction="mean").item() for name, value in means.items()}
                means["lr"] = scheduler.get_last_lr()[0]
                means.update({f"skipped_{reason}": count for reason, count in skipped.items()})
                accelerator.log(means, step=step)
                progress.set_postfix(loss=f"{means['loss']:.4f}")
                running.clear()
            if args.eval_annotations and args.eval_steps and step % args.eval_steps == 0:
                accelerator.log({f"eval_{k}": v for k, v in evaluate_detection(accelerator, accelerator.unwrap_model(model), processor, args).items()}, step=step)
                set_train_mode(model, frozen_modules)
            if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                save_checkpoint()
            if args.kill_after_steps is not None and step >= args.kill_after_steps:
                os._exit(1)  # simulated crash: no cleanup, no final save
            if step >= max_steps:
                break
        else:
            state["epoch"] += 1
            state["batches_in_epoch"] = 0
            continue
        break
    progress.close()

    if not args.checkpointing_steps or state["global_step"] % args.checkpointing_steps:
        save_checkpoint()
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.num_processes > 1:  # diagnostic: DDP keeps every process's weights identical
        weights = torch.cat([p.detach().float().flatten() for p in unwrapped.parameters()])
        spread = (accelerator.gather(weights[None]) - weights).abs().max()
        accelerator.log({"final_rank_weight_max_diff": spread.item()}, step=state["global_step"])
    if args.eval_annotations:
        accelerator.log({f"eval_{k}": v for k, v in evaluate_detection(accelerator, unwrapped, processor, args).items()}, step=state["global_step"])
    if accelerator.is_main_process:
        unwrapped.save_pretrained(output_dir / "model")
        processor.save_pretrained(output_dir / "model")
        if ema is not None:
            unwrapped.save_pretrained(output_dir / "model_ema", state_dict=ema.state_dict())
            processor.save_pretrained(output_dir / "model_ema")
        if skipped:
            logger.warning(f"skipped during training: {dict(skipped)}")
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
