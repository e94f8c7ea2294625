"""Writes that survive `kill -9`: a whole file replaced atomically (a reader sees the old file or the whole new one), and
a line appended durably (on disk before the call returns)."""

import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Union


def write_atomically(path: Union[str, Path], write: Callable[[IO[bytes]], None]) -> None:
    """`write(binary file)` into a temporary file beside `path` (same folder, so the rename is atomic), then rename it
    over `path`; the temporary file is removed when `write` fails, and `path` is never left partial."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def append_durably(path: Union[str, Path], text: str) -> None:
    """Append `text` (UTF-8) to `path` and fsync it: once this returns, the text survives a kill -9 or a power loss."""
    with open(path, "a", encoding="utf-8") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
