"""The word-embedding table in 8 or 4 bits, as onnxruntime's ``GatherBlockQuantized``.

QEmbedLayerNormalization stores the tables in 8 bits, but onnxruntime fuses EmbedLayerNormalization
only for BERT-like embeddings that feed an attention layer: not for RoBERTa and XLM-R (their position
ids come from the mask) nor for a pruned model whose first layer kept no head. There the word table,
most of an encoder's bytes (30,522 x 384 floats: 46.9 MB of MiniLM's 91), stayed float. This rewrite
stores it as onnxruntime's ``GatherBlockQuantized`` (com.microsoft; CPU and WebGPU kernels): uint8
with a scale and zero point per block of ``block_size`` values along the hidden axis, dequantized as
rows are gathered, so the arithmetic downstream is unchanged.

4 bits (``embedding_bits = 4``) halves the table again: onnxruntime's own blockwise quantizer
(``matmul_nbits_quantizer``, the bytes a ``MatMulNBits`` of the transposed table holds) packs two
values a byte with a scale and a 4-bit zero point per block. QEmbedLayerNormalization holds 8-bit
tables only, so a 4-bit table means the embedding fusion stays off (the lookups, their sum and the
LayerNorm run as separate ops). A decoder's token table goes through the same function.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from trimformer.formats.targets import MS_DOMAIN

__all__ = [
    "BLOCK_SIZE",
    "LARGE_TABLE_BYTES",
    "TABLE_BITS",
    "quantize_embedding",
    "quantize_other_tables",
    "quantize_word_embeddings",
    "quiet_quantizer",
]

logger = logging.getLogger(__name__)

# The word table's widths GatherBlockQuantized reads.
TABLE_BITS = (8, 4)
# Other lookup tables at least this large are stored in 8 bits beside a 4-bit word table.
LARGE_TABLE_BYTES = 64 * 1024

# Values per scale along the hidden axis (a power of two of at least 16, as the kernel requires).
BLOCK_SIZE = 32
# The graph input holding the token ids (position and token-type tables are small: left as they are).
_IDS = "input_ids"


def _block_quantize(table: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric uint8 per block of ``block`` values of each row: (codes, scales, zero points)."""
    rows, width = table.shape
    blocks = table.reshape(rows, width // block, block).astype(np.float64)
    low, high = np.minimum(blocks.min(-1), 0.0), np.maximum(blocks.max(-1), 0.0)
    scale = np.where(high > low, (high - low) / 255.0, 1.0)
    zero = np.clip(np.round(-low / scale), 0, 255)
    codes = np.clip(np.round(blocks / scale[..., None]) + zero[..., None], 0, 255)
    return codes.astype(np.uint8).reshape(rows, width), scale.astype(np.float32), zero.astype(np.uint8)


def _lookups(model: onnx.ModelProto, block: int) -> list[tuple[int, onnx.NodeProto, onnx.TensorProto]]:
    """(index, Gather, table) of every lookup of a float 2-D table that nothing else reads, along
    axis 0, whose rows are whole blocks."""
    graph = model.graph
    tables = {init.name: init for init in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    found = []
    for index, node in enumerate(graph.node):
        table = tables.get(node.input[0]) if node.op_type == "Gather" and not node.domain else None
        if table is None or uses[node.input[0]] != 1:
            continue
        if table.data_type != onnx.TensorProto.FLOAT or len(table.dims) != 2:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table.dims[1] % block == 0 and axis == 0:
            found.append((index, node, table))
    return found


def _gather_8bit(
    model: onnx.ModelProto, index: int, node: onnx.NodeProto, table: onnx.TensorProto, block: int
) -> None:
    graph = model.graph
    codes, scale, zero = _block_quantize(numpy_helper.to_array(table), block)
    name = table.name
    graph.initializer.remove(table)
    graph.initializer.extend(
        [
            numpy_helper.from_array(codes, f"{name}_quantized"),
            numpy_helper.from_array(scale, f"{name}_scale"),
            numpy_helper.from_array(zero, f"{name}_zero_point"),
        ]
    )
    graph.node[index].CopyFrom(
        helper.make_node(
            "GatherBlockQuantized",
            [f"{name}_quantized", node.input[1], f"{name}_scale", f"{name}_zero_point"],
            list(node.output),
            name=node.name or f"{name}_gather",
            domain="com.microsoft",
            bits=8,
            block_size=block,
            gather_axis=0,
            quantize_axis=1,
        )
    )


def _add_ms_opset(model: onnx.ModelProto) -> None:
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def quantize_word_embeddings(model: onnx.ModelProto, block: int = BLOCK_SIZE, bits: int = 8) -> int:
    """Rewrite, in place, the Gather of a float table by the token ids into GatherBlockQuantized
    of ``bits``; returns how many."""
    rewritten = 0
    for index, node, table in _lookups(model, block):
        if node.input[1] != _IDS:
            continue
        if bits == 4:
            quantize_embedding(model, node, 4, block)
        else:
            _gather_8bit(model, index, node, table, block)
        rewritten += 1
    if rewritten:
        _add_ms_opset(model)
    return rewritten


def quantize_other_tables(model: onnx.ModelProto, block: int = BLOCK_SIZE) -> int:
    """The position (and any other) lookup tables of at least :data:`LARGE_TABLE_BYTES` in 8 bits,
    where the embedding fusion is off (a 4-bit word table): MiniLM's 512 positions are 0.79 MB
    in float, a tenth of an 8 MB edge budget. Smaller ones (token types) stay float."""
    rewritten = 0
    for index, node, table in _lookups(model, block):
        if node.input[1] == _IDS or int(np.prod(table.dims)) * 4 < LARGE_TABLE_BYTES:
            continue
        _gather_8bit(model, index, node, table, block)
        rewritten += 1
    if rewritten:
        _add_ms_opset(model)
    return rewritten


def quiet_quantizer() -> Any:
    """onnxruntime's module sets the root logger to INFO when imported; undo that."""
    root = logging.getLogger()
    level = root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    root.setLevel(level)
    logging.getLogger(matmul_nbits_quantizer.__name__).setLevel(logging.WARNING)
    return matmul_nbits_quantizer


def quantize_embedding(model: onnx.ModelProto, gather: onnx.NodeProto, bits: int, block_size: int) -> None:
    """The token table as ``GatherBlockQuantized`` (uint8-packed, blocks along the hidden axis),
    quantized by onnxruntime's blockwise kernel: the same bytes a MatMulNBits of its transpose holds."""
    nbits = quiet_quantizer()
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    table = numpy_helper.to_array(inits[gather.input[0]]).astype(np.float32)
    vocab, hidden = table.shape
    quantizer = nbits.DefaultWeightOnlyQuantizer(
        nbits.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False, bits=bits)
    )
    packed, scales, zero_points = quantizer.qbits_block_quant(np.ascontiguousarray(table.T))
    base = gather.input[0]
    tensors = {
        base + "/q": packed.reshape(vocab, -1),
        base + "/scales": scales.reshape(vocab, -1),
        base + "/zero_points": zero_points.reshape(vocab, -1),
    }
    graph.initializer.extend(numpy_helper.from_array(array, name) for name, array in tensors.items())
    axis = next((helper.get_attribute_value(a) for a in gather.attribute if a.name == "axis"), 0)
    quantized = helper.make_node(
        "GatherBlockQuantized",
        [base + "/q", gather.input[1], base + "/scales", base + "/zero_points"],
        list(gather.output),
        name=gather.name + "/quantized",
        domain=MS_DOMAIN,
        gather_axis=axis,
        quantize_axis=1,
        block_size=block_size,
        bits=bits,
    )
    index = list(graph.node).index(gather)
    graph.node.remove(gather)
    graph.node.insert(index, quantized)
    if not any(base in node.input for node in graph.node):
        graph.initializer.remove(inits[base])
    logger.info("embedding %s: %d x %d at %d bits", base, vocab, hidden, bits)
