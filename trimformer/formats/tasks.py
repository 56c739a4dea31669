"""The task registry: what each task's graph takes and returns, how it is scored, what serves it.

One entry per task. Every layer that branches on a task (the artifact schema, the sources, the
exporter, the recipe, the CLI's choices, validation, the runtime) reads this table instead of
spelling the task names itself, so a new task is one more entry here plus the code that is
really new for it.

Plain dataclasses and the standard library only: the runtime reads this module, and a deployed
service carries neither pydantic nor torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from trimformer.errors import UserError

__all__ = [
    "CAUSAL_LM",
    "ENCODER_TASKS",
    "FEATURE_EXTRACTION",
    "SEQUENCE_CLASSIFICATION",
    "TASKS",
    "TASK_NAMES",
    "TaskSpec",
    "task_spec",
]

SEQUENCE_CLASSIFICATION = "sequence-classification"
FEATURE_EXTRACTION = "feature-extraction"
CAUSAL_LM = "causal-lm"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    # Graph inputs every model of the task takes; a family may add its own (BERT's token_type_ids,
    # a decoder's past key/value per layer: see sources/families.py and formats/decoder.py).
    inputs: tuple[str, ...]
    # The first graph output, the one the task's metrics read.
    output: str
    # What `trimformer validate` measures, in report.json's keys.
    metrics: tuple[str, ...]
    # The runtime class that serves a bundle of this task (trimformer.runtime).
    runtime: str
    # Whether the task's models are encoders (bidirectional, one pass per text).
    encoder: bool
    summary: str


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name=SEQUENCE_CLASSIFICATION,
            inputs=("input_ids", "attention_mask"),
            output="logits",
            metrics=("accuracy", "agreement", "max_abs_diff", "latency"),
            runtime="Predictor",
            encoder=True,
            summary="a text classifier: logits per label",
        ),
        TaskSpec(
            name=FEATURE_EXTRACTION,
            inputs=("input_ids", "attention_mask"),
            output="sentence_embedding",
            metrics=("cosine", "max_abs_diff", "latency"),
            runtime="Predictor",
            encoder=True,
            summary="a sentence-embedding model: one pooled vector per text",
        ),
        TaskSpec(
            name=CAUSAL_LM,
            inputs=("input_ids", "attention_mask", "position_ids"),
            output="logits",
            metrics=("perplexity", "token_agreement", "kl", "decode_tokens_per_s", "prompt_latency"),
            runtime="Generator",
            encoder=False,
            summary="a decoder language model with a KV cache: next-token logits",
        ),
    )
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)
ENCODER_TASKS: tuple[str, ...] = tuple(name for name, spec in TASKS.items() if spec.encoder)


def task_spec(name: str, where: str = "task") -> TaskSpec:
    """The registry entry of ``name``; an unknown name is one line naming the known ones."""
    spec = TASKS.get(name)
    if spec is None:
        raise UserError(f"{where}: unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}")
    return spec
