"""The study's lock: ``flock`` on ``<study>/.lock``, held by a launch (and by ``sync``) for as long
as it runs. It dies with its holder, so a lock left by a killed driver is taken over; the file
names the holder ("pid N on HOST since ...") for the messages of those it keeps out."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from bdx_study.space import SpaceError


@contextlib.contextmanager
def study_lock(study_dir: Path, name: str, command: str = "launch") -> Iterator[None]:
    """Hold the study's lock for the whole launch: a second launch of the same study is refused
    at once. The lock (``flock`` on ``<study>/.lock``) dies with its holder, so a lock left by a
    killed driver is taken over."""
    created = [p for p in (study_dir, *study_dir.parents) if not p.exists()]  # to remove if nothing starts
    study_dir.mkdir(parents=True, exist_ok=True)
    path = study_dir / ".lock"
    f = open(path, "a+")  # noqa: SIM115 - held open for the block
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "holder unknown"
            then = (
                "wait for it to finish or stop it, then resume with --resume"
                if command == "launch"
                else f"run `bdx-study {command}` once it finishes (the launch logs to MLflow itself meanwhile)"
            )
            raise SpaceError(
                f"study {name!r} at {study_dir} is being run by another bdx-study launch ({holder}); {then}"
            ) from None
        f.seek(0)
        previous = f.read().strip()
        if previous:
            print(f"[bdx-study] taking over the study's lock from a launch that is no longer running ({previous})")
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            f.flush()
            if not any(p.name != ".lock" for p in study_dir.iterdir()):
                path.unlink(missing_ok=True)  # nothing was started: leave no folder behind
                for folder in created:
                    with contextlib.suppress(OSError):
                        folder.rmdir()  # only if empty
    finally:
        f.close()


def running_launch(study_dir: Path) -> str | None:
    """The holder of the study's lock ("pid N on HOST since ...") while a launch of it runs, else
    None. Creates nothing and holds nothing (a shared lock, tried and let go at once)."""
    path = study_dir / ".lock"
    try:
        f = open(path)  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return None
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "holder unknown"
    return None
