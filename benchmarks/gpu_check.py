"""One prepared GPU check: correctness and speed of GLIP on one accelerator, in one command, one table, one JSON file.

    python benchmarks/gpu_check.py --json gpu_check.json          # on a GPU machine, < 8 minutes on one H100 / H200
    python benchmarks/gpu_check.py --device cpu --smoke             # every code path on tiny sizes (what the tests run)

Sections (each a row group of the printed table):

a. parity: the public fixture (../shared/reference, made by the ORIGINAL GLIP code) converted and run on the device in
   fp32; max abs diff of the region-word logits, box deltas and centerness against the original's tensors (<= 1e-4).
b. half precision: the bundled demo checkpoint on the demo scene and fresh synthetic scenes, in bf16 and fp16, both as
   autocast over the fp32 weights and as a model loaded with `dtype=`: max logits / box error against fp32 (valid
   tokens only) and how many fp32 detections (final score >= 0.3) are found again with the same label and IoU > 0.9.
c. speed: the GLIP-T size (`GLIPConfig.glip_t()`, random weights) on 800x1333 images (padded to 800x1344) with the 80
   COCO names, images/s of the forward (and of forward + post-processing) at batch 1, 4 and 8, fp32 / bf16 / fp16,
   eager, and torch.compile where the time budget allows; peak device memory.
d. training: one GLIP-T training step (forward + backward + AdamW) in bf16 autocast at batch 2: time and memory.
e. forms: the two forms of the modulated deformable convolution (`GLIPConfig.deformable_conv_implementation`:
   embedding_bag and torchvision) on GLIP-T's largest DyConv input (256 channels, the 100x168 P3 map, batch 1 and
   8): milliseconds per call, their max difference, and whether "auto" picks the faster one on this device.

`--smoke` swaps the GLIP-T size for the tiny test configuration, 96x128 images and batch sizes 1 and 2, so that every
path runs in seconds on a CPU. A section that fails is reported in its row (the error) and the others still run; the
exit status is 1 if any check failed. `--budget` (seconds) skips the remaining speed cases once spent.
"""

import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from benchmark_inference import COCO_NAMES, bert_vocab_dir, make_images, model_inputs, to_device  # noqa: E402
from modeling_glip.command_line import GLIPArgumentParser  # noqa: E402
from processing.atomic_files import write_json_atomically  # noqa: E402

REFERENCE = REPO.parent / "shared" / "reference"
DEMO = REPO / "checkpoints" / "glip-demo"
DEMO_LABELS = ["yellow star", "blue ring", "green square", "red triangle", "purple heart", "orange cross"]
PARITY_ATOL = 1e-4
FORMS_ATOL = 1e-3  # fp32 sums of 2304 products of O(1) values, in two orders
DETECTION_SCORE = 0.3
HALF_DTYPES = ("bfloat16", "float16")


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device):
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


# ----------------------------------------------------------------------------------------------------------------------
# a. parity with the original on the device
# ----------------------------------------------------------------------------------------------------------------------
def check_parity(device: torch.device, args) -> list:
    from safetensors.torch import load_file
    from transformers import BertConfig

    from modeling_glip.convert_glip_original_to_hf import config_from_original_yaml, convert_original_state_dict
    from modeling_glip.modeling_glip import GLIPModel

    if not (REFERENCE / "manifest.json").is_file():
        return [{"section": "a. parity", "case": "fixture", "status": "skipped", "note": f"no fixture at {REFERENCE}"}]
    # the fixture's text encoder is a small stand-in of BERT (reference/README.md)
    text_config = BertConfig(hidden_size=80, num_hidden_layers=2, num_attention_heads=4, intermediate_size=320, max_position_embeddings=512)
    config = config_from_original_yaml(REFERENCE / "tiny_config.yaml", text_config)
    model = GLIPModel(config).eval()
    model.load_state_dict(convert_original_state_dict(load_file(str(REFERENCE / "tiny_glip_original.safetensors")), config), strict=True)
    model.to(device)
    f = load_file(str(REFERENCE / "tiny_glip_fixture.safetensors"))
    images = f["input.images_tensor"]
    height, width = f["input.image_sizes_hw"][0].tolist()
    pixel_mask = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.long)
    pixel_mask[:, :height, :width] = 1
    with torch.no_grad():
        out = model(
            images.to(device), f["input.input_ids"].to(device), f["input.attention_mask"].to(device), pixel_mask=pixel_mask.to(device)
        )
    levels = ("p3", "p4", "p5", "p6", "p7")
    expected = {
        "logits": torch.cat([f[f"head.dot_product_logits.{level}"] for level in levels], 1),
        "box_regression": torch.cat([f[f"head.bbox_reg.{level}"].permute(0, 2, 3, 1).reshape(1, -1, 4) for level in levels], 1),
        "centerness": torch.cat([f[f"head.centerness.{level}"].reshape(1, -1) for level in levels], 1),
    }
    rows = []
    for name, reference in expected.items():
        diff = (getattr(out, name).float().cpu() - reference).abs().max().item()
        rows.append({"section": "a. parity", "case": f"fp32 {name}", "max_abs_diff": diff, "status": "ok" if diff <= PARITY_ATOL else "FAIL"})
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# b. half precision on a trained model
# ----------------------------------------------------------------------------------------------------------------------
def demo_images(count: int):
    """The demo scene plus `count - 1` fresh synthetic scenes (the shapes the demo checkpoint knows)."""
    from examples.synthetic_shapes import render_scene, scene_for
    from processing import load_rgb_image

    images = [load_rgb_image(REPO / "examples" / "demo_scene.png")]
    images += [render_scene(scene_for(seed=123, split="test_seen", index=i))[0] for i in range(count - 1)]
    return images


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_iou as iou

    return iou(a.float(), b.float()) if len(a) and len(b) else torch.zeros(len(a), len(b))


