#!/usr/bin/env python
"""Fine-tune a GLIP model on a custom COCO-format dataset (the original's tools/finetune.py recipes, README
"Object Detection in the Wild"): `pretrain_glip.py`'s training with fine-tuning defaults.

    accelerate launch examples/finetune_glip.py --model_name_or_path glip-t --tuning prompt \
        --train_annotations train/_annotations.coco.json --train_images train/ \
        --eval_annotations valid/_annotations.coco.json --eval_image_root valid/ --output_dir runs/ft --num_epochs 12

Modes (`--tuning`): `full` (lr 1e-4, weight decay 0.05), `prompt` (language_prompt_v2: lr 0.05, weight decay 0.25,
only the text prompt offsets train), `linear_probe` (only the head's output layers train). The mode's learning rates
and weight decay apply where the flags are not given. Prompts list every class of the dataset in id order
(DATASETS.DISABLE_SHUFFLE, no sampled negatives); every `pretrain_glip.py` flag is accepted (see --help).
"""

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere: import the sibling module

import pretrain_glip  # noqa: E402

# the original README's fine-tuning hyper-parameters per mode (learning rate of every group, weight decay)
MODE_DEFAULTS = {"full": (1e-4, 0.05), "prompt": (0.05, 0.25), "linear_probe": (1e-4, 0.05)}
FINETUNE_OVERRIDES = {
    "train_files": {"aliases": ["--train_annotations"], "help": "COCO json of the training set (or any pretrain_glip.py training files)"},
    "image_root": {"aliases": ["--train_images"], "help": "folder of the training images"},
    "max_negatives": {"default": -1},  # every class in every prompt (convert_od_to_grounding_simple)
    "shuffle_classes": {"default": False},  # DATASETS.DISABLE_SHUFFLE
    # SUPPRESS: not set unless given, so that the --tuning mode's values fill in only what the user left out
    "learning_rate": {"default": argparse.SUPPRESS, "help": "default: per --tuning, " + ", ".join(f"{m} {lr}" for m, (lr, _) in MODE_DEFAULTS.items())},
    "text_learning_rate": {"default": argparse.SUPPRESS, "help": "learning rate of the text encoder (default: --learning_rate's value)"},
    "weight_decay": {"default": argparse.SUPPRESS, "help": "default: per --tuning, " + ", ".join(f"{m} {wd}" for m, (_, wd) in MODE_DEFAULTS.items())},
    "warmup_steps": {"default": 100},
    "ema_decay": {"default": 0.0, "help": "0 disables the EMA (SOLVER.MODEL_EMA 0.0 of the fine-tuning commands)"},
}


def parse_args(argv: Optional[Sequence[str]] = None):
    """The fine-tuning flags: `pretrain_glip.py`'s, with the defaults above; a flag given in any form wins."""
    parser = pretrain_glip.build_parser(__doc__.split("\n\n")[0], FINETUNE_OVERRIDES)
    args = parser.parse_args(argv)
    learning_rate, weight_decay = MODE_DEFAULTS[args.tuning]
    args.learning_rate = getattr(args, "learning_rate", learning_rate)
    args.text_learning_rate = getattr(args, "text_learning_rate", args.learning_rate)
    args.weight_decay = getattr(args, "weight_decay", weight_decay)
    return pretrain_glip.check_args(parser, args)


if __name__ == "__main__":
    pretrain_glip.train(parse_args())
    pretrain_glip.exit_without_teardown()
