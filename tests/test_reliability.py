"""Data safety and bad input, as a careless or hostile user meets them through the CLI: every case
of docs/reliability.md. Nothing is lost, duplicated or silently overwritten; every refusal is one
clear message naming the file, key or value, with no traceback, before any work starts."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from bdx_study.space import load_space
from bdx_study.trials.launch import launch

from .conftest import tiny_study, write_study
from .test_cli import run_cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TUNE_DISABLE_AUTO_INIT", None)
    return env


def _start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "bdx_study.cli", *args],
            cwd=cwd,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_for(predicate: Any, proc: subprocess.Popen[bytes], timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, "the launch ended before the test could interfere"
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def _marked_processes(study_dir: Path) -> list[int]:
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("BDX_STUDY_RAY", "").startswith(f"{study_dir}|"):
                out.append(p.pid)
        except psutil.Error:
            continue
    return out


def _trial_runs(uri: str, experiment_id: str) -> list[Any]:
    return MlflowClient(uri).search_runs([experiment_id], filter_string="tags.`bdx.kind` = 'trial'", max_results=200)


# ------------------------------------------------------------------------------ 1. two launches at once


@pytest.mark.slow
def test_second_launch_of_a_running_study_is_refused(tmp_path: Path) -> None:
    n = 12  # long enough to be running while the second launches try
    doc = tiny_study(tmp_path, name="twice", search__num_trials=n, search__max_concurrent=1)
    path = write_study(tmp_path, doc)
    study_dir = tmp_path / "runs" / "studies" / "twice"
    first = _start(["launch", "--space", str(path)], tmp_path, tmp_path / "first.log")
    try:
        _wait_for(lambda: (study_dir / "study.json").is_file(), first)
        t = time.perf_counter()
        code, out, _ = run_cli("launch", "--space", str(path), cwd=tmp_path)
        assert time.perf_counter() - t < 30
        assert code == 2 and "being run by another bdx-study launch" in out and "Traceback" not in out, out
        code, out, _ = run_cli("launch", "--space", str(path), "--resume", cwd=tmp_path)
        assert code == 2 and "being run by another bdx-study launch" in out, out
        assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    trials = pq.read_table(study_dir / "tables" / "trials.parquet").to_pandas()
    assert trials["trial_id"].nunique() == n and not trials.duplicated(["trial_id", "victim_id"]).any()
    ids = json.loads((study_dir / "study.json").read_text())
    assert ids["experiment_id"] and ids["parent_run_id"]  # not rewritten by the refused launch
    assert len(_trial_runs(ids["tracking_uri"], ids["experiment_id"])) == n


@pytest.mark.slow
def test_a_lock_left_by_a_dead_driver_is_taken_over(ray_cluster: Any, tmp_path: Path, capsys: Any) -> None:
    doc = tiny_study(tmp_path, name="stale", search__num_trials=1)
    path = write_study(tmp_path, doc)
    spec = load_space(path)
    spec.study_dir.mkdir(parents=True)
    (spec.study_dir / ".lock").write_text("pid 999999 on a-host since 2026-01-01 00:00:00")  # nobody holds it
    on_int = signal.getsignal(signal.SIGINT)
    assert launch(spec, source=path).num_errors == 0
    assert "taking over the study's lock" in capsys.readouterr().out
    # Tune's own SIGINT handler (it only flags its run) does not outlive the run: the next Ctrl-C
    # in this process (the quickstart's analyze and export) still interrupts
    assert signal.getsignal(signal.SIGINT) is on_int


# ------------------------------------------------------------------------------ 4. driver killed, resume


@pytest.mark.slow
def test_killed_driver_leaves_no_orphans_and_resume_logs_each_trial_once(tmp_path: Path) -> None:
    n = 4
    doc = tiny_study(tmp_path, name="killed2", search__num_trials=n, search__max_concurrent=2)
    path = write_study(tmp_path, doc)
    study_dir = tmp_path / "runs" / "studies" / "killed2"
    parts = study_dir / "tables" / "parts" / "trials"
    proc = _start(["launch", "--space", str(path)], tmp_path, tmp_path / "first.log")
    try:
        _wait_for(lambda: len(list(parts.glob("*.parquet"))) >= 1, proc)
        assert _marked_processes(study_dir), "the local Ray's processes carry the study's marker"
        os.kill(proc.pid, signal.SIGKILL)  # the driver only: its local Ray is orphaned
        proc.wait()
        deadline = time.time() + 30
        while _marked_processes(study_dir) and time.time() < deadline:
            time.sleep(0.5)
        assert not _marked_processes(study_dir), "the watchdog stopped what the killed driver left"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    code, out, _ = run_cli("launch", "--space", str(path), "--resume", cwd=tmp_path)
    assert code == 0, out[-3000:]
    progress = [line for line in out.splitlines() if "] trial " in line and "finished" in line]
    for line in progress:
        done, total = line.split("] trial ")[1].split()[0].split("/")
        assert int(done) <= int(total) == n, line
    trials = pq.read_table(study_dir / "tables" / "trials.parquet").to_pandas()
    finished = set(trials["trial_id"])
    assert not trials.duplicated(["trial_id", "victim_id"]).any()
    ids = json.loads((study_dir / "study.json").read_text())
    runs = _trial_runs(ids["tracking_uri"], ids["experiment_id"])
    run_ids = [r.data.tags["bdx.trial_id"] for r in runs]
    assert sorted(run_ids) == sorted(finished)  # each finished trial exactly once, nothing else
    assert all(r.info.status == "FINISHED" for r in runs)
    deadline = time.time() + 15  # the resumed launch's own Ray and watchdog end with it
    while _marked_processes(study_dir) and time.time() < deadline:
        time.sleep(0.5)
    assert not _marked_processes(study_dir)


def test_progress_counts_only_the_trials_tune_knows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A trial the killed driver started after Tune's last snapshot can finish on its orphaned
    worker: its rows reach the tables, but the resumed search never knew it. The progress line
    counts the search's own trials only (it once printed "trial 5/4")."""
    from ray.tune.experiment import Trial

    from bdx_study.space import parse_space
    from bdx_study.tables import StudyTables
    from bdx_study.trials.tracking import MlflowStudyCallback, StudyTracker

    from .test_tables import _rows, _scores

    spec = parse_space(tiny_study(tmp_path))  # 3 trials
    tables = StudyTables(spec.study_dir)
    for done in ("bdx_00000", "orphan_00009"):  # finished before the kill; the orphan after it
        tables.write_trial(done, _rows(done, 0.9), _scores(done, 4))
    config = {"detector": "badexpert", "unlearn_lr": 3e-4, "aux_lr": 0.05}
    trials = [Trial("__fake", config=config, trial_id=f"bdx_0000{i}", stub=True) for i in range(3)]
    tracker = StudyTracker(spec.tracking.uri or "", spec.experiment_name, spec.study.name)
    tracker.start({"space_file": "tiny.yaml"})
    callback = MlflowStudyCallback(tracker, spec, spec.study_dir)
    callback.setup()
    callback.on_trial_complete(0, trials, trials[1])
    out = capsys.readouterr().out
    assert "trial 2/3 bdx_00001 finished" in out, out  # bdx_00000 from the tables, bdx_00001 now
    callback.on_trial_complete(0, trials, trials[2])
    assert "trial 3/3 bdx_00002 finished" in capsys.readouterr().out


