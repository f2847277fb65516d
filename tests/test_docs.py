"""The docs as a user reads them, checked against the code: every ``bdx-study`` command line in
README.md and docs/*.md parses with the real argparse parser (without running), every study YAML
block loads and validates with the real loader (a block marked ``<!-- not a whole study -->`` is
checked key by key against the models), every key docs/study-files.md names exists in the models
and every model key is named there, and every relative link resolves to a file (and heading)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import re
import shlex
import subprocess
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import pytest
from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo

from bdx_study.archs import list_architectures
from bdx_study.attacks import attack_params, list_attacks
from bdx_study.cli import build_parser
from bdx_study.configs import ProtocolConfig
from bdx_study.data import list_datasets
from bdx_study.detectors import DETECTORS, detector_params
from bdx_study.space import Distribution, StudySpec, load_space, read_study_yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PARTIAL = "<!-- not a whole study -->"
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    body: str
    partial: bool

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[ \t]*\n(?P<body>.*?)^(?P=indent)```", re.M | re.S)


def blocks(path: Path) -> list[Block]:
    text = path.read_text()
    out = []
    for m in _FENCE.finditer(text):
        before = [ln.strip() for ln in text[: m.start()].splitlines() if ln.strip()]
        body = "\n".join(ln.removeprefix(m["indent"]) for ln in m["body"].splitlines())
        line = text.count("\n", 0, m.start()) + 1
        out.append(Block(path, line, m["lang"], body, bool(before) and before[-1] == PARTIAL))
    return out


def prose(path: Path) -> str:
    """The file without its fenced code blocks."""
    return _FENCE.sub("", path.read_text())


def _doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ------------------------------------------------------------------------------ command lines


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _options(sub: argparse.ArgumentParser) -> set[str]:
    return {s for a in sub._actions for s in a.option_strings}


def _segments(tokens: list[str]) -> list[list[str]]:
    """A shell line's commands, split at && || ; |."""
    out: list[list[str]] = [[]]
    for t in tokens:
        if t in ("&&", "||", ";", "|"):
            out.append([])
        else:
            out[-1].append(t)
    return [s for s in out if s]


def shown_commands(path: Path) -> list[tuple[str, list[str]]]:
    """``bdx-study`` command lines in the file's shell blocks, as argv (without the program)."""
    found = []
    for b in blocks(path):
        if b.lang not in SHELL_LANGS:
            continue
        for line in b.body.replace("\\\n", " ").splitlines():
            if "bdx-study" not in line:
                continue
            for seg in _segments(shlex.split(line, comments=True)):
                if seg[0] == "bdx-study":
                    found.append((f"{b.where}: {' '.join(seg)[:90]}", seg[1:]))
    return found


def shown_inline(path: Path) -> list[tuple[str, list[str]]]:
    """``bdx-study ...`` inside inline code spans of the prose, as argv (without the program)."""
    spans = re.findall(r"`([^`]+)`", prose(path))
    return [(s, shlex.split(s)[1:]) for s in (" ".join(s.split()) for s in spans) if s.startswith("bdx-study ")]


def _parse(argv: list[str], where: str) -> argparse.Namespace:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: does not parse: {err.getvalue().strip()}")


def _check_flags(argv: list[str], where: str) -> None:
    """The subcommand exists and every --flag is one of its own, spelled out (not abbreviated)."""
    subs = _subparsers()
    assert argv and argv[0] in subs, f"{where}: no subcommand {argv[:1]}; known: {sorted(subs)}"
    known = _options(subs[argv[0]])
    for t in argv[1:]:
        if t.startswith("-"):
            assert t.split("=", 1)[0] in known, (
                f"{where}: `bdx-study {argv[0]}` has no flag {t}; it has {sorted(known)}"
            )


ALL_COMMANDS = [c for p in DOCS for c in shown_commands(p)]
ALL_INLINE = [(f"{_doc_id(p)}: `{w}`", argv) for p in DOCS for w, argv in shown_inline(p)]


