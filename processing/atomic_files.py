"""Writes that survive `kill -9` and power loss: a whole file replaced atomically (a reader sees the old file or the
whole new one, whose bytes are on disk before its name points at them), and a line appended durably (on disk before
the call returns)."""

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Optional, Union


def fsync_path(path: Union[str, Path]) -> None:
    """Flush a file's data, or a folder's entries (new names, renames), to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomically(path: Union[str, Path], write: Callable[[IO[bytes]], None]) -> None:
    """`write(binary file)` into a temporary file beside `path` (same folder, so the rename is atomic), fsync it, then
    rename it over `path`; the temporary file is removed when `write` fails, and `path` is never left partial."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_json_atomically(path: Union[str, Path], value: Any, indent: Optional[int] = 1) -> None:
    """`value` as JSON (UTF-8, one final newline) replacing `path` with `write_atomically`."""
    text = json.dumps(value, indent=indent) + "\n"
    write_atomically(path, lambda stream: stream.write(text.encode()))


def append_durably(path: Union[str, Path], text: str) -> None:
    """Append `text` (UTF-8) to `path` and fsync it: once this returns, the text survives a kill -9 or a power loss."""
    with open(path, "a", encoding="utf-8") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
