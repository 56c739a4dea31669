from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trimformer.errors import GateFailed, UserError
from trimformer.pipeline.stages.validate import open_source_reference, run_validate
from trimformer.runtime.session import resolve_provider
from trimformer.validation.validate import ValidateConfig, parse_grid, validate

REPORT_KEYS = {
    "model",
    "task",
    "provider",
    "threads",
    "n_examples",
    "accuracy",
    "agreement",
    "mean_kl",
    "size_mb",
    "latency_ms",
    "throughput_per_s",
    "natural_latency_ms",
    "reference",
    "speedup",
    "gates",
    "env",
}


def _fast(**kwargs: object) -> ValidateConfig:
    defaults: dict[str, object] = {
        "grid": ((1, 16), (4, 16)),
        "runs": 3,
        "warmup": 1,
        "min_seconds": 0.0,
        "natural_samples": 5,
    }
    defaults.update(kwargs)
    return ValidateConfig(**defaults)  # type: ignore[arg-type]


def test_report_has_the_documented_keys(
    tiny_bert_onnx: Path, tiny_bert: Path, tiny_csv: Path, tmp_path: Path
) -> None:
    report = run_validate(
        _fast(
            model=str(tiny_bert_onnx), data=str(tiny_csv), reference=str(tiny_bert), out=str(tmp_path / "r")
        )
    )
    on_disk = json.loads((tmp_path / "r" / "report.json").read_text())
    assert set(on_disk) >= REPORT_KEYS
    assert on_disk["agreement"] == 1.0 and on_disk["mean_kl"] < 1e-6
    assert on_disk["reference"]["provider"] == "pytorch-cpu"
    assert set(on_disk["latency_ms"]) == {"1x16", "4x16"}
    assert set(on_disk["latency_ms"]["1x16"]) == {"mean", "p50", "p90", "p99"}
    # The speed-up at each shape is the reference's p50 over the model's, as both are reported.
    assert on_disk["speedup"] == {
        shape: round(on_disk["reference"]["latency_ms"][shape]["p50"] / stats["p50"], 3)
        for shape, stats in on_disk["latency_ms"].items()
    }
    assert on_disk["gates"] == {"passed": True, "failed": []}
    assert 0.0 <= report["accuracy"] <= 1.0
    assert (tmp_path / "r" / "report.md").read_text().startswith("# Validation of")


def test_artifact_as_reference_and_speedup_gate(tiny_bert_onnx: Path, tiny_csv: Path, tmp_path: Path) -> None:
    with pytest.raises(GateFailed, match=r"min_speedup: .* at 1x16 \(needs 100.00x\)"):
        validate(
            _fast(
                model=str(tiny_bert_onnx),
                data=str(tiny_csv),
                reference=str(tiny_bert_onnx),
                min_speedup=100.0,
                out=str(tmp_path / "r"),
            )
        )
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["gates"]["passed"] is False and report["agreement"] == 1.0


def test_accuracy_gate_fails_against_a_different_model(
    tiny_bert_onnx: Path, tiny_plain_onnx: Path, tiny_csv: Path, tmp_path: Path
) -> None:
    # Two untrained models disagree; a zero-point budget fails unless accuracy happens to be equal.
    report_cfg = _fast(
        model=str(tiny_plain_onnx), data=str(tiny_csv), reference=str(tiny_bert_onnx), out=str(tmp_path / "r")
    )
    report = validate(report_cfg)
    drop = (report["reference"]["accuracy"] - report["accuracy"]) * 100
    cfg = _fast(
        model=str(tiny_plain_onnx),
        data=str(tiny_csv),
        reference=str(tiny_bert_onnx),
        max_accuracy_drop=max(drop, 0) - 0.5 if drop > 0 else 0.0,
        out=str(tmp_path / "r2"),
    )
    if drop > 0:
        with pytest.raises(GateFailed, match="max_accuracy_drop"):
            validate(cfg)
    else:
        assert validate(cfg)["gates"]["passed"]