# ------------------------------------------------------------------------------ 5. unreadable stored result


@pytest.mark.slow
def test_an_unreadable_stored_result_is_run_again(ray_cluster: Any, tmp_path: Path) -> None:
    doc = tiny_study(tmp_path, name="truncated", search__num_trials=2)
    path = write_study(tmp_path, doc)
    spec = load_space(path)
    assert launch(spec, source=path).num_errors == 0
    parts = spec.study_dir / "tables" / "parts"
    victim, other = sorted((parts / "trials").glob("*.parquet"))
    before = other.stat().st_mtime_ns
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated
    again = launch(spec, source=path, resume=True)
    assert again.num_errors == 0
    table = pq.read_table(victim).to_pandas()  # readable again: the trial ran again
    assert table["trial_id"].nunique() == 1 and len(table) == 1
    assert other.stat().st_mtime_ns == before  # the intact trial was not re-run
    assert list((parts / "quarantine").glob(f"trials-{victim.stem}-*.parquet"))  # nothing is lost
    trials = pq.read_table(spec.study_dir / "tables" / "trials.parquet").to_pandas()
    assert trials["trial_id"].nunique() == 2
    runs = _trial_runs(again.tracking_uri, again.experiment_id)
    assert sorted(r.data.tags["bdx.trial_id"] for r in runs) == sorted(p.stem for p in (parts / "trials").glob("*"))
    assert all(r.info.status == "FINISHED" for r in runs)


