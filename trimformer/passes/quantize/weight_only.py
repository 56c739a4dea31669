"""Weight-only int4/int8 quantization of a causal LM: ``MatMulNBits`` through onnxruntime's own quantizer.

Every MatMul with a constant weight becomes a ``MatMulNBits`` (blocks of ``block_size`` weights
along the input axis share a scale, and a zero point unless symmetric), quantized by
onnxruntime's ``matmul_nbits_quantizer``: round-to-nearest (its default quantizer, as
onnxruntime-genai's model builder uses), GPTQ (its Intel Neural Compressor port, calibrated on
text rows) or HQQ (its half-quadratic solver; it needs PyTorch at build time). Activations stay
float in the graph; ``accuracy_level`` says what the CPU kernel computes in, and by default
(``auto``) it is chosen by token parity and decode speed (:mod:`.accuracy_level`).

Two tensors get their own setting, because greedy decoding is most sensitive to them:
``lm_head`` (int8 by default) and the token embedding (float by default; 4- or 8-bit through
``GatherBlockQuantized``, which reads the same blockwise layout). A tied lm_head reads the
embedding through a Transpose; to quantize it, the pass gives it its own transposed copy, and
where the table is asked at the lm_head's bits, the table is then read from the lm_head's blocks
(one quantized copy, as onnxruntime-genai's builder ties them).

The pass measures what it did against its input graph: on held-out prompts, the float graph's
greedy continuation is fed to both and the share of positions whose top token agrees and the mean
KL go into the stats (the lineage and the report); under ``min_token_agreement`` nothing is written.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import time
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper
from onnx_ir.passes import FunctionalPass
from pydantic import Field, field_validator, model_validator

from trimformer.errors import GateFailed, UserError
from trimformer.formats.targets import MS_DOMAIN
from trimformer.passes.base import PassConfig, PassContext, PassReport, iter_feeds, register_pass
from trimformer.passes.quantize.accuracy_level import (
    choose_accuracy_level,
    measure_fidelity,
    set_accuracy_level,
)
from trimformer.passes.quantize.embeddings import quantize_embedding, quiet_quantizer

__all__ = [
    "WEIGHT_ONLY_BITS",
    "WeightOnlyConfig",
    "WeightOnlyPass",
    "weight_only_quantize",
]

logger = logging.getLogger(__name__)

# The CLI's --weight-only names and the bits they mean.
WEIGHT_ONLY_BITS: dict[str, Literal[4, 8]] = {"int4": 4, "int8": 8}
# The transposed copy a tied lm_head gets when it is quantized.
TIED_SUFFIX = ".lm_head.T"


class WeightOnlyConfig(PassConfig):
    """The recipe's ``[passes.weight-only]`` table; the CLI's ``quantize --weight-only``."""

    bits: Literal[4, 8] = Field(4, description="4 or 8")
    algo: Literal["rtn", "gptq", "hqq"] = Field("rtn", description="one of rtn, gptq, hqq")
    block_size: int = Field(32, description="a power of two from 16 to 256")
    # None: the algorithm's own (symmetric for rtn and gptq; hqq fits a zero point always).
    symmetric: bool | None = None
    lm_head: Literal["int4", "int8", "float"] = Field("int8", description="one of int4, int8, float")
    embedding: Literal["float", "int4", "int8"] = Field("float", description="one of float, int4, int8")
    # "auto": chosen by token parity and decode speed (passes/quantize/accuracy_level.py).
    accuracy_level: Literal["auto", 0, 1, 2, 3, 4] = Field("auto", description="auto or one of 0, 1, 2, 3, 4")
    min_token_agreement: float = Field(0.95, ge=0, le=1, description="in [0, 1]")
    samples: int = Field(128, ge=1, description="1 or more (GPTQ calibration blocks)")
    new_tokens: int = Field(default=32, ge=1, le=256, description="in [1, 256]")

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value < 16 or value > 256 or value & (value - 1):
            raise ValueError(f"block_size must be a power of two from 16 to 256 (got {value})")
        return value

    @model_validator(mode="after")
    def _supported(self) -> WeightOnlyConfig:
        """What the quantizer cannot do, refused when the config is made (command line or recipe)."""
        if self.algo == "gptq" and self.bits != 4:
            raise ValueError(
                "onnxruntime's GPTQ writes MatMulNBits for 4 bits only (8 bits stays float); "
                "use --algo rtn for int8"
            )
        if self.algo == "hqq" and self.symmetric:
            raise ValueError(
                "HQQ fits a zero point per block: it has no symmetric mode; leave out --symmetric"
            )
        if self.algo == "hqq" and importlib.util.find_spec("torch") is None:
            raise ValueError(
                "onnxruntime's HQQ quantizer needs PyTorch at build time; install torch or use --algo rtn"
            )
        return self

    def is_symmetric(self) -> bool:
        return self.symmetric if self.symmetric is not None else self.algo != "hqq"

    def settings(self) -> dict[str, Any]:
        """Every setting as the lineage records it (the resolved symmetry included)."""
        return {**self.model_dump(mode="json"), "symmetric": self.is_symmetric()}


class _FeedList:
    """GPTQ's calibration reader: onnxruntime deep-copies it and iterates it once per copy."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.feeds)


