"""File helpers shared by the caches, the tables and the bundles: hashes and the one atomic writer.

Every file or folder bdx-study writes for others to read appears whole or not at all: it is
written under a temporary name in the same folder and renamed into place (``os.replace`` for a
file; ``os.rename`` for a folder, which fails if another writer got there first).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

_SPECIAL = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def special_kind(path: Path) -> str | None:
    """What ``path`` is if it exists and is neither a regular file nor a folder (a FIFO, a device,
    a socket): such a file is never opened as data (reading could block forever or never end)
    nor replaced by a write. None otherwise (links are followed)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return next((what for test, what in _SPECIAL if test(mode)), None)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(data: Any) -> str:
    """Hash of a JSON value in canonical form (sorted keys, no spaces)."""
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds the file is renamed onto
    ``path`` (readers see the old file or the whole new one), when it fails it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``final``; when the block succeeds it is renamed to
    ``final``. If ``final`` appeared meanwhile (another process stored the same content-addressed
    entry), the new copy is discarded and theirs is kept."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        with contextlib.suppress(OSError):  # a complete entry is already there: keep it
            os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (``flock``) held for the block; released when the process
    dies, so a crashed holder never blocks others. Works across processes on one machine and on
    NFSv4 mounts shared by a cluster."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while the block writes something that is whole only once every
    part is written (a bundle replaced file by file, the manifest last): one that arrives
    meanwhile takes effect when the block ends. Outside the main thread, a plain block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    before = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if received:
            signal.raise_signal(received[0])


# A write that failed for want of space: the errno of an OSError, or the text libraries that wrap
# it give (safetensors: "No space left on device (os error 28)"; Ray's object store: OutOfDiskError).
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")


class DiskFullError(OSError):
    """A filesystem bdx-study writes to is full (or the user's quota is used up). Raised where it
    happened with what each of the places written holds free, so the driver can say so once,
    stop the study instead of retrying what cannot succeed, and keep what finished."""

    def __init__(self, text: str) -> None:
        super().__init__(errno.ENOSPC, text)

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[Any, ...]:  # crosses Ray's process boundary whole
        return (DiskFullError, (self.strerror,))


def _causes(e: BaseException | None) -> Iterator[BaseException]:
    """``e`` and the errors it wraps (a Ray task's ``cause``, ``raise ... from``, the context)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__


def is_disk_full(e: BaseException | None) -> bool:
    """Whether ``e``, or an error it wraps, is a full disk."""
    return any(
        (isinstance(c, OSError) and c.errno in _DISK_FULL_ERRNOS)
        or type(c).__name__ == "OutOfDiskError"
        or any(t in str(c) for t in _DISK_FULL_TEXTS)
        for c in _causes(e)
    )


def disk_full_error(e: BaseException, places: dict[str, Path] | None = None) -> DiskFullError:
    """The :class:`DiskFullError` raised where the disk filled up (a Ray task's error wraps it),
    or one made here from ``e``: the file it failed to write, and what its folder and ``places``
    (where the command writes) hold free."""
    # exactly DiskFullError, not Ray's wrapper of it (whose text is the remote traceback)
    found = next((c for c in _causes(e) if type(c) is DiskFullError), None)
    if found is not None:
        return found
    where = getattr(e, "filename", None)
    places = {**({"its folder": Path(where).parent} if where else {}), **(places or {})}
    text = f"no space left on device{f' writing {where}' if where else ''} ({type(e).__name__})"
    return DiskFullError(f"{text}; free space now: {free_space(places)}" if places else text)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_space(places: dict[str, Path]) -> str:
    """What each filesystem among ``places`` (name -> folder) holds free now, least first;
    places on one filesystem are named together."""
    by_device: dict[int, tuple[int, int, list[str]]] = {}
    for name, path in places.items():
        existing = Path(path)
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            device, usage = os.stat(existing).st_dev, shutil.disk_usage(existing)
        except OSError:
            continue
        by_device.setdefault(device, (usage.free, usage.total, []))[2].append(f"{name} {path}")
    rows = sorted(by_device.values(), key=lambda r: r[0])
    return "; ".join(f"{', '.join(names)}: {_size(free)} free of {_size(total)}" for free, total, names in rows)


@contextlib.contextmanager
def disk_full_reported(what: str, places: dict[str, Path]) -> Iterator[None]:
    """Turn a full disk met in the block (whatever library's error carries it) into one
    :class:`DiskFullError` saying where (``what``, this host) and what ``places`` hold free."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise DiskFullError(
            f"no space left on device while {what} on {socket.gethostname()} ({type(e).__name__}); "
            f"free space now (the write needed more): {free_space(places)}"
        ) from e


def short_error(e: BaseException, limit: int = 240) -> str:
    """``Type: first line of the message`` (MLflow's SQL errors run to pages)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."
