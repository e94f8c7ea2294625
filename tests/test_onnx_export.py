"""ONNX export (examples/export_onnx.py, modeling_glip/export_glip.export_onnx): one graph of the tiny checkpoint with
dynamic batch and prompt length; ONNX Runtime equals eager on the example and on other shapes, the deformable
convolutions are ONNX DeformConv nodes (no Loop), and post-processing finds the same detections."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxscript") is None:
    pytest.skip("onnxruntime / onnxscript are not installed (pip install -e .[export])", allow_module_level=True)

import onnx  # noqa: E402
import onnxruntime  # noqa: E402

from modeling_glip import GLIPModel  # noqa: E402
from modeling_glip.export_glip import EXPORT_OUTPUT_NAMES, export_inputs, run_onnx  # noqa: E402
from processing import GLIPProcessor  # noqa: E402
from tests.test_export import OTHER_NAMES, images  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import export_onnx  # noqa: E402

ATOL = 1e-4


def test_script_exports_and_matches_eager(tiny_glip_checkpoint, tmp_path, capsys):
    folder, checkpoint = tmp_path / "tiny-onnx", tiny_glip_checkpoint
    status = export_onnx.main(["--checkpoint", str(checkpoint), "--output_dir", str(folder), "--names", "cat", "remote control"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "other shapes" in printed and "OK: max abs diff" in printed
    assert {"model.onnx", "processor_config.json"} <= {path.name for path in folder.iterdir()}
    assert not [path for path in folder.parent.iterdir() if path.name.startswith(".")]  # no staging folder left
    ops = {node.op_type for node in onnx.load(str(folder / "model.onnx")).graph.node}
    assert "DeformConv" in ops and "Loop" not in ops, sorted(ops)

    # a third shape, fed like a user would: the saved processor, run_onnx, post-processing
    model = GLIPModel.from_pretrained(checkpoint).eval()
    processor = GLIPProcessor.from_pretrained(folder)
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = processor(images=images(4, size=(80, 80), seed=5), text=OTHER_NAMES[:3])  # the example's square canvas
    outputs = run_onnx(session, export_inputs(inputs))
    with torch.no_grad():
        eager = model(**inputs)
    for name in EXPORT_OUTPUT_NAMES:
        assert (outputs[name].double() - getattr(eager, name).double()).abs().max() <= ATOL, name
    found = processor.post_process_grounded_object_detection(outputs, inputs)
    expected = processor.post_process_grounded_object_detection(eager, inputs)
    assert sum(len(d["scores"]) for d in expected) > 0
    for actual, wanted in zip(found, expected):
        assert actual["text_labels"] == wanted["text_labels"]
        torch.testing.assert_close(actual["boxes"], wanted["boxes"], atol=1e-2, rtol=0)

    with pytest.raises(ValueError, match="lack \\['attention_mask', 'pixel_mask', 'chunk_to_image'\\]"):
        run_onnx(session, {"pixel_values": inputs["pixel_values"], "input_ids": inputs["input_ids"]})


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--checkpoint", "/nonexistent"], "--checkpoint: '/nonexistent' is not a saved GLIP checkpoint folder"),
        (["--dynamic", "height"], "--dynamic: invalid choice: 'height'"),
        (["--threads", "0"], "--threads: must be >= 1, got 0"),
        (["--atol", "nan"], "--atol: must be a finite number > 0, got nan"),
        (["--names", " "], "--names: a label name must not be empty"),
        (["--image", "/nonexistent.png"], "--image: no image file at '/nonexistent.png'"),
        (["--output_dir", __file__], "--output_dir: .* exists and is not an empty folder"),
    ],
)
def test_script_refuses_bad_arguments_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_onnx.parse_args(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # usage, then the one-line error
    assert re.search(f"error: argument {message}", error), error