def matched_fraction(reference: dict, candidate: dict) -> tuple:
    """(matched, total): reference detections found again with the same label and IoU > 0.9."""
    keep = reference["scores"] >= DETECTION_SCORE
    boxes, labels = reference["boxes"][keep], reference["labels"][keep]
    ious = box_iou(boxes, candidate["boxes"])
    same = labels[:, None] == candidate["labels"][None, :]
    matched = int(((ious > 0.9) & same).any(dim=1).sum()) if len(boxes) else 0
    return matched, len(boxes)


def check_half_precision(device: torch.device, args) -> list:
    from modeling_glip.modeling_glip import GLIPModel
    from processing import GLIPProcessor

    processor = GLIPProcessor.from_pretrained(DEMO)
    images = demo_images(2 if args.smoke else 5)
    reference_model = GLIPModel.from_pretrained(DEMO, dtype=torch.float32).eval().to(device)

    def run(model, autocast_dtype=None):
        outputs, detections = [], []
        for image in images:
            inputs = to_device(processor(images=[image], text=DEMO_LABELS), device)
            with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = model(**model_inputs(inputs))
            outputs.append(out)
            detections.append(processor.post_process_grounded_object_detection(out, inputs, target_sizes=[(image.height, image.width)])[0])
        return outputs, detections

    reference_outputs, reference_detections = run(reference_model)
    rows = []
    for dtype_name in HALF_DTYPES:
        dtype = getattr(torch, dtype_name)
        for mode in ("autocast", "dtype="):
            case = f"{dtype_name} {mode}"
            try:
                if mode == "autocast":
                    outputs, detections = run(reference_model, autocast_dtype=dtype)
                else:
                    outputs, detections = run(GLIPModel.from_pretrained(DEMO, dtype=dtype).eval().to(device))
                logits_error = max(
                    (o.logits.float() - r.logits)[..., r.attention_mask[0].bool()].abs().max().item() for o, r in zip(outputs, reference_outputs)
                )
                box_error = max((o.pred_boxes.float() - r.pred_boxes).abs().max().item() for o, r in zip(outputs, reference_outputs))
                finite = all(torch.isfinite(o.logits).all() and torch.isfinite(o.pred_boxes).all() for o in outputs)
                found = [matched_fraction(r, d) for r, d in zip(reference_detections, detections)]
                matched, total = sum(m for m, _ in found), sum(t for _, t in found)
                status = "ok" if finite and matched == total else "FAIL"
                rows.append(
                    {"section": "b. half precision", "case": case, "logits_max_abs_err": logits_error, "boxes_max_abs_err": box_error,
                     "detections_matched": f"{matched}/{total}", "status": status}
                )
            except Exception as error:  # a dtype the device cannot run is a row, not the end of the check
                rows.append({"section": "b. half precision", "case": case, "status": "FAIL", "note": f"{type(error).__name__}: {error}"})
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# c. speed and d. a training step
# ----------------------------------------------------------------------------------------------------------------------
def speed_model(smoke: bool):
    from modeling_glip.configuration_glip import GLIPConfig
    from modeling_glip.modeling_glip import GLIPModel

    torch.manual_seed(0)
    if smoke:
        from tests.test_modeling_glip import tiny_config

        config = tiny_config()
        config.text_config.vocab_size = 30522  # the real vocabulary: the prompts are tokenized with it
    else:
        config = GLIPConfig.glip_t()
    return GLIPModel(config).eval()


