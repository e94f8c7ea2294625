"""docs/tutorial.md runs as written (demo -> own labels -> synthetic COCO set -> evaluate -> fine-tune -> evaluate ->
push --dry_run), in a scratch folder beside the repository's examples/ and checkpoints/.

The whole walk-through in bash, as a user types it, is `slow`; the fast test runs the same commands in this process
(each command line given to its script's entry point), with fewer images and training steps."""

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
from PIL import Image

from modeling_glip import cli
from tests.training_fixtures import REPO, load_script

TUTORIAL = REPO / "docs" / "tutorial.md"
# the whole tutorial on 2 busy CPU cores; a hung step fails the test
TIME_LIMIT_S = 900
# the fast test's smaller sizes: each tutorial text must be present (the test fails when the tutorial changes)
FEWER_STEPS = {
    "--train_images 24 --test_images 8": "--train_images 4 --test_images 2",
    "--max_steps 6": "--max_steps 2",
    "--logging_steps 3": "--logging_steps 1",
    "--checkpointing_steps 3": "--checkpointing_steps 1",
}


def tutorial_script() -> str:
    """The tutorial's ```bash blocks, in order."""
    return "\n".join(re.findall(r"^```bash\n(.*?)^```", TUTORIAL.read_text(), re.MULTILINE | re.DOTALL))


def tutorial_commands(script: str) -> List[List[str]]:
    """Each command of `script` as its argument list (continuation lines joined), the environment `export` left out."""
    lines = script.replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.strip() and not line.startswith("export ")]


def scratch_folder(tmp_path: Path) -> Path:
    for name in ("examples", "checkpoints", "metrics"):
        (tmp_path / name).symlink_to(REPO / name)
    return tmp_path


def check_outputs(runs: Path, printed: str, final_checkpoint: str) -> None:
    # 1-2: the demo and the caption both detect and draw legible (enlarged) pictures
    assert Image.open(runs / "demo" / "demo_scene_detections.png").size == (480, 480)
    demo_info = json.loads((runs / "demo" / "detections_info.json").read_text())
    assert [category["name"] for category in demo_info["categories"]][:2] == ["yellow star", "blue ring"]
    assert json.loads((runs / "caption" / "detections.json").read_text())
    # 4-6: the fine-tuned model carries the processor it was trained for, and the detections and evaluations used it
    processor = json.loads((runs / "finetune" / "model" / "processor_config.json").read_text())["image_processor"]
    assert (processor["min_size"], processor["max_size"]) == (160, 267)
    assert printed.count("processor: min_size 160, max_size 267") >= 5  # 3 detections + 2 evaluations (+ the push)
    for name in ("eval_demo.json", "eval_finetuned.json"):
        assert 0 <= json.loads((runs / name).read_text())["mAP"] <= 1
    assert "mAP  mAP_50" in printed  # the evaluation tables
    assert sorted(path.name for path in (runs / "finetune").glob("checkpoint-*")) == [final_checkpoint]  # total limit 1
    # 7: the dry run wrote the card and listed the files, the code files included
    assert "dry run: would create the public model repo your-name/glip-shapes" in printed
    assert "  modeling_glip.py" in printed and "  README.md" in printed
    assert "mAP" in (runs / "finetune" / "model" / "README.md").read_text()


def run_in_process(arguments: List[str]) -> None:
    """One tutorial command through its entry point: `glip-detect ...` or `python examples/<script>.py ...`."""
    if arguments[0] == "glip-detect":
        assert cli.main(arguments[1:]) == 0
        return
    assert arguments[0] == "python" and arguments[1].startswith("examples/"), arguments
    name, flags = Path(arguments[1]).stem, arguments[2:]
    script = load_script(name)
    if name == "finetune_glip":
        script.pretrain_glip.train(script.parse_args(flags))
    else:
        script.main(flags)


def test_tutorial_commands_with_fewer_steps(tmp_path, monkeypatch, capsys):
    script = tutorial_script()
    for text, fewer in FEWER_STEPS.items():
        assert text in script, text
        script = script.replace(text, fewer)
    commands = tutorial_commands(script)
    assert [command[1] if command[0] == "python" else command[0] for command in commands] == [
        "glip-detect", "glip-detect", "examples/synthetic_shapes.py", "examples/evaluate_glip.py", "examples/finetune_glip.py",
        "examples/evaluate_glip.py", "glip-detect", "examples/push_to_hub.py",
    ]  # fmt: skip
    monkeypatch.chdir(scratch_folder(tmp_path))
    printed = []
    for arguments in commands:
        run_in_process(arguments)
        printed.append(capsys.readouterr().out)
    check_outputs(tmp_path / "runs" / "tutorial", "".join(printed), "checkpoint-2")


@pytest.mark.slow
def test_tutorial_runs_as_written(tmp_path):
    environment = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # `python` and `glip-detect` of this venv
        "PYTHONPATH": str(REPO),
    }
    start = time.perf_counter()
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", tutorial_script()],
        cwd=scratch_folder(tmp_path),
        env=environment,
        capture_output=True,
        text=True,
        timeout=TIME_LIMIT_S,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    print(f"tutorial: {time.perf_counter() - start:.0f} s")
    check_outputs(tmp_path / "runs" / "tutorial", result.stdout, "checkpoint-6")
