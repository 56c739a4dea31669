"""Packaging: layout, manifest, reproducibility, ORT-format copy, report handling, bad inputs, CLI."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from trimformer.artifact import ModelArtifact
from trimformer.cli.commands import cli
from trimformer.errors import UserError
from trimformer.packaging.package import archive_path_for, package_artifact
from trimformer.runtime import MANIFEST, MANIFEST_DIGEST, Predictor, verify_bundle
from trimformer.runtime.archive import GZIP_HEADER

EXPECTED_FILES = {"config.json", "model.onnx", "tokenizer.json", "trimformer.json"}


def _bytes_of(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def report_json(tiny_bert_onnx: Path, tiny_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trimformer.validation.validate import ValidateConfig, validate

    out = tmp_path_factory.mktemp("report") / "report"
    validate(
        ValidateConfig(
            model=str(tiny_bert_onnx),
            data=str(tiny_csv),
            grid=((1, 16),),
            runs=2,
            warmup=1,
            min_seconds=0.0,
            natural_samples=3,
            out=str(out),
        )
    )
    return out / "report.json"


@pytest.fixture(scope="module")
def bundle(tiny_bert_onnx: Path, report_json: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "sentiment"
    package_artifact(tiny_bert_onnx, out, report=report_json, recipe_text="[model]\npath = 'x'\n")
    return out


def test_layout_and_manifest(bundle: Path, tiny_bert_onnx: Path) -> None:
    files = {p.name for p in bundle.iterdir()}
    assert files == EXPECTED_FILES | {MANIFEST, MANIFEST_DIGEST}
    manifest = json.loads((bundle / MANIFEST).read_text())
    # Every other file is listed with its real hash and size; the manifest is pinned by manifest.sha256.
    assert set(manifest["files"]) == EXPECTED_FILES
    for name, entry in manifest["files"].items():
        data = (bundle / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    digest = hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest()
    assert (bundle / MANIFEST_DIGEST).read_text() == f"{digest}  manifest.json\n"
    model = manifest["model"]
    assert model["opset"] == 17 and model["ir_version"] >= 7
    assert [i["name"] for i in model["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert model["inputs"][0]["dynamic_axes"] == {"0": "batch", "1": "sequence"}
    assert model["outputs"][0]["shape"] == ["batch", 3] and model["outputs"][0]["dynamic_axes"] == {
        "0": "batch"
    }
    assert model["quantized"] is False
    assert manifest["runtime"] == {"onnxruntime": ort.__version__, "providers": ["CPUExecutionProvider"]}
    assert manifest["labels"] == ["negative", "neutral", "positive"]
    art = ModelArtifact.open(tiny_bert_onnx)
    # Lineage reaches back to the source checkpoint and ends at the shipped bytes.
    assert manifest["lineage"]["origin_hash"] == art.meta.source_hash
    assert manifest["lineage"]["model_hash"] == "sha256:" + manifest["files"]["model.onnx"]["sha256"]
    assert [s["step"] for s in manifest["lineage"]["steps"]] == ["export"]
    assert manifest["recipe"]["text"] == "[model]\npath = 'x'\n"
    # Model and tokenizer are the artifact's bytes, untouched; its metadata too, less the local
    # folder the export came from.
    for name in ("model.onnx", "tokenizer.json"):
        assert (bundle / name).read_bytes() == (tiny_bert_onnx / name).read_bytes()
    shipped, built = (json.loads((f / "trimformer.json").read_text()) for f in (bundle, tiny_bert_onnx))
    assert built["extras"].pop("exported_from") not in (bundle / "trimformer.json").read_text()
    assert shipped == built
    config = json.loads((bundle / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert config["model_type"] == "bert"


def test_manifest_carries_the_validation_report(bundle: Path, report_json: Path) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    report = json.loads(report_json.read_text())
    validation = manifest["validation"]
    assert validation["metrics"]["accuracy"] == report["accuracy"]
    assert validation["metrics"]["latency_ms"] == report["latency_ms"]
    assert validation["validated_on"]["onnxruntime"] == report["env"]["onnxruntime"]
    assert validation["validated_on"]["providers"] == ["CPUExecutionProvider"]
    assert validation["report_sha256"] == hashlib.sha256(report_json.read_bytes()).hexdigest()
    # No absolute path of the machine that packaged it.
    assert str(Path.cwd()) not in (bundle / MANIFEST).read_text()
    assert "/tmp" not in (bundle / MANIFEST).read_text()


def test_archive_is_canonical_and_has_a_sidecar(bundle: Path) -> None:
    archive = archive_path_for(bundle)
    assert archive.name == "sentiment.tar.gz"
    raw = archive.read_bytes()
    assert raw[: len(GZIP_HEADER)] == GZIP_HEADER  # no file name, mtime 0
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(EXPECTED_FILES | {MANIFEST, MANIFEST_DIGEST})
    assert all(m.isreg() and m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)
    assert all(m.mode == 0o644 for m in members)
    sidecar = archive.with_name(archive.name + ".sha256")
    assert sidecar.read_text() == f"{hashlib.sha256(raw).hexdigest()}  sentiment.tar.gz\n"
    assert verify_bundle(archive)["archive_sha256_checked"] is True


def test_packaging_twice_is_byte_identical(tiny_bert_onnx: Path, report_json: Path, tmp_path: Path) -> None:
    first = package_artifact(
        tiny_bert_onnx, tmp_path / "one" / "bundle-a", report=report_json, recipe_text="r"
    )
    second = package_artifact(
        tiny_bert_onnx, tmp_path / "two" / "other-name", report=report_json, recipe_text="r"
    )
    assert _bytes_of(first.folder) == _bytes_of(second.folder)
    assert first.archive.read_bytes() == second.archive.read_bytes()
    assert first.digest == second.digest
    # And again over the first, with --overwrite.
    third = package_artifact(
        tiny_bert_onnx, first.folder, report=report_json, recipe_text="r", overwrite=True
    )
    assert third.archive.read_bytes() == second.archive.read_bytes()


def test_packaging_with_ort_twice_is_byte_identical(tiny_plain_onnx: Path, tmp_path: Path) -> None:
    first = package_artifact(tiny_plain_onnx, tmp_path / "one" / "a", ort_format=True)
    second = package_artifact(tiny_plain_onnx, tmp_path / "two" / "b", ort_format=True)
    if not (first.manifest["ort_format"]["reproducible"] and second.manifest["ort_format"]["reproducible"]):
        pytest.skip("this kernel refuses personality(ADDR_NO_RANDOMIZE): model.ort cannot be pinned here")
    assert _bytes_of(first.folder) == _bytes_of(second.folder)
    assert first.archive.read_bytes() == second.archive.read_bytes()


def test_ort_format_copy_loads_and_matches(tiny_bert_onnx: Path, tmp_path: Path) -> None:
    result = package_artifact(tiny_bert_onnx, tmp_path / "b", ort_format=True)
    assert (result.folder / "model.ort").is_file()
    config = (result.folder / "model.required_operators.config").read_text()
    assert "ai.onnx;" in config and str(tmp_path) not in config
    assert result.manifest["ort_format"]["smoke_max_abs_diff"] < 1e-4
    texts = ["good phone", "the worst store today", "a"]
    from_onnx = Predictor(result.folder).run(texts)
    from_ort = Predictor(result.archive, model_format="ort").run(texts)
    np.testing.assert_allclose(from_ort, from_onnx, atol=1e-5)
    assert verify_bundle(result.folder)["ort_format"]["file"] == "model.ort"


def test_package_refuses_bad_destinations(tiny_bert_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"use --out x"):
        package_artifact(tiny_bert_onnx, tmp_path / "x.tar.gz")
    with pytest.raises(UserError, match="overlaps the model folder"):
        package_artifact(tiny_bert_onnx, tiny_bert_onnx / "bundle")
    with pytest.raises(UserError, match="overlaps the model folder"):
        package_artifact(tiny_bert_onnx, tiny_bert_onnx)
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        package_artifact(tiny_bert_onnx, tmp_path / "taken")
    (tmp_path / "only.tar.gz").write_bytes(b"old")
    with pytest.raises(UserError, match=r"archive .*only.tar.gz already exists"):
        package_artifact(tiny_bert_onnx, tmp_path / "only")
    assert not (tmp_path / "only").exists() and (tmp_path / "only.tar.gz").read_bytes() == b"old"
    with pytest.raises(UserError, match="not a trimformer artifact"):
        package_artifact(tmp_path / "taken", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["only.tar.gz", "taken"]  # nothing half-written


def test_package_refuses_a_model_changed_outside_trimformer(tiny_bert_onnx: Path, tmp_path: Path) -> None:
    copy = tmp_path / "art"
    shutil.copytree(tiny_bert_onnx, copy)
    import onnx

    model = onnx.load(str(copy / "model.onnx"))
    model.doc_string = "edited by hand"
    onnx.save(model, str(copy / "model.onnx"))
    with pytest.raises(UserError, match="changed outside trimformer"):
        package_artifact(copy, tmp_path / "out")


def test_package_refuses_foreign_or_broken_reports(
    tiny_bert_onnx: Path, tiny_plain_onnx: Path, report_json: Path, tmp_path: Path
) -> None:
    report = json.loads(report_json.read_text())
    # An older report without model_hash is matched by the folder it names.
    foreign = {k: v for k, v in dict(report, model=str(tiny_plain_onnx)).items() if k != "model_hash"}
    (tmp_path / "foreign.json").write_text(json.dumps(foreign))
    with pytest.raises(UserError, match="different model"):
        package_artifact(tiny_bert_onnx, tmp_path / "a", report=tmp_path / "foreign.json")
    hashed = dict(report, model_hash="sha256:" + "0" * 64)
    (tmp_path / "hashed.json").write_text(json.dumps(hashed))
    with pytest.raises(UserError, match="measured on another model"):
        package_artifact(tiny_bert_onnx, tmp_path / "b", report=tmp_path / "hashed.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        package_artifact(tiny_bert_onnx, tmp_path / "c", report=tmp_path / "broken.json")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(UserError, match="not a trimformer validation report"):
        package_artifact(tiny_bert_onnx, tmp_path / "d", report=tmp_path / "other.json")
    with pytest.raises(UserError, match="does not exist"):
        package_artifact(tiny_bert_onnx, tmp_path / "e", report=tmp_path / "missing.json")
    # A report folder is accepted too (validate writes MODEL/report/report.json).
    result = package_artifact(tiny_bert_onnx, tmp_path / "f", report=report_json.parent)
    assert result.manifest["validation"]["metrics"]["accuracy"] == report["accuracy"]


def test_feature_extraction_bundle(tmp_path: Path) -> None:
    from tests.builders import make_hf_model
    from trimformer.exporters import export_model

    source = make_hf_model(tmp_path / "src", task="feature-extraction", pooling="mean")
    export_model(source, tmp_path / "onnx")
    result = package_artifact(tmp_path / "onnx", tmp_path / "bundle")
    predictor = Predictor(result.folder)
    vectors = predictor.embed(["good phone", "bad phone"])
    assert vectors.shape == (2, 32) and np.all(np.isfinite(vectors))
    with pytest.raises(UserError, match="call embed"):
        predictor.predict(["x"])


def test_cli_package_then_verify(tiny_bert_onnx: Path, report_json: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[package]\nort = false\n")
    runner = CliRunner()
    out = tmp_path / "dist" / "sentiment"
    args = [
        "package",
        str(tiny_bert_onnx),
        "--out",
        str(out),
        "--report",
        str(report_json),
        "--recipe",
        str(recipe),
    ]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "digest sha256:" in result.output
    assert json.loads((out / MANIFEST).read_text())["recipe"]["text"] == recipe.read_text()
    again = runner.invoke(cli, args)
    assert again.exit_code == 2 and "already exists; pass --overwrite" in again.output
    verified = runner.invoke(cli, ["--json", "verify", str(out) + ".tar.gz"])
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.output)["ok"] is True
    missing = runner.invoke(
        cli, ["package", str(tiny_bert_onnx), "--out", str(tmp_path / "x"), "--recipe", "nope.toml"]
    )
    assert missing.exit_code == 2 and "recipe file nope.toml does not exist" in missing.output


def test_optimum_loads_the_bundle(bundle: Path) -> None:
    """The folder layout is what Optimum's ORTModel classes read (run where optimum is installed)."""
    pytest.importorskip("optimum.onnxruntime")
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    model = ORTModelForSequenceClassification.from_pretrained(str(bundle))
    tokenizer = AutoTokenizer.from_pretrained(str(bundle))
    texts = ["good phone", "the worst store"]
    encoded = tokenizer(texts, return_tensors="np", padding=True)
    logits = model(**encoded).logits
    expected = Predictor(bundle).run(texts)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4)
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}


def test_gzip_stream_has_no_name_or_time(bundle: Path) -> None:
    archive = archive_path_for(bundle)
    with gzip.open(archive) as stream:
        stream.read(1)
        assert stream.mtime == 0  # type: ignore[attr-defined]


def test_pipeline_only_files_and_reports_are_not_shipped(tiny_bert_onnx: Path, tmp_path: Path) -> None:
    copy = tmp_path / "art"
    shutil.copytree(tiny_bert_onnx, copy)
    (copy / "calibration_ranges.json").write_text("{}")
    (copy / "report").mkdir()
    (copy / "report" / "report.json").write_text("{}")
    (copy / "vocab.txt").write_text("[PAD]\n")
    result = package_artifact(copy, tmp_path / "out")
    shipped = {p.name for p in result.folder.iterdir()}
    assert "calibration_ranges.json" not in shipped and "report" not in shipped
    assert "vocab.txt" in shipped and result.manifest["tokenizer"]["files"] == ["tokenizer.json", "vocab.txt"]
