#!/usr/bin/env python
"""Fine-tune a GLIP model on a custom COCO-format dataset (the original's tools/finetune.py recipes, README
"Object Detection in the Wild"): `pretrain_glip.py` with fine-tuning defaults.

    accelerate launch examples/finetune_glip.py --model_name_or_path glip-t --tuning prompt \
        --train_annotations train/_annotations.coco.json --train_images train/ \
        --eval_annotations valid/_annotations.coco.json --eval_image_root valid/ --output_dir runs/ft --num_epochs 12

Modes (`--tuning`): `full` (lr 1e-4, weight decay 0.05), `prompt` (language_prompt_v2: lr 0.05, weight decay 0.25,
only the text prompt offsets train), `linear_probe` (only the head's output layers train). Prompts list every class of
the dataset in id order (DATASETS.DISABLE_SHUFFLE, no sampled negatives); any `pretrain_glip.py` flag can be added.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere: import the sibling module

import pretrain_glip  # noqa: E402

# the original README's fine-tuning hyper-parameters per mode (learning rate, weight decay)
MODE_DEFAULTS = {"full": ("1e-4", "0.05"), "prompt": ("0.05", "0.25"), "linear_probe": ("1e-4", "0.05")}


def finetune_argv(argv):
    """Translate the fine-tuning flags into `pretrain_glip.py` flags; explicit flags win over the defaults."""
    argv = list(argv)
    aliases = {"--train_annotations": "--train_files", "--train_images": "--image_root"}
    argv = [aliases.get(item, item) for item in argv]
    mode = argv[argv.index("--tuning") + 1] if "--tuning" in argv else "full"
    learning_rate, weight_decay = MODE_DEFAULTS.get(mode, MODE_DEFAULTS["full"])
    defaults = {
        "--max_negatives": "-1",  # every class in every prompt (convert_od_to_grounding_simple)
        "--learning_rate": learning_rate,
        "--text_learning_rate": learning_rate,
        "--weight_decay": weight_decay,
        "--warmup_steps": "100",
        "--ema_decay": "0",  # SOLVER.MODEL_EMA 0.0 in the fine-tuning commands
    }
    extra = [item for flag, value in defaults.items() if flag not in argv for item in (flag, value)]
    if "--no_shuffle_classes" not in argv:
        extra.append("--no_shuffle_classes")
    return argv + extra


if __name__ == "__main__":
    pretrain_glip.main(finetune_argv(sys.argv[1:]))
    pretrain_glip.exit_without_teardown()
