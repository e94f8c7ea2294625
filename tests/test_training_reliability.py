"""examples/pretrain_glip.py never hangs, never loses a checkpoint and never runs code from one: atomic checkpoints and
`latest` resume, checkpoint rotation, refused pickles, exact-resume checks, non-finite steps stopped before they touch
the weights, data without a usable batch stopped with its skip counts, a launcher that starts fewer processes than
asked refused, and finetune_glip.py honouring every flag form."""

import json
import logging
import re
import shutil

import pytest
import torch
from accelerate import Accelerator

from tests.training_fixtures import REPO, common_args, load_script, make_detection_set, run, tiny_training_config


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture
def checkpoint(script, tmp_path):
    """A prepared tiny model / optimizer / scheduler / EMA after one step, and its checkpoint-1."""
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema = script.ExponentialMovingAverage(model, 0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    ema.update(model)
    state = {"global_step": 1, "epoch": 0, "batches_in_epoch": 1, "skipped": {"corrupt_image": 2}, "nonfinite_steps_skipped": 0}
    folder = script.save_checkpoint(accelerator, tmp_path / "run", state, ema)
    return accelerator, model, optimizer, ema, folder


def relist_files(folder):
    """Rewrite trainer_state.json's file list to match the folder (what an attacker or a careless copy would do)."""
    state = json.loads((folder / "trainer_state.json").read_text())
    state["files"] = {path.name: path.stat().st_size for path in folder.iterdir() if path.name != "trainer_state.json"}
    (folder / "trainer_state.json").write_text(json.dumps(state))


def test_checkpoint_round_trip(script, checkpoint):
    accelerator, model, optimizer, ema, folder = checkpoint
    saved = {key: value.clone() for key, value in model.state_dict().items()}
    saved_ema = {key: value.clone() for key, value in ema.state_dict().items()}
    state = json.loads((folder / "trainer_state.json").read_text())
    assert folder.name == "checkpoint-1" and not list(folder.parent.glob("*.incomplete"))
    assert set(state["files"]) == {"model.safetensors", "ema.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"}
    assert not list(folder.glob("*custom_checkpoint*"))  # the EMA is not an Accelerate custom (pickled) state
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
        for value in ema.shadow.values():
            value.zero_()
    loaded = script.load_checkpoint(accelerator, folder, model, ema)
    assert loaded["global_step"] == 1 and loaded["skipped"] == {"corrupt_image": 2} and loaded["num_processes"] == 1
    assert all(torch.equal(model.state_dict()[key], value) for key, value in saved.items())
    assert all(torch.equal(ema.state_dict()[key], value) for key, value in saved_ema.items())
    # the same step saved again replaces the folder; a leftover interrupted save is cleaned up
    (folder.parent / "checkpoint-1.incomplete").mkdir()
    script.save_checkpoint(accelerator, folder.parent, {**loaded, "global_step": 1}, ema)
    assert sorted(path.name for path in folder.parent.iterdir()) == ["checkpoint-1"] and script.checkpoint_problem(folder) is None


class Payload:
    """Unpickling this object creates the file `marker` (a stand-in for arbitrary code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


CHECKPOINT_FILES = ["model.safetensors", "ema.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"]


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_malicious_pickle_in_a_checkpoint_is_refused_and_never_runs(script, checkpoint, tmp_path, name):
    accelerator, model, _, ema, folder = checkpoint
    sanity = tmp_path / "sanity"
    torch.save({"state": Payload(sanity)}, tmp_path / "evil.bin")
    torch.load(tmp_path / "evil.bin", weights_only=False)
    assert sanity.exists()  # the payload really runs when fully unpickled

    marker = tmp_path / "PWNED"
    torch.save({"state": Payload(marker)}, folder / name)
    relist_files(folder)
    with pytest.raises(ValueError, match=str(folder)):
        script.load_checkpoint(accelerator, folder, model, ema)
    assert not marker.exists()
    if name == "random_states_0.pkl":  # opting out of an exact resume still never unpickles it
        script.load_checkpoint(accelerator, folder, model, ema, allow_inexact_resume=True)
    else:
        with pytest.raises(ValueError, match=str(folder)):
            script.load_checkpoint(accelerator, folder, model, ema, allow_inexact_resume=True)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["missing_rng", "unreadable_rng", "missing_ema"])
def test_a_checkpoint_that_cannot_resume_exactly_is_an_error_unless_allowed(script, checkpoint, damage, caplog):
    accelerator, model, _, ema, folder = checkpoint
    if damage == "missing_rng":
        (folder / "random_states_0.pkl").unlink()
        expected = "random_states_0.pkl .the RNG states of process 0. is missing"
    elif damage == "unreadable_rng":
        torch.save({"torch_manual_seed": torch.get_rng_state()}, folder / "random_states_0.pkl")
        expected = r"random_states_0.pkl lacks the RNG states \['numpy_random_seed', 'random_state'\]"
    else:
        (folder / "ema.safetensors").unlink()
        expected = "it has no ema.safetensors"
    relist_files(folder)
    with pytest.raises(ValueError, match=f"cannot give an exact resume: {expected}.*--allow_inexact_resume"):
        script.load_checkpoint(accelerator, folder, model, ema)
    with caplog.at_level(logging.WARNING):
        assert script.load_checkpoint(accelerator, folder, model, ema, allow_inexact_resume=True)["global_step"] == 1
    assert "inexact resume from" in caplog.text
    if damage == "missing_ema":  # restarted from the resumed weights
        assert all(torch.equal(ema.state_dict()[key], value) for key, value in model.state_dict().items())


def test_latest_takes_the_newest_complete_checkpoint(script, checkpoint, caplog):
    _, _, _, _, folder = checkpoint
    run_dir = folder.parent
    for step in (2, 3, 4, 5, 6):
        shutil.copytree(folder, run_dir / f"checkpoint-{step}")
    state = json.loads((run_dir / "checkpoint-6" / "trainer_state.json").read_text())
    (run_dir / "checkpoint-6" / "trainer_state.json").write_text(json.dumps({**state, "global_step": "6"}))  # a wrong type
    (run_dir / "checkpoint-5" / "trainer_state.json").write_text('{"global_step": 5, "fi')  # torn write
    (run_dir / "checkpoint-4" / "optimizer.bin").write_bytes(b"short")  # truncated file
    (run_dir / "checkpoint-3" / "scheduler.bin").unlink()
    (run_dir / "checkpoint-7.incomplete").mkdir()  # an interrupted save
    (run_dir / "checkpoint-9.tmp").mkdir()  # not checkpoint-<int>: ignored
    (run_dir / "checkpoint-latest").mkdir()
    with caplog.at_level(logging.WARNING):
        assert script.latest_checkpoint(run_dir) == run_dir / "checkpoint-2"
    assert "checkpoint-7.incomplete: a checkpoint save that was interrupted" in caplog.text
    assert "checkpoint-6: its trainer_state.json has invalid fields: ['global_step']" in caplog.text
    assert "checkpoint-5: its trainer_state.json cannot be read" in caplog.text
    assert "checkpoint-4: optimizer.bin has 5 bytes" in caplog.text and "checkpoint-3: scheduler.bin is missing" in caplog.text
    assert "checkpoint-9.tmp" not in caplog.text
    assert script.latest_checkpoint(run_dir / "nothing_here") is None


def test_rotation_keeps_the_newest_and_the_resumed_checkpoints_and_deletes_through_a_rename(script, checkpoint):
    _, _, _, _, folder = checkpoint
    run_dir = folder.parent
    for step in (2, 3, 4, 5):
        shutil.copytree(folder, run_dir / f"checkpoint-{step}")
    (run_dir / "checkpoint-3" / "scheduler.bin").unlink()  # incomplete: neither counted nor deleted
    (run_dir / "checkpoint-0.deleting").mkdir()  # left by a deletion that was interrupted
    (run_dir / "checkpoint-7.incomplete").mkdir()
    rotated = script.rotate_checkpoints(run_dir, limit=2, keep=run_dir / "checkpoint-1")
    assert rotated == [run_dir / "checkpoint-2"]
    assert sorted(path.name for path in run_dir.iterdir()) == ["checkpoint-1", "checkpoint-3", "checkpoint-4", "checkpoint-5", "checkpoint-7.incomplete"]
    assert script.rotate_checkpoints(run_dir, limit=1) == [run_dir / "checkpoint-1", run_dir / "checkpoint-4"]
    assert script.latest_checkpoint(run_dir) == run_dir / "checkpoint-5"


@pytest.mark.parametrize(
    "environ, processes, problem",
    [
        ({}, 1, None),  # python pretrain_glip.py
        ({"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "True"}, 1, None),  # accelerate launch --cpu
        ({"ACCELERATE_MIXED_PRECISION": "no", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, 1, "asked for more than one process"),
        ({"ACCELERATE_MIXED_PRECISION": "no", "MASTER_PORT": "29500", "WORLD_SIZE": "2", "RANK": "0"}, 2, None),  # --multi_gpu
        ({"WORLD_SIZE": "2"}, 1, "the launcher started 2 processes .WORLD_SIZE., Accelerate runs 1"),
        ({"PMI_SIZE": "4"}, 2, "started 4 processes .PMI_SIZE."),
        ({"MASTER_PORT": "29500"}, 1, None),  # not launched by accelerate: a user's own environment
    ],
)
def test_a_launcher_that_started_fewer_processes_than_asked_is_named(script, environ, processes, problem):
    found = script.launcher_problem(processes, environ)
    assert (found is None) if problem is None else re.search(problem, found)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model_name_or_path", "/no/such/model"], r"--model_name_or_path /no/such/model: no such folder \(/no/such/model does not exist\)"),
        (["--model_name_or_path", "runs/missing"], r"--model_name_or_path runs/missing: no such folder .* not in the local cache"),
        (["--config", "glip_t", "--tokenizer", "/no/vocab"], r"--tokenizer /no/vocab: no such folder"),
        (["--config", "glip_t", "--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be >= 1, got 0"),
        (["--config", "glip_t", "--eval_min_size", "0"], "--eval_min_size must be >= 1, got 0"),
        (["--config", "glip_t", "--config_overrides", "focal_alpha"], r"--config_overrides 'focal_alpha': expected key=value pairs"),
        (["--config", "glip_t", "--config_overrides", "focal_alpha=0.5,"], r"--config_overrides 'focal_alpha=0.5,': expected key=value pairs"),
        (["--config", "glip_t", "--config_overrides", "no_such_field=1"], r"--config_overrides 'no_such_field=1': key no_such_field isn't in"),
        (["--config", "glip_t", "--config_overrides", "focal_alpha=high"], r"--config_overrides 'focal_alpha=high': could not convert"),
        (["--config", "glip_t", "--config_overrides", "atss_topk=2.5"], r"--config_overrides 'atss_topk=2.5': invalid literal for int"),
        (["--config", "glip_t", "--config_overrides", "focal_alpha=1.5"], r"--config_overrides 'focal_alpha=1.5': focal_alpha must be in \[0, 1\], got 1.5"),
        (["--config", "glip_t", "--config_overrides", "focal_gamma=nan"], r"--config_overrides 'focal_gamma=nan': focal_gamma must be a finite number >= 0"),
    ],
)
def test_bad_paths_and_limits_are_argument_errors(script, flags, message, capsys, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--train_files", "train.json", "--output_dir", "out", *flags])
    assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_nonfinite_step_leaves_the_weights_untouched(script):
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    for loss_scale, losses_finite in ((float("nan"), False), (float("inf"), True)):  # a NaN loss; an inf gradient only
        accelerator.backward(model(torch.ones(1, 3)).sum() * loss_scale)
        stepped, norm = script.optimizer_step_if_finite(accelerator, model, optimizer, losses_finite, max_grad_norm=1.0)
        assert not stepped and not torch.isfinite(torch.tensor(norm))
        assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items()) and not optimizer.state
        assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # cleared for the next window
    accelerator.backward(model(torch.ones(1, 3)).sum())
    stepped, norm = script.optimizer_step_if_finite(accelerator, model, optimizer, True, max_grad_norm=0.0)
    assert stepped and norm > 0 and not torch.equal(model.weight, before["weight"])


def test_a_model_with_non_finite_weights_is_an_error_at_start(script, tmp_path, bert_vocab_dir):
    from modeling_glip.modeling_glip import GLIPModel

    model = GLIPModel(tiny_training_config())
    with torch.no_grad():
        model.head.bias0.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan_model")
    make_detection_set(tmp_path, num_images=2)
    argv = ["--cpu", "--model_name_or_path", str(tmp_path / "nan_model"), "--tokenizer", str(bert_vocab_dir), "--train_files", str(tmp_path / "train.json"), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=r"holds NaN or infinite values in 1 tensors \(head.bias0\)"):
        script.main(argv)


# ----------------------------------------------------------------------------------------------------------------------
# whole runs of the script
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory, bert_vocab_dir):
    root = tmp_path_factory.mktemp("reliability")
    make_detection_set(root, num_images=8)
    tiny_training_config(deterministic=True).to_json_file(root / "deterministic.json")
    return root, bert_vocab_dir


def test_data_without_a_usable_batch_stops_with_the_skip_counts(workspace):
    root, vocab = workspace
    data = json.loads(make_detection_set(root, num_images=9, name="bad.json").read_text())
    for image in data["images"]:
        image["file_name"] = "missing_" + image["file_name"]
    (root / "bad.json").write_text(json.dumps(data))
    # 9 records, batches of 2: 4 batches of missing images, 1 record left over by drop_last; 2 loader workers
    argv = common_args(root, vocab, "deterministic.json", **{"--train_files": str(root / "bad.json"), "--num_workers": "2", "--output_dir": str(root / "all_bad")})
    result = run(argv, expect_rc=1, timeout=180)  # used to loop over empty epochs forever
    assert "ValueError: epoch 0 gave no optimizer step (4 batches of 2 records over all processes; 4 with every sample" in result.stderr
    assert "Skipped so far, by reason: {'corrupt_image': 8, 'incomplete_last_batch': 1}" in result.stderr
    assert result.stderr.count("skipped a sample") <= 2 * 5  # at most WARNINGS_PER_REASON per worker


@pytest.mark.parametrize("skip", [False, True])
def test_a_diverged_step_stops_before_it_touches_the_weights(workspace, skip):
    root, vocab = workspace
    output = root / f"diverged_{skip}"
    # a linear probe at lr 1e30: step 1 is finite, its update makes every later loss NaN
    overrides = {"--tuning": "linear_probe", "--learning_rate": "1e30", "--warmup_steps": "0", "--checkpointing_steps": "1", "--max_steps": "4", "--output_dir": str(output)}
    if skip:
        overrides["--skip_nonfinite_steps"] = None
    result = run(common_args(root, vocab, "deterministic.json", **overrides), expect_rc=1)
    assert (output / "checkpoint-1").is_dir() and not (output / "checkpoint-2").exists() and not (output / "model").exists()
    if not skip:
        assert "FloatingPointError: non-finite loss or gradient norm at optimizer step 2 (epoch 0, batch 2)" in result.stderr
        assert "the weights were not updated" in result.stderr
    else:
        # skipped and counted: 3 steps in epoch 0, 4 in epoch 1, which then made no progress at all: an error, no hang
        assert result.stderr.count("skipped optimizer step 2") == 3 + 4  # per epoch at most NONFINITE_WARNINGS lines
        assert "7 such steps so far" in result.stderr
        assert "ValueError: epoch 1 gave no optimizer step (4 batches of 2 records over all processes; 0 with every sample of a process skipped, 4 non-finite steps skipped)" in result.stderr
        counts = [row["nonfinite_steps_skipped"] for row in map(json.loads, (output / "metrics.jsonl").read_text().splitlines())]
        assert counts == [0, 1, 2, 3, 4, 5, 6, 7]


# ----------------------------------------------------------------------------------------------------------------------
# finetune_glip.py flags
# ----------------------------------------------------------------------------------------------------------------------
REQUIRED = ["--model_name_or_path", str(REPO / "checkpoints" / "glip-demo"), "--train_annotations", "train.json", "--output_dir", "out"]


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--learning_rate=0.01"], {"learning_rate": 0.01, "text_learning_rate": 0.01, "weight_decay": 0.05, "tuning": "full"}),
        (["--learning_rate", "0.01"], {"learning_rate": 0.01, "text_learning_rate": 0.01, "weight_decay": 0.05}),
        (["--tuning=prompt"], {"learning_rate": 0.05, "text_learning_rate": 0.05, "weight_decay": 0.25, "tuning": "prompt"}),
        (["--tuning", "prompt", "--weight_decay=0.1", "--text_learning_rate=0.003"], {"learning_rate": 0.05, "text_learning_rate": 0.003, "weight_decay": 0.1}),
        (["--tuning=linear_probe", "--ema_decay=0.5", "--max_negatives=3", "--shuffle_classes"], {"learning_rate": 1e-4, "ema_decay": 0.5, "max_negatives": 3, "shuffle_classes": True}),
        ([], {"max_negatives": -1, "shuffle_classes": False, "warmup_steps": 100, "ema_decay": 0.0, "train_files": ["train.json"]}),
        (["--train_files=a.json", "--image_root=imgs"], {"train_files": ["a.json"], "image_root": "imgs"}),
    ],
)
def test_finetune_honours_every_flag_form(flags, expected):
    finetune = load_script("finetune_glip")
    args = vars(finetune.parse_args(REQUIRED + flags))
    assert {key: args[key] for key in expected} == expected


def test_finetune_refuses_abbreviations_and_documents_its_defaults(capsys):
    finetune = load_script("finetune_glip")
    with pytest.raises(SystemExit):
        finetune.parse_args(REQUIRED + ["--learning", "0.01"])  # not silently --learning_rate
    assert "unrecognized arguments: --learning" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        finetune.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--train_annotations TRAIN_FILES [TRAIN_FILES ...], --train_files" in text
    assert "default: per --tuning, full 0.0001, prompt 0.05, linear_probe 0.0001" in text and "(default: 100)" in text
    with pytest.raises(SystemExit):
        finetune.parse_args(REQUIRED + ["--learning_rate=nan"])
    assert "--learning_rate must be a finite number >= 0, got nan" in capsys.readouterr().err


def test_early_stopping_keeps_the_best_evaluation_and_counts_as_the_original(script, tiny_glip_checkpoint, tmp_path):
    """The original's auto-termination rule: an mAP not below the best (ties included) is the new best, its weights
    replace model_best; an mAP below it counts; the run stops once the count reaches the patience, also when it is
    resumed from a checkpoint whose state says so."""
    import argparse

    from modeling_glip.modeling_glip import GLIPModel
    from processing import GLIPProcessor

    accelerator = Accelerator(cpu=True)
    model, processor = GLIPModel.from_pretrained(tiny_glip_checkpoint), GLIPProcessor.from_pretrained(tiny_glip_checkpoint)
    args = argparse.Namespace(early_stopping_patience=2)
    state = {"best_eval_mAP": None, "best_eval_step": None, "evaluations_below_best": 0}
    history = []
    for step, mean_ap in enumerate([0.2, 0.3, 0.3, 0.25, 0.1], start=1):
        with torch.no_grad():
            model.head.cls_logits.bias.fill_(step)  # a mark of the weights evaluated at this step
        script.track_best_evaluation(accelerator, model, processor, tmp_path, state, step, {"mAP": mean_ap})
        history.append((state["best_eval_step"], state["evaluations_below_best"], script.stops_early(args, state)))
    assert history == [(1, 0, False), (2, 0, False), (3, 0, False), (3, 1, False), (3, 2, True)]
    best = GLIPModel.from_pretrained(tmp_path / "model_best")
    assert torch.all(best.head.cls_logits.bias == 3) and (tmp_path / "model_best" / "processor_config.json").is_file()
    assert state["best_eval_mAP"] == 0.3 and not script.stops_early(argparse.Namespace(early_stopping_patience=0), state)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model_best"]  # no staging folder left behind


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--early_stopping_patience", "-1"], "--early_stopping_patience must be >= 0, got -1"),
        (["--early_stopping_patience", "3"], "--early_stopping_patience 3 needs evaluations: give --eval_annotations and --eval_steps"),
        (["--early_stopping_patience", "3", "--eval_annotations", "val.json"], "--early_stopping_patience 3 needs evaluations"),
    ],
)
def test_early_stopping_needs_evaluations(script, flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--config", "glip_t", "--train_files", "train.json", "--output_dir", "out", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
