"""Export a converted GLIP checkpoint to ONNX (`torch.onnx.export(dynamo=True)`) and check ONNX Runtime against eager.

    python examples/export_onnx.py                                   # checkpoints/glip-demo -> glip-demo-onnx/
    python examples/export_onnx.py --checkpoint my-glip --output_dir my-glip-onnx --dynamic batch prompt_length image_size

The output folder holds `model.onnx` and the processor (`GLIPProcessor.from_pretrained(folder)`); it is built in a
temporary folder next to it and moved into place when complete. ONNX Runtime is then run on the example and on an input
of other shapes (one more image, a longer prompt, a larger canvas: along each dynamic dimension) and compared with the
eager model; the script exits with status 1 when a difference exceeds `--atol`.
Feed the graph with `modeling_glip.export_glip.run_onnx(session, processor(images=..., text=...))`; its outputs go to
`processor.post_process_grounded_object_detection` like the eager model's. A dynamic image size costs minutes of export
time and needs canvases of at least `min_dynamic_canvas(model)` pixels (README "Export").
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modeling_glip import GLIPModel  # noqa: E402
from modeling_glip.command_line import GLIPArgumentParser, positive_float, positive_int  # noqa: E402
from modeling_glip.export_glip import DYNAMIC_DIMS, EXPORT_OUTPUT_NAMES, export_inputs, export_onnx, min_dynamic_canvas, run_onnx  # noqa: E402
from processing import GLIPProcessor, load_rgb_image  # noqa: E402

DEFAULT_NAMES = ["red square", "blue circle", "green triangle"]
OTHER_NAMES = ["person", "traffic light", "dog", "coffee cup", "bicycle"]


def checkpoint_folder(value: str) -> Path:
    path = Path(value)
    if not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{value!r} is not a saved GLIP checkpoint folder (no config.json)")
    return path


def new_folder(value: str) -> Path:
    path = Path(value)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise argparse.ArgumentTypeError(f"{value!r} exists and is not an empty folder; choose a new output folder")
    return path


def image_file(value: str) -> Path:
    if not Path(value).is_file():
        raise argparse.ArgumentTypeError(f"no image file at {value!r}")
    return Path(value)


def name(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("a label name must not be empty")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = GLIPArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=checkpoint_folder, default=REPO / "checkpoints" / "glip-demo", help="a converted GLIP folder")
    parser.add_argument("--output_dir", type=new_folder, default=Path("glip-demo-onnx"), help="new or empty folder for model.onnx + processor")
    parser.add_argument("--dynamic", nargs="*", choices=DYNAMIC_DIMS, default=["batch", "prompt_length"], help="dynamic dimensions (none: static)")
    parser.add_argument("--image", type=image_file, default=REPO / "examples" / "demo_scene.png", help="example image")
    parser.add_argument("--names", nargs="+", type=name, default=DEFAULT_NAMES, help="example label names")
    parser.add_argument("--threads", type=positive_int, default=2, help="ONNX Runtime / torch intra-op threads")
    parser.add_argument("--atol", type=positive_float, default=1e-4, help="largest accepted |ONNX Runtime - eager|")
    return parser.parse_args(argv)


def make_inputs(processor, image, names, count, pad_to=None):
    """Processor inputs of `count` copies of `image` (mirrored every other one) with `names`, padded to `pad_to`."""
    from PIL import ImageOps

    images = [image if i % 2 == 0 else ImageOps.mirror(image) for i in range(count)]
    pad = {} if pad_to is None else {"pad_size": {"height": pad_to[0], "width": pad_to[1]}}
    return processor(images=images, text=names, **pad)


def max_differences(actual, expected):
    return {key: (actual[key].double() - getattr(expected, key).double()).abs().max().item() for key in EXPORT_OUTPUT_NAMES}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime

    model = GLIPModel.from_pretrained(args.checkpoint).eval()
    processor = GLIPProcessor.from_pretrained(args.checkpoint)
    image = load_rgb_image(args.image)
    divisibility = processor.image_processor.size_divisibility
    count = 2 if "batch" in args.dynamic else 1
    example = make_inputs(processor, image, args.names, count)
    canvas = tuple(example["pixel_values"].shape[-2:])
    if "image_size" in args.dynamic:  # a canvas below the dynamic range is padded up to it
        low = min_dynamic_canvas(model, divisibility)
        canvas = (max(canvas[0], low), max(canvas[1], low))
        example = make_inputs(processor, image, args.names, count, canvas)
    other = make_inputs(
        processor,
        image,
        OTHER_NAMES if "prompt_length" in args.dynamic else args.names,
        count + 1 if "batch" in args.dynamic else count,
        (canvas[0] + divisibility, canvas[1] + 2 * divisibility) if "image_size" in args.dynamic else canvas,
    )

    args.output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{args.output_dir.name}-", dir=args.output_dir.parent))
    try:
        start = time.perf_counter()
        graph = export_onnx(model, example, staging / "model.onnx", args.dynamic, divisibility)
        export_seconds = time.perf_counter() - start
        processor.save_pretrained(staging)
        if args.output_dir.exists():
            args.output_dir.rmdir()  # empty (checked by new_folder)
        os.replace(staging, args.output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    print(f"exported {args.checkpoint} -> {args.output_dir / 'model.onnx'} in {export_seconds:.1f} s (dynamic: {', '.join(args.dynamic) or 'none'})")

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = onnxruntime.InferenceSession(str(args.output_dir / Path(graph).name), options, providers=["CPUExecutionProvider"])
    worst = 0.0
    for label, inputs in (("example", example), ("other shapes", other)):
        start = time.perf_counter()
        with torch.no_grad():
            eager = model(**inputs)
        eager_seconds = time.perf_counter() - start
        start = time.perf_counter()
        onnx_outputs = run_onnx(session, export_inputs(inputs))
        onnx_seconds = time.perf_counter() - start
        diffs = max_differences(onnx_outputs, eager)
        worst = max(worst, *diffs.values())
        shapes = f"pixel_values {tuple(inputs['pixel_values'].shape)}, input_ids {tuple(inputs['input_ids'].shape)}"
        print(f"{label} ({shapes}): eager {eager_seconds:.3f} s, onnxruntime {onnx_seconds:.3f} s, max abs diff "
              + ", ".join(f"{key} {value:.2e}" for key, value in diffs.items()))
    if worst > args.atol:
        print(f"FAILED: ONNX Runtime differs from eager by {worst:.2e} > --atol {args.atol:g}", file=sys.stderr)
        return 1
    print(f"OK: max abs diff {worst:.2e} <= {args.atol:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
