"""Export of `GLIPModel` to a graph of plain tensors: `torch.export` and, from it, ONNX (`torch.onnx.export(dynamo=True)`).

`GLIPForExport` gives the model keyword tensor inputs and returns the five tensors post-processing reads, so that an
exported program (or an ONNX Runtime session, through `run_onnx`) feeds `GLIPProcessor.post_process_grounded_object_detection`
like the eager model. `export_dynamic_shapes` names the dynamic dimensions: rows (batch), prompt length, and the padded
canvas height / width as multiples of the processor's `size_divisibility` (so every pyramid level size is an exact
multiple of the same symbol; see README "Export" for what each costs in export time).
"""

import os
import tempfile
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch
from torch import nn
from torch.export import Dim

# Model inputs an exported GLIP takes (`pixel_mask` and `chunk_to_image` are optional: an exported program or ONNX
# graph has the inputs of its example).
EXPORT_INPUT_NAMES = ("pixel_values", "input_ids", "attention_mask", "pixel_mask", "chunk_to_image")
# Outputs, in this order: what `GLIPProcessor.post_process_grounded_object_detection` reads.
EXPORT_OUTPUT_NAMES = ("logits", "pred_boxes", "centerness", "spatial_shapes", "image_sizes")
DYNAMIC_DIMS = ("batch", "prompt_length", "image_size")
MAX_CANVAS = 4096  # pixels per side of a dynamic canvas
MAX_ROWS = 1024


class GLIPForExport(nn.Module):
    """`GLIPModel` with keyword tensor inputs and a tuple of `EXPORT_OUTPUT_NAMES` tensors as output.

    Inputs: `pixel_values` (I, 3, H, W), `input_ids` (B, T), `attention_mask` (B, T), optionally `pixel_mask`
    (I, H, W) and `chunk_to_image` (B,) (see `GLIPModel.forward`). Outputs: `logits` (B, N, T), `pred_boxes`
    (B, N, 4), `centerness` (B, N), `spatial_shapes` (B, 5, 2), `image_sizes` (B, 2).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_mask: Optional[torch.Tensor] = None,
        chunk_to_image: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, ...]:
        outputs = self.model(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_mask=pixel_mask,
            chunk_to_image=chunk_to_image,
            return_dict=True,
        )
        return tuple(getattr(outputs, name) for name in EXPORT_OUTPUT_NAMES)


def export_inputs(inputs: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The `EXPORT_INPUT_NAMES` entries of a processor / model input dict, in order (absent optional ones left out).

    Raises:
        ValueError: `pixel_values`, `input_ids` or `attention_mask` is missing.
    """
    missing = [name for name in EXPORT_INPUT_NAMES[:3] if inputs.get(name) is None]
    if missing:
        raise ValueError(f"an exported GLIP needs {list(EXPORT_INPUT_NAMES[:3])}; the inputs lack {missing}")
    return {name: inputs[name] for name in EXPORT_INPUT_NAMES if inputs.get(name) is not None}


