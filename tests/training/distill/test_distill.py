"""Distillation: student construction, the training loop (determinism, resume, unlabelled data,
embeddings), the output folder and every bad input of ``trimformer distill``."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from tests.builders import make_csv, make_hf_model, make_jsonl, make_plain_model, make_tokenizer
from trimformer.cli.commands import cli
from trimformer.errors import UserError
from trimformer.progress import set_progress_enabled
from trimformer.sources import load_source
from trimformer.training.distill.api import DISTILL_RECORD, DistillConfig, distill
from trimformer.training.distill.features import model_features, run_spec_for
from trimformer.training.distill.students import (
    StudentShape,
    build_student,
    evenly_spaced,
    parse_layers,
    uniform_maps,
)
from trimformer.training.distill.trainer import ShardStream, TrainerHooks

set_progress_enabled(False)
torch.set_num_threads(1)  # tiny models: threads only add contention on a shared machine


@pytest.fixture(scope="module")
def bert4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_model(tmp_path_factory.mktemp("bert4"), layers=4, seed=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_csv(tmp_path_factory.mktemp("distill_data") / "d.csv", rows=160)


def _config(teacher: Path, data: Path, out: Path, **kw: Any) -> DistillConfig:
    defaults: dict[str, Any] = {"steps": 6, "batch_size": 8, "eval_every": 3, "eval_limit": 16, "layers": "2"}
    defaults.update(kw)
    return DistillConfig(teacher=str(teacher), data=str(data), out=str(out), **defaults)


def _record(
    layers: int, heads: int, head_dim: int, ffn: int, kept: list[tuple[list[int], list[int]]]
) -> dict[str, Any]:
    return {
        "format": "trimformer-pruning-record/1",
        "architecture": "bert",
        "num_layers": layers,
        "num_heads": heads,
        "head_dim": head_dim,
        "hidden_size": heads * head_dim,
        "ffn_size": ffn,
        "importance": "test",
        "layers": [
            {
                "layer": i,
                "kept_heads": kh,
                "removed_heads": [h for h in range(heads) if h not in kh],
                "kept_neurons": kn,
                "removed_neurons": [n for n in range(ffn) if n not in kn],
            }
            for i, (kh, kn) in enumerate(kept)
        ],
    }


# -- students ------------------------------------------------------------------------------------
def test_layer_choice() -> None:
    assert (
        evenly_spaced(3, 6) == [1, 3, 5]
        and evenly_spaced(1, 6) == [5]
        and evenly_spaced(6, 6) == list(range(6))
    )
    assert parse_layers("3", 6) == [1, 3, 5] and parse_layers("0,2,4", 6) == [0, 2, 4]
    for bad in ("7", "0", "0,6", "2,1", "1,1", "a,b", ""):
        with pytest.raises(UserError):
            parse_layers(bad, 6)
    hidden, attention = uniform_maps(2, 6)
    assert hidden == [(0, 0), (1, 3), (2, 6)] and attention == [(0, 2), (1, 5)]


@pytest.mark.parametrize("family", ["bert", "distilbert", "plain"])
def test_layer_dropped_student_keeps_the_chosen_teacher_weights_exactly(family: str, tmp_path: Path) -> None:
    if family == "plain":
        folder = make_plain_model(tmp_path / "t", layers=4)
        prefix = "encoder.layers"
    else:
        folder = make_hf_model(tmp_path / "t", model_type=family, layers=4)
        prefix = "bert.encoder.layer" if family == "bert" else "distilbert.transformer.layer"
    teacher = load_source(folder)
    student = build_student(teacher, layers="0,3")
    t_state, s_state = teacher.model.state_dict(), student.model.state_dict()
    layer_keys = [k for k in s_state if k.startswith(prefix + ".")]
    assert {k.split(".")[len(prefix.split("."))] for k in layer_keys} == {"0", "1"}
    for key, value in s_state.items():
        source_key = key.replace(f"{prefix}.1.", f"{prefix}.3.")
        assert torch.equal(value, t_state[source_key]), key
    assert len(s_state) < len(t_state)
    assert student.hidden_map == [(0, 0), (1, 1), (2, 4)] and student.attention_map == [(0, 0), (1, 3)]
    # The copied bottom layer computes what the teacher's does.
    feeds = {"input_ids": torch.tensor([[2, 7, 9, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    spec = run_spec_for(teacher)
    t_feats = model_features(teacher.model.eval(), spec, feeds, intermediates=True)
    s_feats = model_features(student.model.eval(), spec, feeds, intermediates=True)
    torch.testing.assert_close(s_feats.hidden[1], t_feats.hidden[1])


def test_plain_features_match_the_models_own_forward(tiny_plain: Path) -> None:
    source = load_source(tiny_plain)
    feeds = {"input_ids": torch.tensor([[2, 7, 9, 3, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 0]])}
    feats = model_features(source.model, run_spec_for(source), feeds, intermediates=True)
    torch.testing.assert_close(feats.output, source.model(feeds["input_ids"], feeds["attention_mask"]))
    assert len(feats.hidden) == 3 and feats.attentions[0] is not None
    assert feats.attentions[0].shape == (1, 4, 5, 5)


def test_config_student_is_random_with_the_asked_shape(bert4: Path) -> None:
    teacher = load_source(bert4)
    student = build_student(
        teacher, shape=StudentShape(layers=2, hidden_size=16, heads=2, ffn_size=24), seed=1
    )
    cfg = student.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (
        2,
        16,
        2,
        24,
    )
    assert student.width == 16 and student.hidden_map == [(0, 0), (1, 2), (2, 4)]
    again = build_student(teacher, shape=StudentShape(2, 16, 2, 24), seed=1)
    assert all(
        torch.equal(a, b) for a, b in zip(student.model.parameters(), again.model.parameters(), strict=True)
    )
    with pytest.raises(UserError, match="divisible"):
        build_student(teacher, shape=StudentShape(2, 18, 4, 24))


def test_pruned_student_takes_the_kept_heads_and_neurons(bert4: Path) -> None:
    teacher = load_source(bert4)
    folder = bert4.parent / "pruned"
    folder.mkdir(exist_ok=True)
    kept = [
        ([0, 2], list(range(0, 64, 2))),
        ([0, 1, 2, 3], list(range(64))),
        ([1], list(range(32))),
        ([3], [5]),
    ]
    (folder / "pruning_record.json").write_text(json.dumps(_record(4, 4, 8, 64, kept)))
    student = build_student(teacher, pruning=folder)
    layer0 = student.model.bert.encoder.layer[0]
    t_layer0 = teacher.model.bert.encoder.layer[0]
    rows = torch.tensor([h * 8 + j for h in (0, 2) for j in range(8)])
    assert torch.equal(layer0.attention.self.query.weight, t_layer0.attention.self.query.weight[rows])
    assert torch.equal(layer0.intermediate.dense.weight, t_layer0.intermediate.dense.weight[0::2])
    assert student.head_maps == [[0, 2], [0, 1, 2, 3], [1], [3]]
    assert student.kind == "pruned" and student.description["pruning_record_sha256"]
    # Teacher untouched; a record for another model is refused.
    assert teacher.model.bert.encoder.layer[0].attention.self.query.weight.shape[0] == 32
    (folder / "pruning_record.json").write_text(json.dumps(_record(2, 4, 8, 64, kept[:2])))
    with pytest.raises(UserError, match="num_layers"):
        build_student(teacher, pruning=folder)


def test_shard_stream_partitions_global_batches() -> None:
    ranks = [ShardStream(10, 3, 2, r, seed=5) for r in range(2)]
    for k in range(7):
        a, b = (s.micro_batch(k) for s in ranks)
        assert len(a) == len(b) == 3 and not set(a) & set(b)
    # An epoch reads each row at most once, dropping only the last partial global batch.
    epoch = [int(r) for k in range(ranks[0].epoch_rows // 6) for s in ranks for r in s.micro_batch(k)]
    assert len(epoch) == len(set(epoch)) == 6
    single = ShardStream(10, 5, 1, 0, seed=5)
    assert sorted([*single.micro_batch(0), *single.micro_batch(1)]) == list(range(10))
    # Length grouping: still every row once per epoch, but batches of similar lengths.
    lengths = np.random.default_rng(0).integers(1, 100, size=400)
    grouped = ShardStream(400, 8, 2, 0, seed=1, lengths=lengths, group=25)
    other = ShardStream(400, 8, 2, 1, seed=1, lengths=lengths, group=25)
    rows = [np.concatenate([grouped.micro_batch(k), other.micro_batch(k)]) for k in range(25)]
    assert sorted(np.concatenate(rows).tolist()) == list(range(400))
    spread = np.mean([np.ptp(lengths[r]) for r in rows])
    plain = ShardStream(400, 16, 1, 0, seed=1)
    assert spread < 0.3 * np.mean([np.ptp(lengths[plain.micro_batch(k)]) for k in range(25)])


# -- training ------------------------------------------------------------------------------------
def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_distill_writes_an_exportable_student_with_lineage(bert4: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "student"
    result = distill(_config(bert4, data, out, hidden_weight=1.0, attention_weight=1.0, alpha=0.7))
    assert result.metric == "accuracy" and 0 <= result.best_dev_score <= 1 and result.steps == 6
    assert {"kd", "ce", "hidden", "attention", "dev"} <= set(result.history[-1])
    record = json.loads((out / DISTILL_RECORD).read_text())
    teacher = load_source(bert4)
    assert record["teacher_hash"] == teacher.files_hash
    assert record["student"]["layers"] == [1, 3] and record["params"]["alpha"] == 0.7
    assert record["layer_map"]["hidden"] == [[0, 0], [1, 2], [2, 4]]
    student = load_source(out)
    assert student.model.config.num_hidden_layers == 2 and student.labels == teacher.labels
    assert not (tmp_path / "student.ckpt").exists()  # the checkpoint goes once the run is done
    # A student built from the teacher's weights keeps its word embeddings frozen by default.
    key = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(_weights(out)[key], load_file(str(bert4 / "model.safetensors"))[key])
    assert not torch.equal(
        _weights(out)["bert.encoder.layer.0.attention.self.query.weight"],
        load_file(str(bert4 / "model.safetensors"))["bert.encoder.layer.1.attention.self.query.weight"],
    )
    from trimformer.exporters import export_model

    exported = export_model(out, tmp_path / "onnx")
    assert exported.parity.worst < 1e-4


def test_same_seed_same_student_and_config_student_with_projections(
    bert4: Path, data: Path, tmp_path: Path
) -> None:
    kw = {
        "layers": None,
        "student_layers": 1,
        "student_hidden": 16,
        "student_heads": 2,
        "student_ffn": 16,
        "hidden_weight": 1.0,
        "attention_weight": 0.5,
        "steps": 4,
        "eval_every": 4,
    }
    a = distill(_config(bert4, data, tmp_path / "a", **kw))
    b = distill(_config(bert4, data, tmp_path / "b", **kw))
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a.history == b.history and "hidden" in a.history[-1]
    assert not any("projection" in k for k in wa)  # projections train, but are not exported
    c = distill(_config(bert4, data, tmp_path / "c", seed=1, **kw))
    assert not all(torch.equal(wa[k], _weights(tmp_path / "c")[k]) for k in wa)
    assert c.student["kind"] == "config"


def test_interrupted_run_resumes_from_its_checkpoint(bert4: Path, data: Path, tmp_path: Path) -> None:
    kw = {"steps": 6, "eval_every": 2, "save_every": 100}
    reference = distill(_config(bert4, data, tmp_path / "ref", **kw))

    def interrupt(step: int, info: dict[str, float]) -> None:
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would: stop after this step

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        distill(_config(bert4, data, out, **kw), hooks=TrainerHooks(on_step=interrupt))
    assert not out.exists() and (tmp_path / "resumed.ckpt" / "checkpoint.pt").is_file()
    result = distill(_config(bert4, data, out, **kw))
    assert result.resumed_from == 4
    assert result.history == reference.history
    ref, got = _weights(tmp_path / "ref"), _weights(out)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    # A checkpoint from other settings is refused, not silently mixed in.
    with pytest.raises(KeyboardInterrupt):
        distill(_config(bert4, data, tmp_path / "x", **kw), hooks=TrainerHooks(on_step=interrupt))
    with pytest.raises(UserError, match="other settings"):
        distill(_config(bert4, data, tmp_path / "x", **{**kw, "lr": 3e-4}))
    distill(_config(bert4, data, tmp_path / "x", resume=False, **{**kw, "lr": 3e-4}))


def test_hooks_wrap_the_student_and_see_every_step(bert4: Path, data: Path, tmp_path: Path) -> None:
    wrapped: list[str] = []
    steps: list[int] = []

    def wrap(model: torch.nn.Module) -> None:
        wrapped.append(type(model).__name__)
        for p in model.bert.embeddings.parameters():  # e.g. freeze, or swap Linear layers for QAT
            p.requires_grad_(False)

    distill(
        _config(bert4, data, tmp_path / "s", steps=3),
        hooks=TrainerHooks(wrap_student=wrap, on_step=lambda step, info: steps.append(step)),
    )
    assert wrapped == ["BertForSequenceClassification"] and steps == [1, 2, 3]
    teacher = load_file(str(bert4 / "model.safetensors"))
    key = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(_weights(tmp_path / "s")[key], teacher[key])


def test_unlabelled_text_is_pure_distillation(bert4: Path, tmp_path: Path) -> None:
    texts = tmp_path / "texts.jsonl"
    make_jsonl(tmp_path / "l.jsonl", rows=80)
    rows = [json.loads(line) for line in (tmp_path / "l.jsonl").read_text().splitlines()]
    texts.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    result = distill(_config(bert4, texts, tmp_path / "s", steps=3))
    assert result.metric == "agreement_with_teacher" and result.teacher_dev_score == 1.0
    assert set(result.history[-1]) == {"step", "kd", "dev"}


def test_plain_teacher_and_embedding_teacher(tmp_path: Path, data: Path) -> None:
    plain = make_plain_model(tmp_path / "plain", layers=2)
    result = distill(_config(plain, data, tmp_path / "ps", layers="1", attention_weight=1.0))
    assert load_source(tmp_path / "ps").model.config.num_layers == 1 and result.student["family"] == "plain"
    emb = make_hf_model(tmp_path / "emb", task="feature-extraction", layers=2, pooling="mean")
    kw = {"layers": None, "student_layers": 1, "student_hidden": 16, "student_heads": 2, "student_ffn": 16}
    result = distill(_config(emb, data, tmp_path / "es", embedding_loss="mse", **kw))
    assert result.metric == "cosine_to_teacher" and result.teacher_dev_score == pytest.approx(1.0)
    assert set(result.history[-1]) == {"step", "embedding", "dev"}
    pooling = json.loads((tmp_path / "es" / "1_Pooling" / "config.json").read_text())
    assert pooling["word_embedding_dimension"] == 16
    student = load_source(tmp_path / "es")
    assert student.task == "feature-extraction" and student.io.output_axes["sentence_embedding"][1] == 16


# -- bad input: one line, exit 2, nothing written ------------------------------------------------
def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--quiet", "distill", *args])
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (["--layers", "9"], "out of range"),
        (["--layers", "0,4"], "out of range"),
        (["--nproc-per-node", "999"], "more than this machine"),
        (["--from-pruning", "PRUNED"], "num_layers"),
        (["--from-pruning", "nowhere"], "no pruning record"),
        (["--student", "OTHER_VOCAB"], "different vocabulary"),
        (["--student", "OTHER_LABELS"], "labels"),
        (["--student-layers", "2"], "needs all of"),
        (["--alpha", "1.5"], "alpha"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    extra: list[str], pattern: str, bert4: Path, data: Path, tmp_path: Path
) -> None:
    import re

    pruned = tmp_path / "pruned"
    pruned.mkdir()
    (pruned / "pruning_record.json").write_text(json.dumps(_record(2, 4, 8, 64, [([0], [0])] * 2)))
    other_vocab = make_hf_model(tmp_path / "ov", layers=1)
    tok = make_tokenizer()
    tok.add_tokens(["zzzunseen"])
    tok.save(str(other_vocab / "tokenizer.json"))
    other_labels = make_hf_model(tmp_path / "ol", layers=1)
    cfg = json.loads((other_labels / "config.json").read_text())
    cfg["id2label"] = {"0": "a", "1": "b", "2": "c"}
    cfg["label2id"] = {"a": 0, "b": 1, "c": 2}
    (other_labels / "config.json").write_text(json.dumps(cfg))
    swap = {"PRUNED": str(pruned), "OTHER_VOCAB": str(other_vocab), "OTHER_LABELS": str(other_labels)}
    extra = [swap.get(a, a) for a in extra]
    if (
        "--layers" not in extra
        and "--student" not in extra
        and "--from-pruning" not in extra
        and "--student-layers" not in extra
    ):
        extra += ["--layers", "2"]
    out = tmp_path / "out"
    code, output = _invoke(
        "--teacher", str(bert4), "--data", str(data), "--out", str(out), "--steps", "2", *extra
    )
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2, output
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(pattern, lines[0]), output
    assert not out.exists() and not (tmp_path / "out.ckpt").exists()


def test_no_data_and_mismatched_labels_are_refused(bert4: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    for data_arg, pattern in (
        (str(tmp_path / "missing.csv"), "does not exist"),
        (str(empty), "empty"),
    ):
        code, output = _invoke("--teacher", str(bert4), "--data", data_arg, "--out", str(tmp_path / "o"))
        assert code == 2 and pattern in output and not (tmp_path / "o").exists(), output
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("text,label\n" + "".join(f"good day {i},sports\n" for i in range(30)))
    code, output = _invoke("--teacher", str(bert4), "--data", str(wrong), "--out", str(tmp_path / "o"))
    assert code == 2 and "labels" in output and not (tmp_path / "o").exists(), output


def test_cli_json_result(bert4: Path, data: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        ["--json", "distill", "--teacher", str(bert4), "--data", str(data), "--out", str(tmp_path / "s"),
         "--layers", "1", "--steps", "2", "--eval-every", "2", "--eval-limit", "8", "--batch-size", "4"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["student"] == {"kind": "layers", "layers": [3], "family": "hf"} and payload["steps"] == 2


def test_pruned_then_distilled_is_one_flow_and_exports(bert4: Path, data: Path, tmp_path: Path) -> None:
    from trimformer.exporters import export_source
    from trimformer.training.distill.students import load_student

    kept = [
        ([1, 3], list(range(0, 64, 4))),
        ([], list(range(8))),
        ([0, 1, 2, 3], list(range(64))),
        ([2], [1, 2]),
    ]
    record_file = tmp_path / "pruning_record.json"
    record_file.write_text(json.dumps(_record(4, 4, 8, 64, kept)))
    out = tmp_path / "recovered"
    result = distill(
        _config(
            bert4,
            data,
            out,
            layers=None,
            from_pruning=str(record_file),
            hidden_weight=1.0,
            attention_weight=1.0,
        )
    )
    assert result.student["kind"] == "pruned" and result.parameters < result.teacher_parameters
    assert {"hidden", "attention"} <= set(result.history[-1])
    assert json.loads((out / "pruning_record.json").read_text())["layers"][1]["kept_heads"] == []
    student = load_student(out)
    layer0 = student.model.bert.encoder.layer[0]
    assert layer0.attention.self.query.out_features == 16 and layer0.intermediate.dense.out_features == 16
    saved = _weights(out)
    assert torch.equal(
        layer0.attention.self.query.weight, saved["bert.encoder.layer.0.attention.self.query.weight"]
    )
    exported = export_source(student, tmp_path / "onnx")
    assert exported.parity.worst < 1e-4


def test_time_limit_stops_early_and_keeps_the_evaluated_weights(
    bert4: Path, data: Path, tmp_path: Path
) -> None:
    result = distill(_config(bert4, data, tmp_path / "s", steps=50, eval_every=50, time_limit=1e-6))
    assert result.steps == 1 and result.best_step == 1 and [h["step"] for h in result.history] == [1]
    # The folder holds the 2-layer student of step 1, recorded as such.
    assert load_source(tmp_path / "s").model.config.num_hidden_layers == 2
    assert json.loads((tmp_path / "s" / DISTILL_RECORD).read_text())["result"]["best_step"] == 1
