"""Reliability of the foundation: full disks, interrupted writes, malformed files never crash us."""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trimformer.artifact import ModelArtifact
from trimformer.data import load_dataset
from trimformer.errors import UserError
from trimformer.exporters import export_model
from trimformer.fsutil import atomic_output_dir
from trimformer.onnx_io import load_onnx, probe_onnxruntime


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir()] if folder.exists() else []


def test_atomic_output_dir_leaves_nothing_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")
    assert _leftovers(tmp_path) == []


def test_atomic_output_dir_has_the_umasks_permissions_not_private_ones(tmp_path: Path) -> None:
    """A bundle folder is read by servers that may run as another user: not mkdtemp's 0700."""
    mask = os.umask(0o022)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


def test_atomic_output_dir_keeps_the_old_folder_on_error(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_output_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise KeyboardInterrupt
    assert _leftovers(tmp_path) == ["out"] and (tmp_path / "out" / "old.txt").read_text() == "old"


def test_simulated_full_disk_is_a_clear_error(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("trimformer.exporters.torch_export.save_onnx", full)
    with pytest.raises(UserError, match="no space left on the device"):
        export_model(tiny_bert, tmp_path / "out")
    assert _leftovers(tmp_path) == []


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


def test_real_full_disk_on_a_small_tmpfs(tiny_bert: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "64k"):
        pytest.skip("cannot mount a tmpfs here (needs root); the simulated ENOSPC test covers the logic")
    try:
        with pytest.raises(UserError, match="no space left"):
            export_model(tiny_bert, disk / "out")
        assert _leftovers(disk) == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".csv", ".tsv", ".jsonl"]))
def test_random_dataset_bytes_never_crash(tmp_path: Path, data: bytes, suffix: str) -> None:
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        dataset = load_dataset(path)
    except UserError as exc:
        assert "\n" not in str(exc)
    else:
        assert len(dataset) >= 1


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cut=st.floats(0.0, 0.99), flips=st.lists(st.tuples(st.floats(0, 0.999), st.integers(0, 7)), max_size=6)
)
def test_mutated_onnx_never_crashes_the_loader(
    tiny_bert_onnx: Path, tmp_path: Path, cut: float, flips: list[tuple[float, int]]
) -> None:
    data = bytearray((tiny_bert_onnx / "model.onnx").read_bytes())
    for where, bit in flips:
        data[int(where * len(data))] ^= 1 << bit
    data = data[: max(1, int(len(data) * (1 - cut)))] if cut > 0.5 else data
    bad = tmp_path / "model.onnx"
    bad.write_bytes(bytes(data))
    try:
        load_onnx(bad)
        probe_onnxruntime(bad)
    except UserError as exc:
        assert "\n" not in str(exc)


def test_mutated_artifact_through_the_cli_reports_cleanly(
    tiny_bert_onnx: Path, tiny_csv: Path, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from trimformer.cli.commands import cli

    broken = tmp_path / "m"
    shutil.copytree(tiny_bert_onnx, broken)
    data = bytearray((broken / "model.onnx").read_bytes())
    for offset in range(200, len(data), 997):
        data[offset] ^= 0xFF
    (broken / "model.onnx").write_bytes(bytes(data))
    result = CliRunner().invoke(
        cli,
        [
            "--quiet",
            "validate",
            str(broken),
            "--data",
            str(tiny_csv),
            "--grid",
            "1x8",
            "--runs",
            "1",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()
    ModelArtifact.open(tiny_bert_onnx)  # the original is untouched


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.dictionaries(
            st.sampled_from(["model", "data", "export", "passes", "validate", "package", "distill", "x"]),
            st.one_of(
                st.integers(),
                st.text(max_size=8),
                st.dictionaries(st.text(max_size=6), st.integers(), max_size=3),
            ),
            max_size=5,
        ).map(lambda d: "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in d.items()).encode()),
    )
)
def test_random_recipe_files_never_crash(tmp_path: Path, data: bytes) -> None:
    from trimformer.pipeline.recipe import load_recipe

    path = tmp_path / "fuzz.toml"
    path.write_bytes(data)
    try:
        load_recipe(path)
    except UserError as exc:
        assert "\n" not in str(exc)


@pytest.mark.parametrize("command", ["quantize", "prune"])
@pytest.mark.parametrize("mutation", ["truncate", "flip"])
def test_mutated_model_through_passes_reports_cleanly(
    tiny_bert_onnx: Path, tiny_csv: Path, tmp_path: Path, command: str, mutation: str
) -> None:
    from click.testing import CliRunner

    from trimformer.cli.commands import cli

    broken = tmp_path / "m"
    shutil.copytree(tiny_bert_onnx, broken)
    data = bytearray((broken / "model.onnx").read_bytes())
    if mutation == "truncate":
        data = data[: len(data) // 2]
    else:
        for offset in range(100, len(data), 499):
            data[offset] ^= 0x5A
    (broken / "model.onnx").write_bytes(bytes(data))
    extra = ["--heads", "0.5"] if command == "prune" else ["--samples", "32"]
    result = CliRunner().invoke(
        cli,
        [
            "--quiet",
            command,
            str(broken),
            "--calibration",
            str(tiny_csv),
            *extra,
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    assert re.search(r"ONNX|onnxruntime|model", lines[0]), lines[0]
    assert not (tmp_path / "o").exists()
