"""Output files written whole or not at all.

A report is several files rendered from one result (JSON, HTML, a plot). If rendering the last one fails, or the
process is stopped half way, a reader must not find a new `results.json` beside an old `report.html`, or a file cut
off in the middle. `write_files` renders nothing itself: the caller builds every file's contents first, then each is
written under a temporary name in the target folder and renamed over its final name.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
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


def check_output_folder(path: str | os.PathLike[str], flag: str = "--out") -> None:
    """Fail before any work when `path` cannot become an output folder: it is an existing file, or the nearest
    existing folder above it cannot be written.

    Raises:
        FeatsteerError: naming the flag and what to do instead.
    """
    from featsteer.errors import FeatsteerError

    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise FeatsteerError(f"{flag} {path} is an existing file: give a folder path (it is created if missing)")
    _check_writable_ancestor(target, flag, path)


def check_output_file(path: str | os.PathLike[str], flag: str = "--json") -> None:
    """Fail before any work when `path` cannot become an output file: it is a folder, or the nearest existing
    folder above it cannot be written.

    Raises:
        FeatsteerError: naming the flag and what to do instead.
    """
    from featsteer.errors import FeatsteerError

    target = Path(path).expanduser()
    if target.is_dir():
        raise FeatsteerError(f"{flag} {path} is a folder: give a file path, e.g. {Path(path) / 'out.json'}")
    _check_writable_ancestor(target.parent, flag, path)


def _check_writable_ancestor(target: Path, flag: str, shown: str | os.PathLike[str]) -> None:
    from featsteer.errors import FeatsteerError

    existing = target.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise FeatsteerError(f"{flag} {shown}: {existing} is a file, so nothing can be written below it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FeatsteerError(f"{flag} {shown}: {existing} is not writable; choose another path")


def json_text(payload: object, indent: int | None = 1, default: Callable[[object], object] | None = None) -> str:
    """JSON text in which NaN and infinities become `null`: Python's `json` writes bare `NaN`, which is not JSON and
    which other readers (JavaScript's `JSON.parse`, jq) reject. `default` is `json.dumps`'s: what to write for an object
    JSON has no type for (`str` writes its text)."""
    return json.dumps(_finite(payload), indent=indent, allow_nan=False, default=default)


def _finite(value: object) -> object:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def staging_folder(final: str | os.PathLike[str], inside: bool = False) -> Path:
    """A new hidden folder beside `final` (`.NAME.partial-XXXX`) to build the output `final` in before renaming it
    into place; with `inside`, one in the existing folder `final` itself (`.partial-XXXX`), whose entries
    `place_output` moves up into `final` (the folder stays: the current folder, a symlink to a folder, a mount point
    or a folder whose parent cannot be written could not be swapped for the staging folder).

    `tempfile.mkdtemp` makes it private (mode 0700), which the renamed output would keep; this one gets the mode any
    new folder gets under the process's umask, so other users can read an exported model or a capture as usual.

    Raises:
        OSError: the folder cannot be made there, naming `final` (the path the user gave), not the hidden folder.
    """
    import tempfile

    final = Path(final)
    where, prefix = (final, ".partial-") if inside else (final.parent, f".{final.name}.partial-")
    try:
        folder = Path(tempfile.mkdtemp(dir=where, prefix=prefix))
    except OSError as error:
        raise _naming(error, final) from None
    folder.chmod(0o777 & ~_umask())
    return folder


def output_staging(out: str | os.PathLike[str]) -> Path:
    """The staging folder for the output folder `out` (new or empty): inside `out` when it is an existing folder,
    else beside it (its parent folders created)."""
    out = Path(out)
    if out.is_dir():
        return staging_folder(out, inside=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    return staging_folder(out)


def place_output(work: Path, out: Path, last: tuple[str, ...] = ()) -> None:
    """Make the staged folder `work` (from `output_staging`) the output folder `out`: renamed to `out` when it was made
    beside it; made inside the existing folder `out`, its entries moved up into `out` (each whole; those named in
    `last` after the others, so a reader that looks for one of them finds the rest there) and `work` removed.

    Raises:
        OSError: `out` holds anything besides `work` (files written there during the run), naming `out`.
    """
    import errno

    if not (out.is_dir() and work.parent.samefile(out)):
        if out.exists():
            out.rmdir()  # empty (the caller checked it), made during the run
        work.rename(out)
        return
    if any(entry.name != work.name for entry in out.iterdir()):  # a rename would replace such a file silently
        raise OSError(errno.ENOTEMPTY, "files appeared in the output folder during the run", str(out))
    for entry in sorted(work.iterdir(), key=lambda entry: entry.name in last):
        entry.rename(out / entry.name)
    work.rmdir()


def _naming(error: OSError, path: Path) -> OSError:
    """`error` again, naming `path` instead of the hidden staging path the system refused."""
    return type(error)(error.errno, error.strerror or str(error), str(path))


@contextlib.contextmanager
def staged_output(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Build the output folder `out` (new or empty) in a `staging_folder` beside it, renamed to `out` when the block
    ends (or, when `out` is an existing empty folder, in one inside it, whose files are moved up into it): a command
    that fails or is stopped half way leaves no half-filled `out` (the staging folder is removed).

    Yields:
        The staging folder to write into.
    """
    out = Path(out).expanduser()
    work = output_staging(out)
    try:
        yield work
        place_output(work, out)
    except OSError as error:
        shutil.rmtree(work, ignore_errors=True)
        refused = Path(error.filename) if isinstance(error.filename, (str, os.PathLike)) else None
        if refused is not None and refused.is_relative_to(work):  # name the file as the user will know it, inside out
            raise _naming(error, out / refused.relative_to(work)) from None
        raise
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def share_files(folder: str | os.PathLike[str]) -> None:
    """Give every file below `folder` the mode a new file gets under the umask (some writers, such as transformers'
    `save_pretrained`, leave weights at 0600, which other users cannot load)."""
    mask = _umask()
    for path in Path(folder).rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~mask)


def _umask() -> int:
    """The process's umask (reading it means setting it: it is put straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_empty_folder(path: str | os.PathLike[str], what: str = "output folder", hint: str = "") -> None:
    """A run writes into a new or empty folder only: an earlier run's files left beside the new ones would read as one
    run's output.

    Raises:
        FeatsteerError: `{what} {path} is not empty: choose a new path{hint}`, or the path is an existing file.
    """
    from featsteer.errors import FeatsteerError

    folder = Path(path)
    if folder.exists() and not folder.is_dir():  # found only once everything was written beside it, as an OSError
        raise FeatsteerError(f"{what} {path} is an existing file: give a folder path (it is created if missing)")
    if folder.is_dir() and any(folder.iterdir()):
        raise FeatsteerError(f"{what} {path} is not empty: choose a new path{hint}")