@pytest.mark.parametrize(("where", "argv"), ALL_COMMANDS, ids=[w for w, _ in ALL_COMMANDS])
def test_every_command_line_shown_parses(where: str, argv: list[str]) -> None:
    args = _parse(argv, where)
    assert args.command == argv[0]
    _check_flags(argv, where)


@pytest.mark.parametrize(("where", "argv"), ALL_INLINE, ids=[w for w, _ in ALL_INLINE])
def test_every_inline_command_names_real_flags(where: str, argv: list[str]) -> None:
    _check_flags(argv, where)


def test_the_docs_show_commands_of_every_kind() -> None:
    """The extraction finds what the docs show (a broken fence regex would silently test nothing)."""
    shown = {argv[0] for _, argv in ALL_COMMANDS}
    assert set(_subparsers()) <= shown
    assert len(ALL_INLINE) > 20


def test_a_wrong_command_line_fails() -> None:
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        _parse(["detect", "--input", "x.npy"], "here")  # --detector is required
    with pytest.raises(AssertionError, match="no flag --det"):
        _check_flags(["export", "--det", "strip"], "here")  # parses (an abbreviation), but is not the name


def test_cli_md_documents_every_flag_of_every_command() -> None:
    """docs/cli.md has a section per subcommand whose flag table names each of its flags."""
    text = (ROOT / "docs/cli.md").read_text()
    sections = dict(re.findall(r"^## (\w+)\n(.*?)(?=^## |\Z)", text, re.M | re.S))
    for name, sub in _subparsers().items():
        assert name in sections, f"docs/cli.md has no section `## {name}`"
        documented = set(re.findall(r"^\| `(--[\w-]+)", sections[name], re.M))
        flags = _options(sub) - {"-h", "--help"}
        assert documented == flags, (
            f"docs/cli.md `{name}`: documents {sorted(documented)}, the parser has {sorted(flags)}"
        )


def test_set_up_commands_are_the_ones_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    quickstart = "pip install -e . && bdx-study quickstart"
    tests = 'pip install -e ".[dev]" && python -m pytest'
    setup = next(b for b in blocks(ROOT / "README.md") if b.lang == "bash")
    assert [ln for ln in setup.body.splitlines() if ln and not ln.startswith("#")] == [quickstart, tests]
    assert readme.index("## Set-up: two commands") < readme.index(quickstart)
    ci = (ROOT / ".ci/run").read_text().splitlines()
    assert f"python -m {tests}" in ci, ".ci/run no longer runs the README's test command"


def test_list_prints_what_the_docs_say(capsys: pytest.CaptureFixture[str]) -> None:
    """README and docs/cli.md: `list` names datasets, architectures, attacks and families, and
    prints the protocol's and every family's parameters, but no attack's parameters."""
    args = build_parser().parse_args(["list"])
    assert args.fn(args) in (0, None)
    out = capsys.readouterr().out
    lines = dict(ln.split(":", 1) for ln in out.splitlines()[:4])
    names = {k: set(v.split("(")[0].replace(",", " ").split()) for k, v in lines.items()}
    assert names["datasets"] == set(list_datasets())
    assert names["architectures"] == set(list_architectures())
    assert names["attacks"] == set(list_attacks())
    assert names["detectors"] == set(DETECTORS.names())
    rows = set(re.findall(r"^  (\w+) ", out, re.M))
    family_params = {n for f in DETECTORS.names() for n in detector_params(f).model_fields}
    assert set(ProtocolConfig.model_fields) | family_params == rows
    for family in DETECTORS.names():
        assert f"detector {family} " in out
    attack_only = {n for a in list_attacks() for n in attack_params(a).model_fields} - family_params
    assert attack_only and not attack_only & rows  # no attack's own parameters


# ------------------------------------------------------------------------------ study blocks


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds directly (or as Optional), not inside a list or dict."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [m for a in typing.get_args(annotation) if (m := _model_in(a)) is not None]
        return models[0] if len(models) == 1 else None
    return None


_DIST = TypeAdapter(Distribution)


