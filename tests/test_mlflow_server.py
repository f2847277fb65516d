"""A study tracked by a real `mlflow server` on 127.0.0.1 (HTTP), as on a cluster."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from bdx_study.space import load_space
from bdx_study.trials.launch import launch

from .conftest import tiny_study, write_study

pytestmark = pytest.mark.slow  # starts Ray nodes or servers of its own


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MlflowServer:
    """A real `mlflow server` (SQLite backend, proxied artifacts) that a test can stop and start."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backend-store-uri",
                f"sqlite:///{self.root / 'server.db'}",
                "--artifacts-destination",
                str(self.root / "server-artifacts"),
                "--workers",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail("mlflow server did not come up")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its workers
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def server(tmp_path: Path) -> Any:
    s = MlflowServer(tmp_path)
    s.start()
    yield s
    s.stop()


@pytest.fixture
def mlflow_server(server: MlflowServer) -> str:
    return server.url


def test_study_logs_to_an_mlflow_server(ray_cluster: Any, tmp_path: Path, mlflow_server: str) -> None:
    doc = tiny_study(tmp_path, name="served", search__num_trials=2)
    doc["tracking"]["uri"] = mlflow_server
    path = write_study(tmp_path, doc)
    result = launch(load_space(path), source=path)
    assert result.num_errors == 0 and result.tracking_uri == mlflow_server
    client = MlflowClient(mlflow_server)
    trials = client.search_runs([result.experiment_id], filter_string="tags.`bdx.kind` = 'trial'")
    assert len(trials) == 2
    for run in trials:
        assert run.info.status == "FINISHED"
        assert "worst/auroc_correct_only" in run.data.metrics
        # artifacts went through the server (proxied), not to a local path of the client
        names = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert names == {"plots/trial.png"}
    assert any((tmp_path / "server-artifacts").rglob("trial.png"))


def test_server_stopped_mid_study_then_sync(
    ray_cluster: Any, tmp_path: Path, server: MlflowServer, capsys: Any
) -> None:
    """The tracking server dies while trials run: the study finishes, Parquet keeps every trial,
    the outage is reported once (not per call) and in the final summary; once the server is back,
    `bdx-study sync` logs what is missing and no run stays RUNNING."""
    import threading

    from bdx_study.cli import main as cli

    n = 4
    doc = tiny_study(tmp_path, name="outage-mid", search__num_trials=n, search__max_concurrent=1)
    doc["tracking"]["uri"] = server.url
    path = write_study(tmp_path, doc)
    spec = load_space(path)
    parts = spec.study_dir / "tables" / "parts" / "trials"

    def kill_after_first_trial() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not list(parts.glob("*.parquet")):
            time.sleep(0.1)
        server.stop()

    killer = threading.Thread(target=kill_after_first_trial)
    killer.start()
    result = launch(spec, source=path)
    killer.join()
    out = capsys.readouterr().out
    assert result.num_errors == 0 and result.num_trials == n
    assert len(list(parts.glob("*.parquet"))) == n  # Parquet keeps everything
    assert out.count("WARNING: MLflow") <= 2, out  # one warning for the outage, not one per call
    assert "bdx-study sync" in out  # the final summary says what to do

    server.start()  # the same store, back on the same port
    assert cli(["sync", "--space", str(path)]) == 0
    client = MlflowClient(server.url)
    runs = client.search_runs([result.experiment_id], filter_string="tags.`bdx.kind` = 'trial'", max_results=100)
    assert sorted(r.data.tags["bdx.trial_id"] for r in runs) == sorted(p.stem for p in parts.glob("*.parquet"))
    assert all(r.info.status == "FINISHED" and "worst/auroc_correct_only" in r.data.metrics for r in runs)
    study_runs = client.search_runs([result.experiment_id], filter_string="tags.`bdx.kind` = 'study'")
    assert [r.info.status for r in study_runs] == ["FINISHED"]