def test_size_gate_and_breakdown_need_no_reference(
    tiny_bert_onnx: Path, tiny_csv: Path, tmp_path: Path
) -> None:
    from trimformer.artifact import ModelArtifact

    size_mb = ModelArtifact.open(tiny_bert_onnx).size_bytes() / 1e6
    report = validate(
        _fast(
            model=str(tiny_bert_onnx),
            data=str(tiny_csv),
            max_size_mb=size_mb * 1.01,
            out=str(tmp_path / "ok"),
        )
    )
    parts = report["size_breakdown"]
    assert report["gates"]["passed"] and parts["model_files_mb"] == round(size_mb, 3)
    # The word (and position, type) tables plus the rest are the model files; the tokenizer is beside them.
    assert parts["embeddings_mb"] + parts["encoder_mb"] == pytest.approx(parts["model_files_mb"], abs=2e-3)
    assert parts["embeddings_mb"] > 0 and parts["tokenizer_mb"] > 0
    with pytest.raises(GateFailed, match=r"max_size_mb: the model files are .* MB \(limit 0\.05\)"):
        validate(
            _fast(model=str(tiny_bert_onnx), data=str(tiny_csv), max_size_mb=0.05, out=str(tmp_path / "r"))
        )
    with pytest.raises(UserError, match="--max-size-mb must be a positive number of MB"):
        validate(_fast(model=str(tiny_bert_onnx), data=str(tiny_csv), max_size_mb=0.0))


def test_gates_need_a_reference(tiny_bert_onnx: Path, tiny_csv: Path) -> None:
    with pytest.raises(UserError, match="pass --reference"):
        validate(_fast(model=str(tiny_bert_onnx), data=str(tiny_csv), max_accuracy_drop=1.0))


def test_missing_provider_names_what_is_installed() -> None:
    with pytest.raises(UserError, match=r"provider 'cuda' is not available .*it has: cpu"):
        resolve_provider("cuda", installed=["CPUExecutionProvider"])
    assert resolve_provider("tensorrt", installed=["TensorrtExecutionProvider", "CPUExecutionProvider"]) == (
        "TensorrtExecutionProvider"
    )
    with pytest.raises(UserError, match="unknown provider 'tpu'"):
        resolve_provider("tpu")


def test_grid_parsing() -> None:
    assert parse_grid("1x128, 32x128") == ((1, 128), (32, 128))
    with pytest.raises(UserError, match="BATCHxSEQ"):
        parse_grid("1by128")


def test_labels_absent_from_model(tiny_bert_onnx: Path, tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("text,label\ngood,joy\n")
    with pytest.raises(UserError, match="absent from the model's label map: joy"):
        validate(_fast(model=str(tiny_bert_onnx), data=str(data)))


def test_provider_chain_for_gpu_providers_with_options() -> None:
    from trimformer.validation.runners import ProviderOptions, provider_chain

    installed = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    chain = provider_chain("tensorrt", ProviderOptions(device_id=1, trt_cache="/c", trt_fp16=True), installed)
    assert chain[0][0] == "TensorrtExecutionProvider"
    assert chain[0][1] == {
        "device_id": 1,
        "trt_fp16_enable": True,
        "trt_int8_enable": False,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": "/c",
    }
    assert chain[1] == ("CUDAExecutionProvider", {"device_id": 1}) and chain[2] == "CPUExecutionProvider"
    assert provider_chain("cpu", ProviderOptions(), installed) == ["CPUExecutionProvider"]


def test_several_providers_refuse_a_missing_one_before_measuring(
    tiny_bert_onnx: Path, tiny_csv: Path, tmp_path: Path
) -> None:
    with pytest.raises(UserError, match="provider 'cuda' is not available"):
        validate(
            _fast(
                model=str(tiny_bert_onnx),
                data=str(tiny_csv),
                providers=("cpu", "cuda"),
                out=str(tmp_path / "r"),
            )
        )
    assert not (tmp_path / "r").exists()


def test_a_pytorch_reference_needs_an_opener(tiny_bert_onnx: Path, tiny_bert: Path, tiny_csv: Path) -> None:
    # validate() alone never loads torch: a model folder as reference is refused, in one line.
    config = _fast(model=str(tiny_bert_onnx), data=str(tiny_csv), reference=str(tiny_bert), limit=4)
    with pytest.raises(UserError, match=r"is not an artifact folder \(no trimformer.json\)"):
        validate(config)


def test_the_pytorch_opener_runs_the_source_on_the_threads_given(tiny_bert: Path) -> None:
    reference = open_source_reference(str(tiny_bert), 2)
    assert reference.runner.provider == "pytorch-cpu" and getattr(reference.runner, "threads", None) == 2
    assert reference.task == "sequence-classification" and reference.size_mb > 0
    logits = reference.runner.run(reference.encoder(["good phone", "bad"]))
    assert logits.shape == (2, 3) and logits.dtype.name == "float32"


def test_validation_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, trimformer.validation.validate, trimformer.validation.reference; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
