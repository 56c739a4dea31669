"""Every bad input of the foundation: exit 2, one line naming the problem, no traceback, nothing written."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.builders import make_csv, make_hf_model
from trimformer import __version__
from trimformer.cli import cli


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--quiet", *args])
    # click >= 8.2 mixes stderr into ``output``.
    return result.exit_code, result.output


def validate(model: Path, data: Path | str, *extra: str) -> tuple[int, str]:
    return invoke("validate", str(model), "--data", str(data), *extra)


def assert_user_error(code: int, output: str, pattern: str) -> None:
    import re

    assert code == 2, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert re.search(pattern, lines[0]), lines[0]


def test_help_and_version() -> None:
    code, out = invoke("--help")
    assert code == 0 and "export" in out and "validate" in out and "train" in out
    code, out = invoke("--version")
    assert code == 0 and __version__ in out


def test_python_m_entry_point() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "trimformer", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and __version__ in done.stdout


def test_export_then_validate_json(tiny_bert: Path, tiny_csv: Path, tmp_path: Path) -> None:
    code, out = invoke("--json", "export", str(tiny_bert), "--out", str(tmp_path / "a"))
    assert code == 0, out
    assert json.loads(out)["opset"] == 17
    code, out = invoke(
        "--json",
        "validate",
        str(tmp_path / "a"),
        "--data",
        str(tiny_csv),
        "--grid",
        "1x8",
        "--runs",
        "2",
        "--warmup",
        "0",
        "--reference",
        str(tiny_bert),
        "--max-accuracy-drop",
        "0.5",
    )
    assert code == 0, out
    report = json.loads(out)
    assert report["gates"]["passed"] and report["agreement"] == 1.0


def test_gate_failure_exits_1_and_still_writes_the_report(
    tiny_bert_onnx: Path, tiny_csv: Path, tmp_path: Path
) -> None:
    code, out = validate(
        tiny_bert_onnx,
        tiny_csv,
        "--grid",
        "1x8",
        "--runs",
        "2",
        "--reference",
        str(tiny_bert_onnx),
        "--min-speedup",
        "50",
        "--out",
        str(tmp_path / "r"),
    )
    assert code == 1
    assert "validation gate failed: min_speedup" in out
    assert json.loads((tmp_path / "r" / "report.json").read_text())["gates"]["passed"] is False


# --- the bad-input matrix -------------------------------------------------------------------


def test_model_path_missing(tmp_path: Path) -> None:
    code, out = invoke("export", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert_user_error(code, out, "does not exist")
    assert not (tmp_path / "o").exists()


def test_model_folder_without_model(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, out = invoke("export", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert_user_error(code, out, "no model in")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture(tmp_path: Path) -> None:
    folder = make_hf_model(tmp_path / "m")
    text = (folder / "config.json").read_text().replace('"model_type": "bert"', '"model_type": "t5"')
    (folder / "config.json").write_text(text)
    code, out = invoke("export", str(folder), "--out", str(tmp_path / "o"))
    assert_user_error(code, out, "supported families: encoders bert, roberta, xlm-roberta, distilbert")
    assert not (tmp_path / "o").exists()


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


def test_pickle_only_checkpoint_refused(tmp_path: Path) -> None:
    folder = make_hf_model(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Evil()}))
    code, out = invoke("export", str(folder), "--out", str(tmp_path / "o"))
    assert_user_error(code, out, "weights_only")
    assert "pwned" not in out
    assert not (tmp_path / "o").exists()


def test_dataset_without_the_column(tiny_bert_onnx: Path, tmp_path: Path) -> None:
    data = make_csv(tmp_path / "d.csv", rows=5)
    code, out = validate(tiny_bert_onnx, data, "--text-column", "body", "--out", str(tmp_path / "r"))
    assert_user_error(code, out, r"no column 'body' \(columns: text, label\)")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        ("", "empty"),
        ("nice,joyful\n", "absent from the model's label map: joyful; the model knows: negative"),
    ],
    ids=["empty dataset", "labels absent from the label map"],
)
def test_unusable_dataset(tiny_bert_onnx: Path, tmp_path: Path, rows: str, pattern: str) -> None:
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + rows)
    code, out = validate(tiny_bert_onnx, data, "--out", str(tmp_path / "r"))
    assert_user_error(code, out, pattern)
    assert not (tmp_path / "r").exists()


def test_corrupt_onnx(tiny_bert_onnx: Path, tiny_csv: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_bert_onnx, broken)
    data = (broken / "model.onnx").read_bytes()
    (broken / "model.onnx").write_bytes(data[: len(data) // 2])
    code, out = validate(broken, tiny_csv, "--out", str(tmp_path / "r"))
    assert_user_error(code, out, "corrupt or truncated|not a readable ONNX|cannot load")
    assert not (tmp_path / "r").exists()


def test_provider_not_installed(tiny_bert_onnx: Path, tiny_csv: Path, tmp_path: Path) -> None:
    code, out = validate(tiny_bert_onnx, tiny_csv, "--provider", "tensorrt", "--out", str(tmp_path / "r"))
    assert_user_error(code, out, r"provider 'tensorrt' is not available .*it has: .*cpu")
    assert not (tmp_path / "r").exists()


def test_existing_output_without_overwrite(tiny_bert: Path, tmp_path: Path) -> None:
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    code, out = invoke("export", str(tiny_bert), "--out", str(tmp_path / "o"))
    assert_user_error(code, out, "already exists; pass --overwrite")
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"


def test_train_output_exists_without_overwrite(tiny_bert: Path, tiny_csv: Path, tmp_path: Path) -> None:
    (tmp_path / "o").mkdir()
    code, out = invoke(
        "train", "--model", str(tiny_bert), "--data", str(tiny_csv), "--out", str(tmp_path / "o")
    )
    assert_user_error(code, out, "already exists")


def test_not_an_artifact(tmp_path: Path, tiny_csv: Path) -> None:
    (tmp_path / "m").mkdir()
    code, out = validate(tmp_path / "m", tiny_csv)
    assert_user_error(code, out, "not a trimformer artifact")


def test_unknown_builtin_dataset(tiny_bert_onnx: Path) -> None:
    code, out = validate(tiny_bert_onnx, "builtin:imdb")
    assert_user_error(code, out, "unknown built-in dataset 'builtin:imdb'; known: builtin:tweets")


def test_debug_shows_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["--debug", "export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
    )
    assert result.exception is not None and result.exit_code != 0
