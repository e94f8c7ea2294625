"""Per-lever micro-benchmarks at GLIP-T sizes (P3 100x168 ... P7 7x11, C=256, D=768, N=22400 visual tokens), 2 threads.

    python benchmarks/benchmark_modules.py            # ~3 min on 2 cores
    python benchmarks/benchmark_modules.py --only attention

Each line times one module the original way (the literal per-head attention of tests/test_fast_paths.py,
torchvision's deformable conv kernel) against this repository's implementation, with the max abs difference.
"""

import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import deform_conv2d

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modeling_glip.command_line import GLIPArgumentParser  # noqa: E402
from modeling_glip.configuration_glip import GLIPConfig  # noqa: E402
from modeling_glip.dyconv import DyConv, modulated_deform_conv2d  # noqa: E402
from modeling_glip.vl_fusion import BiMultiHeadAttention  # noqa: E402
from tests.test_fast_paths import reference_bi_attention  # noqa: E402

LEVELS = [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]


def median_seconds(function, runs):
    function()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(name, baseline_s, ours_s, diff):
    print(f"{name:58s} {baseline_s * 1000:9.1f} ms -> {ours_s * 1000:8.1f} ms  ({baseline_s / ours_s:4.1f}x)  max diff {diff:.1e}", flush=True)


def bench_attention(runs):
    torch.manual_seed(0)
    attn = BiMultiHeadAttention(256, 768, 2048, 8, dropout=0.1, clamp_value=50000.0).eval()
    for parameter in attn.parameters():
        nn.init.normal_(parameter, std=0.05)
    tokens_total = sum(h * w for h, w in LEVELS)
    for tokens in (256, 194, 8):
        vision, text = torch.randn(1, tokens_total, 256), torch.randn(1, tokens, 768)
        mask = torch.ones(1, tokens, dtype=torch.long)
        with torch.no_grad():
            diff = max((a - b).abs().max().item() for a, b in zip(attn(vision, text, mask), reference_bi_attention(attn, vision, text, mask)))
            baseline = median_seconds(lambda: reference_bi_attention(attn, vision, text, mask), runs)
            ours = median_seconds(lambda: attn(vision, text, mask), runs)
        report(f"BiMultiHeadAttention N={tokens_total} T={tokens}", baseline, ours, diff)
        if tokens == 194:  # SDPA for the image->text direction alone (no clamp, so not exact; timing only)
            heads = 8

            def sdpa_image_to_text():
                query = attn.v_proj(vision).view(1, -1, heads, 256).transpose(1, 2)
                key = attn.l_proj(text).view(1, -1, heads, 256).transpose(1, 2)
                value = attn.values_l_proj(text).view(1, -1, heads, 256).transpose(1, 2)
                return F.scaled_dot_product_attention(query, key, value)

            with torch.no_grad():
                sdpa = median_seconds(sdpa_image_to_text, runs)
            print(f"{'  SDPA, image->text direction only (unclamped), T=194':58s} {sdpa * 1000:9.1f} ms", flush=True)


def bench_deformable_conv(runs):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 256, 3, 3, generator=generator) * 0.02
    bias = torch.randn(256, generator=generator)
    totals = [0.0, 0.0]
    for stride in (1, 2):
        for height, width in LEVELS[: 5 if stride == 1 else 4]:
            out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
            x = torch.randn(1, 256, height, width, generator=generator).contiguous(memory_format=torch.channels_last)
            offset = torch.randn(1, 18, out_h, out_w, generator=generator) * 2
            mask = torch.rand(1, 9, out_h, out_w, generator=generator)
            with torch.no_grad():
                expected = deform_conv2d(x, offset, weight, bias, stride=stride, padding=1, mask=mask)
                diff = (modulated_deform_conv2d(x, offset, mask, weight, bias, (stride,) * 2, (1, 1), (1, 1)) - expected).abs().max().item()
                baseline = median_seconds(lambda: deform_conv2d(x, offset, weight, bias, stride=stride, padding=1, mask=mask), runs)
                ours = median_seconds(lambda: modulated_deform_conv2d(x, offset, mask, weight, bias, (stride,) * 2, (1, 1), (1, 1)), runs)
            totals[0] += baseline
            totals[1] += ours
            report(f"deformable conv 256->256 3x3 stride {stride}, input {height}x{width}", baseline, ours, diff)
    report("deformable conv, the 9 calls of one DyConv", *totals, float("nan"))


def bench_dyconv(runs):
    torch.manual_seed(0)
    dyconv = DyConv(GLIPConfig.glip_t()).eval()
    nn.init.normal_(dyconv.offset.weight, std=0.01)
    features = [torch.randn(1, 256, h, w) for h, w in LEVELS]
    channels_last = [f.contiguous(memory_format=torch.channels_last) for f in features]
    with torch.no_grad():
        ours = median_seconds(lambda: dyconv(channels_last), runs)
        nchw = median_seconds(lambda: dyconv(features), runs)
        fast = dyconv(channels_last)
        for conv in dyconv.convs:  # the original kernel: torchvision's deform_conv2d
            conv.conv.forward = lambda x, offset, mask, conv=conv.conv: deform_conv2d(x, offset, conv.weight, conv.bias, stride=conv.stride, padding=conv.padding, mask=mask)
        baseline = median_seconds(lambda: dyconv(features), runs)
        diff = max((a - b).abs().max().item() for a, b in zip(fast, dyconv(features)))
    report("DyConv (5 levels), torchvision kernel -> ours, channels-last", baseline, ours, diff)
    print(f"{'  same, ours with contiguous NCHW inputs':58s} {nchw * 1000:9.1f} ms", flush=True)


def main():
    parser = GLIPArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=["attention", "deformable_conv", "dyconv"], help="one benchmark (default: all)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per case")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name, bench in (("attention", bench_attention), ("deformable_conv", bench_deformable_conv), ("dyconv", bench_dyconv)):
        if args.only in (None, name):
            bench(args.runs)


if __name__ == "__main__":
    main()
