"""examples/pretrain_glip.py end to end on tiny synthetic data: two CPU processes equal one, kill-and-resume equals an
uninterrupted run, overfitting 4 images recovers their boxes; plus the fine-tuning modes, gradient checkpointing and
a timm backbone trained in-process."""

import json
import re
import socket
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertTokenizer

from modeling_glip.configuration_glip import timm_backbone_config
from modeling_glip.modeling_glip import GLIPModel
from processing import GLIPImageProcessor, GLIPProcessor
from processing.train_transforms import GLIPTrainTransform
from processing.training_data import GLIPTrainingCollator, coco_json_to_records
from tests.training_fixtures import (  # noqa: F401 (ENV, load_script: also imported from here by test_metrics_training)
    CPU_MULTIPROCESS_FLAGS,
    ENV,
    REPO,
    common_args,
    load_script,
    make_detection_set,
    run,
    tiny_training_config,
)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, bert_vocab_dir):
    root = tmp_path_factory.mktemp("train")
    make_detection_set(root, num_images=8)
    tiny_training_config(deterministic=True).to_json_file(root / "deterministic.json")
    tiny_training_config().to_json_file(root / "stochastic.json")
    return root, bert_vocab_dir


def weights(output_dir: Path, name="model"):
    return load_file(str(output_dir / name / "model.safetensors"))


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[key].float() - b[key].float()).abs().max().item() for key in a)


def metrics(output_dir: Path):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_equal_one_process_with_the_same_global_batch(workspace):
    root, vocab = workspace
    single = root / "single"
    result = run(common_args(root, vocab, "deterministic.json", **{"--output_dir": str(single), "--min_sizes": ["64"], "--max_size": "64"}))
    assert "world size 1, device cpu, mixed precision no, effective batch size 2 = 2 per device x 1 process(es) x 1 accumulation step(s)" in result.stderr
    ddp = root / "ddp"
    # the README's multi-process CPU recipe
    launcher = (sys.executable, "-m", "accelerate.commands.launch", *CPU_MULTIPROCESS_FLAGS, "--main_process_port", str(free_port()))
    # same-size images (64 px, no padding differences) so that a batch of 2 equals two batches of 1
    result = run(common_args(root, vocab, "deterministic.json", **{"--output_dir": str(ddp), "--per_device_batch_size": "1", "--min_sizes": ["64"], "--max_size": "64"}), launcher)
    summary = r"world size 2 \(MULTI_CPU\), device cpu(:0)?, mixed precision no, effective batch size 2 = 1 per device x 2 process\(es\) x 1 accumulation"
    assert len(re.findall(summary, result.stderr)) == 1, result.stderr[-3000:]  # logged once, by the main process
    assert json.loads((ddp / "run_config.json").read_text())["effective_batch_size"] == 2
    final = [row for row in metrics(ddp) if "final_rank_weight_max_diff" in row]
    assert final and final[0]["final_rank_weight_max_diff"] == 0.0  # both ranks hold identical weights
    assert max_difference(weights(single), weights(ddp)) < 1e-5
    assert max_difference(weights(single, "model_ema"), weights(ddp, "model_ema")) < 1e-5
    single_losses = [row["loss"] for row in metrics(single) if "loss" in row]
    ddp_losses = [row["loss"] for row in metrics(ddp) if "loss" in row]
    assert single_losses == pytest.approx(ddp_losses, rel=1e-4)  # num_pos is averaged over processes (section 8)


