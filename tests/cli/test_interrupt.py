"""Kill ``trimformer run`` at random moments (SIGINT and SIGKILL), rerun it, and check that the
result is byte-identical to an uninterrupted run and that no incomplete stage was ever reused.

Seeded: the same kill schedule every time. Kill moments are drawn over the stages' working time
(from the first stage starting to the run ending, as measured on an uninterrupted run), where
killing is interesting, not over interpreter start-up.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.pipeline.runner_support import TEST_PASS, stable_json, tiny_recipe_text, write_recipe
from trimformer.pipeline.recipe import known_passes
from trimformer.pipeline.runner import MARKER, TMP_PREFIX, stage_is_complete

TRIALS = 20
SEED = 20261129
REPO = Path(__file__).resolve().parents[2]  # holds the `tests` package
# `trimformer run` with the tests' `stamp` pass registered (a plugin pass, as a user could add),
# importing trimformer from a snapshot taken when the test starts: every run of the test then
# runs the same code even if the working tree is edited meanwhile (the cache key holds the
# version, not the source, so a mid-test edit would otherwise look like irreproducibility).
LAUNCHER = (
    "import sys; sys.path[:0] = [sys.argv.pop(1), sys.argv.pop(1)]; from tests.pipeline import runner_support as s; "
    "s.register_stamp(); from trimformer.cli import main; sys.argv[0] = 'trimformer'; main()"
)
# Files whose content is a measurement (latency), which no two runs share.
MEASURED = {
    "report.json",
    "report.md",
    "bundle.tar.gz",
    "bundle.tar.gz.sha256",
    "manifest.json",
    "manifest.sha256",
}


def _snapshot(folder: Path) -> Path:
    import trimformer

    shutil.copytree(
        Path(trimformer.__file__).parent, folder / "trimformer", ignore=shutil.ignore_patterns("__pycache__")
    )
    return folder


class Child:
    """``trimformer run`` in a subprocess; records when each progress line arrived."""

    def __init__(self, recipe: Path, workdir: Path, code: Path) -> None:
        env = {**os.environ, "TRIMFORMER_PROGRESS": "0", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                LAUNCHER,
                str(code),
                str(REPO),
                "run",
                str(recipe),
                "--workdir",
                str(workdir),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: list[tuple[float, str]] = []
        self.started = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip()))
            if "running" in line:
                self.started.set()
        self.started.set()

    def wait(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        return rc

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def _recipe(tmp_path: Path, tiny_bert: Path, tiny_csv: Path) -> Path:
    registry = known_passes()
    passes: list[dict[str, object]] = []
    if "prune" in registry:
        passes.append({"name": "prune", "heads": 0.25, "ffn": 0.25})
    # A short sleep gives the killer a window inside a pass, between reading and writing.
    passes.append({"name": TEST_PASS, "tag": "interrupt", "scale": 0.5, "sleep": 0.3})
    if "quantize" in registry:
        passes.append({"name": "quantize"})
    try:
        import trimformer.packaging.package  # noqa: F401

        package = True
    except ImportError:
        package = False
    return write_recipe(tmp_path, tiny_recipe_text(tiny_bert, tiny_csv, passes=passes, package=package))


def _outputs(workdir: Path) -> dict[str, object]:
    """Every output file of every stage: the bytes of models, tokenizers, plots and manifests'
    stable content; measured files (latency reports, and the archive that holds them) by their
    stable content too, with the workdir's path taken out."""
    out: dict[str, object] = {}
    for folder in sorted((workdir / "stages").iterdir()):
        if folder.name.startswith(TMP_PREFIX):
            continue
        for path in sorted((folder / "out").rglob("*")):
            if not path.is_file():
                continue
            rel = path.relative_to(workdir / "stages").as_posix()
            if path.suffix == ".json":
                out[rel] = stable_json(path, {str(workdir): "WORKDIR"})
            elif path.name in MEASURED:
                out[rel] = "measured"
            else:
                out[rel] = path.read_bytes()
    return out


def _differences(got: dict[str, object], expected: dict[str, object]) -> list[str]:
    out = []
    for name in sorted(set(got) | set(expected)):
        a, b = got.get(name), expected.get(name)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            out.append(f"{name} (keys {keys})")
        else:
            out.append(name)
    return out


def _complete_stages(workdir: Path) -> set[str]:
    """Final-named stage folders; each must be complete (marker present, every file matching)."""
    names = set()
    stages = workdir / "stages"
    if not stages.is_dir():
        return names
    for folder in stages.iterdir():
        if folder.name.startswith(TMP_PREFIX):
            continue
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        assert stage_is_complete(folder, marker["key"]), f"{folder} has its final name but is incomplete"
        names.add(marker["stage"])
    return names


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_outputs(tmp_path: Path, tiny_bert: Path, tiny_csv: Path) -> None:
    recipe = _recipe(tmp_path, tiny_bert, tiny_csv)
    code = _snapshot(tmp_path / "code")
    reference = Child(recipe, tmp_path / "reference", code)
    assert reference.wait() == 0, reference.text()
    first = next(t for t, line in reference.lines if "running" in line)
    work_span = reference.lines[-1][0] - first
    expected = _outputs(tmp_path / "reference")
    assert expected

    rng = random.Random(SEED)
    interrupted = 0
    for trial in range(TRIALS):
        workdir = tmp_path / f"trial-{trial}"
        how = signal.SIGINT if trial % 2 == 0 else signal.SIGKILL
        child = Child(recipe, workdir, code)
        assert child.started.wait(120), child.text()
        # The reference run paid for first imports and cold caches: later runs are quicker.
        time.sleep(rng.uniform(0.0, 0.7 * work_span))
        if child.proc.poll() is None:
            child.proc.send_signal(how)
            interrupted += 1
        rc = child.wait()
        if how == signal.SIGINT and rc == 130:
            # A clean interrupt leaves nothing half-written behind.
            leftovers = [p.name for p in (workdir / "stages").iterdir() if p.name.startswith(TMP_PREFIX)]
            assert not leftovers, f"trial {trial}: SIGINT left {leftovers}"
        complete = _complete_stages(workdir)

        rerun = Child(recipe, workdir, code)
        assert rerun.wait() == 0, f"trial {trial}: rerun failed:\n{rerun.text()}"
        reused = {line.split()[1] for _, line in rerun.lines if line.startswith("[") and " cached" in line}
        # Only stages that were complete after the kill can be reused, and all of them are.
        assert reused == complete, f"trial {trial}: reused {reused}, complete {complete}"
        got = _outputs(workdir)
        assert got == expected, (
            f"trial {trial} ({how.name}, rc {rc}, after {child.text()!r}) differs from the uninterrupted run: "
            + "; ".join(_differences(got, expected))
        )
    # The schedule must really interrupt runs, not only watch them finish.
    assert interrupted >= TRIALS // 2
