"""Output files written whole or not at all.

A report is several files rendered from one result (JSON, HTML, a plot). If rendering the last one fails, or the
process is stopped half way, a reader must not find a new `results.json` beside an old `report.html`, or a file cut
off in the middle. `write_files` renders nothing itself: the caller builds every file's contents first, then each is
written under a temporary name in the target folder and renamed over its final name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def write_files(folder: str | Path, contents: Mapping[str, str | bytes]) -> Path:
    """Write `{file name: text or bytes}` into `folder` (created if missing), each file complete or not at all.

    After an interruption each file is its complete previous version, or absent; no temporary file is left behind.

    Returns:
        The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []
    try:
        for name, data in contents.items():
            temporary = folder / f".{name}.{os.getpid()}.partial"
            staged.append((temporary, folder / name))
            if isinstance(data, bytes):
                temporary.write_bytes(data)
            else:
                with temporary.open("w", encoding="utf-8", newline="") as handle:
                    handle.write(data)
        for temporary, final in staged:
            os.replace(temporary, final)
    finally:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
    return folder
