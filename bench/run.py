"""`make bench`: every variant of the MiniLM tweets teacher, measured side by side in one run.

    python -m bench.run [--workdir work/bench] [--rounds 10] [--threads 2] [--skip-peers] [--limit N]

Variants are produced once (cached under the workdir with their wall time and peak memory),
then measured in one process: accuracy on the test split, agreement and mean KL against the
PyTorch FP32 teacher, latency in interleaved rounds, model size, and achieved operations per second
as a fraction of the machine's int8 / FP32 matrix-multiply peak through onnxruntime.
Writes bench/results/<date>.json, docs/BENCHMARKS.md and docs/bench_accuracy_latency.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TF = str(Path(sys.executable).with_name("trimformer"))


@dataclass
class Variant:
    name: str
    group: str  # baseline | peer | trimformer
    path: Path  # folder holding model.onnx (or the PyTorch folder for the eager row)
    command: list[str] | None = None  # produces ``path``; None when it already exists by construction
    precision: str = "fp32"  # fp32 | int8 (which peak its achieved ops/s is compared with)
    torch: bool = False
    note: str = ""
    skipped: str | None = None
    produce: dict[str, Any] = field(default_factory=dict)


def run_measured(command: list[str], log: Path) -> dict[str, Any]:
    """Run a command, polling the whole process tree's resident memory; wall seconds and peak MB."""
    started = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen(
            command,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "TRIMFORMER_PROGRESS": "0"},
        )
        parent = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            try:
                rss = parent.memory_info().rss + sum(
                    c.memory_info().rss for c in parent.children(recursive=True)
                )
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.05)
    return {
        "rc": proc.returncode,
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(peak / 2**20, 1),
        "command": shlex.join(command),
    }


def ensure(variant: Variant, workdir: Path) -> None:
    """Produce a variant unless it is cached; record why when it cannot be produced."""
    meta_file = workdir / "meta" / f"{variant.name}.json"
    if (variant.path / "model.onnx").is_file() or (variant.torch and variant.path.exists()):
        if meta_file.is_file():
            variant.produce = json.loads(meta_file.read_text())
        return
    if variant.command is None:
        variant.skipped = variant.skipped or f"missing {variant.path}"
        return
    meta_file.parent.mkdir(parents=True, exist_ok=True)
    log = workdir / "logs" / f"{variant.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"producing {variant.name}: {shlex.join(variant.command)}", flush=True)
    result = run_measured(variant.command, log)
    if result["rc"] != 0 or not (variant.path / "model.onnx").is_file():
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:] or [
            "no output"
        ]
        variant.skipped = f"producing it failed (exit {result['rc']}): {tail[0][:160]}"
        return
    variant.produce = result
    meta_file.write_text(json.dumps(result, indent=2))


def calibration_file(workdir: Path, teacher: Path, samples: int = 512) -> Path:
    """The calibration rows every int8 variant uses: the first N training-split tweets, 128 tokens."""
    from trimformer.data import Encoder, load_dataset
    from trimformer.data.tokenizer import load_tokenizer

    path = workdir / f"calibration-{samples}.jsonl"
    if path.is_file():
        return path
    data = load_dataset("builtin:tweets", split="train", limit=samples)
    encoder = Encoder(load_tokenizer(teacher), ("input_ids", "attention_mask", "token_type_ids"), 128, 0)
    feeds = encoder(data.texts, pad_to=128)
    with open(path, "w") as handle:
        for i in range(len(data)):
            handle.write(json.dumps({k: v[i].tolist() for k, v in feeds.items()}) + "\n")
    return path


def calibration_texts(workdir: Path, samples: int = 512) -> Path:
    """The same calibration tweets as raw text with integer labels, for peers that tokenize themselves."""
    from trimformer.data import load_dataset, map_labels

    path = workdir / f"calibration-texts-{samples}.jsonl"
    if path.is_file():
        return path
    data = load_dataset("builtin:tweets", split="train", limit=samples)
    labels = map_labels(data.labels or [], data.label_names or [])
    with open(path, "w") as handle:
        for text, label in zip(data.texts, labels, strict=True):
            handle.write(json.dumps({"text": text, "label": int(label)}) + "\n")
    return path


