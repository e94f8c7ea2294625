"""Convert an official GLIP checkpoint, verify the conversion, write a model card and push it to the Hub.

    # local file
    python examples/convert_and_push.py --checkpoint glip_tiny_model_o365_goldg_cc_sbu.pth --output glip-t --repo_id org/glip-t
    # or a file of the Hub repo GLIPModel/GLIP (needs the network)
    python examples/convert_and_push.py --hub_file glip_tiny_model_o365_goldg_cc_sbu.pth --output glip-t --repo_id org/glip-t

Verification before anything is pushed:
1. the saved checkpoint reloads with no missing / unexpected keys and every converted tensor bitwise equal;
2. the converted tensors carry all of the original's weights (the same number of values; only recomputed buffers
   are dropped);
3. a forward on a real photo with a COCO-style prompt gives finite outputs and detections;
4. with `--fixture DIR` (a folder with `tiny_glip_fixture.safetensors`, the golden fixture produced by the original
   code; not part of this repository, the tests read it from GLIP_REFERENCE_DIR), the converted tiny model's head
   outputs are compared with the original's (max abs diff reported, must be <= 1e-4).

Without --repo_id (or with --dry_run) nothing is pushed. Flags use underscores; the dashed spellings (`--repo-id`,
`--config-yaml`, ...) are accepted too.
"""

import hashlib
import json
import sys
from pathlib import Path
from typing import Dict, Optional

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, hf_hub_download
from transformers import BertConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling push_to_hub.py

from modeling_glip import GLIPModel  # noqa: E402
from modeling_glip.command_line import GLIPArgumentParser  # noqa: E402
from modeling_glip.convert_glip_original_to_hf import convert, convert_original_state_dict, load_original_checkpoint  # noqa: E402
from processing import GLIPProcessor  # noqa: E402
from push_to_hub import upload, usage_section  # noqa: E402

ORIGINAL_HUB_REPO = "GLIPModel/GLIP"
FIXTURE_LEVELS = ("p3", "p4", "p5", "p6", "p7")


def resolve_checkpoint(checkpoint: Optional[str], hub_file: Optional[str]) -> Path:
    if checkpoint:
        return Path(checkpoint)
    return Path(hf_hub_download(ORIGINAL_HUB_REPO, hub_file))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_lossless(original: Dict[str, torch.Tensor], model: GLIPModel) -> int:
    """Every converted tensor (from the original) equals the reloaded model's tensor bitwise; returns the count."""
    converted = convert_original_state_dict(original, model.config)
    reloaded = model.state_dict()
    mismatched = [key for key, value in converted.items() if not torch.equal(value.to(reloaded[key].dtype), reloaded[key])]
    if mismatched:
        raise RuntimeError(f"converted tensors differ after saving and reloading: {mismatched[:10]}")
    recovered = sum(value.numel() for value in converted.values())
    expected = sum(value.numel() for key, value in original.items() if _is_parameter_of_original(key))
    if recovered != expected:
        raise RuntimeError(f"converted tensors hold {recovered} numbers, the original's parameters {expected}")
    return len(converted)


def _is_parameter_of_original(key: str) -> bool:
    """Original entries that are weights (not the recomputed buffers the converter drops)."""
    return not (key.endswith("relative_position_index") or key.endswith("position_ids") or ".cell_anchors." in key or key.endswith("attn_mask"))


def smoke_detect(model: GLIPModel, processor: GLIPProcessor) -> list:
    """A forward on a real photo (scikit-image's public-domain cat) with a COCO-style prompt."""
    from PIL import Image
    from skimage import data

    image = Image.fromarray(data.chelsea())
    names = ["cat", "remote control", "couch", "person"]
    inputs = processor(images=[image], text=names)
    with torch.no_grad():
        outputs = model(**inputs)
    for name in ("logits", "pred_boxes", "centerness"):
        if not torch.isfinite(getattr(outputs, name)).all():
            raise RuntimeError(f"non-finite {name} on the smoke image")
    # candidate threshold 0: report the five best boxes whatever their score (random-weight test models score ~0.01)
    (result,) = processor.post_process_grounded_object_detection(
        outputs, inputs, target_sizes=[(image.height, image.width)], candidate_threshold=0.0
    )
    return [(name, round(score, 3)) for name, score in zip(result["text_labels"][:5], result["scores"][:5].tolist())]


def fixture_parity(model: GLIPModel, fixture_dir: Path) -> float:
    """Max abs diff of the logits, box deltas and centerness against the original's golden fixture."""
    from safetensors.torch import load_file

    tensors = load_file(str(fixture_dir / "tiny_glip_fixture.safetensors"))
    h, w = tensors["input.image_sizes_hw"][0].tolist()
    images = tensors["input.images_tensor"]
    pixel_mask = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.long)
    pixel_mask[:, :h, :w] = 1
    with torch.no_grad():
        out = model(images, tensors["input.input_ids"], tensors["input.attention_mask"], pixel_mask=pixel_mask)
    expected = {
        "logits": torch.cat([tensors[f"head.dot_product_logits.{level}"] for level in FIXTURE_LEVELS], dim=1),
        "box_regression": torch.cat([tensors[f"head.bbox_reg.{level}"].permute(0, 2, 3, 1).reshape(1, -1, 4) for level in FIXTURE_LEVELS], dim=1),
        "centerness": torch.cat([tensors[f"head.centerness.{level}"].reshape(1, -1) for level in FIXTURE_LEVELS], dim=1),
    }
    return max((getattr(out, name) - value).abs().max().item() for name, value in expected.items())