def speed_inputs(processor, batch: int, smoke: bool, device: torch.device):
    images = make_images(batch) if not smoke else [image.resize((128, 96)) for image in make_images(batch)]
    return to_device(processor(images=images, text=COCO_NAMES if not smoke else COCO_NAMES[:5]), device)


def time_cases(device: torch.device, args) -> list:
    from transformers import BertTokenizer

    from processing import GLIPImageProcessor, GLIPProcessor

    image_processor = GLIPImageProcessor(min_size=96, max_size=128) if args.smoke else GLIPImageProcessor()
    processor = GLIPProcessor(image_processor, BertTokenizer.from_pretrained(str(bert_vocab_dir())))
    base = speed_model(args.smoke)
    batch_sizes = (1, 2) if args.smoke else (1, 4, 8)
    runs = 2 if args.smoke else args.runs
    deadline = time.perf_counter() + args.budget
    rows = []
    for dtype_name in ("float32", *HALF_DTYPES):
        dtype = getattr(torch, dtype_name)
        model = on_device(base, device, dtype)
        for mode in args.modes:
            runner = torch.compile(model) if mode == "compile" else model
            for batch in batch_sizes:
                case = f"{dtype_name} {mode} batch {batch}"
                if mode == "compile" and dtype_name not in args.compile_dtypes:
                    continue
                if time.perf_counter() > deadline:
                    rows.append({"section": "c. speed", "case": case, "status": "skipped", "note": "time budget spent"})
                    continue
                try:
                    inputs = speed_inputs(processor, batch, args.smoke, device)
                    model_kwargs = model_inputs(inputs)
                    model_kwargs["pixel_values"] = model_kwargs["pixel_values"].to(dtype)
                    start = time.perf_counter()
                    with torch.no_grad():
                        runner(**model_kwargs)  # warm-up (compiles in compile mode)
                    synchronize(device)
                    first = time.perf_counter() - start
                    reset_peak_memory(device)
                    forward, end_to_end = [], []
                    for _ in range(runs):
                        synchronize(device)
                        start = time.perf_counter()
                        with torch.no_grad():
                            outputs = runner(**model_kwargs)
                        synchronize(device)
                        middle = time.perf_counter()
                        processor.post_process_grounded_object_detection(outputs, inputs)
                        end = time.perf_counter()
                        forward.append(middle - start)
                        end_to_end.append(end - start)
                    rows.append(
                        {"section": "c. speed", "case": case, "first_call_s": first, "forward_images_per_s": batch / statistics.median(forward),
                         "end_to_end_images_per_s": batch / statistics.median(end_to_end), "peak_memory_mib": peak_memory_mib(device), "status": "ok"}
                    )
                except Exception as error:
                    rows.append({"section": "c. speed", "case": case, "status": "FAIL", "note": f"{type(error).__name__}: {error}"})
    rows.append(training_step(base, processor, device, args))
    return rows


def on_device(base, device, dtype):
    """A copy of `base` on `device` in `dtype` (the random GLIP-T weights are built once)."""
    import copy

    return copy.deepcopy(base).to(device=device, dtype=dtype)