def test_kill_and_resume_equals_uninterrupted_training(workspace):
    root, vocab = workspace
    full, resumed = root / "full", root / "resumed"
    run(common_args(root, vocab, "stochastic.json", **{"--output_dir": str(full)}))  # dropout, DropBlock, flips, multi-scale
    # trained at 48-64 px (long side 80): the saved model runs at its test size 64 / 80, processor and config alike
    processor = json.loads((full / "model" / "processor_config.json").read_text())["image_processor"]
    config = json.loads((full / "model" / "config.json").read_text())
    assert (processor["min_size"], processor["max_size"]) == (config["min_size_test"], config["max_size_test"]) == (64, 80)
    assert json.loads((full / "model_ema" / "processor_config.json").read_text())["image_processor"]["min_size"] == 64
    # kill -9 while checkpoint-6 is being written (checkpoint-3 complete, 4 batches per epoch): the resume from step 3
    # crosses an epoch boundary
    run(common_args(root, vocab, "stochastic.json", **{"--output_dir": str(resumed), "--kill_during_save": "6"}), expect_rc=-9)
    assert not (resumed / "model").exists() and not (resumed / "checkpoint-6").exists()
    assert (resumed / "checkpoint-6.incomplete" / "model.safetensors").is_file()  # the half-written save
    # a half-written checkpoint of an older, non-atomic save and a stray folder whose name is not checkpoint-<int>
    (resumed / "checkpoint-9").mkdir()
    (resumed / "checkpoint-9" / "model.safetensors").write_bytes(b"partial")
    (resumed / "checkpoint-4.tmp").mkdir()
    result = run(common_args(root, vocab, "stochastic.json", **{"--output_dir": str(resumed), "--resume_from_checkpoint": "latest"}))
    log = result.stderr
    assert "checkpoint-6.incomplete: a checkpoint save that was interrupted" in log
    assert f"skipping incomplete checkpoint {resumed / 'checkpoint-9'}: it has no trainer_state.json" in log
    assert f"resumed from {resumed / 'checkpoint-3'} at step 3" in log
    assert max_difference(weights(full), weights(resumed)) == 0.0
    assert max_difference(weights(full, "model_ema"), weights(resumed, "model_ema")) == 0.0
    assert not (resumed / "checkpoint-6.incomplete").exists() and (resumed / "checkpoint-6" / "trainer_state.json").is_file()


def test_overfitting_four_images_recovers_their_boxes(tmp_path, bert_vocab_dir):
    make_detection_set(tmp_path, num_images=4, seed=1)
    tiny_training_config(deterministic=True).to_json_file(tmp_path / "config.json")
    output = tmp_path / "out"
    argv = [
        "--cpu", "--config", str(tmp_path / "config.json"), "--tokenizer", str(bert_vocab_dir), "--train_files", str(tmp_path / "train.json"),
        "--image_root", str(tmp_path), "--max_steps", "150", "--num_workers", "0", "--min_sizes", "64", "--max_size", "64",
        "--flip_prob", "0", "--max_negatives", "-1", "--no_shuffle_classes", "--per_device_batch_size", "4",
        "--learning_rate", "1e-3", "--text_learning_rate", "1e-3", "--warmup_steps", "10", "--lr_steps", "--ema_decay", "0",
        "--logging_steps", "10", "--eval_annotations", str(tmp_path / "train.json"), "--eval_image_root", str(tmp_path),
        "--eval_min_size", "64", "--eval_max_size", "64", "--output_dir", str(output),
    ]
    result = run(argv)
    rows = metrics(output)
    losses = [row["loss"] for row in rows if "loss" in row]
    # the evaluation after training is printed as a table: a header row and the step-150 row
    table = result.stdout[result.stdout.index("step    mAP  mAP_50") :].splitlines()
    assert table[2].split()[0] == "150" and float(table[2].split()[2]) == pytest.approx(metrics(output)[-1]["eval_mAP_50"], abs=1e-3)
    assert losses[-1] < 0.4 * losses[0]
    evaluation = [row for row in rows if "eval_mAP_50" in row][-1]
    assert evaluation["eval_mAP_50"] > 0.9


