"""benchmarks/gpu_check.py is known to work before a GPU is lent: its CPU smoke run covers every section."""

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_run_covers_every_section(reference_dir, tmp_path, capsys):
    gpu_check = load_gpu_check()
    status = gpu_check.main(["--device", "cpu", "--smoke", "--modes", "eager", "--json", str(tmp_path / "check.json")])
    report = json.loads((tmp_path / "check.json").read_text())
    rows = report["rows"]
    assert status == 0, [row for row in rows if row["status"] != "ok"]
    assert report["smoke"] and report["device"].startswith("cpu")
    sections = {row["section"] for row in rows}
    assert sections == {"a. parity", "b. half precision", "c. speed", "d. training", "e. forms"}
    assert all(row["max_abs_diff"] <= 1e-4 for row in rows if row["section"] == "a. parity")
    half = [row for row in rows if row["section"] == "b. half precision"]
    assert len(half) == 4 and all(row["detections_matched"].split("/")[0] == row["detections_matched"].split("/")[1] for row in half)
    speed = [row for row in rows if row["section"] == "c. speed"]
    assert len(speed) == 6 and all(row["forward_images_per_s"] > 0 for row in speed)
    forms = [row for row in rows if row["section"] == "e. forms"]
    assert len(forms) == 2 and all(row["max_abs_diff"] <= 1e-3 and row["auto_picks"] == "embedding_bag" for row in forms)
    assert all(row["embedding_bag_ms"] > 0 and row["torchvision_ms"] > 0 for row in forms)
    assert "| a. parity | fp32 logits |" in capsys.readouterr().out


def test_bad_arguments_are_one_line_errors(capsys):
    gpu_check = load_gpu_check()
    for argv in (["--runs", "0"], ["--budget", "-1"], ["--sections", "everything"]):
        try:
            gpu_check.parse_args(argv)
        except SystemExit as exit:
            assert exit.code == 2
        else:
            raise AssertionError(f"{argv} was accepted")
    assert "--runs must be >= 1" in capsys.readouterr().err