def min_dynamic_canvas(model: nn.Module, size_divisibility: int = 32) -> int:
    """Smallest canvas side (pixels, a multiple of `size_divisibility`) of an export with dynamic image size.

    Two sizes are special-cased by the traced code and cannot stay symbolic: a P7 level (stride 128) of one cell
    (torch.export specialises sizes 0 / 1), and, for a Swin backbone, a stride-32 stage of at most one window per side
    (its window count along that side is then 1, specialised the same way). Smaller images must be padded up to this canvas
    (`GLIPProcessor(..., pad_size=...)`).
    """
    window = getattr(model.config.backbone_config, "window_size", 0) or 0
    side = max(128, 32 * window) + 1
    return -(-side // size_divisibility) * size_divisibility


def _check_dynamic(dynamic: Iterable[str]) -> Tuple[str, ...]:
    if isinstance(dynamic, str) or not all(isinstance(name, str) for name in dynamic):
        raise TypeError(f"dynamic must be a collection of names from {DYNAMIC_DIMS}, got {dynamic!r}")
    unknown = sorted(set(dynamic) - set(DYNAMIC_DIMS))
    if unknown:
        raise ValueError(f"dynamic names unknown dimensions {unknown}; choose from {DYNAMIC_DIMS}")
    return tuple(dynamic)


def export_dynamic_shapes(
    model: nn.Module, inputs: Mapping[str, torch.Tensor], dynamic: Iterable[str] = ("batch", "prompt_length"), size_divisibility: int = 32
) -> Dict[str, Dict[int, object]]:
    """`dynamic_shapes` for `torch.export.export` / `torch.onnx.export` of `GLIPForExport(model)` on `export_inputs(inputs)`.

    Args:
        model: the `GLIPModel` (its limits bound the dimensions).
        inputs: the example inputs (only their names and shapes are read).
        dynamic: names from `DYNAMIC_DIMS`: `batch` (rows, and images: with `chunk_to_image` two dimensions, else
            one), `prompt_length` (2..`model.max_prompt_length`), `image_size` (the canvas height and width, each
            `size_divisibility` times a dimension, from `min_dynamic_canvas` to `MAX_CANVAS` pixels).
        size_divisibility: the processor's canvas rounding (`GLIPImageProcessor.size_divisibility`).

    Raises:
        TypeError / ValueError: unknown dimension names, a bad `size_divisibility`, or an example whose size would be
            specialised (a dynamic dimension of size 1) or lies outside the range.
    """
    dynamic = _check_dynamic(dynamic)
    if isinstance(size_divisibility, bool) or not isinstance(size_divisibility, int) or size_divisibility < 1:
        raise ValueError(f"size_divisibility must be a positive integer, got {size_divisibility!r}")
    inputs = export_inputs(inputs)
    static = Dim.STATIC
    rows = images = height = width = length = static
    if "batch" in dynamic:
        sizes = {"rows": inputs["input_ids"].shape[0], "images": inputs["pixel_values"].shape[0]}
        if min(sizes.values()) < 2:
            raise ValueError(f"a dynamic batch needs an example with at least 2 rows and images (torch.export fixes size 1); got {sizes}")
        rows = Dim("rows", min=1, max=MAX_ROWS)
        images = Dim("images", min=1, max=MAX_ROWS) if "chunk_to_image" in inputs else rows
    if "prompt_length" in dynamic:
        tokens, most = inputs["input_ids"].shape[1], model.max_prompt_length
        if not 2 <= tokens <= most:
            raise ValueError(f"a dynamic prompt length needs an example of 2..{most} tokens; got {tokens}")
        length = Dim("prompt_length", min=2, max=most)
    if "image_size" in dynamic:
        canvas = tuple(inputs["pixel_values"].shape[-2:])
        low = min_dynamic_canvas(model, size_divisibility)
        if any(side % size_divisibility or not low <= side <= MAX_CANVAS for side in canvas):
            raise ValueError(
                f"a dynamic image size needs an example canvas of multiples of size_divisibility={size_divisibility} "
                f"from {low} to {MAX_CANVAS} pixels per side; got {canvas} (pad smaller images with the processor's pad_size)"
            )
        blocks = dict(min=low // size_divisibility, max=MAX_CANVAS // size_divisibility)
        height = size_divisibility * Dim("canvas_height_blocks", **blocks)
        width = size_divisibility * Dim("canvas_width_blocks", **blocks)
    shapes = {
        "pixel_values": {0: images, 1: static, 2: height, 3: width},
        "input_ids": {0: rows, 1: length},
        "attention_mask": {0: rows, 1: length},
        "pixel_mask": {0: images, 1: height, 2: width},
        "chunk_to_image": {0: rows},
    }
    return {name: shapes[name] for name in inputs}


def export_program(
    model: nn.Module, inputs: Mapping[str, torch.Tensor], dynamic: Iterable[str] = ("batch", "prompt_length"), size_divisibility: int = 32
) -> torch.export.ExportedProgram:
    """`torch.export.export` of `GLIPForExport(model)` on `export_inputs(inputs)` (see `export_dynamic_shapes`).

    The program takes the example's input names as keywords and returns the `EXPORT_OUTPUT_NAMES` tensors.
    """
    example = export_inputs(inputs)
    shapes = export_dynamic_shapes(model, example, dynamic, size_divisibility)
    with torch.no_grad():
        return torch.export.export(GLIPForExport(model).eval(), (), kwargs=example, dynamic_shapes=shapes)


def export_onnx(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    path: os.PathLike,
    dynamic: Iterable[str] = ("batch", "prompt_length"),
    size_divisibility: int = 32,
) -> str:
    """Write `model` as an ONNX graph at `path` through `torch.onnx.export(dynamo=True)` and return the path.

    Inputs and outputs are named `EXPORT_INPUT_NAMES` (those of the example) / `EXPORT_OUTPUT_NAMES`; the deformable
    convolutions become ONNX `DeformConv` nodes (opset 19). The file is written to a temporary name in the same folder
    and moved into place, so an interrupted export never leaves a partial graph at `path`.
    """
    example = export_inputs(inputs)
    shapes = export_dynamic_shapes(model, example, dynamic, size_divisibility)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    with torch.no_grad():
        program = torch.onnx.export(
            GLIPForExport(model).eval(),
            (),
            kwargs=example,
            dynamic_shapes=shapes,
            input_names=list(example),
            output_names=list(EXPORT_OUTPUT_NAMES),
            dynamo=True,
            verbose=False,
        )
    handle, temporary = tempfile.mkstemp(suffix=".onnx", dir=folder)
    os.close(handle)
    try:
        program.save(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def run_onnx(session, inputs: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Run an ONNX Runtime `InferenceSession` of an `export_onnx` graph on processor / model inputs.

    Returns the `EXPORT_OUTPUT_NAMES` tensors by name (plus the `input_ids` they were computed for), a dict that
    `GLIPProcessor.post_process_grounded_object_detection` reads like the eager model's outputs.

    Raises:
        ValueError: the inputs lack one of the graph's inputs.
    """
    wanted = [node.name for node in session.get_inputs()]
    missing = [name for name in wanted if inputs.get(name) is None]
    if missing:
        raise ValueError(f"the ONNX graph takes {wanted}; the inputs lack {missing}")
    feed = {name: inputs[name].detach().cpu().numpy() for name in wanted}
    outputs = session.run(list(EXPORT_OUTPUT_NAMES), feed)
    return {**{name: torch.from_numpy(value) for name, value in zip(EXPORT_OUTPUT_NAMES, outputs)}, "input_ids": inputs["input_ids"]}


__all__ = [
    "DYNAMIC_DIMS",
    "EXPORT_INPUT_NAMES",
    "EXPORT_OUTPUT_NAMES",
    "GLIPForExport",
    "export_dynamic_shapes",
    "export_inputs",
    "export_onnx",
    "export_program",
    "min_dynamic_canvas",
    "run_onnx",
]
