"""Throughput on a folder of image files: what each lever of `processing.fixed_prompt` buys (images/s, one table).

    python benchmarks/benchmark_folder.py --images 6 --runs 3                        # GLIP-T size, 80 COCO names
    python benchmarks/benchmark_folder.py --checkpoint checkpoints/glip-demo --images 40 --runs 3

Writes `--images` JPEG files (COCO-like 640x480 landscape and 480x640 portrait photos: two canvases at the test
resolution) into a temporary folder, then runs the whole folder, from file to detections, with each setting:

* `per image`: what a loop over `processor(images=[image], text=names)` + `model(...)` + post-processing does (the text
  encoder runs for every image, files decoded in the same process);
* `text once`: `FixedPromptDetector` (the prompt encoded once), batch 1, no worker;
* `text once + 1 worker`: a DataLoader worker decodes and resizes the next files while the model runs;
* `text once + batch B` / `... + 1 worker + batch B`: `--batch_size B` images of the same canvas per forward.

Each setting runs `--runs` times (after one untimed warm-up run of the first setting); the table gives the median
images/s and, on CPU, the calibrated ratio seconds-per-image / calibration seconds (`../shared/benchmarks/
calibration.py`, timed between runs), so that rows measured on a busy machine still compare.
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from benchmark_inference import COCO_NAMES, SHARED_BENCHMARKS, build  # noqa: E402
from modeling_glip.command_line import GLIPArgumentParser, positive_int  # noqa: E402
from processing import load_rgb_image  # noqa: E402
from processing.fixed_prompt import FixedPromptDetector, detect_files  # noqa: E402


DEMO_NAMES = ["yellow star", "blue ring", "green square", "red triangle"]  # --checkpoint: the demo scene's prompt


def write_folder(folder: Path, count: int) -> list:
    """`count` JPEG photos, alternately 640x480 and 480x640 (skimage's bundled photos, cropped), as COCO has them."""
    import numpy as np
    import PIL.Image
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    paths = []
    for index in range(count):
        photo = PIL.Image.fromarray(np.asarray(photos[index % len(photos)]))
        size = (640, 480) if index % 2 == 0 else (480, 640)
        path = folder / f"{index:04d}.jpg"
        photo.resize(size).save(path, quality=90)
        paths.append(str(path))
    return paths


def per_image(model, processor, paths, names, limits):
    for path in paths:
        image = load_rgb_image(path)
        inputs = processor(images=[image], text=names)
        with torch.no_grad():
            outputs = model(**inputs)
        processor.post_process_grounded_object_detection(outputs, inputs, target_sizes=[(image.height, image.width)], **limits)


def fixed_prompt(model, processor, paths, names, limits, batch_size, num_workers):
    detector = FixedPromptDetector(model, processor, names, **limits)
    items = list(detect_files(detector, paths, batch_size=batch_size, num_workers=num_workers))
    failed = [item.error for item in items if item.error is not None]
    if failed or len(items) != len(paths):
        raise RuntimeError(f"{len(failed)} files failed: {failed[:2]}")


def main(argv=None):
    parser = GLIPArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a saved GLIP model + processor (default: GLIP-T, random weights)")
    parser.add_argument("--images", type=positive_int, default=6, help="files in the folder")
    parser.add_argument("--runs", type=positive_int, default=3, help="timed runs of the folder per setting (median)")
    parser.add_argument("--batch_sizes", type=positive_int, nargs="+", default=[2], help="batch sizes of the last settings")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads of the model process")
    parser.add_argument("--no_calibration", dest="calibration", action="store_false", help="skip the interleaved calibration")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    calibrate = None
    if args.calibration and (SHARED_BENCHMARKS / "calibration.py").is_file():
        sys.path.insert(0, str(SHARED_BENCHMARKS))
        from calibration import calibration_seconds as calibrate

        torch.set_num_threads(args.threads)
    model, processor = build(torch.device("cpu"), torch.float32, args.checkpoint)
    names = COCO_NAMES if args.checkpoint is None else DEMO_NAMES
    limits = {"candidate_threshold": 0.05, "max_detections": 100}
    settings = [("per image", lambda paths: per_image(model, processor, paths, names, limits))]
    settings.append(("text once", lambda paths: fixed_prompt(model, processor, paths, names, limits, 1, 0)))
    settings.append(("text once + 1 worker", lambda paths: fixed_prompt(model, processor, paths, names, limits, 1, 1)))
    for batch in args.batch_sizes:
        settings.append((f"text once + batch {batch}", lambda paths, batch=batch: fixed_prompt(model, processor, paths, names, limits, batch, 0)))
        settings.append((f"text once + 1 worker + batch {batch}", lambda paths, batch=batch: fixed_prompt(model, processor, paths, names, limits, batch, 1)))

    with tempfile.TemporaryDirectory() as folder:
        paths = write_folder(Path(folder), args.images)
        settings[0][1](paths[:2])  # warm-up
        rows = []
        for name, run in settings:
            seconds, calibrations = [], []
            for _ in range(args.runs):
                if calibrate:
                    calibrations.append(calibrate())
                start = time.perf_counter()
                run(paths)
                seconds.append(time.perf_counter() - start)
                print(f"{name}: {seconds[-1]:.2f} s for {len(paths)} images", flush=True)
            median = statistics.median(seconds)
            row = {"setting": name, "images_per_s": len(paths) / median, "s_per_image": median / len(paths)}
            if calibrations:
                row["calibration_s"] = statistics.median(calibrations)
                row["ratio"] = row["s_per_image"] / row["calibration_s"]
            rows.append(row)
    model_name = str(args.checkpoint) if args.checkpoint else "GLIP-T size (random weights), 80 COCO names"
    print(f"\n{model_name}, {args.images} JPEG files (640x480 / 480x640), {args.threads} torch threads, median of {args.runs} runs")
    print("| setting | images/s | s / image | calibration s | ratio (s per image / calibration) | vs per image |")
    print("|---|---|---|---|---|---|")
    base = rows[0]["s_per_image"]
    for row in rows:
        calibration = f"{row['calibration_s']:.2f}" if "calibration_s" in row else "-"
        ratio = f"{row['ratio']:.3f}" if "ratio" in row else "-"
        print(f"| {row['setting']} | {row['images_per_s']:.2f} | {row['s_per_image']:.3f} | {calibration} | {ratio} | {base / row['s_per_image']:.2f}x |")


if __name__ == "__main__":
    main()