def training_step(base, processor, device: torch.device, args) -> dict:
    case = "bf16 autocast, batch 2, AdamW"
    try:
        model = on_device(base, device, torch.float32).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        inputs = speed_inputs(processor, 2, args.smoke, device)
        tokens = inputs["input_ids"].shape[1]
        labels = []
        for row in range(2):
            positive_map = torch.zeros(2, tokens, device=device)
            positive_map[0, 1] = positive_map[1, 3] = 1
            labels.append({"boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]], device=device), "positive_map": positive_map})
        times = []
        reset_peak_memory(device)
        for _ in range(3):
            synchronize(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(**model_inputs(inputs), labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            times.append(time.perf_counter() - start)
        ok = math.isfinite(loss.item())
        return {"section": "d. training", "case": case, "step_s": statistics.median(times[1:]), "peak_memory_mib": peak_memory_mib(device), "loss": loss.item(), "status": "ok" if ok else "FAIL"}
    except Exception as error:
        return {"section": "d. training", "case": case, "status": "FAIL", "note": f"{type(error).__name__}: {error}"}


# ----------------------------------------------------------------------------------------------------------------------
# e. the deformable convolution's two forms
# ----------------------------------------------------------------------------------------------------------------------
def time_call(function, device: torch.device, runs: int) -> float:
    """Median seconds of `function()` after one warm-up call."""
    function()
    times = []
    for _ in range(runs):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare_deform_forms(device: torch.device, args) -> list:
    from modeling_glip.dyconv import ModulatedDeformConv2d

    channels, (height, width) = (16, (24, 32)) if args.smoke else (256, (100, 168))
    rows = []
    for batch in (1, 2) if args.smoke else (1, 8):
        case = f"{channels} ch {height}x{width} batch {batch}"
        try:
            generator = torch.Generator().manual_seed(0)
            x = torch.randn(batch, channels, height, width, generator=generator).to(device)
            offset = (4 * torch.randn(batch, 18, height, width, generator=generator)).to(device)
            mask = torch.rand(batch, 9, height, width, generator=generator).to(device)
            outputs, seconds = {}, {}
            for form in ("embedding_bag", "torchvision"):
                torch.manual_seed(0)
                conv = ModulatedDeformConv2d(channels, channels, 3, padding=1, implementation=form).to(device)
                with torch.no_grad():
                    outputs[form] = conv(x, offset, mask)
                    seconds[form] = time_call(lambda: conv(x, offset, mask), device, 3 if args.smoke else args.runs)
            faster = min(seconds, key=seconds.get)
            auto = "torchvision" if ModulatedDeformConv2d(channels, channels, 3, padding=1).uses_torchvision(device) else "embedding_bag"
            diff = (outputs["embedding_bag"] - outputs["torchvision"]).abs().max().item()
            rows.append(
                {"section": "e. forms", "case": case, "embedding_bag_ms": 1e3 * seconds["embedding_bag"], "torchvision_ms": 1e3 * seconds["torchvision"],
                 "max_abs_diff": diff, "faster": faster, "auto_picks": auto, "status": "ok" if diff <= FORMS_ATOL else "FAIL"}
            )
        except Exception as error:
            rows.append({"section": "e. forms", "case": case, "status": "FAIL", "note": f"{type(error).__name__}: {error}"})
    return rows


# ----------------------------------------------------------------------------------------------------------------------
def print_table(rows: list, header: str):
    print(header)
    print("| section | case | result | status |")
    print("|---|---|---|---|")
    for row in rows:
        details = {k: v for k, v in row.items() if k not in ("section", "case", "status")}
        text = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in details.items() if v is not None)
        print(f"| {row['section']} | {row['case']} | {text} | {row['status']} |")


def parse_args(argv=None):
    parser = GLIPArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: every path in seconds (CPU tests)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per speed case (median reported)")
    parser.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    parser.add_argument("--compile_dtypes", nargs="+", default=["bfloat16"], choices=["float32", *HALF_DTYPES], help="dtypes also timed compiled")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds after which the remaining speed cases are skipped")
    parser.add_argument("--sections", nargs="+", default=["parity", "half", "forms", "speed"], choices=["parity", "half", "forms", "speed"])
    parser.add_argument("--json", type=Path, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.budget <= 0:
        parser.error(f"--runs must be >= 1 and --budget > 0, got --runs {args.runs} --budget {args.budget}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use --device cpu --smoke)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    sections = {"parity": check_parity, "half": check_half_precision, "speed": time_cases, "forms": compare_deform_forms}
    rows, started = [], time.perf_counter()
    for name in args.sections:
        try:
            rows += sections[name](device, args)
        except Exception as error:
            traceback.print_exc()
            rows.append({"section": name, "case": "-", "status": "FAIL", "note": f"{type(error).__name__}: {error}"})
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    header = f"GLIP GPU check on {device_name}, torch {torch.__version__}{' (smoke sizes)' if args.smoke else ''}, {time.perf_counter() - started:.0f} s"
    print_table(rows, header)
    if args.json:
        write_json_atomically(args.json, {"device": device_name, "torch": torch.__version__, "smoke": args.smoke, "rows": rows})
    return 1 if any(row["status"] == "FAIL" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
