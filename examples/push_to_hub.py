#!/usr/bin/env python
"""Push a GLIP model folder (a `model` / `model_ema` folder of pretrain_glip.py or finetune_glip.py, a converted
checkpoint) to the Hugging Face Hub.

    python examples/push_to_hub.py --model_dir runs/ft/model --repo_id your-name/glip-shapes [--metrics eval.json] [--dry_run]

Before anything is uploaded, the folder must load as a GLIP model with its processor (the settings are printed) and
carry `auto_map` with the code copies it names, so that `trust_remote_code=True` loads it where this package is not
installed. A folder without a model card (README.md) gets one (usage, the processor's resolution, and the metrics of
`--metrics`, a JSON written by `evaluate_glip.py --output`). `--dry_run` does all of that and lists what would be
uploaded, without any network access.
"""

import json
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from modeling_glip.command_line import GLIPArgumentParser, checked_model_path, load_processor  # noqa: E402
from modeling_glip.modeling_glip import GLIPModel  # noqa: E402


def remote_code_problem(folder: Path) -> Optional[str]:
    """Why `folder` cannot be loaded with `trust_remote_code=True` alone, or None: config.json and
    processor_config.json must name their classes in `auto_map` and every module they name must be in the folder."""
    modules = []
    for name in ("config.json", "processor_config.json"):
        path = folder / name
        if not path.is_file():
            return f"it has no {name}"
        auto_map = json.loads(path.read_text()).get("auto_map")
        if not auto_map:
            return f"its {name} has no auto_map (save it with save_pretrained after `import modeling_glip`)"
        modules += [reference.split(".")[0] + ".py" for reference in auto_map.values()]
    missing = sorted({module for module in modules if not (folder / module).is_file()})
    return f"the code files {missing} that its auto_map names are missing" if missing else None


def model_card(repo_id: str, processor, metrics: Optional[dict]) -> ModelCard:
    data = ModelCardData(library_name="transformers", pipeline_tag="zero-shot-object-detection", tags=["glip", "remote-code"])
    image_processor = processor.image_processor
    scores = ""
    if metrics:
        rows = "\n".join(f"| {name} | {value:.3f} |" for name, value in metrics.items() if isinstance(value, (int, float)))
        scores = f"\n## Evaluation\n\n| metric | value |\n|---|---|\n{rows}\n"
    text = f"""---
{data.to_yaml()}
---

# {repo_id.split("/")[-1]}

A GLIP (Grounded Language-Image Pre-training) zero-shot detector. Its processor resizes images to a short side of
{image_processor.min_size} px (long side at most {image_processor.max_size} px), the resolution it was trained for.
{scores}
{usage_section(repo_id, ["red triangle", "blue ring"])}"""
    return ModelCard(text)


def usage_section(repo_id: str, labels: Sequence[str]) -> str:
    """The model cards' "Usage" section: remote-code loading and one detection with `labels`."""
    return f"""## Usage

```python
from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

model = AutoModelForZeroShotObjectDetection.from_pretrained("{repo_id}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
inputs = processor(images=[image], text={list(labels)!r})
outputs = model(**inputs)
detections = processor.post_process_grounded_object_detection(outputs, inputs, target_sizes=[(image.height, image.width)])
```
"""


def upload(folder: Path, repo_id: str, private: bool = False, dry_run: bool = False, api: Optional[HfApi] = None, message: str = "Upload GLIP") -> List[str]:
    """Create `repo_id` and upload every file of `folder` (or, with `dry_run`, only print what would be); returns the
    relative paths of the files."""
    files = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())
    if dry_run:
        print(f"dry run: would create the {'private' if private else 'public'} model repo {repo_id} and upload {len(files)} files from {folder}:")
        print("\n".join(f"  {name}" for name in files))
        return files
    api = api or HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message)
    print(f"pushed {len(files)} files from {folder} to https://huggingface.co/{repo_id}")
    return files


def main(argv: Optional[Sequence[str]] = None, api: Optional[HfApi] = None) -> List[str]:
    parser = GLIPArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, help="the folder to push (model, processor and tokenizer files)")
    parser.add_argument("--repo_id", required=True, help="Hub repo, 'name' or 'namespace/name'")
    parser.add_argument("--metrics", help="evaluation JSON (evaluate_glip.py --output) for the model card written when the folder has none")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--dry_run", action="store_true", help="check and list what would be pushed; no network")
    parser.add_argument("--commit_message", default="Upload GLIP", help="the Hub commit message")
    args = parser.parse_args(argv)
    try:
        validate_repo_id(args.repo_id)
    except HFValidationError as error:
        parser.error(f"--repo_id {args.repo_id!r}: {error}")
    try:
        folder = Path(checked_model_path(args.model_dir, "--model_dir"))
        metrics = json.loads(Path(args.metrics).read_text()) if args.metrics else None
    except (ValueError, OSError) as error:  # json.JSONDecodeError is a ValueError
        parser.error(f"{error}" if not args.metrics or "--model_dir" in str(error) else f"--metrics {args.metrics}: {error}")
    if not folder.is_dir():
        parser.error(f"--model_dir {args.model_dir}: not a local folder")
    problem = remote_code_problem(folder)
    if problem:
        parser.error(f"--model_dir {folder}: {problem}")
    GLIPModel.from_pretrained(folder)  # loads: the weights match the config
    processor, summary = load_processor(str(folder))
    print(f"model: {folder}; {summary}")
    card = folder / "README.md"
    if not card.is_file():
        partial = card.with_name(f".README.md.{os.getpid()}.tmp")
        model_card(args.repo_id, processor, metrics).save(partial)
        os.replace(partial, card)
        print(f"wrote the model card {card}")
    return upload(folder, args.repo_id, args.private, args.dry_run, api, args.commit_message)


if __name__ == "__main__":
    main()