def _consumers(graph: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    return [node for node in graph.node if name in node.input]


def _initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in graph.initializer}


def find_lm_head(graph: onnx.GraphProto, op_type: str = "MatMul") -> onnx.NodeProto | None:
    """The ``op_type`` node (a MatMul; a MatMulNBits once quantized) that writes the logits output
    (None: the graph computes them otherwise)."""
    return next((n for n in graph.node if n.op_type == op_type and "logits" in n.output), None)


def find_embedding(graph: onnx.GraphProto) -> onnx.NodeProto | None:
    """The Gather that reads token rows of a constant table by ``input_ids``."""
    inits = _initializers(graph)
    return next(
        (
            n
            for n in graph.node
            if n.op_type == "Gather" and n.input[0] in inits and n.input[1] == "input_ids"
        ),
        None,
    )


def untie_lm_head(model: onnx.ModelProto, lm_head: onnx.NodeProto) -> bool:
    """Give a tied lm_head (``MatMul(x, Transpose(table))``) its own transposed initializer, so the
    quantizer sees a constant weight; the Transpose goes when nothing else reads it."""
    graph = model.graph
    inits = _initializers(graph)
    if lm_head.input[1] in inits:
        return False
    transpose = next((n for n in graph.node if lm_head.input[1] in n.output), None)
    if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in inits:
        return False
    table = numpy_helper.to_array(inits[transpose.input[0]])
    name = transpose.input[0] + TIED_SUFFIX
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(table.T), name))
    lm_head.input[1] = name
    if not _consumers(graph, transpose.output[0]):
        graph.node.remove(transpose)
    return True


def _algo_config(config: WeightOnlyConfig, feeds: list[dict[str, np.ndarray]] | None) -> Any:
    nbits = quiet_quantizer()
    if config.algo == "gptq":
        return nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=_FeedList(feeds or []))
    if config.algo == "hqq":
        return nbits.HQQWeightOnlyQuantConfig(block_size=config.block_size, bits=config.bits)
    return nbits.DefaultWeightOnlyQuantConfig(
        block_size=config.block_size, is_symmetric=config.is_symmetric(), bits=config.bits
    )


def _run_quantizer(model: onnx.ModelProto, algo_config: Any, config: WeightOnlyConfig) -> onnx.ModelProto:
    # Its GPTQ port sorts the graph from every input's consumers and fails on an input nothing
    # reads (a fused decoder's position_ids, when attention rotates by cache slot): each such input
    # gets an Identity to read it while the quantizer runs.
    readers = [
        helper.make_node("Identity", [value.name], [value.name + "/read"], name="read/" + value.name)
        for value in model.graph.input
        if not _consumers(model.graph, value.name)
    ]
    model.graph.node.extend(readers)
    nbits = quiet_quantizer()
    quantizer = nbits.MatMulNBitsQuantizer(
        model,
        bits=config.bits,
        block_size=config.block_size,
        is_symmetric=config.is_symmetric(),
        algo_config=algo_config,
    )
    # Its GPTQ and RTN ports print a progress bar on stdout, which --json output owns.
    with contextlib.redirect_stdout(io.StringIO()):
        quantizer.process()
    quantized = quantizer.model.model if hasattr(quantizer.model, "model") else quantizer.model
    names = {node.name for node in readers}
    for node in [n for n in quantized.graph.node if n.name in names]:
        quantized.graph.node.remove(node)
    return quantized