def test_a_run_from_a_checkpoint_uses_its_processor_rotates_checkpoints_and_prints_evaluations(workspace, tiny_glip_checkpoint):
    """From a checkpoint whose processor runs at 64 / 96 px: training at x0.6 .. x1.0 of 64, evaluations at 64 / 96
    printed as a table at every --eval_steps, the same processor saved; --checkpoints_total_limit keeps the newest
    checkpoints, and a resumed run never deletes the checkpoint it resumed from. --config_overrides changes the
    checkpoint's loss setting, and the saved model keeps it. --early_stopping_patience keeps the best evaluation's
    weights in model_best and its bookkeeping in the checkpoints."""
    root, _ = workspace
    output = root / "from_checkpoint"
    argv = [
        "--cpu", "--model_name_or_path", str(tiny_glip_checkpoint), "--train_files", str(root / "train.json"), "--image_root", str(root),
        "--max_steps", "3", "--num_workers", "0", "--warmup_steps", "1", "--per_device_batch_size", "2", "--checkpointing_steps", "1",
        "--checkpoints_total_limit", "2", "--eval_annotations", str(root / "train.json"), "--eval_image_root", str(root), "--eval_steps", "2",
        "--config_overrides", "focal_alpha=0.5,token_loss_weight=2", "--early_stopping_patience", "5", "--output_dir", str(output),
    ]
    result = run(argv)
    state = json.loads((output / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["best_eval_step"] == 2 and state["evaluations_below_best"] == 0  # checkpoint-3 is written before the final evaluation
    assert (output / "model_best" / "model.safetensors").is_file() and json.loads((output / "model_best" / "processor_config.json").read_text())
    config = json.loads((output / "model" / "config.json").read_text())
    assert (config["focal_alpha"], config["token_loss_weight"]) == (0.5, 2.0)
    assert json.loads((tiny_glip_checkpoint / "config.json").read_text())["focal_alpha"] == 0.25  # the start is left alone
    assert "training resolution: short side 38 45 51 58 64, long side <= 96; evaluation and the saved processor: min_size 64, max_size 96" in result.stderr
    tables = [text.splitlines() for text in result.stdout.split("min_size 64, max_size 96):\n")[1:]]
    assert [[row.split()[0] for row in table[2:4] if row.strip()] for table in tables] == [["2"], ["2", "3"]]  # during and after training
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert f"deleted {output / 'checkpoint-1'} (--checkpoints_total_limit 2)" in result.stderr
    processor = json.loads((output / "model" / "processor_config.json").read_text())["image_processor"]
    assert (processor["min_size"], processor["max_size"]) == (64, 96)

    run([*argv[: argv.index("--max_steps")], "--max_steps", "4", *argv[argv.index("--max_steps") + 2 :], "--resume_from_checkpoint", str(output / "checkpoint-2"), "--checkpoints_total_limit", "1"])
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]  # the resumed-from one stays


def test_an_accelerate_launch_that_starts_one_process_instead_of_several_is_refused(workspace):
    """`accelerate launch --cpu --num_processes 2` starts ONE plain process: the run stops at start, naming the recipe."""
    root, vocab = workspace
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port()))  # fmt: skip
    result = run(common_args(root, vocab, "deterministic.json", **{"--output_dir": str(root / "one_of_two")}), launcher, expect_rc=1, timeout=180)
    assert "was asked for more than one process" in result.stderr and " ".join(CPU_MULTIPROCESS_FLAGS) in result.stderr
    assert not (root / "one_of_two" / "model").exists()


def test_the_readme_documents_the_tested_multiprocess_cpu_recipe():
    recipe = "accelerate launch " + " ".join(CPU_MULTIPROCESS_FLAGS)
    assert recipe in " ".join((REPO / "README.md").read_text().split())
    assert recipe in load_script().CPU_LAUNCH_RECIPE


@pytest.fixture(scope="module")
def batch(workspace):
    root, vocab = workspace
    processor = GLIPProcessor(GLIPImageProcessor(), BertTokenizer.from_pretrained(str(vocab)))
    records, categories = coco_json_to_records(root / "train.json")
    collator = GLIPTrainingCollator.from_categories(processor, categories, image_root=root, transform=GLIPTrainTransform((64,), 64))
    return collator([{"record": record, "index": i, "epoch": 0} for i, record in enumerate(records[:2])])


def train_step(model, batch, script, mode, freeze=()):
    frozen = script.configure_tuning(model, mode, freeze)
    script.set_train_mode(model, frozen)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(script.parameter_groups(model, 1e-2, 1e-2, 0.0, 1.0))
    inputs = {key: value for key, value in batch.items() if key != "skipped"}
    model(**inputs).loss.backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}
    return changed, frozen


