"""Verification: any changed, missing or extra byte or file is refused; unsafe archives are refused."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trimformer.cli.commands import cli
from trimformer.errors import UserError
from trimformer.packaging.package import package_artifact
from trimformer.runtime import MANIFEST, MANIFEST_DIGEST, BundleError, Predictor, verify_bundle
from trimformer.runtime.archive import safe_extract
from trimformer.runtime.bundle import digest_line


@pytest.fixture(scope="module")
def packaged(tiny_bert_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "bundle"
    package_artifact(tiny_bert_onnx, out, ort_format=True)
    return out


def _copy(packaged: Path, where: Path) -> Path:
    target = where / "bundle"
    shutil.copytree(packaged, target)
    return target


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_intact_bundle_verifies(packaged: Path) -> None:
    result = verify_bundle(packaged)
    assert result["ok"] is True and result["files"] == 8
    assert result["smoke"]["max_abs_diff"] < 1e-5
    assert result["digest"].startswith("sha256:")
    assert verify_bundle(str(packaged) + ".tar.gz")["digest"] == result["digest"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_single_byte_change_is_refused(packaged: Path, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(_files(packaged)), label="file")
    size = (packaged / name).stat().st_size
    offset = data.draw(st.integers(0, size - 1), label="offset")
    delta = data.draw(st.integers(1, 255), label="xor")
    with tempfile.TemporaryDirectory() as tmp:
        bundle = _copy(packaged, Path(tmp))
        raw = bytearray((bundle / name).read_bytes())
        raw[offset] ^= delta
        (bundle / name).write_bytes(bytes(raw))
        with pytest.raises(BundleError, match=r"was changed|malformed|unreadable|not a trimformer"):
            verify_bundle(bundle)
        with pytest.raises(BundleError):
            Predictor(bundle)


@pytest.mark.parametrize(
    "name",
    [
        "model.onnx",
        "model.ort",
        "model.required_operators.config",
        "tokenizer.json",
        "config.json",
        "trimformer.json",
        MANIFEST,
        MANIFEST_DIGEST,
    ],
)
def test_a_missing_file_is_refused(packaged: Path, tmp_path: Path, name: str) -> None:
    bundle = _copy(packaged, tmp_path)
    (bundle / name).unlink()
    with pytest.raises(BundleError, match=r"missing|incomplete"):
        verify_bundle(bundle)
    with pytest.raises(BundleError):
        Predictor(bundle)


@pytest.mark.parametrize("extra", ["notes.txt", ".hidden", "sub/model.onnx"])
def test_an_extra_file_is_refused(packaged: Path, tmp_path: Path, extra: str) -> None:
    bundle = _copy(packaged, tmp_path)
    (bundle / extra).parent.mkdir(exist_ok=True)
    (bundle / extra).write_text("x")
    with pytest.raises(BundleError, match="unexpected file"):
        verify_bundle(bundle)
    with pytest.raises(BundleError, match="unexpected file"):
        Predictor(bundle)


def test_an_empty_extra_folder_and_symlinks_are_refused(packaged: Path, tmp_path: Path) -> None:
    bundle = _copy(packaged, tmp_path)
    (bundle / "empty").mkdir()
    with pytest.raises(BundleError, match="unexpected folder"):
        verify_bundle(bundle)
    (bundle / "empty").rmdir()
    # A symlink in place of a listed file, even one pointing at identical bytes.
    shutil.copy(bundle / "config.json", tmp_path / "config.json")
    (bundle / "config.json").unlink()
    (bundle / "config.json").symlink_to(tmp_path / "config.json")
    with pytest.raises(BundleError, match="symlink"):
        verify_bundle(bundle)


def test_a_consistently_rewritten_manifest_is_caught_by_the_pin_or_the_smoke_run(
    packaged: Path, tmp_path: Path
) -> None:
    """Whoever rewrites manifest.json *and* manifest.sha256 passes the hash check, so:
    a pinned digest refuses the bundle, and changed outputs are refused by the smoke inference."""
    bundle = _copy(packaged, tmp_path)
    original = verify_bundle(bundle)["digest"]
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["smoke"]["values"][0][0] += 0.5
    raw = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    (bundle / MANIFEST).write_bytes(raw)
    (bundle / MANIFEST_DIGEST).write_text(digest_line(raw))
    with pytest.raises(BundleError, match="computes different outputs"):
        verify_bundle(bundle)
    with pytest.raises(BundleError, match="not the expected one"):
        Predictor(bundle, expected_digest=original)
    assert Predictor(packaged, expected_digest=original.removeprefix("sha256:")).digest == original


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        verify_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match="not a trimformer bundle"):
        verify_bundle(tmp_path)
    (tmp_path / "x.zip").write_bytes(b"PK")
    with pytest.raises(BundleError, match=r"neither a bundle folder nor a \.tar\.gz"):
        verify_bundle(tmp_path / "x.zip")
    (tmp_path / "bad.tar.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(BundleError, match="not a readable bundle archive"):
        verify_bundle(tmp_path / "bad.tar.gz")


# -- archives --------------------------------------------------------------------------------
def _tar_gz(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, payload in members:
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path


def _file(name: str, payload: bytes = b"data") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    return info, payload


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def _device(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return info, None


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (_file("/tmp/evil.txt"), "absolute path"),
        (_file("../evil.txt"), r"outside the target folder \('\.\.'\)"),
        (_file("sub/../../evil.txt"), r"outside the target folder"),
        (_file("./a/../../evil.txt"), r"outside the target folder"),
        (_link("model.onnx", "/etc/passwd", tarfile.SYMTYPE), "symlink"),
        (_link("model.onnx", "../outside", tarfile.SYMTYPE), "symlink"),
        (_link("tokenizer.json", "config.json", tarfile.LNKTYPE), "hard link"),
        (_device("null"), "not a plain file"),
        (_file("C:/evil.txt"), "absolute path"),
        (_file("a\\..\\evil.txt"), "outside the target folder|unsafe"),
    ],
)
def test_unsafe_archive_members_are_refused_before_anything_is_written(
    tmp_path: Path, member: tuple[tarfile.TarInfo, bytes | None], message: str
) -> None:
    # A harmless first member: it must not be written either, because checks come first.
    archive = _tar_gz(tmp_path / "evil.tar.gz", [_file("config.json", b"{}"), member])
    dest = tmp_path / "dest"
    with pytest.raises(BundleError, match=message):
        safe_extract(archive, dest)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "evil.txt").exists()
    with pytest.raises(BundleError, match=message):
        verify_bundle(archive)
    result = CliRunner().invoke(cli, ["verify", str(archive)])
    assert result.exit_code == 2 and "refusing archive" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_duplicate_members_are_refused(tmp_path: Path) -> None:
    archive = _tar_gz(tmp_path / "dup.tar.gz", [_file("config.json", b"{}"), _file("./config.json", b"[]")])
    with pytest.raises(BundleError, match="appears twice"):
        safe_extract(archive, tmp_path / "dest")


def test_any_single_byte_change_to_the_archive_is_refused(packaged: Path, tmp_path: Path) -> None:
    archive = Path(str(packaged) + ".tar.gz")
    raw = archive.read_bytes()
    offsets = sorted(
        {0, 3, 4, 8, 9, len(raw) // 2, len(raw) - 9, len(raw) - 5, len(raw) - 1, *range(10, 200, 37)}
    )
    for offset in offsets:
        changed = bytearray(raw)
        changed[offset] ^= 0x01
        target = tmp_path / "bundle.tar.gz"
        target.write_bytes(bytes(changed))
        shutil.copy(Path(str(archive) + ".sha256"), tmp_path / "bundle.tar.gz.sha256")
        with pytest.raises(BundleError):
            verify_bundle(target)


def test_a_repacked_or_retouched_archive_is_refused_without_sidecar(packaged: Path, tmp_path: Path) -> None:
    # Same files, different tar headers (real mtimes, owner): contents verify, the archive does not.
    repacked = tmp_path / "repacked.tar.gz"
    with tarfile.open(repacked, "w:gz") as tar:
        for path in sorted(packaged.iterdir()):
            tar.add(path, arcname=path.name)
    with pytest.raises(BundleError, match="changed or repacked"):
        verify_bundle(repacked)
    # A change inside the tar stream that leaves every file's bytes alone (a mode field).
    plain = gzip.decompress(Path(str(packaged) + ".tar.gz").read_bytes())
    index = plain.index(b"0000644")
    retouched = plain[:index] + b"0000664" + plain[index + 7 :]
    # Fix the header checksum so tarfile accepts the header.
    start = index - 100
    header = bytearray(retouched[start : start + 512])
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\0 ".encode()
    retouched = retouched[:start] + bytes(header) + retouched[start + 512 :]
    target = tmp_path / "retouched.tar.gz"
    target.write_bytes(gzip.compress(retouched, mtime=0))
    with pytest.raises(BundleError, match="changed or repacked"):
        verify_bundle(target)


def test_archive_extraction_leaves_no_temp_files(
    packaged: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tempfile.tempdir = None
    try:
        Predictor(str(packaged) + ".tar.gz")
        assert os.listdir(tmp_path) == []
    finally:
        tempfile.tempdir = None


def test_cli_verify_reports_one_line(packaged: Path, tmp_path: Path) -> None:
    bundle = _copy(packaged, tmp_path)
    runner = CliRunner()
    ok = runner.invoke(cli, ["verify", str(bundle)])
    assert ok.exit_code == 0 and ok.output.startswith("ok: ")
    (bundle / "extra.bin").write_bytes(b"\0")
    bad = runner.invoke(cli, ["verify", str(bundle)])
    assert bad.exit_code == 2
    assert bad.output.strip() == (
        f"error: bundle {bundle} was changed: unexpected file(s) extra.bin not in manifest.json; "
        "remove them or re-package"
    )
    wrong = runner.invoke(cli, ["verify", str(packaged), "--expect", "sha256:" + "1" * 64])
    assert wrong.exit_code == 2 and "not the expected one" in wrong.output
    assert isinstance(BundleError("x"), UserError)


@pytest.mark.parametrize("drop", ["model", "tokenizer", "smoke", "task"])
def test_a_rehashed_manifest_missing_a_section_is_refused_cleanly(
    packaged: Path, tmp_path: Path, drop: str
) -> None:
    bundle = _copy(packaged, tmp_path)
    manifest = json.loads((bundle / MANIFEST).read_text())
    del manifest[drop]
    raw = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    (bundle / MANIFEST).write_bytes(raw)
    (bundle / MANIFEST_DIGEST).write_text(digest_line(raw))
    with pytest.raises(BundleError):
        verify_bundle(bundle)
    result = CliRunner().invoke(cli, ["verify", str(bundle)])
    assert result.exit_code == 2, result.output


def test_an_archive_with_too_many_members_is_refused(tmp_path: Path) -> None:
    archive = _tar_gz(tmp_path / "many.tar.gz", [_file(f"f{i}", b"") for i in range(1001)])
    with pytest.raises(BundleError, match="more than 1000 members"):
        safe_extract(archive, tmp_path / "dest")
    assert list((tmp_path / "dest").iterdir()) == []