def _check_value(field: FieldInfo, value: Any, loc: str, searchable: bool) -> None:
    """A value against its field's type and bounds (``searchable``: or a distribution)."""
    if searchable and isinstance(value, dict) and "dist" in value:
        _DIST.validate_json(json.dumps(value), strict=True)
        return
    adapter = TypeAdapter(Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation)
    try:
        adapter.validate_json(json.dumps(value), strict=True)
    except ValueError as e:
        raise AssertionError(f"{loc}: {value!r}: {e}") from None


def _check_keys(mapping: Any, model: type[BaseModel], loc: str, searchable: bool = False) -> None:
    """Every key of ``mapping`` is a field of ``model`` (nested models key by key), every value
    fits its field."""
    assert isinstance(mapping, dict), f"{loc}: a mapping, got {mapping!r}"
    for key, value in mapping.items():
        assert key in model.model_fields, f"{loc}.{key}: no such key; {model.__name__} has {sorted(model.model_fields)}"
        field = model.model_fields[key]
        sub = _model_in(field.annotation)
        if sub is not None and isinstance(value, dict) and not (searchable and "dist" in value):
            _check_keys(value, sub, f"{loc}.{key}", searchable)
        else:
            _check_value(field, value, f"{loc}.{key}", searchable)


def _check_family(family: str, params: Any, loc: str) -> None:
    assert family in DETECTORS.names(), f"{loc}: no detector family {family!r}; known: {DETECTORS.names()}"
    params = params or {}
    if family != "committee":
        _check_keys(params, detector_params(family), loc, searchable=True)
        return
    model = detector_params("committee")
    assert isinstance(params, dict) and "members" in params, f"{loc}: a committee names its members"
    _check_keys({k: v for k, v in params.items() if k != "members"}, model, loc, searchable=True)
    members = params["members"]
    for m in members if isinstance(members, list) else members.items():
        name, own = (m, {}) if isinstance(m, str) else m
        assert name != "committee", f"{loc}: a committee as a member"
        _check_family(name, own, f"{loc}.members.{name}")
    for name in params.get("weights") or {}:
        assert name in members, f"{loc}.weights.{name}: not a member"


def check_partial_study(raw: Any, loc: str) -> None:
    """Every key of a partial study against the models, every value against its field."""
    assert isinstance(raw, dict), f"{loc}: a mapping of sections"
    for section, value in raw.items():
        assert section in StudySpec.model_fields, (
            f"{loc}: no section {section!r}; known: {list(StudySpec.model_fields)}"
        )
        where = f"{loc}: {section}"
        if section == "protocol":
            _check_keys(value, ProtocolConfig, where, searchable=True)
        elif section == "detectors":
            assert isinstance(value, dict), where
            for family, params in value.items():
                _check_family(family, params, f"{where}.{family}")
        else:
            model = _model_in(StudySpec.model_fields[section].annotation)
            assert model is not None, where
            if section == "victims" and isinstance(value, dict) and isinstance(value.get("attacks"), list):
                # as the grid reads them: a bare name is {name: NAME}
                value = {**value, "attacks": [{"name": a} if isinstance(a, str) else a for a in value["attacks"]]}
            _check_keys(value, model, where)


STUDY_BLOCKS = [b for p in DOCS for b in blocks(p) if b.lang in ("yaml", "yml")]


@pytest.mark.parametrize("block", STUDY_BLOCKS, ids=[b.where for b in STUDY_BLOCKS])
def test_every_study_block_validates(block: Block, tmp_path: Path) -> None:
    f = tmp_path / "study.yaml"
    f.write_text(block.body)
    if block.partial:
        check_partial_study(read_study_yaml(f), block.where)
    else:
        spec = load_space(f)
        assert spec.num_trials >= 1


def test_the_readme_shows_a_whole_study() -> None:
    assert any(not b.partial for b in STUDY_BLOCKS if b.path.name == "README.md")