@pytest.mark.parametrize("mode", ["full", "prompt", "linear_probe"])
def test_tuning_modes_train_only_their_parameters(batch, mode):
    script = load_script()
    torch.manual_seed(0)
    model = GLIPModel(tiny_training_config(text_prompt_length=64 if mode == "prompt" else 0))
    changed, frozen = train_step(model, batch, script, mode)
    names = {name for name, _ in model.named_parameters()}
    if mode == "prompt":
        assert changed == {"text_prompt"}
        assert not any(getattr(model, name).training for name in ("backbone", "fpn", "text_model", "head"))  # all frozen: eval
    elif mode == "linear_probe":
        assert changed == {name for name in names if name.startswith(script.LINEAR_PROBE_PARAMETERS)}
        assert not model.backbone.training and not model.text_model.training and model.head.training
    else:
        # every parameter but the never-computed cls_logits (and GroupNorm/others that received exactly zero update)
        assert changed <= names - {"head.cls_logits.weight", "head.cls_logits.bias"} and len(changed) > 0.9 * len(names)
        assert any(n.startswith("backbone.") for n in changed) and any(n.startswith("text_model.") for n in changed)
    if mode == "full":
        model = GLIPModel(tiny_training_config())
        changed, frozen = train_step(model, batch, script, "full", freeze=("backbone", "text_model"))
        assert frozen == ["backbone", "text_model"] and not any(n.startswith(("backbone.", "text_model.")) for n in changed)
        with pytest.raises(ValueError, match="matches no parameter"):
            script.configure_tuning(model, "full", ("no_such_module",))
    with pytest.raises(ValueError, match="text_prompt_length"):
        script.configure_tuning(GLIPModel(tiny_training_config()), "prompt")


def test_parameter_groups_and_schedule():
    script = load_script()
    model = GLIPModel(tiny_training_config())
    script.configure_tuning(model, "full")
    groups = script.parameter_groups(model, 1e-4, 1e-5, 1e-4, 2.0)
    settings = {(group["lr"], group["weight_decay"]) for group in groups}
    assert settings == {(1e-4, 1e-4), (2e-4, 0.0), (1e-5, 1e-4), (2e-5, 0.0)}
    bias_group = next(group for group in groups if group["lr"] == 2e-4)
    assert any(p is model.head.bias0 for p in bias_group["params"]) and any(p is model.head.bias_lang for p in bias_group["params"])
    factors = [script.warmup_multistep_factor(step, 4, 0.001, [6, 8], 0.1) for step in range(10)]
    assert factors[0] == pytest.approx(0.001) and factors[2] == pytest.approx(0.5005) and factors[4:6] == [1.0, 1.0]
    assert factors[6] == pytest.approx(0.1) and factors[8] == pytest.approx(0.01)


def test_gradient_checkpointing_gives_the_same_gradients(batch):
    torch.manual_seed(0)
    model = GLIPModel(tiny_training_config(deterministic=True)).train()
    inputs = {key: value for key, value in batch.items() if key != "skipped"}
    model(**inputs).loss.backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert any(getattr(module, "gradient_checkpointing", False) for module in model.modules())
    model(**inputs).loss.backward()
    for name, grad in reference.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet10t", "convnext_atto"])
def test_timm_backbone_trains(batch, name, tmp_path):
    torch.manual_seed(0)
    config = tiny_training_config(deterministic=True)
    config.backbone_config = timm_backbone_config(name)
    model = GLIPModel(config).train()
    assert list(model.backbone.channels[-3:]) == [model.fpn.inner_blocks[i][0].in_channels for i in range(3)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs = {key: value for key, value in batch.items() if key != "skipped"}
    before = model.backbone.state_dict()
    before = {key: value.clone() for key, value in before.items()}
    losses = []
    for _ in range(3):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert any(not torch.equal(before[key], value) for key, value in model.backbone.state_dict().items())
    model.save_pretrained(tmp_path)
    reloaded = GLIPModel.from_pretrained(tmp_path)
    assert reloaded.config.backbone_config.backbone == name and type(reloaded.backbone).__name__ == "TimmBackbone"
    with pytest.raises(ValueError, match="strides"):
        timm_backbone_config("vit_tiny_patch16_224")
