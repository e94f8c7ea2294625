"""Prompt building (glip_architecture.md section 9): class-name prompts, captions, positive maps, chunking."""

import pytest
import torch
from transformers import BertTokenizer

from processing.chunking import chunk_names
from processing.prompts import build_caption_prompt, build_detection_prompt, clean_class_names, clean_name, positive_map_from_encoding


@pytest.fixture(scope="module")
def tokenizer(bert_vocab_dir):
    return BertTokenizer.from_pretrained(str(bert_vocab_dir))


def _positive_map(tokenizer, prompt, names):
    encoding = tokenizer([prompt.text], return_tensors="pt")
    return encoding, positive_map_from_encoding(encoding, 0, prompt, encoding["input_ids"].shape[1], names)


@pytest.mark.parametrize(
    "name, cleaned",
    [
        ("american flag (US)", "american flag "),  # trailing space kept
        ("coffee_cup", "coffee cup"),
        ("a (b) c (d) e", "a e"),  # greedy: first "(" to last ")" removed -> "a  e", then "  " -> " "
        ("a__b", "a b"),  # "a  b" collapsed once
        ("a    b", "a  b"),  # four spaces -> two: collapse happens ONCE
        ("plain", "plain"),
    ],
)
def test_clean_name_matches_original(name, cleaned):
    assert clean_name(name) == cleaned


def test_fixture_prompt_parity(manifest, fixture_tensors, tokenizer):
    names = manifest["class_names_input"]
    cleaned = clean_class_names(names)
    assert cleaned == manifest["class_names_cleaned"]
    prompt = build_detection_prompt(cleaned)
    assert prompt.text == manifest["caption"]
    assert [list(span) for span in prompt.spans] == [manifest["tokens_positive_char_spans"][str(i)][0] for i in range(1, 6)]
    encoding, positive_map = _positive_map(tokenizer, prompt, names)
    assert tokenizer.convert_ids_to_tokens(encoding["input_ids"][0]) == manifest["tokens"]
    expected = {int(label): tokens for label, tokens in manifest["positive_map_label_to_token"].items()}
    assert {row + 1: positive_map[row].nonzero().squeeze(1).tolist() for row in range(len(names))} == expected
    valid = int(fixture_tensors["input.attention_mask"].sum())
    assert torch.equal(encoding["input_ids"][0], fixture_tensors["input.input_ids"][0, :valid])
    dense = fixture_tensors["input.positive_map_label_to_token_dense"]
    assert torch.equal(positive_map, dense[:, : positive_map.shape[1]]) and dense[:, positive_map.shape[1] :].sum() == 0


def test_trailing_space_uses_end_fallback(tokenizer):
    # "american flag " ends with a space: char_to_token(end - 1) is None, the end-2 fallback finds "flag"
    prompt = build_detection_prompt(["american flag "])
    assert prompt.text == "american flag "
    _, positive_map = _positive_map(tokenizer, prompt, ["american flag "])
    assert positive_map[0].nonzero().squeeze(1).tolist() == [1, 2]


def test_caption_with_phrases_and_spans(tokenizer):
    caption = "a woman holding a cup"
    prompt, names = build_caption_prompt(caption, phrases=["a woman", "a cup"])
    assert prompt.spans == ((0, 7), (16, 21)) and names == ["a woman", "a cup"]
    same, same_names = build_caption_prompt(caption, phrase_spans=[(0, 7), (16, 21)])
    assert same == prompt and same_names == names
    _, positive_map = _positive_map(tokenizer, prompt, names)
    # tokens: [CLS] a woman holding a cup [SEP]
    assert positive_map[0].nonzero().squeeze(1).tolist() == [1, 2]
    assert positive_map[1].nonzero().squeeze(1).tolist() == [4, 5]


def test_phrase_matches_whole_words_only():
    prompt, _ = build_caption_prompt("concatenate the cat", phrases=["cat"])
    assert prompt.spans == ((16, 19),)


@pytest.mark.parametrize(
    "names, message",
    [
        ([], "empty"),
        ("cat", "list of strings"),
        (["cat", 3], "not a string"),
        (["cat", ""], "empty or whitespace"),
        (["cat", "   "], "empty or whitespace"),
        (["cat", "(US)"], "empty after cleaning"),
        (["cat", "dog", "cat"], "duplicate"),
        (["coffee_cup", "coffee cup"], "duplicate"),
    ],
)
def test_bad_class_names(names, message):
    with pytest.raises(ValueError, match=message):
        clean_class_names(names)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"phrases": ["a dog"]}, "not found"),
        ({"phrases": []}, "non-empty list"),
        ({"phrases": [""]}, "non-empty string"),
        ({"phrases": ["a cup", "a cup"]}, "duplicate"),
        ({"phrase_spans": [(5, 3)]}, "outside the caption"),
        ({"phrase_spans": [(0, 99)]}, "outside the caption"),
        ({}, "exactly one of"),
        ({"phrases": ["a cup"], "phrase_spans": [(0, 1)]}, "exactly one of"),
    ],
)
def test_bad_captions(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_caption_prompt("a woman holding a cup", **kwargs)


def test_label_without_tokens_is_an_error(tokenizer):
    prompt, names = build_caption_prompt("a   b", phrase_spans=[(1, 4)])  # only spaces
    with pytest.raises(ValueError, match="maps to no token"):
        _positive_map(tokenizer, prompt, names)


def test_chunk_names_packs_by_tokens():
    names = [f"n{i}" for i in range(10)]
    counts = [3] * 10
    # each prompt: 2 specials + 3k tokens + (k-1) separators <= 20 -> k = 4
    chunks = chunk_names(names, counts, max_text_len=20)
    assert chunks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert chunk_names(names, counts, max_text_len=20, names_per_chunk=3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    with pytest.raises(ValueError, match="'n1'"):
        chunk_names(names, [3, 19] + [3] * 8, max_text_len=20)
    with pytest.raises(ValueError, match="names_per_chunk"):
        chunk_names(names, counts, names_per_chunk=0)