def _hidden(model: onnx.ModelProto, node: onnx.NodeProto | None) -> str | None:
    """Route a MatMul's weight through an Identity, so the quantizer (which takes constant weights
    only) leaves it alone; :func:`_unhide` undoes it."""
    if node is None or node.input[1] not in _initializers(model.graph):
        return None
    weight = node.input[1]
    node.input[1] = weight + "/hidden"
    model.graph.node.insert(0, helper.make_node("Identity", [weight], [node.input[1]], name="hide" + weight))
    return weight


def _unhide(model: onnx.ModelProto, weight: str | None) -> None:
    if weight is None:
        return
    hide = next(n for n in model.graph.node if n.op_type == "Identity" and n.input[0] == weight)
    for node in _consumers(model.graph, hide.output[0]):
        node.input[:] = [weight if name == hide.output[0] else name for name in node.input]
    model.graph.node.remove(hide)


def share_lm_head_blocks(model: onnx.ModelProto, gather: onnx.NodeProto, bits: int) -> bool:
    """Read the token table from a tied lm_head's ``MatMulNBits`` blocks (its weight is the table
    transposed, so its N rows of K blocks are the table's rows) through ``GatherBlockQuantized``,
    as onnxruntime-genai's builder does: one quantized copy of the table instead of two. False
    (nothing changed) where the lm_head is not a symmetric ``bits``-bit copy of this table."""
    graph = model.graph
    head = find_lm_head(graph, "MatMulNBits")
    table = gather.input[0]
    if head is None or not head.input[1].startswith(table + TIED_SUFFIX) or _attribute(head, "bits") != bits:
        return False
    if len(head.input) > 3 and head.input[3]:
        return False  # its zero points are packed for MatMulNBits, not in the Gather layout
    vocab, hidden, block = _attribute(head, "N"), _attribute(head, "K"), _attribute(head, "block_size")
    padded = -(-hidden // block) * block
    rows, shape = table + "/lm_head_rows", table + "/lm_head_rows_shape"
    graph.initializer.append(numpy_helper.from_array(np.array([vocab, padded * bits // 8], np.int64), shape))
    looked_up = gather.output[0] if padded == hidden else table + "/padded_rows"
    nodes = [
        helper.make_node("Reshape", [head.input[1], shape], [rows], name=table + "/lm_head_rows"),
        helper.make_node(
            "GatherBlockQuantized",
            [rows, gather.input[1], head.input[2]],
            [looked_up],
            name=gather.name + "/quantized",
            domain=MS_DOMAIN,
            gather_axis=0,
            quantize_axis=1,
            block_size=block,
            bits=bits,
        ),
    ]
    if padded != hidden:  # the lm_head pads K to whole blocks; the rows lose the padding
        bounds = {"/start": [0], "/end": [hidden], "/axis": [-1]}
        graph.initializer.extend(
            numpy_helper.from_array(np.array(v, np.int64), table + k) for k, v in bounds.items()
        )
        slice_inputs = [looked_up, *(table + k for k in bounds)]
        nodes.append(helper.make_node("Slice", slice_inputs, list(gather.output), name=table + "/unpad"))
    index = list(graph.node).index(gather)
    graph.node.remove(gather)
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)
    if not _consumers(graph, table):
        graph.initializer.remove(_initializers(graph)[table])
    logger.info("embedding %s: read from the tied lm_head's %d-bit blocks", table, bits)
    return True


def _attribute(node: onnx.NodeProto, name: str) -> Any:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _bits(setting: str) -> int | None:
    return WEIGHT_ONLY_BITS.get(setting)


def weight_only_quantize(
    model: onnx.ModelProto, config: WeightOnlyConfig, feeds: list[dict[str, np.ndarray]] | None
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The quantized graph (a new ModelProto) and what became of each weight."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    if not _weight_matmuls(model):
        raise UserError(
            "the graph has no MatMul with a constant weight to quantize (a MatMulNBits graph already, or "
            "weights computed at run time); weight-only quantization needs the exported float graph"
        )
    lm_head = find_lm_head(model.graph)
    lm_bits = _bits(config.lm_head)
    untied = untie_lm_head(model, lm_head) if lm_head is not None and lm_bits else False
    hidden = _hidden(model, lm_head)
    model = _run_quantizer(model, _algo_config(config, feeds), config)
    _unhide(model, hidden)
    if hidden is not None and lm_bits:
        head_config = config.model_copy(update={"bits": lm_bits, "algo": "rtn", "symmetric": None})
        model = _run_quantizer(model, _algo_config(head_config, None), head_config)
    gather = find_embedding(model.graph)
    embedding_bits = _bits(config.embedding)
    shared = False
    if gather is not None and embedding_bits:
        shared = untied and share_lm_head_blocks(model, gather, embedding_bits)
        if not shared:
            quantize_embedding(model, gather, embedding_bits, config.block_size)
    if config.accuracy_level != "auto":
        set_accuracy_level(model, config.accuracy_level)
    ops = [n.op_type for n in model.graph.node]
    return model, {
        "matmul_nbits": ops.count("MatMulNBits"),
        "float_matmuls_with_weights": len(_weight_matmuls(model)),
        "lm_head": config.lm_head if lm_head is not None else "not found",
        "lm_head_untied": untied,
        "embedding": config.embedding if gather is not None else "not found",
        "embedding_shares_lm_head": shared,
    }


def _weight_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMuls whose weight is constant: an initializer, or a Transpose of one (a tied lm_head)."""
    inits = _initializers(model.graph)
    tied = {n.output[0] for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in inits}
    return [
        n for n in model.graph.node if n.op_type == "MatMul" and (n.input[1] in inits or n.input[1] in tied)
    ]


@register_pass(
    "weight-only",
    WeightOnlyConfig,
    order=2,
    changes_weights=True,
    data=("calibration",),
    emits=(MS_DOMAIN,),
    models="decoder",
)
def weight_only_factory(config: WeightOnlyConfig, ctx: PassContext) -> WeightOnlyPass:
    return WeightOnlyPass(config, ctx)


class WeightOnlyPass(FunctionalPass):
    def __init__(self, config: WeightOnlyConfig, ctx: PassContext) -> None:
        super().__init__()
        self.config = config
        self.ctx = ctx

    def _feeds(self) -> list[dict[str, np.ndarray]] | None:
        if self.config.algo != "gptq":
            return None
        source = self.ctx.require_calibration("weight-only (GPTQ)")()
        feeds = [feed for _, feed in zip(range(self.config.samples), iter_feeds(source), strict=False)]
        if not feeds:
            raise UserError(
                "the calibration text is shorter than one block of tokens: GPTQ has nothing to calibrate on; "
                "pass more text with --calibration"
            )
        return feeds

    def _accuracy(self, quantized: onnx.ModelProto, reference: onnx.ModelProto) -> dict[str, Any]:
        """The accuracy level (chosen, or as given) and the token parity that let it through."""
        config, spec, prompts = self.config, self.ctx.decoder_spec, self.ctx.prompts
        if spec is None or not prompts:
            raise UserError(
                "weight-only quantization checks token parity: it needs the decoder spec and prompts"
            )
        if config.accuracy_level != "auto":
            figures = measure_fidelity(quantized, reference, spec, prompts, config.new_tokens)
            if figures["token_agreement"] < config.min_token_agreement:
                raise GateFailed(
                    f"token agreement with the float graph is {figures['token_agreement']:.4f} at accuracy_level "
                    f"{config.accuracy_level}, under --min-token-agreement {config.min_token_agreement}"
                )
            return {"accuracy_level": config.accuracy_level, "fidelity": figures}
        chosen, levels = choose_accuracy_level(
            quantized, reference, spec, prompts, config.new_tokens, config.min_token_agreement
        )
        fidelity = {k: v for k, v in levels[str(chosen)].items() if k != "decode_tokens_per_s"}
        return {
            "accuracy_level": chosen,
            "accuracy_levels": levels,
            "fidelity": {**fidelity, "prompts": len(prompts)},
        }

    def call(self, model: ir.Model) -> PassReport:
        started = time.perf_counter()
        reference = ir.to_proto(model)
        quantized, counts = weight_only_quantize(reference, self.config, self._feeds())
        stats: dict[str, Any] = {
            "settings": self.config.settings(),
            **counts,
            "input_size_mb": round(reference.ByteSize() / 1e6, 3),
            "size_mb": round(quantized.ByteSize() / 1e6, 3),
        }
        stats.update(self._accuracy(quantized, reference))
        stats["seconds"] = round(time.perf_counter() - started, 2)
        return PassReport(ir.from_proto(quantized), True, stats=stats)
