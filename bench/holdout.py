"""Holdout check of pruning + int8 on models the pipeline was not tuned on (issue 29).

Two classifiers other than the built-in tweets teacher:
* a **DistilBERT-layout** classifier: MiniLM-L6's pretrained weights moved into DistilBERT's module
  layout (no token types: type 0's row is folded into the position table), fine-tuned on the tweets;
* a **MiniLM on a second corpus** built from an installed package: the docstrings of Python's own
  standard library, labelled by the kind of module they document (text, network, files, data).

Each is exported, pruned (``--flops 0.5``, Fisher on its PyTorch source) and quantized to int8.
Targets: pruned int8 p50 at 1x128 at most 0.35x its FP32 export, and the pruned int8 graph has the
unpruned int8 graph's count of every com.microsoft op (QAttention, QEmbedLayerNormalization, ...). Latencies come
from one interleaved run (2 threads).

Usage: ``.venv/bin/python -m bench.holdout [--steps 150] [--work work/holdout]``
"""

from __future__ import annotations

import argparse
import csv
import importlib
import inspect
import json
import os
import random
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import open_session, time_sessions

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
RESULTS = Path(__file__).parent / "results" / "holdout.json"
THREADS = 2
TF = str(Path(".venv/bin/trimformer"))
# Standard-library modules by what they are about: the second corpus's labels.
CORPUS_MODULES = {
    "text": ["string", "textwrap", "difflib", "re", "unicodedata", "codecs", "html", "email", "locale"],
    "network": ["socket", "ssl", "http.client", "http.server", "urllib.request", "smtplib", "ftplib"],
    "files": ["os", "shutil", "pathlib", "tempfile", "glob", "zipfile", "tarfile", "io", "filecmp"],
    "data": ["json", "csv", "pickle", "sqlite3", "decimal", "fractions", "statistics", "collections"],
}


def _defined_in(obj: object, name: str) -> bool:
    home = (getattr(obj, "__module__", None) or "").lstrip("_").split(".")[0]
    return home == name.split(".")[0] or (name == "os" and home == "posix")


def build_corpus(path: Path, seed: int = 0) -> int:
    """One row per documented function, class or method: its docstring's first paragraph."""
    rows = []
    for label, modules in CORPUS_MODULES.items():
        for name in modules:
            module = importlib.import_module(name)
            for _, obj in inspect.getmembers(module):
                if not _defined_in(obj, name):
                    continue  # re-exported from elsewhere: its label would be another module's
                members = [obj, *(m for _, m in inspect.getmembers(obj) if inspect.isfunction(m))]
                for member in members if inspect.isclass(obj) else [obj]:
                    if not (
                        inspect.isfunction(member) or inspect.isclass(member) or inspect.isbuiltin(member)
                    ):
                        continue
                    doc = inspect.getdoc(member) or ""
                    text = " ".join(doc.split("\n\n")[0].split())
                    if len(text) >= 20:
                        rows.append((text, label))
    unique = sorted(set(rows))
    random.Random(seed).shuffle(unique)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(unique)
    return len(unique)


def distilbert_from_minilm(out: Path) -> None:
    """MiniLM-L6 (BERT layout) as a DistilBERT model: the same weights, DistilBERT's modules."""
    import shutil

    from transformers import AutoModel, DistilBertConfig, DistilBertModel

    from trimformer.sources import resolve_model_path

    src = resolve_model_path("builtin:minilm")
    bert = AutoModel.from_pretrained(str(src))
    c = bert.config
    config = DistilBertConfig(
        vocab_size=c.vocab_size,
        dim=c.hidden_size,
        n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        hidden_dim=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings,
        pad_token_id=c.pad_token_id,
    )
    model = DistilBertModel(config)
    state = bert.state_dict()
    new: dict[str, Any] = {
        "embeddings.word_embeddings.weight": state["embeddings.word_embeddings.weight"],
        "embeddings.position_embeddings.weight": state["embeddings.position_embeddings.weight"]
        + state["embeddings.token_type_embeddings.weight"][0],
        "embeddings.LayerNorm.weight": state["embeddings.LayerNorm.weight"],
        "embeddings.LayerNorm.bias": state["embeddings.LayerNorm.bias"],
    }
    names = {
        "attention.q_lin": "attention.self.query",
        "attention.k_lin": "attention.self.key",
        "attention.v_lin": "attention.self.value",
        "attention.out_lin": "attention.output.dense",
        "sa_layer_norm": "attention.output.LayerNorm",
        "ffn.lin1": "intermediate.dense",
        "ffn.lin2": "output.dense",
        "output_layer_norm": "output.LayerNorm",
    }
    for i in range(c.num_hidden_layers):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                new[f"transformer.layer.{i}.{ours}.{kind}"] = state[f"encoder.layer.{i}.{theirs}.{kind}"]
    missing, unexpected = model.load_state_dict(new, strict=False)
    assert not unexpected and not [m for m in missing if "position_ids" not in m], (missing, unexpected)
    model.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(src / name, out / name)


