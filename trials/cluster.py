"""Ray for a study: which cluster the driver joins, and what happens to Ray's processes when the
driver dies.

- Without ``--address`` the driver starts its own local Ray (``address="local"``): it never
  joins another program's cluster, nor a stale one a crashed cluster left behind.
  ``--address auto`` joins the local cluster ``ray start`` made; ``--address HOST:PORT`` a
  remote one, probed first so that a wrong address fails in seconds: something must listen there
  and answer as a gRPC server does (a Ray GCS is one), and joining gets ``JOIN_TIMEOUT_S``.
- Every process of a local Ray started by a launch carries an environment marker naming the
  study and the launch. A small watchdog outlives a killed driver and stops them; the next
  launch of the study stops any that are still there (Ray's agents ignore SIGTERM).
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bdx_study.space import SpaceError

MARKER = "BDX_STUDY_RAY"  # environment variable: "<study dir>|<launch id>"
CURRENT_CLUSTER_FILE = Path("/tmp/ray/ray_current_cluster")  # written by `ray start`
PROBE_TIMEOUT_S = 5.0
ANSWER_TIMEOUT_S = 3.0  # a gRPC server answers HTTP/2's preface at once
JOIN_TIMEOUT_S = 60.0  # ray.init's own wait on a cluster that answered the probe
# HTTP/2's client connection preface and an empty SETTINGS frame: a gRPC server (a Ray GCS is one)
# answers with its own SETTINGS frame (9-byte header: length 3 bytes, type 0x4, flags, stream 0).
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def probe_address(address: str) -> str:
    """The concrete ``HOST:PORT`` of ``address`` ("auto" = the local `ray start` cluster), after
    checking that something listens there; a clear error otherwise."""
    if address == "auto":
        if not CURRENT_CLUSTER_FILE.is_file():
            raise SpaceError(
                "--address auto: no local Ray cluster (start one with `ray start --head`, or leave out --address "
                "to let bdx-study start its own)"
            )
        address = CURRENT_CLUSTER_FILE.read_text().strip()
    if address.startswith("ray://"):
        return address  # Ray Client: its own handshake
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SpaceError(f"--address {address!r}: expected HOST:PORT (e.g. 10.0.0.1:6379), 'auto' or ray://HOST:PORT")
    try:
        sock = socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S)
    except OSError as e:
        raise SpaceError(
            f"--address {address}: no Ray cluster reachable there ({e.strerror or e}); check the head node's "
            "address, or leave out --address to let bdx-study start its own local Ray"
        ) from None
    with sock:
        if os.environ.get("RAY_USE_TLS", "0").lower() not in ("1", "true"):  # TLS: Ray's own handshake
            _check_grpc(sock, address)
    return address


def _check_grpc(sock: socket.socket, address: str) -> None:
    """Refuse, within ``ANSWER_TIMEOUT_S``, a port that is not a gRPC server (an HTTP/1 server, a
    database, a port that accepts and says nothing): Ray would wait minutes on it."""
    sock.settimeout(ANSWER_TIMEOUT_S)
    head = b""
    try:
        sock.sendall(HTTP2_PREFACE)
        while len(head) < 9 and (chunk := sock.recv(9 - len(head))):
            head += chunk
    except TimeoutError:
        what = f"it accepts connections but sent nothing back in {ANSWER_TIMEOUT_S:g} s"
    except OSError as e:
        what = f"the connection failed ({e.strerror or e})"
    else:
        if len(head) == 9 and head[3] == 0x4 and head[5:] == bytes(4):  # a SETTINGS frame on stream 0
            return
        first = head.split(b"\r\n")[0].decode("ascii", "replace")
        what = f"it answered {first!r}, not HTTP/2" if head else "it closed the connection without an answer"
    raise SpaceError(
        f"--address {address}: not a Ray cluster: {what}, where a Ray GCS answers as a gRPC (HTTP/2) server; give "
        "the head node's GCS address (`ray start --head` prints it; port 6379 by default), or leave out --address "
        "to let bdx-study start its own local Ray"
    )


@contextlib.contextmanager
def deadline(seconds: float, message: str) -> Iterator[None]:
    """Raise ``SpaceError(message)`` in the main thread if the block is still running after
    ``seconds``. It takes effect when Python code runs again: a C call in progress (one of Ray's
    connection attempts) ends first. Ctrl-C and SIGTERM still interrupt the block as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    lock = threading.Lock()
    state = {"done": False, "fired": False}

    def fire() -> None:
        with lock:
            if not state["done"]:
                state["fired"] = True
                _thread.interrupt_main()

    # The timer interrupts the main thread as Ctrl-C does; whatever handler SIGINT had before
    # (a library may have left one that only sets a flag) must not swallow it.
    on_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        try:
            yield
        finally:
            with lock:
                state["done"] = True
            timer.cancel()
            signal.signal(signal.SIGINT, on_int if on_int is not None else signal.SIG_DFL)
    except KeyboardInterrupt:
        if state["fired"]:
            raise SpaceError(message) from None
        raise


