"""A real two-node Ray cluster on this machine (a head and a second node started with `ray start`,
one CPU each), a real `mlflow server`, and studies launched against them with --address, as on
a cluster: trials run on both nodes and log over HTTP; a worker node lost in mid-trial and a
driver killed and resumed leave every finished trial in MLflow and Parquet exactly once, and no
victim or fitted component is trained twice."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from .conftest import tiny_study, write_study
from .test_mlflow_server import MlflowServer
from .test_reliability import _free_port, _start, _wait_for

pytestmark = pytest.mark.slow  # starts Ray nodes or servers of its own


class TwoNodes:
    """`ray start --head` plus a second `ray start` joining it, each its own process group."""

    def __init__(self, root: Path) -> None:
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp = Path(f"/tmp/bdxc-{os.getpid()}-{self.port}")  # short: Ray's socket paths
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("TUNE_DISABLE_AUTO_INIT", None)
        self.head = self._start(
            ["--head", f"--port={self.port}", "--include-dashboard=false", f"--temp-dir={self.temp}"], root / "head"
        )
        self._wait_port()
        self.worker = self._start([f"--address={self.address}", '--resources={"second_node": 1}'], root / "worker")
        self._wait_nodes(2)

    def _start(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log.with_suffix(".log"), "wb") as out:
            return subprocess.Popen(
                ["ray", "start", "--block", "--num-cpus=1", *args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_port(self) -> None:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("the head node did not come up")

    def alive_nodes(self) -> int:
        code = (
            f"import ray; ray.init(address='{self.address}', logging_level='ERROR');"
            "print(sum(n['Alive'] for n in ray.nodes()))"
        )
        p = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
        return int(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else -1

    def _wait_nodes(self, n: int) -> None:
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.alive_nodes() == n:
                return
            time.sleep(1)
        raise RuntimeError(f"the cluster did not reach {n} nodes")

    def _worker_tree(self) -> list[Any]:
        """The second node's processes: its `ray start`, raylet and agents, and the Ray workers
        its raylet started (in process groups of their own)."""
        import psutil

        try:
            return [psutil.Process(self.worker.pid), *psutil.Process(self.worker.pid).children(recursive=True)]
        except psutil.Error:
            return []

    def running_on_worker(self) -> bool:
        """A trial is executing on the second node (Ray titles a busy trial actor so)."""
        import psutil

        for p in self._worker_tree():
            try:
                if p.cmdline()[:1] == ["ray::ImplicitFunc.train"]:
                    return True
            except (psutil.Error, IndexError):
                continue
        return False

    def kill_worker(self) -> None:
        """The second node is lost, as a machine would be: every one of its processes at once."""
        import psutil

        for p in self._worker_tree():
            with contextlib.suppress(psutil.Error):
                p.kill()
        self.worker.wait()

    def stop(self) -> None:
        for p in (self.worker, self.head):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip().endswith(f":{self.port}"):
            current.unlink()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[TwoNodes]:
    c = TwoNodes(tmp_path)
    yield c
    c.stop()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[MlflowServer]:
    s = MlflowServer(tmp_path)
    s.start()
    yield s
    s.stop()


def _study(tmp_path: Path, server: MlflowServer, name: str, n: int, **overrides: Any) -> Path:
    doc = tiny_study(tmp_path, name=name, search__num_trials=n, search__max_concurrent=2, **overrides)
    doc["tracking"]["uri"] = server.url
    return write_study(tmp_path, doc)


def _check_exactly_once(study_dir: Path, server: MlflowServer, n: int) -> Any:
    trials = pq.read_table(study_dir / "tables" / "trials.parquet").to_pandas()
    assert trials["trial_id"].nunique() == n and not trials.duplicated(["trial_id", "victim_id"]).any()
    ids = json.loads((study_dir / "study.json").read_text())
    runs = MlflowClient(server.url).search_runs(
        [ids["experiment_id"]], filter_string="tags.`bdx.kind` = 'trial'", max_results=100
    )
    assert sorted(r.data.tags["bdx.trial_id"] for r in runs) == sorted(set(trials["trial_id"]))
    assert all(r.info.status == "FINISHED" for r in runs)
    return trials


def _check_fitted_once(storage: Path, trials: Any) -> None:
    """Each victim trained once; each fitted component stored once, and fitted once in all (the
    trials' stages_fitted add up to the entries: a retried trial found what it had fitted)."""
    victims = [p for p in (storage / "victims").iterdir() if not p.name.startswith(".")]
    assert len(victims) == trials["victim_id"].nunique()
    entries = [p for p in (storage / "stages").glob("*/*") if p.is_dir() and p.name != "model"]
    keys = {k for s in trials["stage_keys"] for k in json.loads(s).values()}
    assert len(entries) == len(keys)
    assert int(trials["stages_fitted"].sum()) <= len(entries)


def test_trials_run_on_both_nodes_and_log_over_http(tmp_path: Path, cluster: TwoNodes, server: MlflowServer) -> None:
    path = _study(tmp_path, server, "two-nodes", 4)
    p = subprocess.run(
        [sys.executable, "-m", "bdx_study.cli", "launch", "--space", str(path), "--address", cluster.address],
        cwd=tmp_path,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    study_dir = tmp_path / "runs" / "studies" / "two-nodes"
    trials = _check_exactly_once(study_dir, server, 4)
    assert trials["node"].nunique() == 2  # the two Ray nodes' ids
    _check_fitted_once(tmp_path / "runs", trials)


def test_worker_node_lost_in_mid_trial(tmp_path: Path, cluster: TwoNodes, server: MlflowServer) -> None:
    n = 6
    path = _study(tmp_path, server, "lost-node", n)
    study_dir = tmp_path / "runs" / "studies" / "lost-node"
    parts = study_dir / "tables" / "parts" / "trials"
    driver = _start(["launch", "--space", str(path), "--address", cluster.address], tmp_path, tmp_path / "d.log")
    try:
        _wait_for(lambda: len(list(parts.glob("*.parquet"))) >= 1 and cluster.running_on_worker(), driver, 600)
        cluster.kill_worker()  # in mid-trial
        assert driver.wait(timeout=900) == 0, (tmp_path / "d.log").read_text()[-3000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    log = (tmp_path / "d.log").read_text()
    assert "is retried" in log, log[-3000:]  # the lost trial ran again, on the head
    trials = _check_exactly_once(study_dir, server, n)
    _check_fitted_once(tmp_path / "runs", trials)


def test_driver_killed_then_resumed_on_the_same_cluster(
    tmp_path: Path, cluster: TwoNodes, server: MlflowServer
) -> None:
    n = 5
    path = _study(tmp_path, server, "driver-killed", n)
    study_dir = tmp_path / "runs" / "studies" / "driver-killed"
    parts = study_dir / "tables" / "parts" / "trials"
    driver = _start(["launch", "--space", str(path), "--address", cluster.address], tmp_path, tmp_path / "d.log")
    try:
        _wait_for(lambda: len(list(parts.glob("*.parquet"))) >= 1, driver, timeout=600)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert len(list(parts.glob("*.parquet"))) < n
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "bdx_study.cli",
            "launch",
            "--space",
            str(path),
            "--resume",
            "--address",
            cluster.address,
        ],
        cwd=tmp_path,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    trials = _check_exactly_once(study_dir, server, n)
    _check_fitted_once(tmp_path / "runs", trials)
