"""What the command-line entry points share (`glip-detect`, the converter, `examples/`, `benchmarks/`): one flag style,
model paths that fail with a clear message, and the processor a run uses, printed.

Flags are spelled with underscores, as in transformers' example scripts (`--output_dir`, `--top_k`); the dashed
spelling of every flag (`--output-dir`, `--top-k`) is accepted as the same flag.
"""

import argparse
import ctypes
import math
import os
import platform
import sys
import textwrap
from pathlib import Path
from typing import Optional, Sequence, Tuple

from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import BertTokenizer

from processing import GLIPImageProcessor, GLIPProcessor

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


# glibc malloc settings that keep freed memory: tunable name -> (mallopt parameter number, value); the same settings
# as `GLIBC_TUNABLES` for a new process (benchmarks/benchmark_inference.py --allocator keep-freed)
_KEEP_FREED_SETTINGS = {"mmap_max": (-4, 0), "trim_threshold": (-1, 2**31 - 1)}  # M_MMAP_MAX, M_TRIM_THRESHOLD
KEEP_FREED_TUNABLES = ":".join(f"glibc.malloc.{name}={value}" for name, (_, value) in _KEEP_FREED_SETTINGS.items())


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse in this process, as `GLIBC_TUNABLES=<KEEP_FREED_TUNABLES>` would at start.

    glibc maps every block above 32 MB afresh and unmaps it when freed; a full-size GLIP forward on CPU allocates
    dozens of 100-200 MB blocks (fusion scores, deformable-convolution columns), so each forward faults the same pages
    in again: GLIP-T at 800x1333 runs 1.2x (80 names) to 1.25x (3 names) faster without that (benchmarks/README.md,
    `benchmark_inference.py --allocator`). The process keeps its peak memory instead of returning it. The inference
    entry points (`glip-detect`, `glip-app`) call this; a library user sets the environment variable instead. Does
    nothing (returns False) without glibc or when `GLIBC_TUNABLES` already sets a malloc tunable.
    """
    if platform.libc_ver()[0] != "glibc" or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    libc = ctypes.CDLL(None)
    return all([bool(libc.mallopt(parameter, value)) for parameter, value in _KEEP_FREED_SETTINGS.values()])


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """`--help` keeps the description's line breaks and shows each flag's default (except None, and a switch's)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or action.required or action.nargs == 0 or default is None or default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"

    def _split_lines(self, text: str, width: int) -> list:
        # names with hyphens (bert-base-uncased, fine-tuning) are never broken across lines
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class GLIPArgumentParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` with the project's conventions: `--help` shows the defaults (`HelpFormatter`),
    abbreviated flags are refused (`--learning` must not silently mean `--learning_rate`), and the dashed spelling of
    a flag (`--output-dir`) is read as its underscored one (`--output_dir`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Optional[Sequence[str]] = None, namespace=None):
        return super().parse_known_args(self.underscored(sys.argv[1:] if args is None else args), namespace)

    def underscored(self, args: Sequence[str]) -> list:
        """`args` with each dashed flag of this parser (`--top-k`, `--top-k=3`) spelled as its underscored flag;
        everything after a bare `--` and every unknown token are left alone (sub-commands normalise their own)."""
        known = self._option_string_actions
        output = []
        for index, token in enumerate(args):
            if token == "--":
                return output + list(args[index:])
            name, equals, value = token.partition("=")
            underscored = "--" + name[2:].replace("-", "_")
            if name.startswith("--") and name not in known and underscored in known:
                token = underscored + equals + value
            output.append(token)
        return output


def checked_model_path(name_or_path: str, flag: str) -> str:
    """A model / tokenizer location given on the command line: a local folder, or a Hub repo id.

    Returns `name_or_path` unchanged when it is an existing folder, or a valid repo id that can be fetched (online, or
    offline but in the Hugging Face cache).

    Raises:
        ValueError: naming `flag`: the folder does not exist (also for a relative path such as `runs/ft/model`, which
            would otherwise be taken for a repo id), the path is a file, or the repo cannot be reached offline.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return name_or_path
    if path.exists():
        raise ValueError(f"{flag} {name_or_path}: is a file; give the folder that holds config.json (a save_pretrained folder)")
    missing = f"{flag} {name_or_path}: no such folder ({path.resolve()} does not exist)"
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise ValueError(missing) from None
    cached = any(isinstance(try_to_load_from_cache(name_or_path, name), str) for name in ("config.json", "tokenizer_config.json"))
    if hub_constants.HF_HUB_OFFLINE and not cached:
        raise ValueError(f"{missing}, and the Hub repo {name_or_path!r} is not in the local cache (HF_HUB_OFFLINE=1)")
    return name_or_path


def _integer_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse `type=` of a count or size: an integer >= 1."""
    return _integer_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse `type=` of a count that may be 0 (e.g. worker processes): an integer >= 0."""
    return _integer_at_least(text, 0)


def positive_float(text: str) -> float:
    """argparse `type=` of a tolerance or scale: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


class ResolutionError(ValueError):
    """Resize settings given on the command line that the checkpoint's processor cannot take (an argument error, not a
    damaged checkpoint)."""


def resized(image_processor: GLIPImageProcessor, **sizes: int) -> GLIPImageProcessor:
    """A copy of `image_processor` with other resize settings (`min_size=`, `max_size=`), checked as at construction.

    Raises:
        ResolutionError: naming the given flags and the settings they were combined with (e.g. `--min_size 320` above
            the saved max_size 267).
    """
    if not sizes:
        return image_processor
    try:
        return GLIPImageProcessor(**{**image_processor.to_dict(), **sizes})
    except ValueError as error:
        given = ", ".join(f"--{name} {value}" for name, value in sizes.items())
        saved = f"min_size {image_processor.min_size}, max_size {image_processor.max_size}"
        raise ResolutionError(f"{given}: {error} (combined with the processor's {saved}; give both --min_size and --max_size)") from None


def load_processor(
    name_or_path: str, tokenizer: Optional[str] = None, min_size: Optional[int] = None, max_size: Optional[int] = None
) -> Tuple[GLIPProcessor, str]:
    """The processor saved with a checkpoint, with the settings the user gave instead of the saved ones.

    Args:
        name_or_path: a checkpoint folder or Hub repo id (see `checked_model_path`).
        tokenizer: a tokenizer folder / repo id that replaces the checkpoint's.
        min_size, max_size: the image resize (short side, long-side cap) instead of the checkpoint's, when not None.

    Returns:
        (the processor, one line that says which settings it uses and where each comes from). A local folder without
        a saved processor (`processor_config.json`) gets GLIP's default image settings (800 / 1333) and the folder's
        tokenizer; the line says so.

    Raises:
        ResolutionError: an override out of range, or one that does not fit the saved settings (see `resized`).
    """
    folder = Path(name_or_path)
    saved = not folder.is_dir() or any((folder / name).is_file() for name in PROCESSOR_FILES)
    if saved:
        processor = GLIPProcessor.from_pretrained(name_or_path)
        origin = "saved with the model"
    else:
        processor = GLIPProcessor(GLIPImageProcessor(), BertTokenizer.from_pretrained(tokenizer or name_or_path))
        origin = "GLIP's default image settings: the model folder has no processor_config.json"
    if tokenizer is not None:
        processor.tokenizer = BertTokenizer.from_pretrained(tokenizer)
    overrides = {name: value for name, value in (("min_size", min_size), ("max_size", max_size)) if value is not None}
    processor.image_processor = resized(processor.image_processor, **overrides)
    image_processor = processor.image_processor
    given = f"; given: {', '.join(f'--{name} {value}' for name, value in overrides.items())}" if overrides else ""
    summary = (
        f"processor: min_size {image_processor.min_size}, max_size {image_processor.max_size}, size_divisibility "
        f"{image_processor.size_divisibility}, max_text_len {processor.max_text_len} ({origin}{given})"
    )
    return processor, summary


__all__ = ["GLIPArgumentParser", "HelpFormatter", "ResolutionError", "checked_model_path", "load_processor", "resized"]
