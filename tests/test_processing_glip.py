"""GLIPProcessor: prompts per image, batching, chunking of long vocabularies, errors, save/load."""

import io
import random

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import BertTokenizer

from processing import GLIPImageProcessor, GLIPProcessor, clean_name


@pytest.fixture(scope="module")
def tokenizer(bert_vocab_dir):
    return BertTokenizer.from_pretrained(str(bert_vocab_dir))


@pytest.fixture(scope="module")
def processor(tokenizer):
    return GLIPProcessor(GLIPImageProcessor(min_size=320, max_size=533), tokenizer)


@pytest.fixture(scope="module")
def small_processor(tokenizer):
    return GLIPProcessor(GLIPImageProcessor(min_size=32, max_size=64), tokenizer)


@pytest.fixture(scope="module")
def chelsea(reference_dir):
    return PIL.Image.open(reference_dir / "input_image.png").convert("RGB")


@pytest.fixture(scope="module")
def lvis_like_names(bert_vocab_dir):
    """1203 unique names of 1-3 vocabulary words, some with LVIS-style "_" and "(...)"."""
    words = [w for w in (bert_vocab_dir / "vocab.txt").read_text().split() if w.isalpha() and len(w) > 2]
    rng = random.Random(0)
    names, seen = [], set()
    while len(names) < 1203:
        name = "_".join(rng.sample(words, rng.randint(1, 3)))
        if rng.random() < 0.1:
            name += f"_({rng.choice(words)})"
        if clean_name(name).strip() not in seen:
            seen.add(clean_name(name).strip())
            names.append(name)
    return names


def test_fixture_prompt_through_processor(processor, chelsea, manifest, fixture_tensors):
    inputs = processor(images=chelsea, text=manifest["class_names_input"])
    expected_keys = {"input_ids", "attention_mask", "token_type_ids", "pixel_values", "pixel_mask", "positive_map", "label_ids", "chunk_to_image", "text_labels"}
    assert set(inputs.keys()) == expected_keys
    valid = int(fixture_tensors["input.attention_mask"].sum())
    assert inputs["input_ids"].shape == (1, valid)  # padded to the longest row, not to 256
    assert torch.equal(inputs["input_ids"], fixture_tensors["input.input_ids"][:, :valid])
    assert torch.equal(inputs["attention_mask"], fixture_tensors["input.attention_mask"][:, :valid])
    assert torch.equal(inputs["positive_map"][0], fixture_tensors["input.positive_map_label_to_token_dense"][:, :valid])
    assert inputs["label_ids"].tolist() == [[0, 1, 2, 3, 4]] and inputs["chunk_to_image"].tolist() == [0]
    assert inputs["text_labels"] == [manifest["class_names_input"]]
    assert torch.allclose(inputs["pixel_values"], fixture_tensors["input.images_tensor"], atol=1e-5, rtol=0)


def test_batch_with_different_prompts_padded_to_longest(processor, chelsea, tokenizer):
    small = chelsea.resize((200, 100))
    inputs = processor(images=[chelsea, small], text=[["cat"], ["person", "remote control", "coffee_cup"]])
    # "[CLS] cat [SEP]" (3) and "[CLS] person . remote control . coffee cup [SEP]" (9)
    assert inputs["input_ids"].shape == (2, 9) and inputs["attention_mask"].sum(1).tolist() == [3, 9]
    assert inputs["positive_map"].shape == (2, 3, 9)
    assert inputs["label_ids"].tolist() == [[0, -1, -1], [0, 1, 2]]
    assert inputs["positive_map"][0, 1:].sum() == 0
    assert [inputs["positive_map"][1, i].nonzero().squeeze(1).tolist() for i in range(3)] == [[1], [3, 4], [6, 7]]
    assert inputs["text_labels"] == [["cat"], ["person", "remote control", "coffee_cup"]]
    assert inputs["pixel_values"].shape == (2, 3, 320, 544) and inputs["pixel_mask"][1].sum() == 266 * 532


def test_shared_names_and_caption_batches(small_processor, chelsea):
    inputs = small_processor(images=[chelsea, chelsea], text=["cat", "dog"])
    assert inputs["chunk_to_image"].tolist() == [0, 1] and inputs["text_labels"] == [["cat", "dog"]] * 2
    inputs = small_processor(images=[chelsea, chelsea], text=["a cat on a mat", "two dogs"], phrases=[["a cat", "a mat"], ["two dogs"]])
    assert inputs["label_ids"].tolist() == [[0, 1], [0, -1]] and inputs["text_labels"] == [["a cat", "a mat"], ["two dogs"]]
    inputs = small_processor(text="a woman holding a cup", phrase_spans=[(16, 21)])
    assert "pixel_values" not in inputs and inputs["text_labels"] == [["a cup"]]
    assert inputs["positive_map"][0, 0].nonzero().squeeze(1).tolist() == [4, 5]


def test_chunking_1203_names(small_processor, chelsea, lvis_like_names, tokenizer):
    names = lvis_like_names
    inputs = small_processor(images=[chelsea, chelsea], text=[names, ["cat", "dog"]])
    rows = inputs["chunk_to_image"]
    assert rows.tolist().count(1) == 1 and rows[-1] == 1 and (rows[:-1] == 0).all()
    assert inputs["pixel_values"].shape[0] == 2  # each image once; `chunk_to_image` maps rows to images
    lengths = inputs["attention_mask"].sum(1)
    assert (lengths <= 256).all() and inputs["input_ids"].shape[1] == lengths.max() <= 256
    image_rows = (rows == 0).nonzero().squeeze(1)
    global_ids = inputs["label_ids"][image_rows]
    assert sorted(global_ids[global_ids >= 0].tolist()) == list(range(len(names)))  # every name in exactly one chunk
    assert inputs["text_labels"][0] == names
    for row in image_rows.tolist():
        for column, label in enumerate(inputs["label_ids"][row].tolist()):
            if label < 0:
                assert inputs["positive_map"][row, column].sum() == 0
                continue
            tokens = inputs["input_ids"][row][inputs["positive_map"][row, column].bool()]
            assert tokenizer.decode(tokens) == clean_name(names[label]).strip()
    # names_per_chunk reproduces the original's fixed chunk size
    fixed = small_processor(text=[names], names_per_chunk=40)
    assert len(fixed["chunk_to_image"]) == 31 and (fixed["label_ids"] >= 0).sum(1).tolist() == [40] * 30 + [3]


