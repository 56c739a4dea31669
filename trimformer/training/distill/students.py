"""Building the student a teacher is distilled into, and saving it as a model folder.

Four kinds:

* ``layers`` - a layer-dropped copy of the teacher, initialised from chosen teacher layers
  (DistilBERT); every kept weight is the teacher's, bit for bit.
* ``pruned`` - the teacher with a pruning record applied (heads and FFN neurons physically removed),
  so that structured pruning followed by recovery training is one flow.
* ``config`` - a randomly initialised model of the teacher's family with the given shape.
* ``folder`` - an existing model folder that shares the teacher's vocabulary and labels.

Each comes with the layer maps the intermediate losses use: (student hidden index, teacher hidden
index) pairs, hidden index 0 being the embeddings, and (student layer, teacher layer) pairs with
the teacher head each student head descends from, where that is known.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trimformer.data.tokenizer import TOKENIZER_FILES
from trimformer.errors import UserError
from trimformer.formats.pruning_record import RECORD_FILE, load_pruning_record, record_path
from trimformer.fsutil import sha256_file
from trimformer.sources import LoadedSource, PlainTransformerClassifier, load_source
from trimformer.sources.families import FAMILIES
from trimformer.sources.pruning import apply_pruning_record

__all__ = [
    "Student",
    "StudentShape",
    "build_student",
    "evenly_spaced",
    "hidden_width",
    "layer_count",
    "layer_list",
    "load_student",
    "parse_layers",
    "save_student",
    "uniform_maps",
    "word_embeddings",
]

logger = logging.getLogger(__name__)

# Sentence-transformers files that carry an embedding model's pooling; copied to the student.
_SENTENCE_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


@dataclass
class StudentShape:
    """A student described by its dimensions (kind ``config``)."""

    layers: int
    hidden_size: int
    heads: int
    ffn_size: int

    def validate(self) -> None:
        for name in ("layers", "hidden_size", "heads", "ffn_size"):
            if getattr(self, name) < 1:
                raise UserError(
                    f"student {name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if self.hidden_size % self.heads:
            raise UserError(
                f"student hidden size {self.hidden_size} is not divisible by its {self.heads} heads; "
                "choose a hidden size that is a multiple of the head count"
            )


@dataclass
class Student:
    model: nn.Module
    kind: str  # layers | pruned | config | folder
    family: str  # hf | plain
    description: dict[str, Any]
    hidden_map: list[tuple[int, int]]
    attention_map: list[tuple[int, int]]
    # Per attention_map entry: the teacher heads the student's heads came from, or None.
    head_maps: list[list[int] | None] = field(default_factory=list)
    pruning_record: dict[str, Any] | None = None
    width: int = 0
    # Layers whose heads were all pruned: Hugging Face models report no attentions for them.
    headless_layers: list[int] = field(default_factory=list)


def layer_count(source: LoadedSource) -> int:
    return len(layer_list(source.model)[1])


def hidden_width(model: nn.Module) -> int:
    config: Any = model.config
    return int(config.hidden_size)


def word_embeddings(model: nn.Module) -> nn.Module:
    """The token embedding table (Hugging Face ``get_input_embeddings``; ``embed`` in the plain model)."""
    if isinstance(model, PlainTransformerClassifier):
        return model.embed
    getter: Any = getattr(model, "get_input_embeddings", None)
    if getter is None:
        raise UserError(f"cannot find the token embeddings of {type(model).__name__}")
    module: nn.Module = getter()
    return module


def layer_list(
    model: nn.Module, supported: str = "distillation supports BERT-family and plain models"
) -> tuple[str, nn.ModuleList]:
    """The ModuleList of Transformer blocks: ``bert.encoder.layer``, ``distilbert.transformer.layer``,
    ``encoder.layers`` (plain); ``supported`` ends the error when there is none."""
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and re.search(r"(^|\.)(layer|layers)$", name)
    ]
    if len(found) != 1:
        raise UserError(f"cannot find the Transformer layers of {type(model).__name__}; {supported}")
    return found[0]


def evenly_spaced(count: int, total: int) -> list[int]:
    """``count`` of ``total`` layers, evenly spread, always keeping the top layer.

    6 -> 3 gives 1, 3, 5 (TinyBERT's uniform mapping): the top layer feeds the classifier the
    teacher's last representation, the others sample the stack at equal strides.
    """
    return [(i + 1) * total // count - 1 for i in range(count)]


def parse_layers(text: str, total: int) -> list[int]:
    """``"3"`` -> three evenly spaced layers; ``"0,2,4"`` -> those layers (0-based, increasing)."""
    raw = text.strip()
    try:
        values = [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise UserError(
            f"--layers {text!r} is neither a count nor a list of layer indices like 0,2,4"
        ) from None
    if not values:
        raise UserError("--layers is empty; give a count (3) or layer indices (0,2,4)")
    if "," not in raw:
        count = values[0]
        if not 1 <= count <= total:
            raise UserError(
                f"--layers {count} is out of range: the teacher has {total} layers (choose 1 to {total})"
            )
        return evenly_spaced(count, total)
    bad = [v for v in values if not 0 <= v < total]
    if bad:
        raise UserError(
            f"--layers {text}: layer {bad[0]} is out of range; the teacher has layers 0 to {total - 1}"
        )
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise UserError(f"--layers {text}: list the layers once each, in increasing order")
    return values


def uniform_maps(
    student_layers: int, teacher_layers: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """TinyBERT's uniform strategy: student layer m learns from teacher layer m·N/M (and embeddings
    from embeddings)."""
    teacher_of = [(m + 1) * teacher_layers // student_layers - 1 for m in range(student_layers)]
    hidden = [(0, 0)] + [(m + 1, t + 1) for m, t in enumerate(teacher_of)]
    return hidden, list(enumerate(teacher_of))


def _remap_layers(state: dict[str, torch.Tensor], prefix: str, picks: list[int]) -> dict[str, torch.Tensor]:
    new_index = {old: new for new, old in enumerate(picks)}
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = pattern.match(key)
        if match is None:
            out[key] = value.clone()
        elif int(match.group(1)) in new_index:
            out[f"{prefix}.{new_index[int(match.group(1))]}.{match.group(2)}"] = value.clone()
    return out


def _layer_dropped(teacher: LoadedSource, picks: list[int]) -> Student:
    prefix, _ = layer_list(teacher.model)
    state = _remap_layers(teacher.model.state_dict(), prefix, picks)
    model: nn.Module
    teacher_config: Any = teacher.model.config
    if teacher.kind == "plain":
        model = PlainTransformerClassifier(replace(teacher_config, num_layers=len(picks)))
    else:
        config = copy.deepcopy(teacher_config)
        config.num_hidden_layers = len(picks)
        model = type(teacher.model)(config)
    model.load_state_dict(state, strict=True)
    hidden = [(0, 0)] + [(i + 1, p + 1) for i, p in enumerate(picks)]
    return Student(
        model=model,
        kind="layers",
        family=teacher.kind,
        description={"kind": "layers", "layers": picks},
        hidden_map=hidden,
        attention_map=list(enumerate(picks)),
        head_maps=[None] * len(picks),
        width=hidden_width(model),
    )


def _check_record(teacher: LoadedSource, record: dict[str, Any], path: Path) -> None:
    model = teacher.model
    expected = {"num_layers": layer_count(teacher), "hidden_size": hidden_width(model)}
    for key, value in expected.items():
        if key in record and int(record[key]) != value:
            raise UserError(
                f"pruning record {path} was made for a model with {key} {record[key]}, the teacher has {value}; "
                "prune this teacher's export and pass that record"
            )


def _pruned(teacher: LoadedSource, record: dict[str, Any], path: Path) -> Student:
    _check_record(teacher, record, path)
    model = copy.deepcopy(teacher.model)
    apply_pruning_record(model, record)
    layers = layer_count(teacher)
    per_layer = {int(entry["layer"]): entry for entry in record.get("layers", [])}
    head_maps: list[list[int] | None] = []
    for layer in range(layers):
        entry = per_layer.get(layer)
        head_maps.append(None if entry is None else [int(h) for h in entry.get("kept_heads", [])])
    return Student(
        model=model,
        kind="pruned",
        family=teacher.kind,
        description={
            "kind": "pruned",
            "pruning_record": str(path),
            "pruning_record_sha256": sha256_file(path),
        },
        hidden_map=[(i, i) for i in range(layers + 1)],
        attention_map=[(i, i) for i in range(layers)],
        head_maps=head_maps,
        pruning_record=record,
        width=hidden_width(model),
        headless_layers=[i for i, heads in enumerate(head_maps) if heads == []],
    )


def _from_shape(teacher: LoadedSource, shape: StudentShape, seed: int) -> Student:
    shape.validate()
    torch.manual_seed(seed)
    model: nn.Module
    teacher_config: Any = teacher.model.config
    # What each family calls the shape's four dimensions (layers, hidden size, heads, FFN size).
    sizes = (shape.layers, shape.hidden_size, shape.heads, shape.ffn_size)
    if teacher.kind == "plain":
        keys = ("num_layers", "hidden_size", "num_heads", "ffn_size")
        model = PlainTransformerClassifier(replace(teacher_config, **dict(zip(keys, sizes, strict=True))))
    else:
        dims = FAMILIES[teacher.architecture].dims
        keys = (dims.layers, dims.hidden, dims.heads, dims.ffn)
        hf_config = copy.deepcopy(teacher_config)
        for key, size in zip(keys, sizes, strict=True):
            setattr(hf_config, key, size)
        model = type(teacher.model)(hf_config)
    hidden, attention = uniform_maps(shape.layers, layer_count(teacher))
    return Student(
        model=model,
        kind="config",
        family=teacher.kind,
        description={"kind": "config", **shape.__dict__, "seed": seed},
        hidden_map=hidden,
        attention_map=attention,
        head_maps=[None] * len(attention),
        width=shape.hidden_size,
    )


def _from_folder(teacher: LoadedSource, folder: str) -> Student:
    source = load_source(folder, task=teacher.task)
    if source.task != teacher.task:
        raise UserError(
            f"the student in {folder} is a {source.task} model, the teacher a {teacher.task} model"
        )
    if source.tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
        raise UserError(
            f"the student in {folder} has a different vocabulary from the teacher "
            f"({source.tokenizer.get_vocab_size()} vs {teacher.tokenizer.get_vocab_size()} tokens); "
            "distillation on logits needs both to read the same token ids"
        )
    if source.labels != teacher.labels:
        raise UserError(f"the student's labels {source.labels} differ from the teacher's {teacher.labels}")
    hidden, attention = uniform_maps(layer_count(source), layer_count(teacher))
    return Student(
        model=source.model,
        kind="folder",
        family=source.kind,
        description={"kind": "folder", "student": str(folder), "student_hash": source.files_hash},
        hidden_map=hidden,
        attention_map=attention,
        head_maps=[None] * len(attention),
        width=hidden_width(source.model),
    )


def build_student(
    teacher: LoadedSource,
    layers: str | None = None,
    pruning: str | Path | None = None,
    shape: StudentShape | None = None,
    folder: str | None = None,
    seed: int = 0,
) -> Student:
    """Exactly one of ``layers``, ``pruning``, ``shape`` or ``folder`` chooses the student."""
    chosen = [
        name
        for name, value in (
            ("--layers", layers),
            ("--from-pruning", pruning),
            ("--student-*", shape),
            ("--student", folder),
        )
        if value is not None
    ]
    if len(chosen) > 1:
        raise UserError(f"choose one student: {' and '.join(chosen)} were both given")
    if pruning is not None:
        path = record_path(pruning)
        record = load_pruning_record(path)
        return _pruned(teacher, record, path)
    if shape is not None:
        return _from_shape(teacher, shape, seed)
    if folder is not None:
        return _from_folder(teacher, folder)
    return _layer_dropped(
        teacher, parse_layers(layers or str(max(1, layer_count(teacher) // 2)), layer_count(teacher))
    )


def save_student(
    model: nn.Module, family: str, teacher: LoadedSource, folder: Path, pruning_record: dict[str, Any] | None
) -> None:
    """Write a folder that ``trimformer export`` (and Hugging Face) can load."""
    folder.mkdir(parents=True, exist_ok=True)
    if family == "plain":
        model.save(folder)  # type: ignore[operator]
    else:
        config: Any = model.config
        if teacher.labels is not None:
            config.id2label = dict(enumerate(teacher.labels))
            config.label2id = {label: i for i, label in enumerate(teacher.labels)}
        model.save_pretrained(str(folder), safe_serialization=True)  # type: ignore[operator]
        for name in TOKENIZER_FILES:
            if (teacher.folder / name).is_file():
                shutil.copy2(teacher.folder / name, folder / name)
        if teacher.task == "feature-extraction":
            _copy_pooling(teacher.folder, folder, hidden_width(model))
    if not (folder / "tokenizer.json").exists():
        teacher.tokenizer.save(str(folder / "tokenizer.json"))
    if pruning_record is not None:
        # The pruned shapes are not expressible in config.json; the record lets a loader rebuild them.
        (folder / RECORD_FILE).write_text(
            json.dumps(pruning_record, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )


def _copy_pooling(src: Path, dst: Path, width: int) -> None:
    for name in _SENTENCE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    pooling = src / "1_Pooling" / "config.json"
    if pooling.is_file():
        (dst / "1_Pooling").mkdir(exist_ok=True)
        cfg = json.loads(pooling.read_text(encoding="utf-8"))
        cfg["word_embedding_dimension"] = width
        (dst / "1_Pooling" / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def load_student(folder: str | Path) -> LoadedSource:
    """Load a distilled student folder, pruned or not (``load_source`` handles both)."""
    return load_source(folder)
