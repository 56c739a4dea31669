"""Where an artifact's bytes go: embedding tables, the encoder, the tokenizer files.

An edge build is judged by its size, and a MiniLM-class model is mostly its word table, so the
report splits the bytes the way a trimming decision is made: the tables the lookups read (word,
position, token type, in whatever form: float, QEmbedLayerNormalization's 8 bits,
GatherBlockQuantized's 8 or 4 with their scales), everything else in the model files, and the
tokenizer files that ship beside it.
"""

from __future__ import annotations

from typing import Any

import onnx

from trimformer.artifact import ModelArtifact
from trimformer.formats.tokenizer_files import TOKENIZER_FILES

__all__ = ["size_breakdown"]

# Lookup ops and the inputs that are tables (with their scales and zero points).
_TABLE_INPUTS = {
    "Gather": (0,),
    "GatherBlockQuantized": (0, 2, 3),
    "EmbedLayerNormalization": (2, 3, 4),
    "QEmbedLayerNormalization": (2, 3, 4, 8, 9, 10, 13, 14, 15),
}
_MB = 1e6


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    if tensor.raw_data:
        return len(tensor.raw_data)
    return (
        sum(len(field) * 4 for field in (tensor.float_data, tensor.int32_data)) + len(tensor.int64_data) * 8
    )


def _table_names(model: onnx.ModelProto, initializers: dict[str, onnx.TensorProto]) -> set[str]:
    names: set[str] = set()
    for node in model.graph.node:
        for index in _TABLE_INPUTS.get(node.op_type, ()):
            if index < len(node.input) and node.input[index] in initializers:
                table = initializers[node.input[index]]
                # A Gather of a 2-D table is a lookup; of a shape vector it is plumbing.
                if node.op_type != "Gather" or len(table.dims) == 2:
                    names.add(node.input[index])
    return names


def size_breakdown(artifact: ModelArtifact) -> dict[str, Any]:
    """MB of the embedding tables, the rest of the model files, and the tokenizer files."""
    model = artifact.load_model()
    initializers = {t.name: t for t in model.graph.initializer}
    tables = sum(_tensor_bytes(initializers[name]) for name in _table_names(model, initializers))
    model_bytes = artifact.size_bytes()
    tokenizer = sum(
        (artifact.path / name).stat().st_size for name in TOKENIZER_FILES if (artifact.path / name).is_file()
    )
    return {
        "embeddings_mb": round(tables / _MB, 3),
        "encoder_mb": round(max(0, model_bytes - tables) / _MB, 3),
        "tokenizer_mb": round(tokenizer / _MB, 3),
        "model_files_mb": round(model_bytes / _MB, 3),
    }