def variants(
    workdir: Path, teacher: Path, teacher_onnx: Path, calibration: Path, skip_peers: bool
) -> list[Variant]:
    w = workdir
    peer_py = {name: ROOT / "bench" / ".venvs" / name / "bin" / "python" for name in ("optimum", "olive")}
    out = [
        Variant("PyTorch eager FP32", "baseline", teacher, torch=True),
        Variant("ORT FP32 (plain export)", "baseline", teacher_onnx),
        Variant(
            "ORT quantize_dynamic per-channel",
            "baseline",
            w / "ort-dynamic",
            precision="int8",
            command=[PY, "-m", "bench.producers", "ort-dynamic", str(teacher_onnx), str(w / "ort-dynamic")],
        ),
        Variant(
            "ORT best dynamic (transformers optimizer + quantize_dynamic)",
            "baseline",
            w / "ort-best",
            precision="int8",
            command=[PY, "-m", "bench.producers", "ort-best", str(teacher_onnx), str(w / "ort-best")],
        ),
        Variant(
            "ORT quantize_static defaults",
            "baseline",
            w / "ort-static",
            precision="int8",
            command=[
                PY,
                "-m",
                "bench.producers",
                "ort-static",
                str(teacher_onnx),
                str(w / "ort-static"),
                str(calibration),
            ],
        ),
    ]
    peers = [
        Variant(
            "Optimum O2 + static int8 (avx512_vnni)",
            "peer",
            w / "optimum-static",
            precision="int8",
            command=[
                str(peer_py["optimum"]),
                "bench/peers/optimum_run.py",
                "o2-static",
                str(teacher),
                str(calibration),
                str(w / "optimum-static"),
            ],
        ),
        Variant(
            "Optimum dynamic int8 (avx512_vnni)",
            "peer",
            w / "optimum-dynamic",
            precision="int8",
            command=[
                str(peer_py["optimum"]),
                "bench/peers/optimum_run.py",
                "dynamic",
                str(teacher),
                str(calibration),
                str(w / "optimum-dynamic"),
            ],
        ),
        Variant(
            "Olive conversion + optimization + static int8",
            "peer",
            w / "olive",
            precision="int8",
            command=[
                str(peer_py["olive"]),
                "bench/peers/olive_run.py",
                str(teacher),
                str(calibration_texts(w)),
                str(w / "olive"),
            ],
        ),
    ]
    for peer in peers:
        python = Path(peer.command[0]) if peer.command else None
        if skip_peers:
            peer.skipped = "--skip-peers"
        elif python is not None and not python.exists():
            peer.skipped = f"peer environment not installed ({python.parent.parent.name}: make bench-peers)"
    out += peers
    student = w / "student"
    out += [
        Variant(
            "trimformer int8 (static, cpu-vnni)",
            "trimformer",
            w / "tf-int8",
            precision="int8",
            command=[
                TF,
                "--quiet",
                "quantize",
                str(teacher_onnx),
                "--calibration",
                "builtin:tweets",
                "--out",
                str(w / "tf-int8"),
                "--overwrite",
            ],
        ),
        Variant(
            "trimformer pruned 50% FLOPs (fisher)",
            "trimformer",
            w / "tf-prune",
            command=[
                TF,
                "--quiet",
                "prune",
                str(teacher_onnx),
                "--calibration",
                "builtin:tweets",
                "--flops",
                "0.5",
                "--importance",
                "fisher",
                "--source",
                str(teacher),
                "--out",
                str(w / "tf-prune"),
            ],
        ),
        Variant(
            "trimformer distilled 3 layers",
            "trimformer",
            w / "tf-distill-onnx",
            command=[
                "bash",
                "-c",
                f"test -f {student}/config.json || {TF} --quiet distill --teacher {teacher} "
                f"--data builtin:tweets --layers 3 --out {student} && "
                f"{TF} --quiet export {student} --out {w}/tf-distill-onnx --overwrite",
            ],
        ),
        Variant(
            "trimformer edge (distill + prune + int8)",
            "trimformer",
            w / "tf-edge",
            precision="int8",
            command=[
                "bash",
                "-c",
                f"{TF} --quiet prune {w}/tf-distill-onnx --calibration builtin:tweets "
                f"--flops 0.5 --importance fisher --source {student} --out {w}/tf-edge-pruned --overwrite && "
                f"{TF} --quiet quantize {w}/tf-edge-pruned --calibration builtin:tweets "
                f"--out {w}/tf-edge --overwrite",
            ],
        ),
        # The edge recipe's last steps on the same pruned student: the vocabulary the train tweets
        # use (99 % of their tokens) and the word table in 4 bits (docs/VOCABULARY.md).
        Variant(
            "trimformer edge + trim-vocab + 4-bit word table",
            "trimformer",
            w / "tf-edge-trim",
            precision="int8",
            command=[
                "bash",
                "-c",
                f"{TF} --quiet trim-vocab {w}/tf-edge-pruned --corpus builtin:tweets --coverage 0.99 "
                f"--out {w}/tf-edge-trimmed --overwrite && "
                f"{TF} --quiet quantize {w}/tf-edge-trimmed --calibration builtin:tweets --embedding int4 "
                f"--out {w}/tf-edge-trim --overwrite",
            ],
        ),
    ]
    return out


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("trimformer", "onnxruntime", "onnx", "torch", "transformers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="work/bench")
    parser.add_argument("--teacher", default="work/demo/teacher")
    parser.add_argument("--teacher-onnx", default="work/demo/teacher-onnx")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--limit", type=int, default=None, help="test examples (default: the whole test split)"
    )
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--only", default=None, help="comma-separated substrings of variant names to keep")
    args = parser.parse_args(argv)

    from bench.report import write_outputs
    from bench.table import measure_variants

    workdir = ROOT / args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    teacher, teacher_onnx = ROOT / args.teacher, ROOT / args.teacher_onnx
    if not (teacher_onnx / "model.onnx").is_file():
        raise SystemExit(f"no teacher at {teacher_onnx}: run `make demo` first (make bench does)")
    calibration = calibration_file(workdir, teacher)
    chosen = variants(workdir, teacher, teacher_onnx, calibration, args.skip_peers)
    if args.only:
        keys = [k.strip().lower() for k in args.only.split(",")]
        chosen = [
            v
            for v in chosen
            if (v.group == "baseline" and "FP32" in v.name) or any(k in v.name.lower() for k in keys)
        ]
    for variant in chosen:
        if variant.skipped is None:
            ensure(variant, workdir)
    rows, machine = measure_variants(chosen, teacher, args.threads, args.rounds, args.limit)
    header = {
        "date": dt.date.today().isoformat(),
        "cpu": _cpu_name(),
        "threads": args.threads,
        "command": "make bench",
        "python": platform.python_version(),
        "versions": _versions(),
        **machine,
    }
    write_outputs(rows, header, ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
