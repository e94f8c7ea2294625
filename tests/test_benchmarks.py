"""The pieces of the benchmark scripts that decide what they measure: allocator environments and FLOP attribution."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tests.test_modeling_glip import make_inputs, tiny_config

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_allocator_environments():
    benchmark = load("benchmark_inference")
    assert benchmark.allocator_environment("system") == {}
    tunables = benchmark.allocator_environment("keep-freed")["GLIBC_TUNABLES"]
    assert "glibc.malloc.mmap_max=0" in tunables and "glibc.malloc.trim_threshold=" in tunables
    import ctypes.util

    if ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc"):
        assert "tcmalloc" in benchmark.allocator_environment("tcmalloc")["LD_PRELOAD"]
    else:
        with pytest.raises(SystemExit, match="libtcmalloc"):
            benchmark.allocator_environment("tcmalloc")


def test_flops_are_attributed_to_each_part_once():
    from modeling_glip.modeling_glip import GLIPModel

    floor = load("flop_floor")
    torch.manual_seed(0)
    model = GLIPModel(tiny_config()).eval()
    short, long = make_inputs(tokens=5), make_inputs(tokens=40)
    counts = [floor.count_flops(model, inputs) for inputs in (short, long)]
    for flops in counts:
        parts = [flops[part] for part in floor.PARTS]
        assert all(value > 0 for value in parts[:5])
        assert sum(parts) == pytest.approx(flops["total"])  # every operation in exactly one part
    # the image side does not depend on the prompt; the fusion grows with its tokens
    assert counts[0]["backbone"] == counts[1]["backbone"] and counts[0]["DyConv"] == counts[1]["DyConv"]
    assert counts[1]["VLFuse"] > 4 * counts[0]["VLFuse"]
