"""Output files written whole or not at all.

A report is several files rendered from one result (JSON, HTML, a plot). If rendering the last one fails, or the
process is stopped half way, a reader must not find a new `results.json` beside an old `report.html`, or a file cut
off in the middle. `write_files` renders nothing itself: the caller builds every file's contents first, then each is
written under a temporary name in the target folder and renamed over its final name.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import logging
import math
import os
import re
import shlex
import shutil
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

STAGING_MARKER = ".featsteer-staging.json"
"""The file an output staging folder (`output_staging`) holds until its files are placed: the writing process's id, host,
start time and kernel (`_kernel_id`), by which a later run knows a folder a killed run left (SIGKILL, power loss) as
featsteer's own and gone."""


def write_files(folder: str | Path, contents: Mapping[str, str | bytes]) -> Path:
    """Write `{file name: text or bytes}` into `folder` (created if missing), each file complete or not at all.

    After an interruption each file is its complete previous version, or absent; no temporary file is left behind. A
    process killed outright (SIGKILL, power loss) leaves its temporary `.NAME.PID-START-kKERNEL-tTHREAD@HOST.partial` files: the
    next write of the same NAME removes those whose process is provably gone (`remove_stale_partial_files`).

    Returns:
        The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writer = _partial_file_writer()
    staged: list[tuple[Path, Path]] = []
    try:
        for name, data in contents.items():
            remove_stale_partial_files(folder, name)
            temporary = folder / f".{name}.{writer}.partial"
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


_PARTIAL_FILE_WRITER = re.compile(r"(?P<pid>\d+)(?:-(?P<started>\d+))?(?:-k(?P<kernel>[0-9a-f]+))?(?:-t(?P<thread>\d+))?@(?P<host>[^/@]+)")
"""What `write_files` puts between `.NAME.` and `.partial` in a temporary file's name: its process id, the process's
start time and kernel when known (`_process_start`, `_kernel_id`), the writing thread (so two threads of one process
writing the same NAME do not share a temporary file) and the host."""


def _partial_file_writer() -> str:
    """This process as `write_files` names it in its temporary files (`_PARTIAL_FILE_WRITER`)."""
    started, kernel = _process_start(os.getpid()), _kernel_id()
    return (f"{os.getpid()}{'' if started is None else f'-{started}'}{'' if kernel is None else f'-k{kernel}'}"
            f"-t{threading.get_native_id()}@{socket.gethostname()}")


def remove_stale_partial_files(folder: Path, name: str) -> None:
    """Remove the temporary files of `name` that `write_files` runs killed outright left in `folder`: the regular files
    `.NAME.PID[-START]@HOST.partial` whose process is provably gone (`staging_is_stale`). A file named otherwise - one
    of an older featsteer, `.NAME.PID.partial`, which records no host - stays."""
    prefix = f".{name}."
    for path in folder.glob(f"{glob.escape(prefix)}*.partial"):
        match = _PARTIAL_FILE_WRITER.fullmatch(path.name[len(prefix):-len(".partial")])
        if match is None or path.is_symlink() or not path.is_file():
            continue
        owner = {"pid": int(match["pid"]), "host": match["host"], "started": None if match["started"] is None else int(match["started"]),
                 "kernel": match["kernel"]}
        if staging_is_stale(owner):
            logger.warning("removing %s, which a featsteer run (process %s on this machine) was writing when it was stopped", path, owner["pid"])
            with contextlib.suppress(OSError):  # one left for the next write rather than this write failed
                path.unlink()


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


def output_staging(out: str | os.PathLike[str], beside: bool = False) -> Path:
    """The staging folder for the output folder `out` (new or empty): inside `out` when it is an existing folder,
    else beside it (its parent folders created; staging folders that killed runs left beside `out` are removed first).
    With `beside`, beside `out` even when it exists (a caller that replaces `out` whole). It holds a `STAGING_MARKER`
    naming this process until `place_output` places its files."""
    out = Path(out)
    if out.is_dir() and not beside:
        work = staging_folder(out, inside=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out.parent, out.name)
        work = staging_folder(out)
    record = {"writer": "featsteer", "pid": os.getpid(), "host": socket.gethostname(), "started": _process_start(os.getpid()),
              "kernel": _kernel_id()}
    try:
        (work / STAGING_MARKER).write_text(json.dumps(record), encoding="utf-8")
    except OSError as error:
        shutil.rmtree(work, ignore_errors=True)
        raise _naming(error, out) from None
    return work


def place_output(work: Path, out: Path, last: tuple[str, ...] = ()) -> None:
    """Make the staged folder `work` (from `output_staging`) the output folder `out`: renamed to `out` when it was made
    beside it; made inside the existing folder `out`, its entries moved up into `out` (each whole; those named in
    `last` after the others, so a reader that looks for one of them finds the rest there) and `work` removed. Its
    `STAGING_MARKER` is not placed: removed before the rename, or after the last entry is moved up.

    Raises:
        OSError: `out` holds anything besides `work` (files written there during the run), naming `out`.
    """
    import errno

    marker = work / STAGING_MARKER
    if not (out.is_dir() and work.parent.samefile(out)):
        if out.exists():
            out.rmdir()  # empty (the caller checked it), made during the run
        marker.unlink(missing_ok=True)
        work.rename(out)
        return
    if any(entry.name != work.name for entry in out.iterdir()):  # a rename would replace such a file silently
        raise OSError(errno.ENOTEMPTY, "files appeared in the output folder during the run", str(out))
    for entry in sorted((entry for entry in work.iterdir() if entry.name != STAGING_MARKER), key=lambda entry: entry.name in last):
        entry.rename(out / entry.name)
    marker.unlink(missing_ok=True)
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
    run's output. Staging folders that killed runs left there, when they are all it holds, are removed first
    (`clear_stale_staging`).

    Raises:
        FeatsteerError: `{what} {path} is not empty: choose a new path{hint}` (when it holds only hidden entries, which
            plain `ls` does not list, what each is and the command that removes them), or the path is an existing file.
    """
    from featsteer.errors import FeatsteerError

    folder = Path(path)
    if folder.exists() and not folder.is_dir():  # found only once everything was written beside it, as an OSError
        raise FeatsteerError(f"{what} {path} is an existing file: give a folder path (it is created if missing)")
    if folder.is_dir():
        clear_stale_staging(folder)
        if any(folder.iterdir()):
            raise FeatsteerError(f"{what} {path} is not empty: {hidden_entries_note(folder) or 'choose a new path'}{hint}")


