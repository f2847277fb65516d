"""A study tracked by a real `mlflow server` on 127.0.0.1 (HTTP), as on a cluster."""

from __future__ import annotations

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Any:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not come up")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


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