def _synthetic_outputs(inputs, hits):
    """Model outputs over 5 anchors (levels 2x2 and 1x1) where anchor `a` of row `r` fires on the tokens of label `c`."""
    rows, tokens = inputs["input_ids"].shape
    logits = torch.full((rows, 5, tokens), -20.0)
    for row, column, anchor in hits:
        logits[row, anchor, inputs["positive_map"][row, column].bool()] = 20.0
    return {
        "logits": logits,
        "pred_boxes": torch.tensor([0.5, 0.5, 0.2, 0.2]).expand(rows, 5, 4),
        "centerness": torch.full((rows, 5), 20.0),
        "spatial_shapes": torch.tensor([[2, 2], [1, 1]]),
        "image_sizes": torch.tensor([[100, 100]]).expand(rows, 2),
    }


def test_chunked_post_processing_returns_global_labels(small_processor, lvis_like_names):
    names = lvis_like_names
    inputs = small_processor(text=[names, ["cat", "dog"]])
    last_row = len(inputs["chunk_to_image"]) - 1
    hits = [(3, 5, 0), (last_row - 1, 0, 4), (last_row, 1, 2)]  # (row, row-local label, anchor)
    outputs = _synthetic_outputs(inputs, hits)
    results = small_processor.post_process_grounded_object_detection(outputs, inputs, target_sizes=[(200, 300), (100, 100)])
    expected = sorted(inputs["label_ids"][row, column].item() for row, column, _ in hits[:2])
    assert sorted(results[0]["labels"].tolist()) == expected
    assert sorted(results[0]["text_labels"]) == sorted(names[i] for i in expected)
    assert results[1]["labels"].tolist() == [1] and results[1]["text_labels"] == ["dog"]
    assert torch.allclose(results[1]["boxes"], torch.tensor([[40.0, 40.0, 60.0, 60.0]]))
    assert torch.allclose(results[0]["boxes"][0], torch.tensor([120.0, 80.0, 180.0, 120.0]))  # x * 3, y * 2


def _corrupt_image(chelsea):
    buffer = io.BytesIO()
    chelsea.save(buffer, format="PNG")
    return PIL.Image.open(io.BytesIO(buffer.getvalue()[:2000]))


@pytest.mark.parametrize(
    "make_kwargs, message",
    [
        (lambda c: {"text": [[]]}, "empty"),
        (lambda c: {"text": []}, "non-empty list"),
        (lambda c: {"text": ["cat", "  "]}, "whitespace-only"),
        (lambda c: {"text": ["cat", ""]}, "whitespace-only"),
        (lambda c: {"text": ["cat", "dog", "Cat"]}, "duplicate"),
        (lambda c: {"text": ["cat", 7]}, "not a string"),
        (lambda c: {"text": [["cat", None]]}, "not a string"),
        (lambda c: {"text": ["cat", " ".join(["dog"] * 300)]}, "more than the 254"),
        (lambda c: {"text": "a cat"}, "single string"),
        (lambda c: {"text": ["cat", ["dog"]]}, "mixes"),
        (lambda c: {"text": "a cat on a mat", "phrases": ["a dog"]}, "not found"),
        (lambda c: {"text": ["a cat", "a dog"], "phrases": [["a cat"]]}, "one entry per caption"),
        (lambda c: {"text": " ".join(["cat"] * 300), "phrases": ["cat"]}, "more than max_text_len"),
        (lambda c: {"images": [c, c], "text": [["cat"], ["dog"], ["cow"]]}, "3 prompts for 2 images"),
        (lambda c: {"images": [c, np.zeros((0, 4, 3), dtype=np.uint8)], "text": ["cat"]}, "image 1 has zero size"),
        (lambda c: {"images": [_corrupt_image(c)], "text": ["cat"]}, "image 0 could not be decoded"),
        (lambda c: {"images": c, "text": ["cat"], "return_tensors": "mlx"}, "'np' or None"),
        (lambda c: {}, "give `images`"),
    ],
)
def test_bad_inputs(small_processor, chelsea, make_kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_processor(**make_kwargs(chelsea))


def test_save_and_load_round_trip(tokenizer, chelsea, tmp_path, lvis_like_names):
    original = GLIPProcessor(GLIPImageProcessor(min_size=32, max_size=64), tokenizer, max_text_len=128)
    original.save_pretrained(tmp_path)
    loaded = GLIPProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded.image_processor, GLIPImageProcessor) and isinstance(loaded.tokenizer, BertTokenizer)
    assert (loaded.max_text_len, loaded.separator, loaded.image_processor.min_size) == (128, ". ", 32)
    text = [lvis_like_names[:100], ["american flag (US)", "coffee_cup"]]
    before, after = original(images=[chelsea, chelsea], text=text), loaded(images=[chelsea, chelsea], text=text)
    assert before.keys() == after.keys()
    for key in before:
        assert before[key] == after[key] if key == "text_labels" else torch.equal(before[key], after[key]), key
    assert (after["attention_mask"].sum(1) <= 128).all()