def staging_owner(folder: Path) -> dict | None:
    """The writer an output staging folder's `STAGING_MARKER` records (`pid`, `host`, `started`), or None when `folder`
    is not one: not a real folder named `.partial-*` or `.NAME.partial-*`, or without a marker featsteer wrote."""
    if not (folder.name.startswith(".") and ".partial-" in folder.name) or folder.is_symlink() or not folder.is_dir():
        return None
    marker = folder / STAGING_MARKER
    try:
        record = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() and not marker.is_symlink() else None
    except (OSError, ValueError):
        return None
    if not (isinstance(record, dict) and record.get("writer") == "featsteer" and isinstance(record.get("host"), str)
            and type(record.get("pid")) is int):
        return None
    return record


def staging_is_stale(owner: Mapping[str, object]) -> bool:
    """Whether the run that wrote a staging folder (`staging_owner`) is provably gone: it ran on this machine and its
    process no longer runs (or its process id now belongs to a process started at another time). A run on another
    machine cannot be asked, and counts as alive; so does one under another kernel or process-id namespace than this
    process's (`kernel`, `_kernel_id`): another machine of the same host name (two VMs named "ubuntu" sharing a folder), or a
    container sharing the host name (`docker run --network host`), whose process ids mean other processes here. A
    record without `kernel` (an older featsteer's) is judged by host name and process alone."""
    if owner["host"] != socket.gethostname() or os.name == "nt":  # on Windows, os.kill(pid, 0) would end the process
        return False
    if owner.get("kernel") is not None and owner["kernel"] != _kernel_id():
        return False
    pid = int(owner["pid"])  # type: ignore[call-overload]
    if not process_alive(pid):
        return True
    started = owner.get("started")
    return started is not None and _process_start(pid) not in (None, started)


def remove_if_stale_staging(folder: Path) -> bool:
    """Remove `folder` when it is an output staging folder whose run is provably gone (`staging_is_stale`), its marker
    last, so a removal stopped half way leaves a folder still known as a stopped run's. Returns whether it was removed."""
    owner = staging_owner(folder)
    if owner is None or not staging_is_stale(owner):
        return False
    logger.warning("removing %s, which a featsteer run (process %s on this machine) was writing when it was stopped", folder, owner["pid"])
    for entry in folder.iterdir():
        if entry.name == STAGING_MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (folder / STAGING_MARKER).unlink()
        folder.rmdir()
    return not folder.exists()