def test_a_corrupt_parquet_page_is_named(tmp_path: Path) -> None:
    from bdx_study.tables import StudyTables, TableError

    t = StudyTables(tmp_path)
    f = t.part("scores", "abc")
    f.parent.mkdir(parents=True)
    f.write_bytes(b"PAR1" + os.urandom(200) + b"PAR1")
    with pytest.raises(TableError, match=str(f)):
        t.read("scores")


# ------------------------------------------------------------------------------ 6, 10. Ray addresses


def test_unreachable_address_fails_fast_and_writes_nothing(tmp_path: Path) -> None:
    path = write_study(tmp_path, tiny_study(tmp_path, name="nowhere"))
    for cmd in ("validate", "launch"):
        code, out, seconds = run_cli(cmd, "--space", str(path), "--address", "127.0.0.1:1", cwd=tmp_path)
        assert code == 2 and "127.0.0.1:1" in out and "no Ray cluster reachable" in out, out
        assert "Traceback" not in out
        assert seconds < 30
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_without_address_launch_starts_its_own_ray(tmp_path: Path) -> None:
    """A foreign cluster (`ray start` by another program, with no CPU to offer) and a stale
    RAY_ADDRESS are never joined; --address auto joins the local cluster on purpose."""
    port = _free_port()
    env = {**_env(), "RAY_AUTH_MODE": "disabled"}
    foreign = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=0", "--include-dashboard=false"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        path = write_study(tmp_path, tiny_study(tmp_path, name="own", search__num_trials=1))
        p = subprocess.run(
            [sys.executable, "-m", "bdx_study.cli", "launch", "--space", str(path)],
            cwd=tmp_path,
            env={**_env(), "RAY_ADDRESS": "127.0.0.1:1"},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        # joining the foreign cluster on purpose: it has no CPU for a trial, which launch says at once
        code, out, _ = run_cli(
            "launch", "--space", str(path), "--resume", "--address", f"127.0.0.1:{port}", cwd=tmp_path
        )
        assert code == 2 and "no Ray node has that" in out, out[-2000:]
    finally:
        os.killpg(foreign.pid, signal.SIGKILL)
        foreign.wait()
        current = Path("/tmp/ray/ray_current_cluster")  # `ray start` left its address behind
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


# ------------------------------------------------------------------------------ 7. a victim that learned nothing


def test_a_victim_no_better_than_chance_is_not_cached(tmp_path: Path) -> None:
    import torch

    from bdx_study.victims import (
        AttackSpec,
        DataConfig,
        TrainingConfig,
        VictimCache,
        VictimConfig,
        VictimError,
        check_learned,
    )

    cfg = VictimConfig(
        dataset="digits",
        architecture="small_cnn",
        attack=AttackSpec(name="badnet"),
        training=TrainingConfig(epochs=1, lr=1e-3),
        data=DataConfig(train_size=300),
    )
    with pytest.raises(VictimError, match=r"clean accuracy 0\.120, no better than chance \(0\.100\).*lr 0\.001"):
        check_learned(cfg, 0.12)
    check_learned(cfg, 0.5)
    broken = cfg.model_copy(update={"training": TrainingConfig(epochs=2, lr=1e3, optimizer="sgd")})
    cache = VictimCache(tmp_path)
    torch.manual_seed(0)
    with pytest.raises(VictimError, match="no better than chance"):
        cache.get_or_train(broken, device=torch.device("cpu"))
    assert cache.load(broken) is None and not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------ 8, 9. validate = launch


VALIDATE_CASES = {
    "reserve_beyond_test_portion": ({"data__reserve_size": 5000}, ["data.reserve_size", "5000", "700"]),
    "eval_size_beyond_what_is_left": ({"data__eval_size": 690}, ["data.eval_size", "690"]),
    "train_size_beyond_training_set": ({"data__train_size": 100000}, ["data.train_size", "100000", "1097"]),
    "cpus_no_machine_has": ({"resources__cpu": 1000}, ["resources.cpu", "1000"]),
    "gpus_no_machine_has": ({"resources__gpu": 2}, ["resources.gpu", "2"]),
    "train_size_not_an_integer": ({"data__train_size": 1e9}, ["data.train_size", "1000000000.0"]),
}


@pytest.mark.parametrize("case", sorted(VALIDATE_CASES))
def test_validate_refuses_what_launch_refuses(tmp_path: Path, case: str) -> None:
    overrides, needles = VALIDATE_CASES[case]
    doc = tiny_study(tmp_path, **overrides)
    path = write_study(tmp_path, doc)
    for cmd in ("validate", "launch"):
        code, out, _ = run_cli(cmd, "--space", str(path), cwd=tmp_path)
        assert code == 2, (cmd, out)
        assert str(path) in out and "Traceback" not in out, out
        for needle in needles:
            assert needle in out, (cmd, needle, out)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_storage_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    doc = tiny_study(tmp_path, study={"name": "s", "storage": str(tmp_path / "afile")})
    path = write_study(tmp_path, doc)
    for cmd in ("validate", "launch", "analyze"):
        code, out, _ = run_cli(cmd, "--space", str(path), cwd=tmp_path)
        assert code == 2 and "Traceback" not in out, out
        assert "afile" in out
    code, out, _ = run_cli("validate", "--space", str(path), cwd=tmp_path)
    assert "study.storage" in out and "not a folder" in out


# ------------------------------------------------------------------------------ 12. tracking URIs


def test_unreachable_tracking_server_fails_fast(tmp_path: Path) -> None:
    doc = tiny_study(tmp_path, name="untracked")
    doc["tracking"]["uri"] = "http://127.0.0.1:1"
    path = write_study(tmp_path, doc)
    code, out, seconds = run_cli("launch", "--space", str(path), cwd=tmp_path)
    assert code == 2 and "tracking.uri" in out and "127.0.0.1:1" in out and "cannot be reached" in out, out
    assert "Traceback" not in out and seconds < 40
    assert not (tmp_path / "runs" / "victims").exists()  # before any victim trains


# ------------------------------------------------------------------------------ SIGTERM


@pytest.mark.slow
def test_sigterm_stops_a_launch_cleanly(tmp_path: Path) -> None:
    """SIGTERM ends a launch like Ctrl-C, within seconds: Tune keeps its state, the study's MLflow
    run is closed as KILLED (not left RUNNING), the lock is released and --resume completes."""
    n = 6
    doc = tiny_study(tmp_path, name="termed", search__num_trials=n, search__max_concurrent=1)
    path = write_study(tmp_path, doc)
    study_dir = tmp_path / "runs" / "studies" / "termed"
    parts = study_dir / "tables" / "parts" / "trials"
    proc = _start(["launch", "--space", str(path)], tmp_path, tmp_path / "first.log")
    try:
        _wait_for(lambda: len(list(parts.glob("*.parquet"))) >= 1, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "first.log").read_text()
    # The driver ends without a traceback. A Ray worker that Ray's own shutdown SIGTERMs may print
    # "Exception ignored ... SystemExit" (Ray's worker handler raising inside a weakref callback;
    # seen under heavy load): its lines carry Ray's "(name pid=N)" prefix and are Ray's, not ours.
    driver = "\n".join(line for line in log.splitlines() if not re.search(r"\(\S+ pid=\d+(, ip=\S+)?\)", line))
    assert "interrupted" in driver and "Traceback" not in driver, log[-3000:]
    ids = json.loads((study_dir / "study.json").read_text())
    parent = MlflowClient(ids["tracking_uri"]).get_run(ids["parent_run_id"])
    assert parent.info.status == "KILLED"
    # five trials still to run: minutes on a loaded 2-core machine (a hang still fails)
    code, out, _ = run_cli("launch", "--space", str(path), "--resume", cwd=tmp_path, timeout=600)
    assert code == 0, out[-3000:]
    trials = pq.read_table(study_dir / "tables" / "trials.parquet").to_pandas()
    assert trials["trial_id"].nunique() == n
    runs = _trial_runs(ids["tracking_uri"], ids["experiment_id"])
    assert sorted(r.data.tags["bdx.trial_id"] for r in runs) == sorted(set(trials["trial_id"]))
    assert all(r.info.status == "FINISHED" for r in runs)
