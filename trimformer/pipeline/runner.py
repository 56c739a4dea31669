"""Run a recipe: every stage cached by content, resumable after a crash, with progress.

Workdir layout::

    WORKDIR/
      .lock                       held (flock) while a run is in progress
      stages/<name>-<key>/        one finished stage: out/ (its output) + stage.json (marker)
      stages/.tmp-<name>-...      a stage being written; never read, removed by the next run
      report/                     report.json, report.md, report.html (+ PNG plots)
      run.json                    what the last run did: each stage, cached or run, seconds

A stage's key is a hash of (stage kind, its parameters, the keys of the stages it reads, the
content hashes of the outside files it reads, the trimformer version), as in Olive's engine
cache. A stage is written into a temporary folder; its marker ``stage.json`` (which lists the
sha256 of every file) is written last, then the folder is renamed into place. So a folder with
the final name is complete by construction; on reuse the runner still checks every file against
the marker, and redoes a stage whose folder does not match.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trimformer import __version__
from trimformer.errors import GateFailed, UserError
from trimformer.fsutil import hash_files, sha256_bytes, sha256_file
from trimformer.pipeline.plan import Stage, StageContext, build_plan
from trimformer.pipeline.recipe import Recipe

__all__ = [
    "MARKER",
    "PlannedStage",
    "RunResult",
    "StageEvent",
    "plan_run",
    "run_recipe",
    "stage_is_complete",
]

logger = logging.getLogger(__name__)

MARKER = "stage.json"
# How long the stage took when it was computed: kept beside the marker, out of its file list,
# because the marker must be the same bytes wherever the same stage is computed.
TIMING = "timing.json"
RESUME = "resume"
STAGES = "stages"
TMP_PREFIX = ".tmp-"
OUT = "out"


@dataclass
class PlannedStage:
    stage: Stage
    key: str
    folder: Path
    cached: bool
    action: str  # "cached" | "run" | "rerun" (forced) | "skip" (after --until)

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def out(self) -> Path:
        return self.folder / OUT


@dataclass
class StageEvent:
    """Progress for the CLI: ``status`` is cached | start | done | failed | skip."""

    index: int
    total: int
    name: str
    status: str
    key: str
    folder: Path
    seconds: float | None = None


@dataclass
class RunResult:
    workdir: Path
    stages: list[PlannedStage]
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    report_dir: Path | None = None
    gates_passed: bool | None = None
    gate_failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir),
            "stages": [
                {
                    "name": p.name,
                    "kind": p.stage.kind,
                    "key": p.key,
                    "action": p.action,
                    "folder": str(p.folder),
                    "seconds": self.timings.get(p.name),
                }
                for p in self.stages
            ],
            "report": str(self.report_dir) if self.report_dir else None,
            "gates_passed": self.gates_passed,
            "gate_failures": self.gate_failures,
        }


# -- hashing ------------------------------------------------------------------------------------
def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()


def _external_path(spec: str) -> Path:
    if spec == "builtin:tweets":
        from trimformer.data.datasets import _builtin_path

        return _builtin_path(spec)
    if spec.startswith("builtin:"):
        from trimformer.sources import resolve_model_path

        return resolve_model_path(spec)
    return Path(spec)


def content_hash(spec: str) -> str:
    """sha256 over a file, or over every file of a folder keyed by relative path."""
    path = _external_path(spec)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise UserError(f"input {spec} does not exist")
    # Reports and caches inside a model folder do not change the model.
    files = [
        item
        for item in path.rglob("*")
        if item.is_file() and not _is_cache(item.relative_to(path).as_posix())
    ]
    return hash_files(files, path)


def _is_cache(rel: str) -> bool:
    return rel.startswith(("report/", ".")) or "/." in rel or "__pycache__" in rel


def _stage_key(stage: Stage, upstream: dict[str, str], external: dict[str, str]) -> str:
    payload = {
        "stage": stage.kind,
        "params": stage.params,
        "inputs": {role: upstream[name] for role, name in sorted(stage.inputs.items())},
        "external": external,
        "trimformer": __version__,
    }
    return sha256_bytes(_canonical(payload))


# -- completion markers -------------------------------------------------------------------------
def _file_hashes(folder: Path) -> dict[str, str]:
    hashes = {}
    for item in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = item.relative_to(folder).as_posix()
        if rel in (MARKER, TIMING):
            continue
        hashes[rel] = sha256_file(item)
    return hashes


def read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def stage_is_complete(folder: Path, key: str, check_files: bool = True) -> bool:
    """A folder is reusable only with a marker for this key whose files all match."""
    marker = read_marker(folder)
    if marker is None or marker.get("key") != key or not isinstance(marker.get("files"), dict):
        return False
    if not check_files:
        return True
    try:
        return _file_hashes(folder) == marker["files"]
    except OSError:
        return False


# The files whose ``seconds`` keys are wall-clock durations (written by trimformer's stages).
_DURATION_FILES = frozenset(
    {
        "trimformer.json",
        "trimformer_train.json",
        "trimformer_distill.json",
        "pruning_report.json",
        "quantization_report.json",
        "report.json",
    }
)


def _strip_durations(folder: Path) -> dict[str, Any]:
    """Move wall-clock durations out of the stage's metadata files, into the returned dict.

    Lineage steps, training records and pass reports note how many seconds they took (keys
    ``seconds`` and ``*_seconds``); that is the one thing
    two runs of a recipe never agree on, and it would make every artifact differ byte for byte.
    The durations go to ``timing.json`` beside the marker instead.
    """
    moved: dict[str, Any] = {}

    def strip(value: Any, where: str) -> Any:
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for key, item in value.items():
                if (key == "seconds" or key.endswith("_seconds")) and item is not None:
                    moved[f"{where}.{key}"] = item
                    out[key] = None
                else:
                    out[key] = strip(item, f"{where}.{key}")
            return out
        if isinstance(value, list):
            return [strip(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return value

    for path in sorted(folder.rglob("*.json")):
        # Only our own records: a tokenizer's vocabulary has a token "seconds" too.
        if path.name not in _DURATION_FILES:
            continue
        try:
            original = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        cleaned = strip(original, path.relative_to(folder).as_posix())
        if cleaned != original:
            # The format write_meta uses (sorted keys, indent 2, trailing newline).
            path.write_text(json.dumps(cleaned, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return moved


def _fsync_tree(folder: Path) -> None:
    for item in folder.rglob("*"):
        if item.is_file():
            fd = os.open(item, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- workdir ------------------------------------------------------------------------------------
def _writable_error(workdir: Path, exc: OSError) -> UserError:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        reason = "read-only or not writable"
    return UserError(f"cannot write to workdir {workdir} ({reason}); choose another --workdir")


@contextlib.contextmanager
def _locked_workdir(workdir: Path) -> Iterator[None]:
    try:
        (workdir / STAGES).mkdir(parents=True, exist_ok=True)
        handle = open(workdir / ".lock", "a+")  # noqa: SIM115 (held for the whole run)
    except OSError as exc:
        raise _writable_error(workdir, exc) from exc
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"another trimformer run is using workdir {workdir}; wait for it or choose another"
            ) from None
        # Leftovers of runs that were killed: never read, safe to remove while we hold the lock.
        for item in (workdir / STAGES).iterdir():
            if item.name.startswith(TMP_PREFIX):
                shutil.rmtree(item, ignore_errors=True)
        yield
    finally:
        handle.close()


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# -- planning -----------------------------------------------------------------------------------
def _stage_names(plan: list[Stage]) -> str:
    return ", ".join(stage.name for stage in plan)


def plan_run(
    recipe: Recipe,
    workdir: Path,
    from_stage: str | None = None,
    until: str | None = None,
    force: bool = False,
    check_files: bool = True,
) -> list[PlannedStage]:
    """Keys, folders and what will happen to each stage; touches nothing."""
    stages = build_plan(recipe)
    names = [stage.name for stage in stages]
    for option, value in (("--from", from_stage), ("--until", until)):
        if value is not None and value not in names:
            raise UserError(
                f"{option} {value!r} is not a stage of this recipe; stages: {_stage_names(stages)}"
            )
    if from_stage and until and names.index(from_stage) > names.index(until):
        raise UserError(
            f"--from {from_stage} comes after --until {until}; stages run in order: {_stage_names(stages)}"
        )
    hashes: dict[str, str] = {}
    keys: dict[str, str] = {}
    planned = []
    forced = force
    stopped = False
    for stage in stages:
        external = {}
        for role, spec in sorted(stage.external.items()):
            if spec not in hashes:
                hashes[spec] = content_hash(spec)
            external[role] = hashes[spec]
        key = _stage_key(stage, keys, external)
        keys[stage.name] = key
        folder = workdir / STAGES / f"{stage.name}-{key[:16]}"
        forced = forced or stage.name == from_stage
        cached = stage_is_complete(folder, key, check_files)
        if stopped:
            action = "skip"
        elif forced:
            action = "rerun" if cached else "run"
        else:
            action = "cached" if cached else "run"
        planned.append(PlannedStage(stage, key, folder, cached, action))
        stopped = stopped or stage.name == until
    return planned


# -- running ------------------------------------------------------------------------------------
def _external_inputs(stage: Stage) -> dict[str, Path]:
    return {role: _external_path(spec) for role, spec in stage.external.items()}


def _execute(planned: PlannedStage, recipe: Recipe, outputs: dict[str, Path]) -> dict[str, Any]:
    stage = planned.stage
    parent = planned.folder.parent
    resume_dir = parent.parent / RESUME / planned.folder.name
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{stage.name}-", dir=parent))
    try:
        inputs = {**_external_inputs(stage), **{role: outputs[name] for role, name in stage.inputs.items()}}
        scratch = tmp / "scratch"
        scratch.mkdir()
        context = StageContext(
            out=tmp / OUT, inputs=inputs, recipe=recipe, scratch=scratch, resume_dir=resume_dir
        )
        facts = stage.run(context).facts
        shutil.rmtree(scratch, ignore_errors=True)
        if not (tmp / OUT).exists():
            raise RuntimeError(f"stage {stage.name} wrote no output")
        # A validation report is a measurement and a bundle is hashed as written: leave both alone.
        durations = {} if stage.kind in ("validate", "package") else _strip_durations(tmp / OUT)
        marker = {
            "stage": stage.name,
            "kind": stage.kind,
            "key": planned.key,
            "params": stage.params,
            "inputs": {role: outputs[name].parent.name for role, name in sorted(stage.inputs.items())},
            "trimformer": __version__,
            "result": facts,
            "files": _file_hashes(tmp),
        }
        # The marker goes last: a folder without it is incomplete, and it is renamed only after.
        _write_json_atomic(
            tmp / TIMING, {"seconds": round(time.perf_counter() - started, 2), "steps": durations}
        )
        _write_json_atomic(tmp / MARKER, marker)
        _fsync_tree(tmp)
        if planned.folder.exists():
            trash = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}old-", dir=parent))
            os.replace(planned.folder, trash / "old")
            os.replace(tmp, planned.folder)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, planned.folder)
        _fsync_dir(parent)
        shutil.rmtree(resume_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            resume_dir.parent.rmdir()  # only when no other stage's checkpoint is left there
        return marker
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run_recipe(
    recipe: Recipe,
    workdir: str | Path,
    from_stage: str | None = None,
    until: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    on_event: Callable[[StageEvent], None] | None = None,
    report: bool = True,
) -> RunResult:
    """Run (or with ``dry_run`` only plan) a recipe; raise GateFailed when a final gate fails.

    The report is written even when a gate fails, before GateFailed is raised.
    """
    workdir = Path(workdir)
    emit = on_event or (lambda event: None)
    if dry_run:
        planned = plan_run(recipe, workdir, from_stage, until, force)
        return RunResult(workdir, planned)
    with _locked_workdir(workdir):
        planned = plan_run(recipe, workdir, from_stage, until, force)
        result = RunResult(workdir, planned)
        outputs: dict[str, Path] = {}
        total = len(planned)
        try:
            for index, item in enumerate(planned, start=1):
                event = StageEvent(index, total, item.name, item.action, item.key, item.folder)
                if item.action == "skip":
                    emit(event)
                    continue
                if item.action == "cached":
                    marker = read_marker(item.folder) or {}
                    emit(event)
                else:
                    event.status = "start"
                    emit(event)
                    started = time.perf_counter()
                    try:
                        marker = _execute(item, recipe, outputs)
                    except BaseException:
                        emit(StageEvent(index, total, item.name, "failed", item.key, item.folder))
                        raise
                    seconds = round(time.perf_counter() - started, 2)
                    result.timings[item.name] = seconds
                    emit(StageEvent(index, total, item.name, "done", item.key, item.folder, seconds))
                outputs[item.name] = item.out
                result.records[item.name] = marker
                if item.stage.kind == "validate":
                    gates = marker.get("result", {}).get("gates", {})
                    result.gates_passed = all(g.get("passed", False) for g in gates.values())
                    result.gate_failures = [
                        f"{p}: {f}" for p, g in gates.items() for f in g.get("failed", [])
                    ]
                    if not result.gates_passed:
                        # A bundle is only built from a model that met its gates.
                        for rest in planned[index:]:
                            rest.action = "skip"
        finally:
            _write_json_atomic(workdir / "run.json", {"recipe": str(recipe.path), **result.to_dict()})
        if report:
            from trimformer.pipeline.report import write_run_report

            result.report_dir = write_run_report(recipe, result, workdir / "report")
            _write_json_atomic(workdir / "run.json", {"recipe": str(recipe.path), **result.to_dict()})
    if result.gates_passed is False:
        raise GateFailed("validation gate failed: " + "; ".join(result.gate_failures))
    return result
