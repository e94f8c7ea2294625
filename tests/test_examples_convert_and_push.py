"""examples/convert_and_push.py on the fixture's tiny original checkpoint, pushing through a fake Hub client."""

import importlib.util
import json
from pathlib import Path

from transformers import BertConfig

from tests.test_parity_original import TINY_TEXT_CONFIG

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "convert_and_push.py"


def load_script():
    spec = importlib.util.spec_from_file_location("convert_and_push", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class RecordingApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.calls.append(("create_repo", repo_id))

    def upload_folder(self, folder_path, repo_id, commit_message=None):
        self.calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))


def test_convert_verify_card_and_push(reference_dir, bert_vocab_dir, tmp_path):
    script = load_script()
    text_config = tmp_path / "text.json"
    text_config.write_text(json.dumps(BertConfig(**TINY_TEXT_CONFIG).to_dict()))
    api = RecordingApi()
    report = script.main(
        [
            "--checkpoint", str(reference_dir / "tiny_glip_original.safetensors"),
            "--config-yaml", str(reference_dir / "tiny_config.yaml"),
            "--text-config", str(text_config),
            "--tokenizer", str(bert_vocab_dir),
            "--output", str(tmp_path / "out"),
            "--fixture", str(reference_dir),
            "--repo-id", "glip-org/glip-tiny",
        ],
        api=api,
    )  # fmt: skip
    assert float(report["fixture_max_abs_diff"]) <= 1e-4
    assert report["tensors"] > 300 and len(report["smoke"]) > 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "license: mit" in card and "tiny_glip_original.safetensors" in card and "sha256" in card
    assert api.calls[0] == ("create_repo", "glip-org/glip-tiny")
    _, repo, files = api.calls[1]
    assert {"README.md", "config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "modeling_glip.py"} <= set(files)
