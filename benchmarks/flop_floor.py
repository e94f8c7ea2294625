"""How far GLIP-T's fp32 CPU forward is from this machine's matrix-product speed: the compute floor of each part.

For one prompt case of `benchmark_inference.py` (GLIP-T, random weights, one 800x1333 image padded to 800x1344) it

1. counts the floating-point operations of each part (backbone with the FPN, text encoder, VLFuse, BERT layers, DyConv, heads)
   with `torch.utils.flop_counter.FlopCounterMode`, i.e. 2 x multiply-adds of every matrix product and convolution the
   forward runs (element-wise work, softmax, GroupNorm and the deformable convolution's bilinear gather are not
   counted: they only add to the floor);
2. times each part in eager mode (forward hooks, median of `--runs`);
3. measures this machine's fp32 matrix-product speed at the same threads (median of square 2048 products and of the
   model's own largest product shape) with `../shared/benchmarks/calibration.py` interleaved;
4. prints per part: GFLOP, measured s, achieved GFLOP/s, floor s = GFLOP / matrix-product speed; and for the whole
   forward the measured ratio and the floor ratio (seconds / calibration median) with the speedup over the original
   each would give (original ratios as in `benchmark_inference.py`).

The floor assumes every counted operation runs at the speed of a large, square, cache-friendly fp32 product and the
uncounted work is free: no fp32 implementation of the same arithmetic can run faster on this machine, so a speedup
target above the floor's needs fewer operations (another algorithm) or lower precision, not a better kernel.

    python benchmarks/flop_floor.py --prompt coco80
    python benchmarks/flop_floor.py --prompt three --runs 3
"""

import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_inference import ORIGINAL_RATIOS, SHARED_BENCHMARKS, Timer, build, make_images, model_inputs, part_seconds, prompt_names  # noqa: E402

from modeling_glip.command_line import GLIPArgumentParser, positive_int  # noqa: E402

PARTS = ("backbone", "text encoder", "VLFuse", "BertLayer", "DyConv", "heads")  # as benchmark_inference.py: "backbone" includes the FPN


def count_flops(model, inputs) -> dict:
    """FLOPs per part of one forward, read off the module paths FlopCounterMode records (a module's count includes its
    children's; "GLIPModel.head" also holds the tower layers, whose parts are counted on their own)."""
    counter = FlopCounterMode(display=False, depth=None)
    with torch.no_grad(), counter:
        model(**inputs)
    per_module = {name: sum(counts.values()) for name, counts in counter.get_flop_counts().items()}
    flops = lambda *names: sum(per_module.get(name, 0) for name in names)  # noqa: E731
    totals = {"backbone": flops("GLIPModel.backbone", "GLIPModel.fpn"), "text encoder": flops("GLIPModel.text_model")}
    for part, attribute in (("VLFuse", "vl_fuse"), ("BertLayer", "text_layer"), ("DyConv", "dyconv")):
        totals[part] = flops(*(f"GLIPModel.head.layers.{index}.{attribute}" for index in range(len(model.head.layers))))
    totals["heads"] = flops("GLIPModel.head") - totals["VLFuse"] - totals["BertLayer"] - totals["DyConv"]
    totals["total"] = per_module["Global"]
    return totals


def matmul_gflops(shapes, repeats: int) -> dict:
    """Median GFLOP/s of fp32 `a @ b` for each (m, k, n)."""
    speeds = {}
    generator = torch.Generator().manual_seed(0)
    for m, k, n in shapes:
        a, b = torch.randn(m, k, generator=generator), torch.randn(k, n, generator=generator)
        a @ b
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            seconds.append(time.perf_counter() - start)
        speeds[f"{m}x{k}x{n}"] = 2 * m * k * n / statistics.median(seconds) / 1e9
    return speeds


def main():
    parser = GLIPArgumentParser(description=__doc__)
    parser.add_argument("--prompt", default="coco80", choices=["three", "coco80"], help="prompt case of benchmark_inference.py")
    parser.add_argument("--runs", type=positive_int, default=3, help="timed eager forwards (median per part)")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    calibrate = None
    if (SHARED_BENCHMARKS / "calibration.py").is_file():
        sys.path.insert(0, str(SHARED_BENCHMARKS))
        from calibration import calibration_seconds as calibrate

        torch.set_num_threads(args.threads)

    model, processor = build(torch.device("cpu"), torch.float32)
    inputs = model_inputs(processor(images=make_images(1), text=prompt_names(args.prompt)))
    flops = count_flops(model, inputs)

    timer = Timer(torch.device("cpu"))
    timer.watch_parts(model)
    with torch.no_grad():
        model(**inputs)  # warm-up
        parts, totals, calibrations, speeds = [], [], [], defaultdict(list)
        # the model's largest product: P3's 16800 positions x (9 taps x 256 channels) -> 256 (a DyConv convolution)
        shapes = [(2048, 2048, 2048), (16800, 2304, 256)]
        for _ in range(args.runs):
            if calibrate:
                calibrations.append(calibrate())
            for shape, speed in matmul_gflops(shapes, repeats=5).items():
                speeds[shape].append(speed)
            timer.totals.clear()
            start = time.perf_counter()
            model(**inputs)
            totals.append(time.perf_counter() - start)
            parts.append(dict(timer.totals))
    measured = part_seconds(parts)
    speed = {shape: statistics.median(values) for shape, values in speeds.items()}
    peak = max(speed.values())
    total_seconds = statistics.median(totals)
    floor_seconds = flops["total"] / 1e9 / peak

    print(f"GLIP-T, prompt {args.prompt} ({inputs['input_ids'].shape[1]} tokens), 800x1344, fp32, {args.threads} threads, {args.runs} runs")
    print("matrix-product speed (median GFLOP/s): " + ", ".join(f"{shape}: {value:.0f}" for shape, value in speed.items()) + f"; floor at {peak:.0f}")
    print("\n| part | GFLOP | measured s | achieved GFLOP/s | floor s |\n|---|---|---|---|---|")
    for name in PARTS:
        gflop, seconds = flops.get(name, 0.0) / 1e9, measured.get(name, 0.0)
        print(f"| {name} | {gflop:.1f} | {seconds:.2f} | {gflop / seconds if seconds else 0:.0f} | {gflop / peak:.2f} |")
    print(f"| whole forward | {flops['total'] / 1e9:.1f} | {total_seconds:.2f} | {flops['total'] / 1e9 / total_seconds:.0f} | {floor_seconds:.2f} |")
    result = {"prompt": args.prompt, "gflop": {k: v / 1e9 for k, v in flops.items()}, "measured_s": measured, "total_s": total_seconds}
    result.update({"matmul_gflops": speed, "floor_s": floor_seconds})
    if calibrations:
        calibration = statistics.median(calibrations)
        original = ORIGINAL_RATIOS[args.prompt]
        ratio, floor_ratio = total_seconds / calibration, floor_seconds / calibration
        print(
            f"\ncalibration median {calibration:.2f} s: measured ratio {ratio:.2f} -> {original / ratio:.1f}x the original; "
            f"floor ratio {floor_ratio:.2f} -> at most {original / floor_ratio:.1f}x at fp32 with these operations"
        )
        result.update({"calibration_median_s": calibration, "ratio": ratio, "floor_ratio": floor_ratio, "max_speedup": original / floor_ratio})
    if args.json:
        from processing.atomic_files import write_json_atomically

        write_json_atomically(args.json, result)


if __name__ == "__main__":
    main()