@pytest.mark.parametrize(
    "bad",
    [
        {"victims": {"datasets": [], "attack": ["badnet"]}},  # a key the grid lacks
        {"search": {"refit": {"top": 2}}},  # a nested key that does not exist
        {"detectors": {"badexpert": {"unlearn_rate": 1e-4}}},  # not a parameter of the family
        {"detectors": {"committee": {"members": {"ted": {"nope": 1}}}}},  # not a member's parameter
        {
            "victims": {
                "datasets": ["digits"],
                "architectures": ["small_cnn"],
                "attacks": [{"name": "badnet", "size": 3}],
            }
        },
        {"protocol": {"target_fpr": {"dist": "loguniform", "low": 0.01}}},  # a distribution without its high
    ],
)
def test_a_wrong_partial_block_fails(bad: dict[str, Any]) -> None:
    with pytest.raises((AssertionError, ValueError)):
        check_partial_study(bad, "here")


# ------------------------------------------------------------------------------ study-files.md


def _tables(text: str) -> list[str]:
    return re.findall(r"^\| `([\w.]+)` \|", text, re.M)


def _sections(text: str, level: str) -> dict[str, str]:
    return dict(re.findall(rf"^{level} ([^\n]+)\n(.*?)(?=^{level} |^## |\Z)", text, re.M | re.S))


def _union_models(annotation: Any) -> list[type[BaseModel]]:
    """The models a field may hold as one of several (a discriminated union such as
    search.pruning), private sentinels left out."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _union_models(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _union_models(a)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel) and not annotation.__name__.startswith("_"):
        return [annotation]
    return []


def _leaves(model: type[BaseModel], prefix: str = "") -> set[str]:
    out = set()
    for name, field in model.model_fields.items():
        sub = _model_in(field.annotation)
        union = _union_models(field.annotation)
        if sub is not None:
            out |= _leaves(sub, f"{prefix}{name}.")
        elif len(union) > 1:  # each member's keys
            out |= {leaf for m in union for leaf in _leaves(m, f"{prefix}{name}.")}
        else:
            out.add(prefix + name)
    return out


def _section_keys(section: str) -> set[str]:
    if section == "protocol":
        return set(ProtocolConfig.model_fields)
    if section == "detectors":
        return {f"committee.{k}" for k in detector_params("committee").model_fields}
    model = _model_in(StudySpec.model_fields[section].annotation)
    assert model is not None
    return _leaves(model)


def test_study_files_md_names_every_key_and_only_real_ones() -> None:
    sections = _sections((ROOT / "docs/study-files.md").read_text(), "##")
    for section in StudySpec.model_fields:
        body = sections.get(f"`{section}`")
        assert body is not None, f"docs/study-files.md has no section ## `{section}`"
        documented, real = set(_tables(body)), _section_keys(section)
        assert documented - real == set(), f"{section}: documented keys that do not exist: {sorted(documented - real)}"
        assert real - documented == set(), f"{section}: keys not documented: {sorted(real - documented)}"


def test_study_files_md_names_every_attack_parameter() -> None:
    body = _sections((ROOT / "docs/study-files.md").read_text(), "##")["Attack parameters"]
    common = set(_tables(body.split("\n### ", 1)[0]))
    per_attack = {name.strip("`"): set(_tables(b)) for name, b in _sections(body, "###").items()}
    assert set(per_attack) == set(list_attacks())
    for name, own in per_attack.items():
        real = set(attack_params(name).model_fields)
        assert own | common == real, f"{name}: documented {sorted(own | common)}, the model has {sorted(real)}"
        assert not own & common, name


# ------------------------------------------------------------------------------ links


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", prose(path), re.M)}


LINKS = [
    (p, target) for p in DOCS for target in re.findall(r"\]\(([^)\s]+)\)", prose(p)) if not re.match(r"[a-z]+:", target)
]


@pytest.mark.parametrize(("doc", "target"), LINKS, ids=[f"{_doc_id(p)}->{t}" for p, t in LINKS])
def test_every_relative_link_resolves(doc: Path, target: str) -> None:
    file, _, anchor = target.partition("#")
    dest = (doc.parent / file).resolve() if file else doc
    assert dest.is_file(), f"{_doc_id(doc)}: link to {target}: no such file"
    if anchor and dest.suffix == ".md":
        assert anchor in _anchors(dest), f"{_doc_id(doc)}: link to {target}: no such heading in {dest.name}"


def test_the_readme_links_every_doc() -> None:
    readme = (ROOT / "README.md").read_text()
    for p in DOCS[1:]:
        assert f"](docs/{p.name})" in readme, f"README.md does not link docs/{p.name}"


EXAMPLE_SCRIPT = """
import sys
import torch
from bdx_study.plugins import load_plugins
from bdx_study.protocol import ProtocolConfig
from bdx_study.stages import LoadedVictim, StageStore, run_detector
from bdx_study.victims import AttackSpec, DataConfig, TrainingConfig, VictimConfig, train_victim
from bdx_study.detectors import create_detector

