"""The recipe runner: content-keyed cache, atomic stages, resume, --from/--until/--force/--dry-run."""

from __future__ import annotations

import fcntl
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.pipeline.runner_support import (
    TEST_PASS,
    register_stamp,
    stable_json,
    stage_folders,
    tiny_recipe_text,
    write_recipe,
)
from trimformer.cli.commands import cli
from trimformer.errors import GateFailed, UserError
from trimformer.pipeline.recipe import load_recipe
from trimformer.pipeline.runner import MARKER, StageEvent, plan_run, run_recipe, stage_is_complete

PASSES = [{"name": TEST_PASS, "tag": "first", "scale": 0.5}, {"name": TEST_PASS, "tag": "second"}]


@pytest.fixture(autouse=True)
def stamp(monkeypatch: pytest.MonkeyPatch) -> None:
    register_stamp(monkeypatch)


@pytest.fixture
def recipe_path(tmp_path: Path, tiny_bert: Path, tiny_csv: Path) -> Path:
    return write_recipe(tmp_path, tiny_recipe_text(tiny_bert, tiny_csv, passes=PASSES))


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, tiny_csv: Path) -> Iterator[Path]:
    """A workdir after one complete run of the recipe (copied by the tests that change it)."""
    from trimformer.passes.base import PASS_REGISTRY

    previous = PASS_REGISTRY.get(TEST_PASS)
    register_stamp()
    folder = tmp_path_factory.mktemp("finished")
    recipe = write_recipe(folder, tiny_recipe_text(tiny_bert, tiny_csv, passes=PASSES))
    run_recipe(load_recipe(recipe), folder / "wd")
    yield folder / "wd"
    if previous is None:
        PASS_REGISTRY.pop(TEST_PASS, None)
    else:
        PASS_REGISTRY[TEST_PASS] = previous