def _run(*args: str) -> None:
    subprocess.run([TF, "--quiet", *args], check=True)


def _ops(folder: Path) -> dict[str, int]:
    """Count of every com.microsoft op (the fused and int8 kernels) in the graph."""
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    return dict(sorted(Counter(n.op_type for n in graph.node if n.domain == "com.microsoft").items()))


def make_model(name: str, base: str, data: str, work: Path, steps: int) -> dict[str, Any]:
    """Train, export, prune and quantize one model (each step cached by its output folder)."""
    folder = work / name
    timings: dict[str, float] = {}
    stages = [
        (
            "train",
            folder / "torch",
            [
                "train",
                base,
                "--data",
                data,
                "--steps",
                str(steps),
                "--lr",
                "1e-4",
                "--eval-every",
                str(steps),
                "--max-length",
                "64",
            ],
        ),
        ("export", folder / "onnx", ["export", str(folder / "torch")]),
        (
            "prune",
            folder / "pruned",
            ["prune", str(folder / "onnx"), "--calibration", data, "--flops", "0.5", "--samples", "512"],
        ),
        ("int8", folder / "int8", ["quantize", str(folder / "onnx"), "--calibration", data]),
        ("pruned_int8", folder / "pruned-int8", ["quantize", str(folder / "pruned"), "--calibration", data]),
    ]
    for stage, out, args in stages:
        if not (out / "trimformer.json").is_file() and not (out / "trimformer_train.json").is_file():
            started = time.perf_counter()
            _run(*args, "--out", str(out), "--overwrite")
            timings[stage] = round(time.perf_counter() - started, 1)
    record = json.loads((folder / "pruned" / "pruning_record.json").read_text())
    return {
        "seconds": timings,
        "heads_kept": [len(layer["kept_heads"]) for layer in record["layers"]],
        "fused_int8": _ops(folder / "int8"),
        "fused_pruned_int8": _ops(folder / "pruned-int8"),
        "fused_equal": _ops(folder / "int8") == _ops(folder / "pruned-int8"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--work", default="work/holdout")
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    work = Path(args.work)
    corpus = work / "stdlib-docstrings.csv"
    rows = build_corpus(corpus)
    if not (work / "distilbert-base" / "config.json").is_file():
        distilbert_from_minilm(work / "distilbert-base")
    models = {
        "distilbert-tweets": make_model(
            "distilbert-tweets", str(work / "distilbert-base"), "builtin:tweets", work, args.steps
        ),
        "minilm-stdlib": make_model("minilm-stdlib", "builtin:minilm", str(corpus), work, args.steps),
    }
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(1000, 20000, size=(1, 128), dtype=np.int64),
        "attention_mask": np.ones((1, 128), dtype=np.int64),
        "token_type_ids": np.zeros((1, 128), dtype=np.int64),
    }
    sessions = {}
    for name in models:
        for variant in ("onnx", "int8", "pruned-int8"):
            sessions[f"{name}/{variant}"] = open_session(work / name / variant / "model.onnx", THREADS)
    times = time_sessions(
        sessions, feeds, case="1x128", rounds=max(1, args.runs // 20), calls_per_round=20, warmup=10
    )
    p50 = times.medians("1x128")
    for name, result in models.items():
        result["p50_ms_1x128"] = {v: round(p50[f"{name}/{v}"], 3) for v in ("onnx", "int8", "pruned-int8")}
        result["pruned_int8_vs_fp32"] = round(p50[f"{name}/pruned-int8"] / p50[f"{name}/onnx"], 3)
        result["targets"] = {
            "latency_le_0.35x": result["pruned_int8_vs_fp32"] <= 0.35,
            "fused_equal": result["fused_equal"],
        }
    result = {"corpus_rows": rows, "steps": args.steps, "models": models}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    for name, r in models.items():
        print(
            f"{name}: p50 {r['p50_ms_1x128']} ms, pruned int8 / fp32 {r['pruned_int8_vs_fp32']:.3f}, "
            f"heads {r['heads_kept']}, fused equal {r['fused_equal']} {r['fused_pruned_int8']}"
        )
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
