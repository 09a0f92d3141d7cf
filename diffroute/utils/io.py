"""Atomic file writes and friendly JSON reading, shared by schedules, results and checkpoints."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` so that readers see the old file or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are for others to read too, as open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def readable_by_others(path: str | os.PathLike) -> None:
    """Give `path` (a file, or a folder and all below it) the permissions a plain open()/mkdir() would have under
    the umask: temporary files and folders (mkstemp, mkdtemp, safetensors) are made private (0600/0700)."""
    path, mask = Path(path), _umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it (and put it back at once)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def read_json(path: str | os.PathLike, what: str = "JSON file", max_bytes: int | None = None) -> Any:
    """Read JSON, turning a missing, oversized or broken file into an error that says which file and what is wrong."""
    from diffroute.errors import InputError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist.")
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise InputError(f"{what} {str(path)!r} is {path.stat().st_size} bytes; the limit is {max_bytes}.")
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f"line {e.lineno}, column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise InputError(f"{what} {str(path)!r} is not valid JSON ({where}).") from e
    except RecursionError as e:
        raise InputError(f"{what} {str(path)!r} nests too deeply to be a valid file.") from e


def read_prompt_lines(path: str | os.PathLike) -> list[str]:
    """The non-blank lines of a prompts file, stripped; a clear ValueError/FileNotFoundError for a missing path,
    something that is not a regular file (a folder, /dev/null, a pipe), non-UTF-8 bytes or no prompts at all."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompts file {str(path)!r} does not exist.")
    if not path.is_file():
        raise ValueError(f"prompts file {str(path)!r} is not a regular file: give a text file, one prompt per line.")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise ValueError(f"prompts file {str(path)!r} is not UTF-8 text.") from None
    if not lines:
        raise ValueError(f"prompts file {str(path)!r} has no prompts (one per line).")
    return lines


_HELD: list = []  # open lock files of the folders this process writes (released when the process ends)
_HELD_PATHS: set[str] = set()


def hold_folder(path: str | os.PathLike, flag: str = "--out") -> None:
    """Claim `path` for this run: a second run writing the same folder at the same time is refused (ValueError),
    not interleaved. An advisory lock on `path/.lock`, released by the OS when the process ends, however it ends
    (so a killed run leaves nothing to clean up). Only the main process of a multi-process launch claims it."""
    import fcntl

    if os.environ.get("RANK", "0") != "0":
        return
    path = Path(path)
    key = str(path.resolve())
    if key in _HELD_PATHS:  # already ours (flock would refuse a second descriptor of this very process)
        return
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ValueError(
            f"{flag} {str(path)!r} is being written by another run right now: wait for it to finish, or give "
            "another folder."
        ) from None
    _HELD.append(fd)
    _HELD_PATHS.add(key)