def model_card(source: Path, source_sha: str, report: dict, repo_id: str) -> ModelCard:
    data = ModelCardData(
        license="mit", library_name="transformers", pipeline_tag="zero-shot-object-detection", tags=["glip", "object-detection", "phrase-grounding", "remote-code"]
    )
    text = f"""---
{data.to_yaml()}
---

# GLIP ({source.name}) for transformers

GLIP (Grounded Language-Image Pre-training, Li et al., CVPR 2022) converted from the official microsoft/GLIP release.

* **Source checkpoint:** `{source.name}` (sha256 `{source_sha}`), from https://github.com/microsoft/GLIP /
  https://huggingface.co/{ORIGINAL_HUB_REPO}. Licence: MIT, as the original release.
* **Architecture:** Swin ({report["backbone"]}) + FPN P3-P7, BERT ({report["text"]}), {report["fusion_layers"]} VLDyHead
  fusion layers, ATSS head; {report["parameters"]:,} parameters.
* **Conversion:** `python examples/convert_and_push.py --checkpoint {source.name} --output <dir> --repo_id {repo_id}`.

## How it was verified
* {report["tensors"]} converted tensors reload bitwise and carry all of the original's weights (only recomputed
  buffers are dropped).
* The port reproduces the original code's every intermediate tensor on a golden fixture (tiny model of the same
  architecture) to <= 1e-5; this conversion's fixture check: {report["fixture_max_abs_diff"]}.
* Smoke detection on a photo with the prompt "cat. remote control. couch. person" (best five): {report["smoke"]}.

{usage_section(repo_id, ["cat", "remote control"])}"""
    return ModelCard(text)


def main(argv=None, api: Optional[HfApi] = None) -> dict:
    parser = GLIPArgumentParser(description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="local original checkpoint (.pth or .safetensors)")
    source.add_argument("--hub_file", help=f"file name in the Hub repo {ORIGINAL_HUB_REPO}")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--repo_id", help="Hub repo to push to (omit to only convert and verify)")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--dry_run", action="store_true", help="convert, verify and write the card, then list what would be pushed; push nothing")
    parser.add_argument("--config_yaml", help="original YAML config (default: inferred from key shapes)")
    parser.add_argument("--text_config", help="BertConfig json when the text model is not bert-base-uncased")
    parser.add_argument("--tokenizer", default="bert-base-uncased", help="BERT tokenizer repo id or folder")
    parser.add_argument("--allow_unsafe_pickle", action="store_true", help="fully unpickle a trusted .pth that weights_only refuses")
    parser.add_argument("--fixture", help="folder of the original's golden fixture (tiny model only)")
    args = parser.parse_args(argv)

    checkpoint = resolve_checkpoint(args.checkpoint, args.hub_file)
    output = Path(args.output)
    text_config = BertConfig.from_pretrained(args.text_config) if args.text_config else None
    convert(checkpoint, output, args.config_yaml, text_config, args.allow_unsafe_pickle, tokenizer=args.tokenizer)

    model, info = GLIPModel.from_pretrained(output, output_loading_info=True)
    if any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        raise RuntimeError(f"the saved checkpoint does not reload cleanly: {info}")
    model.eval()
    processor = GLIPProcessor.from_pretrained(output)
    config = model.config
    report = {
        "tensors": check_lossless(load_original_checkpoint(checkpoint, args.allow_unsafe_pickle), model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "backbone": f"embed {config.backbone_config.embed_dim}, depths {config.backbone_config.depths}",
        "text": f"{config.text_config.num_hidden_layers} layers x {config.text_config.hidden_size}",
        "fusion_layers": config.num_fusion_layers,
        "smoke": smoke_detect(model, processor),
        "fixture_max_abs_diff": "not run (full-size checkpoint)",
    }
    if args.fixture:
        diff = fixture_parity(model, Path(args.fixture))
        if diff > 1e-4:
            raise RuntimeError(f"fixture parity failed: max abs diff {diff}")
        report["fixture_max_abs_diff"] = f"{diff:.1e}"
    model_card(checkpoint, sha256(checkpoint), report, args.repo_id or "<repo>").save(output / "README.md")
    print(json.dumps(report, indent=1))
    if args.repo_id:
        upload(output, args.repo_id, args.private, args.dry_run, api, "Upload GLIP converted from the official checkpoint")
    return report


if __name__ == "__main__":
    main()
