#!/usr/bin/env python
"""Seconds per image of the zero-shot LVIS evaluation (processing/lvis_evaluation.py: the original's settings, 1203
names in prompt chunks of 40, 300 detections per chunk, text features once) for the full GLIP-T size
(`GLIPConfig.glip_t()`, random weights, nothing downloaded) on random images of COCO's typical 640x480 size (resized to
800 x 1066 as the original's 800 / 1333), and what a full LVIS MiniVal (5000 images) or val v1.0 (19809) would take.

    python benchmarks/benchmark_lvis_eval.py --images 2 [--width 640 --height 480] [--device cuda]

The 1203 names are `benchmark_inference.lvis_length_names` (1-3 vocabulary words each, LVIS-like lengths): the real
LVIS names are not shipped with this repository.
"""

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark module

import benchmark_inference  # noqa: E402

from processing.lvis_evaluation import LVIS_TEST_SIZE, lvis_detector  # noqa: E402

SPLITS = {"LVIS MiniVal": 5000, "LVIS val v1.0": 19809}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2, help="timed images (after one warm-up image)")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--names", type=int, default=1203, help="vocabulary size (fewer: a quicker per-chunk slope)")
    args = parser.parse_args(argv)
    if args.images < 1 or args.width < 32 or args.height < 32 or args.names < 1:
        parser.error("--images and --names must be >= 1, --width / --height >= 32")
    torch.set_num_threads(args.threads)
    model, processor = benchmark_inference.build(args.device, torch.float32)
    processor.image_processor.min_size, processor.image_processor.max_size = LVIS_TEST_SIZE
    names = benchmark_inference.lvis_length_names(benchmark_inference.bert_vocab_dir(), args.names)
    generator = torch.Generator().manual_seed(0)
    import PIL.Image

    images = [
        PIL.Image.fromarray(torch.randint(0, 256, (args.height, args.width, 3), generator=generator, dtype=torch.uint8).numpy())
        for _ in range(args.images + 1)
    ]
    start = time.perf_counter()
    detector = lvis_detector(model, processor, names)  # the text features of every chunk, once
    detector([images[0]])  # warm-up
    first = time.perf_counter() - start
    rows = detector.rows["input_ids"].shape
    print(f"first image (text features of {rows[0]} chunks included): {first:.1f} s", flush=True)
    times, counts = [], []
    for image in images[1:]:
        start = time.perf_counter()
        boxes = detector([image])[0]["boxes"]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        counts.append(len(boxes))
        print(f"image {len(times)}: {times[-1]:.1f} s, {counts[-1]} detections", flush=True)
    per_image = sorted(times)[len(times) // 2]
    result = {
        "device": args.device,
        "threads": args.threads,
        "prompt_rows_x_tokens": list(rows),
        "first_image_s": round(first, 2),
        "seconds_per_image": [round(t, 2) for t in times],
        "median_s": round(per_image, 2),
        "detections_per_image": counts,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "estimates_h": {name: round(count * per_image / 3600, 1) for name, count in SPLITS.items()} if args.names == 1203 else None,
    }
    for key, value in result.items():
        print(f"{key}: {value}")
    return result


if __name__ == "__main__":
    main()
