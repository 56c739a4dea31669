"""The pruning record (``pruning_record.json``): which heads and neurons a prune kept.

The prune pass writes it next to the pruned graph (:func:`trimformer.passes.prune.structured.build_record`);
the torch side reads it to replay the same pruning on a PyTorch model
(:mod:`trimformer.sources.pruning`) and distillation builds a pruned student from it. Both sides
import this one schema; it needs neither torch nor onnx.

Indices refer to the ORIGINAL (unpruned) model. Per layer: ``kept_heads``/``removed_heads``
partition ``0..num_heads-1`` and ``kept_neurons``/``removed_neurons`` partition ``0..ffn_size-1``
(a layer may state its own ``num_heads``/``ffn_size``, else the record-wide ones apply).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trimformer.errors import UserError

__all__ = [
    "RECORD_FILE",
    "RECORD_FORMAT",
    "kept_per_layer",
    "load_pruning_record",
    "record_path",
    "validate_record",
]

RECORD_FILE = "pruning_record.json"
RECORD_FORMAT = "trimformer-pruning-record/1"
_KEYS = (
    "architecture",
    "num_layers",
    "num_heads",
    "head_dim",
    "hidden_size",
    "ffn_size",
    "importance",
    "layers",
)


def validate_record(record: Any, where: str = "the pruning record") -> dict[str, Any]:
    """``record`` itself when it is a well-formed record, else a one-line error naming ``where``."""
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise UserError(f"{where} is not a {RECORD_FORMAT} file")
    missing = [k for k in _KEYS if k not in record]
    if missing:
        raise UserError(f"{where} lacks {', '.join(missing)}")
    layers = record["layers"]
    if not isinstance(layers, list) or len(layers) != record["num_layers"]:
        raise UserError(
            f"{where} lists {len(layers) if isinstance(layers, list) else 0} layers, "
            f"not num_layers={record['num_layers']}"
        )
    for i, entry in enumerate(layers):
        _check_layer(entry, i, record, where)
    return record


def _check_layer(entry: Any, index: int, record: dict[str, Any], where: str) -> None:
    try:
        kept_h, removed_h = list(entry["kept_heads"]), list(entry["removed_heads"])
        kept_n, removed_n = list(entry["kept_neurons"]), list(entry["removed_neurons"])
    except (KeyError, TypeError) as exc:
        raise UserError(f"{where}: layer {index} lacks kept/removed heads or neurons") from exc
    heads = int(entry.get("num_heads", record["num_heads"]))
    ffn = int(entry.get("ffn_size", record["ffn_size"]))
    if sorted(kept_h + removed_h) != list(range(heads)):
        raise UserError(f"{where}: layer {index} heads do not partition 0..{heads - 1}")
    if sorted(kept_n + removed_n) != list(range(ffn)):
        raise UserError(f"{where}: layer {index} neurons do not partition 0..{ffn - 1}")


def record_path(path: str | Path) -> Path:
    """The record file itself: ``path``, or ``path/pruning_record.json`` for an artifact folder."""
    target = Path(path)
    if target.is_dir():
        target = target / RECORD_FILE
    if not target.is_file():
        raise UserError(
            f"no pruning record at {target}; pass a {RECORD_FILE} or a folder pruned by `trimformer prune`"
        )
    return target


def load_pruning_record(path: str | Path) -> dict[str, Any]:
    """Read and validate a pruning record (a file, or an artifact folder holding one)."""
    target = record_path(path)
    try:
        record = json.loads(target.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserError(f"{target} is not valid JSON: {exc}") from exc
    return validate_record(record, str(target))


def kept_per_layer(record: dict[str, Any]) -> list[dict[str, int]]:
    """Per layer of a validated record: heads and FFN neurons kept, out of how many."""
    return [
        {
            "layer": int(entry.get("layer", index)),
            "heads_kept": len(entry["kept_heads"]),
            "heads_total": int(entry.get("num_heads", record["num_heads"])),
            "ffn_kept": len(entry["kept_neurons"]),
            "ffn_total": int(entry.get("ffn_size", record["ffn_size"])),
        }
        for index, entry in enumerate(record["layers"])
    ]
