"""One way to write a file so that a reader (or a rerun after `kill -9`) sees the old file or the whole new one."""

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