def _copy(finished: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "wd"
    shutil.copytree(finished, workdir)
    return workdir


def _run(recipe_path: Path, workdir: Path, **kwargs: object) -> tuple[list[StageEvent], object]:
    events: list[StageEvent] = []
    result = run_recipe(load_recipe(recipe_path), workdir, on_event=events.append, **kwargs)  # type: ignore[arg-type]
    return events, result


def _actions(events: list[StageEvent]) -> dict[str, str]:
    out: dict[str, str] = {}
    for event in events:
        if event.status in ("cached", "done", "skip"):
            out[event.name] = event.status
    return out


def test_run_then_rerun_skips_everything(recipe_path: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "wd"
    events, _ = _run(recipe_path, workdir)
    names = ["export", TEST_PASS, f"{TEST_PASS}-2", "validate"]
    assert _actions(events) == dict.fromkeys(names, "done")
    assert [e.status for e in events if e.name == "export"] == ["start", "done"]
    folders = stage_folders(workdir)
    assert len(folders) == 4
    for folder in folders:
        assert stage_is_complete(folder, json.loads((folder / MARKER).read_text())["key"])
    before = {p: p.read_bytes() for p in workdir.glob("stages/*/out/**/*") if p.is_file()}

    events, _ = _run(recipe_path, workdir)
    assert _actions(events) == dict.fromkeys(names, "cached")
    assert {p: p.read_bytes() for p in before} == before
    run = json.loads((workdir / "run.json").read_text())
    assert [s["action"] for s in run["stages"]] == ["cached"] * 4
    # The rerun's report says so: every stage in its table, each one cached.
    page = (workdir / "report" / "report.html").read_text(encoding="utf-8")
    assert all(f"<tr><td>{name}</td>" in page for name in names) and page.count("<td>cached</td>") == 4
    # The first pass got calibration feeds, the eval split and the PyTorch folder it came from;
    # the second pass no source (the PyTorch weights no longer match its input graph).
    folder = {s["name"]: Path(s["folder"]) for s in run["stages"]}
    first = json.loads((folder[TEST_PASS] / "out" / "trimformer.json").read_text())["lineage"][-1]["stats"]
    second = json.loads((folder[f"{TEST_PASS}-2"] / "out" / "trimformer.json").read_text())["lineage"][-1][
        "stats"
    ]
    assert first["accuracy"] is not None and first["calibration_batch"] and first["source"]
    assert second["source"] is None
    # Durations are moved out of the artifacts (into timing.json) so that they are reproducible.
    assert first and json.loads((folder["export"] / "timing.json").read_text())["seconds"] > 0


def test_changed_parameter_reruns_only_what_depends_on_it(
    recipe_path: Path, tmp_path: Path, tiny_bert: Path, tiny_csv: Path, finished: Path
) -> None:
    workdir = _copy(finished, tmp_path)
    changed = [PASSES[0], {"name": TEST_PASS, "tag": "other"}]
    other = write_recipe(tmp_path, tiny_recipe_text(tiny_bert, tiny_csv, passes=changed), "changed.toml")
    events, _ = _run(other, workdir)
    assert _actions(events) == {
        "export": "cached",
        TEST_PASS: "cached",
        f"{TEST_PASS}-2": "done",
        "validate": "done",
    }
    # Both versions stay cached side by side: switching back costs nothing.
    events, _ = _run(recipe_path, workdir)
    assert set(_actions(events).values()) == {"cached"}


def test_from_until_force(recipe_path: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "wd"
    events, _ = _run(recipe_path, workdir, until=TEST_PASS)
    assert _actions(events) == {
        "export": "done",
        TEST_PASS: "done",
        f"{TEST_PASS}-2": "skip",
        "validate": "skip",
    }
    events, _ = _run(recipe_path, workdir, from_stage=f"{TEST_PASS}-2")
    assert _actions(events) == {
        "export": "cached",
        TEST_PASS: "cached",
        f"{TEST_PASS}-2": "done",
        "validate": "done",
    }
    events, _ = _run(recipe_path, workdir, from_stage=f"{TEST_PASS}-2")
    assert _actions(events)[f"{TEST_PASS}-2"] == "done"
    events, _ = _run(recipe_path, workdir, force=True)
    assert set(_actions(events).values()) == {"done"}
    assert len(stage_folders(workdir)) == 4
    with pytest.raises(
        UserError, match="--from 'quantise' is not a stage of this recipe; stages: export, stamp"
    ):
        _run(recipe_path, workdir, from_stage="quantise")
    with pytest.raises(UserError, match="comes after --until"):
        _run(recipe_path, workdir, from_stage="validate", until="export")


def test_dry_run_plans_without_writing(recipe_path: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "wd"
    runner = CliRunner()
    result = runner.invoke(cli, ["run", str(recipe_path), "--workdir", str(workdir), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "export" in result.output and "run " in result.output
    assert not workdir.exists()
    _run(recipe_path, workdir, until="export")
    result = runner.invoke(cli, ["--json", "run", str(recipe_path), "--workdir", str(workdir), "--dry-run"])
    plan = json.loads(result.output)
    assert [s["action"] for s in plan["stages"]] == ["cached", "run", "run", "run"]


def test_corrupted_or_incomplete_stage_is_never_reused(
    recipe_path: Path, tmp_path: Path, finished: Path
) -> None:
    workdir = _copy(finished, tmp_path)
    recipe = load_recipe(recipe_path)
    planned = {p.name: p for p in plan_run(recipe, workdir)}
    # 1. a file changed after completion
    model = planned[TEST_PASS].out / "model.onnx"
    good = model.read_bytes()
    model.write_bytes(good[:-10])
    # 2. a folder with the final name but no marker (as if written by something else)
    marker = planned[f"{TEST_PASS}-2"].folder / MARKER
    marker.unlink()
    # 3. a leftover temporary folder of a killed run
    stale = workdir / "stages" / ".tmp-export-leftover"
    stale.mkdir()
    (stale / "junk").write_text("x")
    assert [p.action for p in plan_run(recipe, workdir)] == ["cached", "run", "run", "cached"]
    events, _ = _run(recipe_path, workdir)
    assert _actions(events) == {
        "export": "cached",
        TEST_PASS: "done",
        f"{TEST_PASS}-2": "done",
        "validate": "cached",
    }
    assert model.read_bytes() == good
    assert not stale.exists()


def test_gate_failure_exits_1_after_writing_the_report(
    tmp_path: Path, tiny_bert: Path, tiny_csv: Path
) -> None:
    text = tiny_recipe_text(tiny_bert, tiny_csv, passes=PASSES[:1], gates={"min_speedup": 50.0}, package=True)
    recipe_path = write_recipe(tmp_path, text)
    workdir = tmp_path / "wd"
    result = CliRunner().invoke(cli, ["-q", "run", str(recipe_path), "--workdir", str(workdir)])
    assert result.exit_code == 1, result.output
    assert "validation gate failed: cpu: min_speedup" in result.output
    report = json.loads((workdir / "report" / "report.json").read_text())
    assert report["gates_passed"] is False and report["bundle"] is None
    assert not list((workdir / "stages").glob("package-*"))
    # Cached gate results decide the exit code of a rerun too.
    with pytest.raises(GateFailed):
        _run(recipe_path, workdir)


def test_read_only_workdir_is_one_line_exit_2(recipe_path: Path, tmp_path: Path) -> None:
    target = Path("/sys/trimformer-test-workdir")
    try:
        target.mkdir()
    except OSError:
        pass
    else:  # pragma: no cover - a machine where /sys is writable
        target.rmdir()
        pytest.skip("/sys is writable here")
    result = CliRunner().invoke(cli, ["-q", "run", str(recipe_path), "--workdir", str(target)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: cannot write to workdir {target} (read-only or not writable); choose another --workdir"
    ]


def test_a_workdir_in_use_is_refused(recipe_path: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "wd"
    workdir.mkdir()
    with open(workdir / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another trimformer run is using workdir"):
            _run(recipe_path, workdir)


def test_two_runs_are_byte_identical(recipe_path: Path, tmp_path: Path, finished: Path) -> None:
    _run(recipe_path, tmp_path / "b")
    a, b = stage_folders(finished), stage_folders(tmp_path / "b")
    assert [p.name for p in a] == [p.name for p in b]
    for fa, fb in zip(a, b, strict=True):
        assert (fa / MARKER).read_bytes() == (fb / MARKER).read_bytes() or fa.name.startswith("validate")
        if (fa / "out" / "model.onnx").exists():
            assert (fa / "out" / "model.onnx").read_bytes() == (fb / "out" / "model.onnx").read_bytes()
            assert stable_json(fa / "out" / "trimformer.json") == stable_json(fb / "out" / "trimformer.json")


def test_bad_recipe_is_one_line_exit_2(tmp_path: Path, tiny_bert: Path, tiny_csv: Path) -> None:
    text = tiny_recipe_text(tiny_bert, tiny_csv, passes=[{"name": TEST_PASS, "ratio": 0.5}])
    recipe_path = write_recipe(tmp_path, text)
    result = CliRunner().invoke(cli, ["run", str(recipe_path), "--workdir", str(tmp_path / "wd")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {recipe_path}: passes[0].ratio: unknown key; allowed: tag, scale, sleep, layers"
    ]
    assert not (tmp_path / "wd").exists()
