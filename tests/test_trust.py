"""Trust what you load and what you open: analyze and export refuse a study whose launch is
running, export refuses a recipe older than the study's tables, --address refuses in seconds a
port that is not a Ray GCS, and fit and detect stop on SIGTERM leaving nothing half-written.
Real components throughout: the study's lock held by another process, real servers on
loopback, the CLI in subprocesses."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from bdx_study._io import interrupts_deferred
from bdx_study.cli import main
from bdx_study.space import SpaceError, load_space
from bdx_study.trials.cluster import deadline

from .conftest import tiny_study, write_study
from .test_cli import run_cli
from .test_fit import DOMAIN, write_recipe

# ------------------------------------------------------------------------------ 1. a running launch, a stale recipe

HOLD_LOCK = """
import sys, time
from pathlib import Path
from bdx_study.trials.lock import study_lock
with study_lock(Path(sys.argv[1]), "busy"):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def running_launch(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """A study whose lock another process holds, as a running launch does (the real study_lock)."""
    path = write_study(tmp_path, tiny_study(tmp_path, name="busy"))
    study_dir = load_space(path).study_dir
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(study_dir)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield path, proc
    finally:
        proc.kill()
        proc.wait()


def test_analyze_and_export_refuse_while_a_launch_runs(
    running_launch: tuple[Path, subprocess.Popen[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, holder = running_launch
    for command in ("analyze", "export"):
        assert main([command, "--space", str(path)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert "'busy'" in err and "is being run by a bdx-study launch" in err and f"pid {holder.pid} on" in err
        assert f"run `bdx-study {command}` once it finishes" in err and "--while-running" in err
    # --while-running: a warning, then the command goes on (to what this empty study lacks)
    assert main(["analyze", "--space", str(path), "--while-running"]) == 2
    err = capsys.readouterr().err
    assert "warning" in err and f"pid {holder.pid} on" in err and "analyze the trials finished so far" in err
    assert "no trials tables" in err
    assert main(["export", "--space", str(path), "--while-running"]) == 2
    err = capsys.readouterr().err
    assert "warning" in err and "export from the recipe as it is" in err and "run `bdx-study analyze` first" in err
    # the launch ends (killed: its lock dies with it, the file still names it): nothing refuses
    holder.kill()
    holder.wait()
    assert main(["analyze", "--space", str(path)]) == 2
    err = capsys.readouterr().err
    assert "being run" not in err and "no trials tables" in err and "no finished trials yet" in err
    assert "run `bdx-study launch --space <study file>` first" in err, err


def test_sync_while_a_launch_runs_is_not_told_to_resume(
    running_launch: tuple[Path, subprocess.Popen[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, holder = running_launch
    (load_space(path).study_dir / "study.json").write_text("{}")  # what a launch writes first
    assert main(["sync", "--space", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"pid {holder.pid} on" in err, err
    assert "run `bdx-study sync` once it finishes" in err and "--resume" not in err, err


def _store(study_dir: Path, kind: str, *trial_ids: str) -> None:
    folder = study_dir / "tables" / "parts" / kind
    folder.mkdir(parents=True, exist_ok=True)
    for t in trial_ids:
        pq.write_table(pa.table({"trial_id": [t]}), folder / f"{t}.parquet")


def test_export_refuses_a_recipe_older_than_the_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_study(tmp_path, tiny_study(tmp_path, name="grown"))
    study_dir = load_space(path).study_dir
    recipe = yaml.safe_load(write_recipe(tmp_path / "r.yaml", DOMAIN).read_text())
    recipe["study"] = "grown"

    def export(made_from: dict[str, Any] | None) -> str:
        doc = dict(recipe, made_from=made_from) if made_from is not None else recipe
        (study_dir / "recipe.yaml").write_text(yaml.safe_dump(doc))
        assert main(["export", "--space", str(path), "--no-mlflow"]) == 2
        return capsys.readouterr().err

    _store(study_dir, "trials", "t0001", "t0002")
    _store(study_dir, "refits", "t0001_r1")
    err = export({"trials": 1, "refits": 1, "heldout": 0})  # a trial finished since analyze
    assert len(err.strip().splitlines()) == 1, err
    assert f"{study_dir / 'recipe.yaml'}: older than the study's tables" in err
    assert "2 trials (the recipe was made from 1)" in err and "run `bdx-study analyze` again" in err
    err = export({"trials": 2, "refits": 0, "heldout": 0})  # a refit ran since
    assert "1 refits (the recipe was made from 0)" in err
    err = export(None)  # an older bdx-study's recipe cannot say
    assert "records no count of the results it was made from" in err and "bdx-study analyze" in err
    # a current recipe passes, and export goes on (to the victim this study never trained)
    err = export({"trials": 2, "refits": 1, "heldout": 0})
    assert "older than" not in err and "is not in the cache; run `bdx-study launch` first" in err


# ------------------------------------------------------------------------------ 2. --address that is not a Ray GCS


@pytest.fixture
def not_ray() -> Iterator[dict[str, str]]:
    """Two ports on loopback that accept connections but are no Ray GCS: a socket server that
    never answers, and an HTTP server."""
    silent = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(silent.accept()[0])
            except OSError:
                return

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threads = [threading.Thread(target=accept, daemon=True), threading.Thread(target=web.serve_forever, daemon=True)]
    for t in threads:
        t.start()
    try:
        yield {
            "silent": f"127.0.0.1:{silent.getsockname()[1]}",
            "http": f"127.0.0.1:{web.server_address[1]}",
        }
    finally:
        web.shutdown()
        web.server_close()
        silent.close()
        for c in accepted:
            c.close()


def test_an_address_that_is_not_a_ray_gcs_fails_fast(tmp_path: Path, not_ray: dict[str, str]) -> None:
    path = write_study(tmp_path, tiny_study(tmp_path, name="notray"))
    for kind, address in not_ray.items():
        for command in ("validate", "launch"):
            code, out, seconds = run_cli(command, "--space", str(path), "--address", address, cwd=tmp_path, timeout=60)
            assert code == 2 and seconds < 10, (kind, command, seconds, out)
            assert f"--address {address}: not a Ray cluster" in out and "Traceback" not in out, out
            assert ("sent nothing back" if kind == "silent" else "not HTTP/2") in out, out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def _swallow(signum: int, frame: object) -> None:
    """A SIGINT handler that raises nothing (as one a library may leave behind)."""


@pytest.fixture(autouse=True)
def sigint_restored() -> Iterator[None]:
    """Each test starts with Python's own SIGINT handler and leaves the one it found."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before if before is not None else signal.SIG_DFL)


@pytest.mark.timeout(60)
def test_joining_ray_is_bounded_by_a_deadline() -> None:
    """ray.init on a cluster that answered the probe runs under a deadline: past it, one clear
    error (here on a loop that would never end); a block that ends in time is not disturbed."""
    signal.signal(signal.SIGINT, _swallow)  # a handler left by a library must not disarm it
    t = time.perf_counter()
    with pytest.raises(SpaceError, match="did not join"), deadline(0.5, "did not join"):
        while True:
            time.sleep(0.02)
    assert time.perf_counter() - t < 5
    with deadline(0.2, "never"):
        pass
    time.sleep(0.5)  # no interrupt arrives late
    assert signal.getsignal(signal.SIGINT) is _swallow  # the handler is back


# ------------------------------------------------------------------------------ 3. SIGTERM to fit and detect


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A BadNet-backdoored small CNN (safetensors), clean digits (.npz), a recipe, its bundle, and
    a recipe whose fit lasts minutes (400 epochs of the auxiliary model)."""
    import torch
    from safetensors.torch import save_file

    from bdx_study.victims import AttackSpec, DataConfig, TrainingConfig, VictimConfig, train_victim

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("sigterm")
    data = DataConfig(reserve_size=300, eval_size=200, train_size=400)
    cfg = VictimConfig(
        dataset="digits",
        architecture="small_cnn",
        attack=AttackSpec(name="badnet", params={"poison_rate": 0.1}),
        training=TrainingConfig(epochs=6, lr=2e-3),
        data=data,
    )
    model = train_victim(cfg, device=torch.device("cpu"))[0]
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    reserve = data.splits("digits").reserve
    np.savez(tmp / "clean.npz", x=reserve.x.numpy(), y=reserve.y.numpy())
    recipe = write_recipe(tmp / "recipe.yaml", DOMAIN)
    slow = yaml.safe_load(recipe.read_text())
    slow["detectors"]["badexpert"]["defaults"].update(aux_epochs=400, aux_milestones=[200])
    (tmp / "slow.yaml").write_text(yaml.safe_dump(slow))
    assert main(fit_args(tmp, recipe, tmp / "bundle")) == 0
    return {"tmp": tmp, "slow": tmp / "slow.yaml", "bundle": tmp / "bundle"}


def fit_args(tmp: Path, recipe: Path, out: Path) -> list[str]:
    return [
        *("fit", "--recipe", str(recipe), "--architecture", "small_cnn", "--num-classes", "10"),
        *("--input-shape", "1,16,16", "--weights", str(tmp / "model.safetensors"), "--clean", str(tmp / "clean.npz")),
        *("--out", str(out)),
    ]


def _terminate_when(args: list[str], ready: str, log: Path) -> tuple[int, str]:
    """Start the CLI, send SIGTERM once its output shows ``ready``; (exit code, output)."""
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bdx_study.cli", *args], stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline_s = time.time() + 120
        while ready not in log.read_text():
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.time() < deadline_s, "timed out"
            time.sleep(0.1)
        time.sleep(0.5)  # at work
        assert proc.poll() is None, "finished before SIGTERM: give it more work"
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=60), log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _leftovers(folder: Path, name: str) -> list[Path]:
    """What an atomic writer of ``name`` leaves while at work (``.<name>.*``)."""
    return sorted(folder.glob(f".{name}.*"))


def test_sigterm_stops_fit_leaving_no_bundle(user: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "my-detector"
    code, log = _terminate_when(fit_args(user["tmp"], user["slow"], out), "fitting badexpert", tmp_path / "fit.log")
    assert code == 130, log[-3000:]
    assert f"bdx-study: fit: interrupted; no half-written bundle is left in --out {out}" in log, log[-3000:]
    assert "launch --resume" not in log and "Traceback" not in log, log[-3000:]
    assert not out.exists() and not _leftovers(tmp_path, out.name)


def test_sigterm_stops_detect_leaving_no_output(user: dict[str, Path], tmp_path: Path) -> None:
    n = 60_000  # tens of seconds of scoring, 1,024 inputs at a time
    x = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float32, shape=(n, 1, 16, 16))
    rng = np.random.default_rng(0)
    for i in range(0, n, 20_000):
        x[i : i + 20_000] = rng.random((min(20_000, n - i), 1, 16, 16), dtype=np.float32)
    x.flush()
    del x
    out = tmp_path / "flags.csv"
    args = ["detect", "--detector", str(user["bundle"]), "--input", str(tmp_path / "big.npy"), "--output", str(out)]
    code, log = _terminate_when(args, f"scoring {n} inputs", tmp_path / "detect.log")
    assert code == 130, log[-3000:]
    assert f"bdx-study: detect: interrupted; no half-written --output {out} is left" in log, log[-3000:]
    assert "launch --resume" not in log and "Traceback" not in log, log[-3000:]
    assert not out.exists() and not _leftovers(tmp_path, out.name)


@pytest.mark.timeout(60)
def test_an_interrupt_waits_for_a_bundle_being_replaced() -> None:
    """Replacing a bundle writes file after file, the manifest last: Ctrl-C or SIGTERM received
    meanwhile takes effect once the last is written."""
    written = []
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), interrupts_deferred():
        signal.raise_signal(signal.SIGINT)
        written.append("weights")
        written.append("manifest")
    assert written == ["weights", "manifest"]
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are back


# --------------------------------------------------------------- 4. recipes read as strictly as study files


def _recipe_variant(user: dict[str, Path], name: str, edit: Any) -> Path:
    doc = yaml.safe_load(write_recipe(user["tmp"] / "base-recipe.yaml", DOMAIN).read_text())
    text = edit(doc)
    path = user["tmp"] / name
    path.write_text(text if isinstance(text, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


def _fit_refused(user: dict[str, Path], recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    out = tmp_path / "never"
    t = time.perf_counter()
    assert main(fit_args(user["tmp"], recipe, out)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert time.perf_counter() - t < 30 and not out.exists()
    return err


def test_recipes_are_read_strictly(user: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No coercion (a quoted number is refused, naming file and key), the study file's YAML guards
    (duplicate keys, alias bombs, special files), unknown families and malformed entries: one
    error each, before any fitting."""

    def quoted(doc: dict[str, Any]) -> None:
        doc["detectors"]["badexpert"]["defaults"]["unlearn_lr"] = "0.001"

    path = _recipe_variant(user, "quoted.yaml", quoted)
    err = _fit_refused(user, path, tmp_path, capsys)
    assert f"{path}: detectors.badexpert.defaults.unlearn_lr:" in err and "'0.001'" in err, err

    def seed_text(doc: dict[str, Any]) -> None:
        doc["detectors"]["badexpert"]["seed_policy"]["seed"] = "1"

    path = _recipe_variant(user, "seed.yaml", seed_text)
    assert f"{path}: detectors.badexpert.seed_policy.seed:" in _fit_refused(user, path, tmp_path, capsys)

    def protocol_text(doc: dict[str, Any]) -> None:
        doc["detectors"]["badexpert"]["protocol"]["target_fpr"] = "0.05"

    path = _recipe_variant(user, "protocol.yaml", protocol_text)
    assert f"{path}: detectors.badexpert.protocol.target_fpr:" in _fit_refused(user, path, tmp_path, capsys)

    def unknown(doc: dict[str, Any]) -> None:
        doc["detectors"]["mystery"] = doc["detectors"]["badexpert"]

    path = _recipe_variant(user, "unknown.yaml", unknown)
    err = _fit_refused(user, path, tmp_path, capsys)
    assert f"{path}: detectors.mystery: not a detector family" in err and "badexpert" in err

    def duplicate(doc: dict[str, Any]) -> str:
        return yaml.safe_dump(doc, sort_keys=False) + "default_detector: ted\n"

    path = _recipe_variant(user, "dup.yaml", duplicate)
    assert "duplicate key 'default_detector'" in _fit_refused(user, path, tmp_path, capsys)

    levels = zip("abcd", "bcde", strict=True)
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in levels
    )
    path = _recipe_variant(user, "bomb.yaml", lambda doc: bomb + yaml.safe_dump(doc, sort_keys=False))
    assert "once YAML anchors and aliases are resolved" in _fit_refused(user, path, tmp_path, capsys)

    fifo = user["tmp"] / "recipe.fifo"
    os.mkfifo(fifo)  # reading it would block forever
    assert f"{fifo}: a FIFO (named pipe), not a regular file" in _fit_refused(user, fifo, tmp_path, capsys)


def test_a_recipe_that_gives_a_degenerate_detector_is_refused_at_fit(
    user: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Settings whose clean scores are all equal (or not numbers: an expert finetuned at a learning
    rate that diverges) would give a detector that flags nothing: `fit` refuses, writing no bundle."""

    def diverging(doc: dict[str, Any]) -> None:
        doc["detectors"]["badexpert"]["defaults"].update(unlearn_lr=10.0, unlearn_epochs=3)

    path = _recipe_variant(user, "diverging.yaml", diverging)
    out = tmp_path / "never"
    assert main(fit_args(user["tmp"], path, out)) == 2
    err = capsys.readouterr().err
    assert f"--recipe {path}: detectors.badexpert: these settings give a detector whose scores" in err, err
    assert "would flag nothing" in err and not out.exists()


# ------------------------------------------------------------------------------ 5. detect: special files, streaming


def test_detect_refuses_special_files(
    user: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A FIFO as --input is refused by what it is (reading it would block); a device as --output
    is never replaced, even with --force (an atomic write would rename a file over the node)."""
    fifo = tmp_path / "inputs.npy"
    os.mkfifo(fifo)
    assert main(["detect", "--detector", str(user["bundle"]), "--input", str(fifo)]) == 2
    assert f"{fifo}: a FIFO (named pipe), not a regular file" in capsys.readouterr().err
    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(0).random((5, 1, 16, 16), dtype=np.float32))
    args = ["detect", "--detector", str(user["bundle"]), "--input", str(x), "--output", "/dev/null", "--force"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--output /dev/null is a character device, which bdx-study never replaces (even with --force)" in err
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_detect_streams_every_input_once_in_order(user: dict[str, Path], tmp_path: Path) -> None:
    """More inputs than one chunk: CSV and JSON hold each input once, in order, with the scores
    the Python API gives."""
    from bdx_study.cli import DETECT_CHUNK
    from bdx_study.detector import Detector

    n = 2 * DETECT_CHUNK + 37
    x = np.random.default_rng(1).random((n, 1, 16, 16), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    want = Detector.load(user["bundle"]).detect(x)
    for fmt in ("csv", "json"):
        out = tmp_path / f"flags.{fmt}"
        assert (
            main(
                ["detect", "--detector", str(user["bundle"]), "--input", str(tmp_path / "x.npy"), "--output", str(out)]
            )
            == 0
        )
        if fmt == "json":
            doc = json.loads(out.read_text())
            assert doc["detector"] == "badexpert" and doc["threshold"] == Detector.load(user["bundle"]).threshold
            rows = doc["results"]
            index, score, flagged = ([r[k] for r in rows] for k in ("index", "score", "flagged"))
        else:
            table = np.genfromtxt(out, delimiter=",", names=True)
            index, score, flagged = table["index"], table["score"], table["flagged"]
        assert list(index) == list(range(n))
        np.testing.assert_allclose(score, want.score, rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(flagged, dtype=bool), want.flagged)
        assert not _leftovers(tmp_path, out.name)


# ------------------------------------------------------------------------------ 6. --resume from another folder


@pytest.mark.slow
def test_resume_from_another_folder_says_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A relative study.storage is resolved against the working folder: --resume from elsewhere
    does not find the study. Where the study lies beside the study file, the command refuses
    before writing anything, naming both places and the folder to run from."""
    project = tmp_path / "project"
    project.mkdir()
    doc = tiny_study(project, name="moved")
    doc["study"]["storage"] = "runs"  # relative, as the shipped studies
    path = write_study(project, doc)
    launched = project / "runs" / "studies" / "moved"
    launched.mkdir(parents=True)
    (launched / "study.json").write_text("{}")  # what a launch from the project folder left
    elsewhere = tmp_path / "home"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["launch", "--space", str(path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"--resume: no study 'moved' at {elsewhere / 'runs' / 'studies' / 'moved'}" in err
    assert f"resolved against the working folder {elsewhere}" in err
    assert f"there is one at {launched}: run the command from {project}" in err
    assert not any(elsewhere.iterdir())  # nothing written where it looked


# ------------------------------------------------------------------------------ 7. sync rebuilds a lost tracking store

COUNT_RUNS = """
import json, sys
from mlflow.tracking import MlflowClient
client = MlflowClient(sys.argv[1])
exp = client.get_experiment_by_name(sys.argv[2])
runs = client.search_runs([exp.experiment_id], "tags.`bdx.kind` = 'trial'", max_results=1000) if exp else []
print(json.dumps(sorted([r.data.tags["bdx.trial_id"], r.info.status] for r in runs)))
"""


def _trial_runs(uri: str, experiment: str) -> list[list[str]]:
    out = subprocess.run(
        [sys.executable, "-c", COUNT_RUNS, uri, experiment], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_sync_rebuilds_mlflow_when_its_database_was_deleted_or_replaced(ray_cluster: Any, tmp_path: Path) -> None:
    """The tracking database deleted, then replaced by another: `sync` (as a user runs it, in its
    own process) rebuilds the study in MLflow from the Parquet tables, each trial exactly once, and
    a second sync adds nothing."""
    from bdx_study.trials.launch import launch

    path = write_study(tmp_path, tiny_study(tmp_path, name="lost", search__num_trials=2))
    spec = load_space(path)
    assert launch(spec, source=path).num_errors == 0
    trials = sorted(p.stem for p in (spec.study_dir / "tables" / "parts" / "trials").glob("*.parquet"))
    uri, db = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "mlflow.db"
    assert [t for t, _ in _trial_runs(uri, spec.experiment_name)] == trials
    for loss in ("deleted", "replaced"):
        db.unlink()
        if loss == "replaced":  # another project's store in its place
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    f"import mlflow; mlflow.set_tracking_uri({uri!r}); mlflow.create_experiment('x')",
                ],
                check=True,
                capture_output=True,
            )
        code, out, _ = run_cli("sync", "--space", str(path), cwd=tmp_path)
        assert code == 0, out
        assert "held no run of this study" in out and f"logged {len(trials)} finished trial(s)" in out, out
        assert _trial_runs(uri, spec.experiment_name) == [[t, "FINISHED"] for t in trials], loss
        code, out, _ = run_cli("sync", "--space", str(path), cwd=tmp_path)
        assert code == 0 and "logged 0 finished trial(s)" in out, out
        assert _trial_runs(uri, spec.experiment_name) == [[t, "FINISHED"] for t in trials], loss


# ------------------------------------------------------------------------------ a full disk


def _small_filesystem_works(tmp: Path) -> bool:
    """Whether this machine lets a test mount a small tmpfs of its own (a user and mount
    namespace: ``unshare -rm``), the only way to fill a disk without filling the machine's."""
    probe = tmp / "probe"
    probe.mkdir(exist_ok=True)
    try:
        p = subprocess.run(
            ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=16k tmpfs {probe}"], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0


def _on_a_full_disk(folder: Path, args: list[str], cwd: Path, size: str = "16k") -> tuple[int, str, str]:
    """Run the CLI with ``folder`` a tmpfs of ``size`` (its own mount namespace: the mount is
    gone when the command ends); (exit code, output, what the tmpfs held at the end)."""
    folder.mkdir(parents=True, exist_ok=True)
    cli = " ".join(f"'{a}'" for a in [sys.executable, "-m", "bdx_study.cli", *args])
    mount = f"mount -t tmpfs -o size={size} tmpfs '{folder}' || exit 99"
    script = f"{mount}; {cli}; rc=$?; echo LEFT:; ls -A '{folder}'; exit $rc"
    p = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert p.returncode != 99, p.stderr
    out, _, left = p.stdout.partition("LEFT:")
    return p.returncode, out + p.stderr, left.strip()


@pytest.mark.slow
def test_a_full_disk_during_a_trial_is_reported_once_and_resume_finishes(tmp_path: Path) -> None:
    """The stage cache's filesystem fills up in mid-trial. The launch says so once, naming the
    full place and what it holds free (not a lost node, not one traceback per retry), stops the
    study instead of retrying what cannot succeed, and `launch --resume` on a disk with room
    finishes it: each trial once in Parquet and MLflow."""
    if not _small_filesystem_works(tmp_path):
        pytest.skip("needs `unshare -rm` and a tmpfs mount (user namespaces) to fill a small disk")
    n = 2
    path = write_study(tmp_path, tiny_study(tmp_path, name="full", search__num_trials=n, search__max_concurrent=1))
    spec = load_space(path)
    stages = spec.storage_root() / "stages"
    code, out, _ = _on_a_full_disk(stages, ["launch", "--space", str(path)], tmp_path)
    assert code == 1, out[-3000:]
    ours = [line for line in out.splitlines() if line.startswith(("bdx-study", "[bdx-study]"))]
    said = [line for line in ours if "no space left on device" in line]
    assert len(said) == 1, ours  # once, by bdx-study
    assert said[0].startswith("bdx-study: launch: no space left on device while running trial "), said
    assert f"stage cache {stages}: " in said[0] and "free of 16.0 KiB" in said[0], said
    assert "`bdx-study launch --resume` continues the study" in said[0], said
    assert not any("retried" in line or "node" in line for line in ours), ours
    assert out.count("Trial task failed") == 1, "no retry of a trial that cannot succeed"
    assert not (spec.study_dir / "tables" / "parts" / "trials").exists() or not any(
        (spec.study_dir / "tables" / "parts" / "trials").glob("*.parquet")
    )

    code, out, _ = run_cli("launch", "--space", str(path), "--resume", cwd=tmp_path, timeout=600)
    assert code == 0, out[-3000:]
    trials = pq.read_table(spec.study_dir / "tables" / "trials.parquet").to_pandas()
    assert trials["trial_id"].nunique() == n and not trials.duplicated(["trial_id", "victim_id"]).any()
    ids = json.loads((spec.study_dir / "study.json").read_text())
    runs = _trial_runs(ids["tracking_uri"], spec.experiment_name)
    assert sorted(r[0] for r in runs) == sorted(set(trials["trial_id"])), runs
    assert all(r[1] == "FINISHED" for r in runs), runs


def test_a_full_disk_during_fit_leaves_no_bundle(user: dict[str, Path], tmp_path: Path) -> None:
    """`fit --out` onto a filesystem too small for the bundle: one line saying the disk is full
    and what it holds free, exit 1, nothing left there (not even a temporary folder)."""
    if not _small_filesystem_works(tmp_path):
        pytest.skip("needs `unshare -rm` and a tmpfs mount (user namespaces) to fill a small disk")
    disk = tmp_path / "small"
    out = disk / "my-detector"
    code, log, left = _on_a_full_disk(disk, fit_args(user["tmp"], user["tmp"] / "recipe.yaml", out), tmp_path)
    assert code == 1, log[-3000:]
    lines = [line for line in log.splitlines() if "no space left on device" in line]
    assert len(lines) == 1 and lines[0].startswith("bdx-study: fit: no space left on device"), log[-3000:]
    assert f"no half-written bundle is left in --out {out}" in lines[0] and "free of 16.0 KiB" in lines[0], lines
    assert "Traceback" not in log and "launch --resume" not in log, log[-3000:]
    assert left == "", f"the full disk still holds {left!r}"


def test_what_counts_as_a_full_disk(tmp_path: Path) -> None:
    """A full disk is known by its errno or by the text libraries wrap it in, through any chain
    of causes; other errors are not one. Its report crosses a process boundary whole."""
    import errno
    import pickle

    from bdx_study._io import DiskFullError, disk_full_error, disk_full_reported, is_disk_full

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied")) and not is_disk_full(ValueError("bad"))
    with pytest.raises(DiskFullError) as got, disk_full_reported("writing a test file", {"scratch": tmp_path}):
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
        except OSError as e:
            raise RuntimeError("a library's wrapper") from e
    text = str(got.value)
    assert text.startswith("no space left on device while writing a test file on ") and f"scratch {tmp_path}: " in text
    assert str(pickle.loads(pickle.dumps(got.value))) == text
    assert disk_full_error(RuntimeError("wrapped")).__class__ is DiskFullError
    with pytest.raises(PermissionError), disk_full_reported("writing", {}):
        raise PermissionError(errno.EACCES, "Permission denied")


# ------------------------------------------------------------------------------ optuna.db while the search runs

WATCH_OPTUNA = """
import json, sys, time
from pathlib import Path
import optuna
optuna.logging.set_verbosity(optuna.logging.ERROR)
db, name, stop = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
seen = []
while not stop.exists():
    if db.exists():
        try:
            trials = optuna.load_study(study_name=name, storage=f"sqlite:///{db}").trials
        except Exception:
            trials = None
        if trials:
            seen.append([[t.user_attrs.get("trial_id"), t.state.name, sorted(t.intermediate_values)] for t in trials])
    time.sleep(0.3)
print(json.dumps(seen))
"""


@pytest.mark.slow
def test_optuna_db_follows_the_running_search(tmp_path: Path) -> None:
    """While a launch runs, optuna-dashboard (any reader of optuna.db) sees each trial RUNNING
    once it starts, with the running objective after each victim, then how it ended; at the end
    the file holds each trial once, as `analyze` rebuilds it."""
    import optuna

    from bdx_study.analysis.searches import write_optuna_study
    from bdx_study.tables import StudyTables

    n = 3
    doc = tiny_study(tmp_path, name="live", search__num_trials=n, search__max_concurrent=1)
    doc["victims"]["seeds"] = [0, 1]
    path = write_study(tmp_path, doc)
    spec = load_space(path)
    db, stop = spec.study_dir / "optuna.db", tmp_path / "stop"
    watcher = subprocess.Popen(
        [sys.executable, "-c", WATCH_OPTUNA, str(db), "live-badexpert", str(stop)], stdout=subprocess.PIPE, text=True
    )
    try:
        code, out, _ = run_cli("launch", "--space", str(path), cwd=tmp_path, timeout=600)
    finally:
        stop.touch()
        seen = json.loads(watcher.communicate(timeout=60)[0].strip().splitlines()[-1])
    assert code == 0, out[-3000:]
    running = [t for snapshot in seen for t in snapshot if t[1] == "RUNNING"]
    assert running, "no trial was seen RUNNING while the search ran"
    assert any(t[2] == [1] for t in running), "a running trial's value after its first victim was not seen"

    live = optuna.load_study(study_name="live-badexpert", storage=f"sqlite:///{db}").trials
    rows = StudyTables(spec.study_dir).read("trials").to_pandas()
    assert sorted(t.user_attrs["trial_id"] for t in live) == sorted(set(rows["trial_id"]))  # each once
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in live)
    rebuilt = write_optuna_study(rows, spec, tmp_path / "rebuilt.db")
    again = optuna.load_study(study_name="live-badexpert", storage=f"sqlite:///{rebuilt}").trials
    by_id = {t.user_attrs["trial_id"]: t for t in again}
    for t in live:  # what analyze would show: value, state, constraint, attributes by split, running values
        r = by_id[t.user_attrs["trial_id"]]
        assert (t.state, t.values, t.params) == (r.state, r.values, r.params)
        assert t.intermediate_values == r.intermediate_values
        assert t.user_attrs == r.user_attrs and t.system_attrs.get("constraints") == r.system_attrs.get("constraints")
        assert t.datetime_start <= t.datetime_complete


def test_optuna_db_that_cannot_be_written_never_stops_the_study(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A live optuna.db that cannot be written (its folder is a file) is said once; every later
    write is skipped, none raises: the tables keep everything and analyze rebuilds the file."""
    from bdx_study.trials.live_optuna import LiveOptuna

    spec = load_space(write_study(tmp_path, tiny_study(tmp_path)))
    blocked = tmp_path / "not_a_folder"
    blocked.write_text("a file")
    live = LiveOptuna(spec, blocked)
    config = {"detector": "badexpert", "unlearn_lr": 3e-4, "aux_lr": 0.05}
    live.started("t1", config)
    live.progress("t1", 1, 0.5)
    live.finished("t1", "badexpert")
    live.started("t2", config)
    live.failed("t2")
    out = capsys.readouterr().out
    assert out.count("optuna.db is no longer written live") == 1, out
