"""The bad-input matrix: every command, every kind of input (models, data, recipes, bundles, options).

Each case must exit 2 with exactly one line that names the problem, print no traceback, and leave no
output folder behind (nor any temporary sibling of it).
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.builders import make_causal_lm, make_csv, make_hf_model
from trimformer.cli.commands import cli

Case = Callable[[Path, dict[str, Path]], list[str]]


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


def _hf_with(tmp: Path, edit: Callable[[Path], None]) -> Path:
    folder = make_hf_model(tmp / "m")
    edit(folder)
    return folder


def _copy_artifact(fx: dict[str, Path], tmp: Path, edit: Callable[[Path], None]) -> Path:
    target = tmp / "art"
    shutil.copytree(fx["onnx"], target)
    edit(target)
    return target


def _forget_source(folder: Path) -> None:
    """As if the PyTorch folder the artifact was exported from were gone (an artifact from elsewhere)."""
    meta = json.loads((folder / "trimformer.json").read_text())
    meta["extras"].pop("exported_from")
    (folder / "trimformer.json").write_text(json.dumps(meta))


def _unigram_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models

    Tokenizer(models.Unigram([("[PAD]", 0.0), ("good", -1.0)], 0, False)).save(str(folder / "tokenizer.json"))


def _dangling_special(folder: Path) -> None:
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["post_processor"]["special_tokens"]["[CLS]"]["ids"] = [999]
    (folder / "tokenizer.json").write_text(json.dumps(spec))


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _recipe(tmp: Path, fx: dict[str, Path], extra: str) -> Path:
    return _write(
        tmp / "r.toml",
        f'[model]\nsource = "{fx["bert"]}"\n[data]\nsource = "{fx["csv"]}"\n{extra}',
    )


def _quantize(t: Path, fx: dict[str, Path], *extra: str) -> list[str]:
    return ["quantize", str(fx["onnx"]), "--calibration", str(fx["csv"]), *extra, "--out", str(t / OUT)]


def _tampered_bundle(tmp: Path, fx: dict[str, Path]) -> Path:
    bundle = tmp / "bundle"
    assert (
        CliRunner().invoke(cli, ["--quiet", "package", str(fx["onnx"]), "--out", str(bundle)]).exit_code == 0
    )
    (bundle / "config.json").write_text((bundle / "config.json").read_text() + " ")
    return bundle


OUT = "out"
CASES: dict[str, tuple[Case, str]] = {
    # --- models --------------------------------------------------------------------------
    "export: model path missing": (
        lambda t, fx: ["export", str(t / "nope"), "--out", str(t / OUT)],
        "does not exist",
    ),
    "export: folder without a model": (
        lambda t, fx: ["export", str((t / "empty").mkdir() or t / "empty"), "--out", str(t / OUT)],
        "no model in",
    ),
    "export: unsupported architecture": (
        lambda t, fx: [
            "export",
            str(
                _hf_with(
                    t,
                    lambda f: _write(
                        f / "config.json",
                        (f / "config.json").read_text().replace('"model_type": "bert"', '"model_type": "t5"'),
                    ),
                )
            ),
            "--out",
            str(t / OUT),
        ],
        "supported families: encoders bert",
    ),
    "export: pickle-only checkpoint": (
        lambda t, fx: [
            "export",
            str(
                _hf_with(
                    t,
                    lambda f: (
                        (f / "model.safetensors").unlink(),
                        (f / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Evil()})),
                    ),
                )
            ),
            "--out",
            str(t / OUT),
        ],
        "weights_only",
    ),
    "export: config without weights": (
        lambda t, fx: [
            "export",
            str(_hf_with(t, lambda f: (f / "model.safetensors").unlink())),
            "--out",
            str(t / OUT),
        ],
        "no weights",
    ),
    "export: opset out of range": (
        lambda t, fx: ["export", str(fx["bert"]), "--out", str(t / OUT), "--opset", "9"],
        "opset 9 is not supported",
    ),
    "export: output exists": (
        lambda t, fx: ["export", str(fx["bert"]), "--out", str((t / OUT).mkdir() or t / OUT)],
        "already exists",
    ),
    "fuse: model path missing": (
        lambda t, fx: ["fuse", str(t / "nope"), "--out", str(t / OUT)],
        "does not exist",
    ),
    "validate: not an artifact": (
        lambda t, fx: ["validate", str(fx["bert"]), "--data", str(fx["csv"]), "--out", str(t / OUT)],
        "not a trimformer artifact",
    ),
    "validate: truncated model": (
        lambda t, fx: [
            "validate",
            str(
                _copy_artifact(
                    fx, t, lambda a: (a / "model.onnx").write_bytes((a / "model.onnx").read_bytes()[:5000])
                )
            ),
            "--data",
            str(fx["csv"]),
            "--out",
            str(t / OUT),
        ],
        "corrupt or truncated|not a readable ONNX|cannot load",
    ),
    "validate: malformed trimformer.json": (
        lambda t, fx: [
            "validate",
            str(_copy_artifact(fx, t, lambda a: _write(a / "trimformer.json", "{"))),
            "--data",
            str(fx["csv"]),
            "--out",
            str(t / OUT),
        ],
        "malformed",
    ),
    # --- data ----------------------------------------------------------------------------
    "validate: dataset file missing": (
        lambda t, fx: ["validate", str(fx["onnx"]), "--data", str(t / "none.csv"), "--out", str(t / OUT)],
        "does not exist",
    ),
    "validate: unsupported dataset format": (
        lambda t, fx: [
            "validate",
            str(fx["onnx"]),
            "--data",
            str(_write(t / "d.xlsx", "x")),
            "--out",
            str(t / OUT),
        ],
        "unsupported dataset format",
    ),
    "validate: no such text column": (
        lambda t, fx: [
            "validate",
            str(fx["onnx"]),
            "--data",
            str(fx["csv"]),
            "--text-column",
            "body",
            "--out",
            str(t / OUT),
        ],
        r"no column 'body' \(columns: text, label\)",
    ),
    "validate: no such label column": (
        lambda t, fx: [
            "validate",
            str(fx["onnx"]),
            "--data",
            str(fx["csv"]),
            "--label-column",
            "y",
            "--out",
            str(t / OUT),
        ],
        "no label column 'y'",
    ),
    "validate: empty dataset": (
        lambda t, fx: [
            "validate",
            str(fx["onnx"]),
            "--data",
            str(_write(t / "e.csv", "text,label\n")),
            "--out",
            str(t / OUT),
        ],
        "empty",
    ),
    "validate: labels outside the label map": (
        lambda t, fx: [
            "validate",
            str(fx["onnx"]),
            "--data",
            str(_write(t / "l.csv", "text,label\ngood,joy\n")),
            "--out",
            str(t / OUT),
        ],
        "absent from the model's label map: joy",
    ),
    "validate: broken JSONL line": (
        lambda t, fx: [
            "validate",
            str(fx["onnx"]),
            "--data",
            str(_write(t / "b.jsonl", '{"text": "a"}\n{oops\n')),
            "--out",
            str(t / OUT),
        ],
        r"b.jsonl:2 is not valid JSON",
    ),
    "validate: unknown built-in dataset": (
        lambda t, fx: ["validate", str(fx["onnx"]), "--data", "builtin:imdb", "--out", str(t / OUT)],
        "unknown built-in dataset",
    ),
    "train: unlabelled data": (
        lambda t, fx: [
            "train",
            "--model",
            str(fx["bert"]),
            "--data",
            str(_write(t / "u.csv", "text\na\nb\nc\n" * 5)),
            "--out",
            str(t / OUT),
        ],
        "has no labels",
    ),
    # --- options -------------------------------------------------------------------------
    "validate: provider not installed": (
        lambda t, fx: [
            "validate",
            str(fx["onnx"]),
            "--data",
            str(fx["csv"]),
            "--provider",
            "tensorrt",
            "--out",
            str(t / OUT),
        ],
        "provider 'tensorrt' is not available",
    ),
    "validate: bad grid": (
        lambda t, fx: [
            "validate",
            str(fx["onnx"]),
            "--data",
            str(fx["csv"]),
            "--grid",
            "1by128",
            "--out",
            str(t / OUT),
        ],
        "BATCHxSEQ",
    ),
    "validate: gate without reference": (
        lambda t, fx: [
            "validate",
            str(fx["onnx"]),
            "--data",
            str(fx["csv"]),
            "--min-speedup",
            "2",
            "--out",
            str(t / OUT),
        ],
        "pass --reference",
    ),
    "train: zero steps": (
        lambda t, fx: [
            "train",
            "--model",
            str(fx["bert"]),
            "--data",
            str(fx["csv"]),
            "--steps",
            "0",
            "--out",
            str(t / OUT),
        ],
        "--steps must be at least 1",
    ),
    "quantize: unknown preset": (
        lambda t, fx: [
            "quantize",
            str(fx["onnx"]),
            "--calibration",
            str(fx["csv"]),
            "--preset",
            "tpu",
            "--out",
            str(t / OUT),
        ],
        "tpu",
    ),
    "quantize: unknown target": (
        lambda t, fx: _quantize(t, fx, "--target", "tpu"),
        r"unknown target 'tpu'; known targets: x86-vnni, x86-avx2, arm64, wasm, webgpu, tensorrt, auto",
    ),
    "quantize: a target without int8 kernels": (
        lambda t, fx: _quantize(t, fx, "--target", "webgpu"),
        "target webgpu has no int8 activation kernels",
    ),
    "quantize: an op the target cannot run": (
        lambda t, fx: _quantize(t, fx, "--target", "tensorrt", "--format", "qoperator", "--samples", "8"),
        r"the quantize pass made a graph with com\.microsoft\.\w+.*which target tensorrt cannot run",
    ),
    "quantize: preset and target disagree": (
        lambda t, fx: _quantize(t, fx, "--preset", "cpu-vnni", "--target", "x86-avx2"),
        "--preset cpu-vnni is the preset of target x86-vnni, not x86-avx2",
    ),
    "fuse: unknown target": (
        lambda t, fx: ["fuse", str(fx["onnx"]), "--target", "npu", "--out", str(t / OUT)],
        "unknown target 'npu'",
    ),
    "prune: unknown target": (
        lambda t, fx: ["prune", str(fx["onnx"]), "--flops", "0.5", "--target", "npu", "--out", str(t / OUT)],
        "unknown target 'npu'",
    ),
    "optimize: unknown target": (
        lambda t, fx: [
            "optimize",
            str(fx["onnx"]),
            "--passes",
            "fuse",
            "--target",
            "npu",
            "--out",
            str(t / OUT),
        ],
        "unknown target 'npu'",
    ),
    "run: unknown target in a recipe": (
        lambda t, fx: [
            "run",
            str(_write(t / "r.toml", f'target = "npu"\n[model]\nsource = "{fx["bert"]}"\n')),
        ],
        r"target: unknown target 'npu'",
    ),
    "quantize: unknown method": (
        lambda t, fx: [
            "quantize",
            str(fx["onnx"]),
            "--calibration",
            str(fx["csv"]),
            "--method",
            "magic",
            "--out",
            str(t / OUT),
        ],
        "magic",
    ),
    "quantize: more samples than the data has": (
        lambda t, fx: [
            "quantize",
            str(fx["onnx"]),
            "--calibration",
            str(fx["csv"]),
            "--samples",
            "100000",
            "--out",
            str(t / OUT),
        ],
        "100000|rows|samples",
    ),
    "prune: ratio outside [0, 1)": (
        lambda t, fx: [
            "prune",
            str(fx["onnx"]),
            "--calibration",
            str(fx["csv"]),
            "--heads",
            "1.5",
            "--out",
            str(t / OUT),
        ],
        r"1\.5|\[0, 1\)",
    ),
    "prune: fisher without a PyTorch source": (
        lambda t, fx: [
            "prune",
            str(_copy_artifact(fx, t, _forget_source)),
            "--calibration",
            str(fx["csv"]),
            "--heads",
            "0.5",
            "--importance",
            "fisher",
            "--out",
            str(t / OUT),
        ],
        "--source",
    ),
    "optimize: unknown pass": (
        lambda t, fx: ["optimize", str(fx["onnx"]), "--passes", "shrink", "--out", str(t / OUT)],
        "unknown pass 'shrink'; known passes:",
    ),
    "distill: layer out of range": (
        lambda t, fx: [
            "distill",
            "--teacher",
            str(fx["bert"]),
            "--data",
            str(fx["csv"]),
            "--layers",
            "0,7",
            "--out",
            str(t / OUT),
        ],
        "7",
    ),
    "distill: more processes than the machine has": (
        lambda t, fx: [
            "distill",
            "--teacher",
            str(fx["bert"]),
            "--data",
            str(fx["csv"]),
            "--layers",
            "1",
            "--nproc-per-node",
            "512",
            "--out",
            str(t / OUT),
        ],
        "512",
    ),
    # --- recipes -------------------------------------------------------------------------
    "run: recipe with a typo'd key": (
        lambda t, fx: [
            "run",
            str(_recipe(t, fx, "[export]\nopset = 17\nopsett = 1\n")),
            "--workdir",
            str(t / OUT),
        ],
        "opsett",
    ),
    "run: unknown pass in a recipe": (
        lambda t, fx: [
            "run",
            str(_recipe(t, fx, '[export]\n[[passes]]\nname = "shrink"\n')),
            "--workdir",
            str(t / OUT),
        ],
        "shrink",
    ),
    "run: out-of-range pass value in a recipe": (
        lambda t, fx: [
            "run",
            "--dry-run",
            str(_recipe(t, fx, '[[passes]]\nname = "prune"\nheads = 1.5\n')),
            "--workdir",
            str(t / OUT),
        ],
        r"r\.toml: passes\[0\]\.heads: must be a fraction in \[0, 1\) to remove \(got 1\.5\)",
    ),
    "run: export opset the exporter cannot write": (
        lambda t, fx: ["run", str(_recipe(t, fx, "[export]\nopset = 11\n")), "--workdir", str(t / OUT)],
        r"r\.toml: export\.opset: must be in \[14, 21\] \(got 11\)",
    ),
    "run: unknown quantize preset in a recipe": (
        lambda t, fx: [
            "run",
            "--dry-run",
            str(_recipe(t, fx, '[[passes]]\nname = "quantize"\npreset = "tpu"\n')),
            "--workdir",
            str(t / OUT),
        ],
        r"passes\[0\]\.preset: unknown preset 'tpu'; known presets: ",
    ),
    "run: recipe file missing": (
        lambda t, fx: ["run", str(t / "none.toml"), "--workdir", str(t / OUT)],
        "none.toml",
    ),
    # --- bundles -------------------------------------------------------------------------
    "verify: bundle missing": (lambda t, fx: ["verify", str(t / "nothing")], "nothing"),
    "verify: tampered bundle": (lambda t, fx: ["verify", str(_tampered_bundle(t, fx))], "config.json"),
    "train: causal LM to classifier training": (
        lambda t, fx: ["train", str(fx["llama"]), "--data", str(fx["csv"]), "--out", str(t / OUT)],
        r"is a causal language model \(llama\); this command takes an encoder",
    ),
    "train: encoder to causal-LM training": (
        lambda t, fx: [
            "train",
            str(fx["bert"]),
            "--task",
            "causal-lm",
            "--data",
            str(fx["csv"]),
            "--out",
            str(t / OUT),
        ],
        r"is an encoder \(bert\); the causal-lm task takes a decoder",
    ),
    "train: causal LM with epochs": (
        lambda t, fx: [
            "train",
            "--task",
            "causal-lm",
            "--data",
            str(fx["csv"]),
            "--epochs",
            "1",
            "--out",
            str(t / OUT),
        ],
        "--epochs is for classifiers",
    ),
    "train: causal LM vocabulary too small": (
        lambda t, fx: [
            "train",
            "--task",
            "causal-lm",
            "--data",
            str(fx["csv"]),
            "--vocab-size",
            "10",
            "--out",
            str(t / OUT),
        ],
        r"--vocab-size must be in \[256, 65536\]",
    ),
    "train: classifier without a model": (
        lambda t, fx: ["train", "--data", str(fx["csv"]), "--out", str(t / OUT)],
        "missing MODEL",
    ),
    "generate: encoder model": (
        lambda t, fx: ["generate", str(fx["onnx"]), "--prompt", "hi"],
        "is a sequence-classification model; generation takes a causal language model",
    ),
    "generate: no new tokens": (
        lambda t, fx: ["generate", str(fx["llama_onnx"]), "--prompt", "hi", "--max-new-tokens", "0"],
        "max_new_tokens must be at least 1",
    ),
    "generate: top-p out of range": (
        lambda t, fx: ["generate", str(fx["llama_onnx"]), "--prompt", "hi", "--top-p", "1.2"],
        r"top_p must be in \(0, 1\]",
    ),
    "generate: negative temperature": (
        lambda t, fx: ["generate", str(fx["llama_onnx"]), "--prompt", "hi", "--temperature", "-1"],
        "temperature must be 0",
    ),
    "generate: prompt longer than the context": (
        lambda t, fx: ["generate", str(fx["llama_onnx"]), "--prompt", "the car is good " * 60],
        "leaves no room in the model's context of 128 tokens",
    ),
    "generate: streaming a batch": (
        lambda t, fx: ["generate", str(fx["llama_onnx"]), "--prompt", "a", "--prompt", "b", "--stream"],
        "give one --prompt",
    ),
    "trim-vocab: coverage under the threshold": (
        lambda t, fx: [
            "trim-vocab",
            str(fx["onnx"]),
            "--corpus",
            str(fx["csv"]),
            "--coverage",
            "0.5",
            "--out",
            str(t / OUT),
        ],
        r"coverage: must be in \[0.95, 1\].*\(got 0.5\)",
    ),
    "trim-vocab: a corpus with no texts": (
        lambda t, fx: [
            "trim-vocab",
            str(fx["onnx"]),
            "--corpus",
            str(_write(t / "empty.csv", "text,label\n,positive\n")),
            "--out",
            str(t / OUT),
        ],
        "has no texts",
    ),
    "trim-vocab: an unsupported tokenizer family": (
        lambda t, fx: [
            "trim-vocab",
            str(_copy_artifact(fx, t, _unigram_tokenizer)),
            "--corpus",
            str(fx["csv"]),
            "--out",
            str(t / OUT),
        ],
        "supports WordPiece .* and byte-level BPE .*; this tokenizer.json has a Unigram model",
    ),
    "trim-vocab: a special token the vocabulary lacks": (
        lambda t, fx: [
            "trim-vocab",
            str(_copy_artifact(fx, t, _dangling_special)),
            "--corpus",
            str(fx["csv"]),
            "--out",
            str(t / OUT),
        ],
        r"special token id\(s\) \[999\].*trimming would drop them",
    ),
    "trim-vocab: a tokenizer.json that is not JSON": (
        lambda t, fx: [
            "trim-vocab",
            str(_copy_artifact(fx, t, lambda f: (f / "tokenizer.json").write_text("{not json"))),
            "--corpus",
            str(fx["csv"]),
            "--out",
            str(t / OUT),
        ],
        "tokenizer.json is not a valid tokenizers file",
    ),
    "trim-vocab: causal LM": (
        lambda t, fx: [
            "trim-vocab",
            str(fx["llama_onnx"]),
            "--corpus",
            str(fx["csv"]),
            "--out",
            str(t / OUT),
        ],
        "the trim-vocab pass works on encoder graphs and .* is a causal-lm model",
    ),
    "quantize: causal LM": (
        lambda t, fx: [
            "quantize",
            str(fx["llama_onnx"]),
            "--calibration",
            str(fx["csv"]),
            "--out",
            str(t / OUT),
        ],
        "works on encoder graphs and .* is a causal-lm model with a KV cache",
    ),
    "quantize: weight-only bits": (
        lambda t, fx: ["quantize", str(fx["llama_onnx"]), "--weight-only", "int3", "--out", str(t / OUT)],
        "--weight-only must be one of int4, int8",
    ),
    "quantize: weight-only option without --weight-only": (
        lambda t, fx: ["quantize", str(fx["onnx"]), "--algo", "gptq", "--out", str(t / OUT)],
        "--algo is a weight-only option; add --weight-only",
    ),
    "quantize: an int8 option with --weight-only": (
        lambda t, fx: [
            "quantize",
            str(fx["llama_onnx"]),
            "--weight-only",
            "int4",
            "--dynamic",
            "--out",
            str(t / OUT),
        ],
        "--dynamic is an option of static int8, not of --weight-only",
    ),
    "quantize: GPTQ without calibration": (
        lambda t, fx: [
            "quantize",
            str(fx["llama_onnx"]),
            "--weight-only",
            "int4",
            "--algo",
            "gptq",
            "--out",
            str(t / OUT),
        ],
        "GPTQ is calibrated on text: pass --calibration",
    ),
    "quantize: weight-only block size": (
        lambda t, fx: [
            "quantize",
            str(fx["llama_onnx"]),
            "--weight-only",
            "int4",
            "--block-size",
            "48",
            "--out",
            str(t / OUT),
        ],
        "block_size must be a power of two from 16 to 256",
    ),
    "quantize: weight-only on an encoder": (
        lambda t, fx: ["quantize", str(fx["onnx"]), "--weight-only", "int4", "--out", str(t / OUT)],
        "works on causal-LM graphs with a KV cache and .* is a sequence-classification encoder",
    ),
    "prune: causal LM": (
        lambda t, fx: [
            "prune",
            str(fx["llama_onnx"]),
            "--calibration",
            str(fx["csv"]),
            "--heads",
            "0.5",
            "--out",
            str(t / OUT),
        ],
        "works on encoder graphs and .* is a causal-lm model with a KV cache",
    ),
    "fuse: head counts for a causal LM": (
        lambda t, fx: ["fuse", str(fx["llama_onnx"]), "--num-heads", "4", "--out", str(t / OUT)],
        "a causal LM's head counts come from its decoder spec; leave out --num-heads",
    ),
    "package: output exists": (
        lambda t, fx: ["package", str(fx["onnx"]), "--out", str((t / OUT).mkdir() or t / OUT)],
        "exists",
    ),
    "package: unknown generation setting": (
        lambda t, fx: [
            "package",
            str(fx["llama_onnx"]),
            "--out",
            str(t / OUT),
            "--generation",
            "temprature=1",
        ],
        r"unknown generation settings \['temprature'\]",
    ),
    "package: a name that cannot go in a URL": (
        lambda t, fx: ["package", str(fx["onnx"]), "--out", str(t / OUT), "--name", "my model"],
        "model name 'my model' must be 1 to 128 letters",
    ),
    "serve: a name that cannot go in a URL": (
        lambda t, fx: ["serve", str(t / "nope.tar.gz"), "--name", "a/b"],
        "--name: model name 'a/b' must be",
    ),
    "serve: tampered bundle": (
        lambda t, fx: ["serve", str(_tampered_bundle(t, fx)), "--port", "0"],
        "config.json",
    ),
    "serve: bundle missing": (
        lambda t, fx: ["serve", str(t / "nope.tar.gz"), "--port", "0"],
        "does not exist",
    ),
    "serve: no texts allowed": (
        lambda t, fx: ["serve", str(t / "nope.tar.gz"), "--max-texts", "0"],
        "--max-texts must be at least 1",
    ),
    "serve: zero batch size": (
        lambda t, fx: ["serve", str(t / "nope.tar.gz"), "--max-batch-size", "0"],
        "--max-batch-size must be at least 1",
    ),
    "serve: zero token budget": (
        lambda t, fx: ["serve", str(t / "nope.tar.gz"), "--max-batch-tokens", "0"],
        "--max-batch-tokens must be at least 1",
    ),
    "serve: zero workers": (
        lambda t, fx: ["serve", str(t / "nope.tar.gz"), "--workers", "0"],
        "--workers must be at least 1",
    ),
    "serve: zero threads": (
        lambda t, fx: ["serve", str(_tampered_bundle(t, fx)), "--threads", "0"],
        "--threads must be at least 1",
    ),
}


@pytest.fixture(scope="module")
def fx(tiny_bert: Path, tiny_bert_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from trimformer.exporters import export_model

    llama = make_causal_lm(tmp_path_factory.mktemp("llama") / "llama")
    llama_onnx = tmp_path_factory.mktemp("llama_onnx") / "llama"
    export_model(llama, llama_onnx, parity_tokens=2)
    return {
        "bert": tiny_bert,
        "llama": llama,
        "llama_onnx": llama_onnx,
        "onnx": tiny_bert_onnx,
        "csv": make_csv(tmp_path_factory.mktemp("d") / "d.csv", 60),
    }


def test_the_matrix_covers_every_command() -> None:
    covered = {name.split(":")[0] for name in CASES}
    assert covered == set(cli.commands), f"commands without a bad-input case: {set(cli.commands) - covered}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name: str, fx: dict[str, Path], tmp_path: Path) -> None:
    build, pattern = CASES[name]
    args = build(tmp_path, fx)
    preexisting = (tmp_path / OUT).exists()
    result = CliRunner().invoke(cli, ["--quiet", *args])
    output = result.output
    assert result.exit_code == 2, f"{name}: exit {result.exit_code}: {output}"
    assert "Traceback" not in output and "pwned" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{name}: {output}"
    assert re.search(pattern, lines[0]), f"{name}: {lines[0]}"
    if not preexisting:
        assert not (tmp_path / OUT).exists(), f"{name} left {OUT}/ behind"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{OUT}.")], (
        f"{name} left a temp folder"
    )
