"""GLIP prompts: class-name prompts as the original `create_queries_and_maps`, free captions with phrases, and the
label -> token positive map (glip_architecture.md section 9)."""

import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from transformers.tokenization_utils_base import BatchEncoding

DEFAULT_SEPARATOR = ". "  # DATASETS.SEPARATION_TOKENS (section 9)


@dataclass(frozen=True)
class Prompt:
    """One text row: the string given to the tokenizer and the [start, end) character span of each of its labels."""

    text: str
    spans: Tuple[Tuple[int, int], ...]


def clean_name(name: str) -> str:
    """The original `clean_name` (section 9): "american flag (US)" -> "american flag ", "coffee_cup" -> "coffee cup"."""
    name = re.sub(r"\(.*\)", "", name)  # greedy: drops everything from the first "(" to the last ")" (section 9)
    name = name.replace("_", " ")
    return name.replace("  ", " ")  # collapses double spaces ONCE, trailing spaces kept (section 9)


def clean_class_names(names: Sequence[str]) -> List[str]:
    """Validate a list of class names and return their cleaned forms.

    Raises:
        ValueError: empty list, non-string name, empty/whitespace-only name (before or after cleaning), or two names
            that are equal after cleaning.
    """
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise ValueError(f"class names must be a list of strings, got {type(names).__name__}")
    if len(names) == 0:
        raise ValueError("the list of class names is empty")
    cleaned = []
    seen = {}
    for index, name in enumerate(names):
        if not isinstance(name, str):
            raise ValueError(f"class name {index} is not a string: {name!r} ({type(name).__name__})")
        if not name.strip():
            raise ValueError(f"class name {index} is empty or whitespace-only: {name!r}")
        clean = clean_name(name)
        if not clean.strip():
            raise ValueError(f"class name {index} ({name!r}) is empty after cleaning (parenthesised text is dropped)")
        key = clean.strip().lower()
        if key in seen:
            raise ValueError(f"duplicate class names: {names[seen[key]]!r} (index {seen[key]}) and {name!r} (index {index})")
        seen[key] = index
        cleaned.append(clean)
    return cleaned


def build_detection_prompt(cleaned_names: Sequence[str], separator: str = DEFAULT_SEPARATOR) -> Prompt:
    """Cleaned class names -> "n1. n2. n3" (no separator after the last name) and each name's span (section 9)."""
    text, spans = "", []
    for index, name in enumerate(cleaned_names):
        spans.append((len(text), len(text) + len(name)))
        text += name
        if index != len(cleaned_names) - 1:
            text += separator
    return Prompt(text=text, spans=tuple(spans))


def phrase_occurrences(caption: str, phrase: str, ignore_case: bool = False) -> List[Tuple[int, int]]:
    """[start, end) character spans of every whole-word occurrence of `phrase` in `caption` (not preceded or followed
    by a letter, digit or underscore), in caption order."""
    pattern = re.compile(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", re.IGNORECASE if ignore_case else 0)
    return [match.span() for match in pattern.finditer(caption)]


def _phrase_span(caption: str, phrase: str, index: int) -> Tuple[int, int]:
    if not isinstance(phrase, str) or not phrase.strip():
        raise ValueError(f"phrase {index} must be a non-empty string, got {phrase!r}")
    occurrences = phrase_occurrences(caption, phrase)
    if not occurrences:
        raise ValueError(f"phrase {index} ({phrase!r}) was not found as whole words in the caption {caption!r}")
    return occurrences[0]


def build_caption_prompt(
    caption: str, phrases: Optional[Sequence[str]] = None, phrase_spans: Optional[Sequence[Tuple[int, int]]] = None
) -> Tuple[Prompt, List[str]]:
    """A free caption and its labels, given as phrases (first whole-word occurrence) or as [start, end) char spans.

    Returns:
        the prompt and the label names (the phrases, or the caption text of each span).

    Raises:
        ValueError: empty caption, neither or both of phrases / phrase_spans, a phrase not in the caption, a span
            outside the caption or empty, duplicate labels.
    """
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"the caption must be a non-empty string, got {caption!r}")
    if (phrases is None) == (phrase_spans is None):
        raise ValueError("a caption needs exactly one of `phrases` or `phrase_spans` to define its labels")
    labels = phrases if phrases is not None else phrase_spans
    if isinstance(labels, str) or len(labels) == 0:
        raise ValueError(f"the labels of caption {caption!r} must be a non-empty list, got {labels!r}")
    if phrases is not None:
        spans = [_phrase_span(caption, phrase, index) for index, phrase in enumerate(phrases)]
    else:
        spans = []
        for index, span in enumerate(phrase_spans):
            start, end = (int(v) for v in span)
            if not 0 <= start < end <= len(caption):
                raise ValueError(f"phrase span {index} ({start}, {end}) is empty or outside the caption (length {len(caption)})")
            spans.append((start, end))
    if len(set(spans)) != len(spans):
        raise ValueError(f"duplicate labels in caption {caption!r}: spans {spans}")
    names = [caption[start:end] for start, end in spans]
    return Prompt(text=caption, spans=tuple(spans)), names


def _char_to_token(encoding: BatchEncoding, row: int, text_length: int, positions: Sequence[int]) -> Optional[int]:
    """First token found at one of the character `positions` (skipping positions outside the text)."""
    for position in positions:
        if 0 <= position < text_length:
            token = encoding.char_to_token(row, position)
            if token is not None:
                return token
    return None


def positive_map_from_encoding(encoding: BatchEncoding, row: int, prompt: Prompt, num_tokens: int, names: Sequence[str]) -> torch.Tensor:
    """(L, T) 0/1 label -> token map of one tokenized row (the original's `create_positive_dict`, section 9).

    A label's first token is the token of char `start` (fallbacks start+1, start+2), its last token that of char
    `end-1` (fallbacks end-2, end-3); every token in between is positive.

    Raises:
        ValueError: a label whose characters map to no token (the original silently drops such labels).
    """
    positive_map = torch.zeros(len(prompt.spans), num_tokens)
    for label, (start, end) in enumerate(prompt.spans):
        first = _char_to_token(encoding, row, len(prompt.text), (start, start + 1, start + 2))  # fallbacks (section 9)
        last = _char_to_token(encoding, row, len(prompt.text), (end - 1, end - 2, end - 3))  # fallbacks (section 9)
        if first is None or last is None or last < first:
            raise ValueError(f"label {names[label]!r} (characters {start}..{end} of {prompt.text!r}) maps to no token")
        positive_map[label, first : last + 1] = 1.0
    return positive_map