load_plugins(sys.argv[1:])
cfg = VictimConfig(
    dataset="stripes", architecture="tiny_mlp", attack=AttackSpec(name="corner_dot", params={"side": 3}),
    training=TrainingConfig(epochs=3, lr=2e-3), data=DataConfig(reserve_size=300, eval_size=200),
)
model, metrics, attack = train_victim(cfg, device=torch.device("cpu"))
splits = cfg.data.splits(cfg.dataset)
victim = LoadedVictim(cfg.key, model, splits, attack, cfg.data.layout())
protocol = ProtocolConfig(clean_set_size=200, target_fpr=0.1)
run = run_detector(StageStore(None), create_detector("confidence", {"power": 2.0}), protocol, victim,
                   device=torch.device("cpu"))
print("clean_acc", metrics["clean_acc"], "asr", metrics["attack_success"])
print("auroc", run.evaluation.metrics["auroc_correct_only"])
"""


def test_the_extending_examples_register_and_run_end_to_end(tmp_path: Path) -> None:
    """Every Python example of docs/extending.md, saved under the file name its first line gives,
    is a plugin: a study file naming them validates, and a victim of the example dataset,
    architecture and attack trains and is scored by the example family through the real code."""
    examples = [b for b in blocks(ROOT / "docs" / "extending.md") if b.lang == "python"]
    modules = []
    for b in examples:
        first = b.body.splitlines()[0]
        assert first.startswith("# ") and first.endswith(".py"), f"{b.where}: first line names its file"
        (tmp_path / first[2:]).write_text(b.body)
        modules.append(first[2:-3])
    assert sorted(modules) == ["my_archs", "my_attacks", "my_data", "my_families"]
    study = (
        "study: {name: ext, storage: runs, plugins: [" + ", ".join(modules) + "]}\n"
        "data: {reserve_size: 300, eval_size: 200}\n"
        "victims: {datasets: [stripes], architectures: [tiny_mlp], attacks: [{name: corner_dot, side: 3}],"
        " seeds: [0], training: {epochs: 3}}\n"
        "protocol: {clean_set_size: 200}\n"
        "detectors: {confidence: {power: {dist: uniform, low: 0.5, high: 2.0}}}\n"
        "search: {sampler: random, num_trials: 2}\n"
    )
    (tmp_path / "study.yaml").write_text(study)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    run = functools.partial(subprocess.run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    p = run([sys.executable, "-m", "bdx_study.cli", "validate", "--space", "study.yaml"])
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout + p.stderr
    p = run([sys.executable, "-c", EXAMPLE_SCRIPT, *modules])
    assert p.returncode == 0, p.stdout + p.stderr
    figures = dict(line.split(" ", 1) for line in p.stdout.splitlines() if line.startswith(("clean_acc", "auroc")))
    clean_acc, asr = (float(v) for v in figures["clean_acc"].split(" asr "))
    assert clean_acc > 0.9 and asr > 0.9, p.stdout  # the example dataset is learnable and the trigger takes
    assert 0.0 <= float(figures["auroc"]) <= 1.0, p.stdout
