"""Split a long class vocabulary into prompts that each fit the text encoder (the original's TEST.CHUNKED_EVALUATION,
glip_architecture.md section 9, without its silent truncation at 256 tokens)."""

from typing import List, Optional, Sequence


def chunk_names(
    names: Sequence[str],
    name_token_counts: Sequence[int],
    max_text_len: int = 256,
    separator_token_count: int = 1,
    special_token_count: int = 2,
    names_per_chunk: Optional[int] = None,
) -> List[List[int]]:
    """Greedily pack names, in order, into chunks whose prompt "n1. n2. ... nk" fits `max_text_len` tokens.

    Args:
        names: the class names (only used in error messages).
        name_token_counts: tokens of each name on its own, without special tokens.
        max_text_len: token limit of one prompt, special tokens included.
        separator_token_count: tokens of the separator between two names ("." for ". ").
        special_token_count: special tokens added around a prompt ([CLS], [SEP]).
        names_per_chunk: optional cap on names per chunk (the original's fixed chunk size, e.g. 40 for LVIS).

    Returns:
        the chunks as lists of indices into `names`; every name is in exactly one chunk.

    Raises:
        ValueError: a name that does not fit in a prompt on its own, or a non-positive names_per_chunk.
    """
    if names_per_chunk is not None and names_per_chunk < 1:
        raise ValueError(f"names_per_chunk must be >= 1, got {names_per_chunk}")
    chunks: List[List[int]] = []
    length = 0
    for index, count in enumerate(name_token_counts):
        if count + special_token_count > max_text_len:
            raise ValueError(
                f"class name {index} ({names[index]!r}) has {count} tokens, more than the {max_text_len - special_token_count} "
                f"that fit in one prompt of {max_text_len} tokens"
            )
        extended = length + separator_token_count + count
        if chunks and extended <= max_text_len and (names_per_chunk is None or len(chunks[-1]) < names_per_chunk):
            chunks[-1].append(index)
            length = extended
        else:
            chunks.append([index])
            length = special_token_count + count
    return chunks