def init_ray(address: str | None, study_dir: Path) -> None:
    """Join ``address`` or start a private local Ray (with a watchdog against orphans)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "logging_level": "WARNING"}
    on_term = signal.getsignal(signal.SIGTERM)  # Ray replaces it with a handler that aborts
    try:
        if address:
            _join(address, kwargs)
            return
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster on loopback
        marker = f"{study_dir}|{uuid.uuid4().hex}"
        os.environ[MARKER] = marker  # inherited by every process of the local Ray
        ray.init(address="local", object_store_memory=256 * 2**20, **kwargs)
    finally:
        if threading.current_thread() is threading.main_thread():  # SIG_DFL too: Ray's would stay
            signal.signal(signal.SIGTERM, on_term if on_term is not None else signal.SIG_DFL)
    subprocess.Popen(
        [sys.executable, "-m", "bdx_study.trials.cluster", str(os.getpid()), marker],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _join(address: str, kwargs: dict[str, Any]) -> None:
    """ray.init on a cluster that answered the probe, within ``JOIN_TIMEOUT_S``."""
    import ray

    target = probe_address(address)
    try:
        with deadline(
            JOIN_TIMEOUT_S,
            f"--address {address}: Ray did not finish joining the cluster there in {JOIN_TIMEOUT_S:g} s (a gRPC "
            f"service that is not a Ray GCS, or a cluster of another Ray version than this one's {ray.__version__}?); "
            "check the head node's address and its Ray version",
        ):
            ray.init(address=target, **kwargs)
    except SpaceError:
        ray.shutdown()
        raise


def _marked(prefix: str, exclude: str | None = None) -> list[Any]:
    """This machine's processes whose marker starts with ``prefix`` (but is not ``exclude``)."""
    import psutil

    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            value = p.environ().get(MARKER)
            if value and value.startswith(prefix) and value != exclude and p.pid != os.getpid():
                found.append(p)
    return found


def _kill(procs: list[Any]) -> int:
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=10)
    return len(procs)


def stop_orphans(study_dir: Path) -> int:
    """Stop the local Ray processes an earlier launch of this study left running (its driver was
    killed). Call while holding the study's lock: no other launch of it is alive."""
    current = os.environ.get(MARKER)
    return _kill(_marked(f"{study_dir}|", exclude=current))


def _watch(driver_pid: int, marker: str) -> None:
    """Wait for the driver to end, then stop what its local Ray left behind."""
    while True:
        try:
            os.kill(driver_pid, 0)
        except ProcessLookupError:
            break
        except PermissionError:
            pass
        time.sleep(1.0)
    time.sleep(2.0)  # a clean shutdown is already stopping them
    _kill(_marked(marker))


if __name__ == "__main__":  # the watchdog: python -m bdx_study.trials.cluster DRIVER_PID MARKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _watch(int(sys.argv[1]), sys.argv[2])