def remove_stale_staging(folder: Path, name: str | None = None) -> None:
    """Remove the output staging folders in `folder` whose run is provably gone (`remove_if_stale_staging`): those built
    for `name` beside it (`.NAME.partial-*`), or with None those built inside `folder` itself (`.partial-*`), whatever
    else `folder` holds."""
    for leftover in folder.glob(".partial-*" if name is None else f".{glob.escape(name)}.partial-*"):
        remove_if_stale_staging(leftover)


def remove_stale_named_staging(folder: Path) -> None:
    """Remove every output staging folder built beside an output in `folder` (`.NAME.partial-*`, whatever NAME) whose run
    is provably gone (`remove_if_stale_staging`): for an output folder featsteer fills with named outputs (one SAE per
    hook), where a killed run's leftover for an output no later run asks for would otherwise stay for ever. Folders
    without featsteer's marker, or of a run that may still write, stay."""
    for leftover in folder.glob(".*.partial-*"):
        remove_if_stale_staging(leftover)


def clear_stale_staging(folder: Path) -> None:
    """When everything in the existing folder `folder` is output staging folders, remove those whose run is provably gone
    (`remove_if_stale_staging`): what a run killed while it wrote into `folder` left there. Anything else - a file, a
    folder without featsteer's marker, a staging folder of a run that may still write - keeps every entry in place."""
    entries = list(folder.iterdir())
    if entries and all(staging_owner(entry) is not None for entry in entries):
        for entry in entries:
            remove_if_stale_staging(entry)


def hidden_entries_note(folder: Path, shown: str | os.PathLike[str] | None = None) -> str | None:
    """When the non-empty `folder` (given as `shown`) holds only hidden entries, which plain `ls` does not list: what each
    one is and the command that removes them; None when it holds a visible one."""
    entries = sorted(folder.iterdir())
    if not entries or not all(entry.name.startswith(".") for entry in entries):
        return None
    base = Path(folder if shown is None else shown)
    described = ", ".join(_describe_hidden(entry) for entry in entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    command = "rm -r " + " ".join(shlex.quote(str(base / entry.name)) for entry in entries)
    return (f"it holds only hidden entries, which plain `ls` does not list: {described}; if no run is writing there, "
            f"remove {'it' if len(entries) == 1 else 'them'} with `{command}`, or choose a new path")


def _describe_hidden(entry: Path) -> str:
    owner = staging_owner(entry)
    if owner is None:
        if ".partial-" in entry.name and entry.is_dir():
            return f"{entry.name} (a staging folder that records no writer: one an older featsteer left when it was stopped?)"
        return f"{entry.name} (a hidden {'folder' if entry.is_dir() else 'file'})"
    pid, host = owner["pid"], owner["host"]
    if host != socket.gethostname():
        return f"{entry.name} (the staging folder of a featsteer run on {host}, process {pid}, which cannot be checked from here)"
    if owner.get("kernel") is not None and owner["kernel"] != _kernel_id():
        return (f"{entry.name} (the staging folder of a featsteer run in another container or machine named {host}, process {pid}, "
                "which cannot be checked from here)")
    if staging_is_stale(owner):
        return f"{entry.name} (the staging folder of a featsteer run, process {pid}, that was stopped before it finished)"
    return f"{entry.name} (the staging folder of a featsteer run still running as process {pid})"


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@functools.cache
def _kernel_id() -> str | None:
    """This process's kernel boot and process-id namespace as 12 hex digits (a hash of Linux's
    `/proc/sys/kernel/random/boot_id` and `/proc/self/ns/pid`), or None where neither can be read (macOS, Windows): only
    a process that shares both can ask whether a recorded process id still runs."""
    parts = []
    for read in (lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip(), lambda: os.readlink("/proc/self/ns/pid")):
        try:
            parts.append(read())
        except OSError:
            parts.append("")
    if not any(parts):
        return None
    return hashlib.blake2s("|".join(parts).encode(), digest_size=6).hexdigest()


def _process_start(pid: int) -> int | None:
    """When process `pid` started, in clock ticks after boot (Linux `/proc/PID/stat`), or None where that cannot be
    read: with the process id, it tells the process that wrote a staging folder from a later one given the same id."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None
