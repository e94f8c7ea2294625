"""Offline Hub round trip, run in a fresh interpreter by tests/test_hf_integration.py (see hf_integration.md section 6).

The Hub client is replaced by a fake whose `create_commit` writes the uploaded files into an HF-cache snapshot; then
`from_pretrained("org/name")` and `pipeline(..., model="org/name")` read them back with HF_HUB_OFFLINE=1.
Usage: python hub_roundtrip.py CHECKPOINT_DIR  (prints a JSON report on the last line)
"""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

CACHE = Path(os.environ["HF_HUB_CACHE"])  # set by the caller before huggingface_hub is imported
REPO = "glip-org/glip-tiny"

import numpy as np  # noqa: E402
import transformers.utils.hub as transformers_hub  # noqa: E402
from huggingface_hub import ModelCard, ModelCardData  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor, pipeline  # noqa: E402

import modeling_glip  # noqa: E402,F401  (registers GLIP)
from modeling_glip import GLIPModel  # noqa: E402
from processing import GLIPProcessor, GLIPZeroShotObjectDetectionPipeline  # noqa: E402


class FakeHfApi:
    """Records commits and lays them out as the HF cache would after a download."""

    def __init__(self):
        self.uploaded = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
        repo_dir = CACHE / f"models--{repo_id.replace('/', '--')}"
        previous = (repo_dir / "refs" / "main").read_text() if (repo_dir / "refs" / "main").exists() else None
        sha = hashlib.sha1(f"{previous}{commit_message}{len(self.uploaded)}".encode()).hexdigest()
        snapshot = repo_dir / "snapshots" / sha
        if previous:
            shutil.copytree(repo_dir / "snapshots" / previous, snapshot)
        for operation in operations:
            target = snapshot / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(operation.path_or_fileobj, target)
            self.uploaded.append(operation.path_in_repo)
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / "main").write_text(sha)
        return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}/commit/{sha}", oid=sha, pr_url=None)


def offline_model_card(repo_id, tags=None, token=None):
    return ModelCard.from_template(ModelCardData(tags=tags or [], library_name="transformers", license="mit"), model_description="GLIP test")


def main(checkpoint_dir: str):
    fake = FakeHfApi()
    model = GLIPModel.from_pretrained(checkpoint_dir)
    processor = GLIPProcessor.from_pretrained(checkpoint_dir)
    real_hf_api, real_model_card = transformers_hub.hf_api, transformers_hub.create_and_tag_model_card
    transformers_hub.hf_api, transformers_hub.create_and_tag_model_card = (lambda: fake), offline_model_card
    try:
        model.push_to_hub(REPO)
        processor.push_to_hub(REPO)
    finally:  # downloads go through the real (offline) client and the cache
        transformers_hub.hf_api, transformers_hub.create_and_tag_model_card = real_hf_api, real_model_card

    reloaded = AutoModelForZeroShotObjectDetection.from_pretrained(REPO)
    reloaded_processor = AutoProcessor.from_pretrained(REPO)
    same_weights = all((a == b).all().item() for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
    image = Image.fromarray((np.random.RandomState(0).rand(60, 90, 3) * 255).astype("uint8"))
    stock = pipeline("zero-shot-object-detection", model=REPO)(image, candidate_labels=["cat", "dog"], threshold=0.0)
    one_pass = pipeline("zero-shot-object-detection", model=REPO, pipeline_class=GLIPZeroShotObjectDetectionPipeline)(
        image, candidate_labels=["cat", "dog"], threshold=0.0
    )
    config = json.loads((CACHE / f"models--{REPO.replace('/', '--')}" / "snapshots").glob("*/config.json").__next__().read_text())
    print(
        json.dumps(
            {
                "uploaded": sorted(set(fake.uploaded)),
                "auto_map": config.get("auto_map"),
                "model_class": type(reloaded).__name__,
                "processor_class": type(reloaded_processor).__name__,
                "same_weights": same_weights,
                "stock_labels": sorted({d["label"] for d in stock}),
                "one_pass_labels": sorted({d["label"] for d in one_pass}),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
