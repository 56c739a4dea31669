"""Two CPU processes under torchrun with gloo: different shards per rank, identical weights at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.builders import make_csv, make_hf_model
from trimformer.progress import set_progress_enabled
from trimformer.training.distill.api import DISTILL_RECORD, DistillConfig, distill


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPU cores for two processes")
def test_two_gloo_processes_read_different_shards_and_agree(tmp_path: Path) -> None:
    set_progress_enabled(False)
    teacher = make_hf_model(tmp_path / "teacher", layers=2)
    # No dropout, so that a single process can reproduce the two ranks' steps (see the end).
    cfg = json.loads((teacher / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (teacher / "config.json").write_text(json.dumps(cfg))
    data = make_csv(tmp_path / "d.csv", rows=80)
    out = tmp_path / "student"
    config = DistillConfig(
        teacher=str(teacher), data=str(data), out=str(out), layers="1", steps=3, batch_size=4,
        grad_accum=2, eval_every=3, eval_limit=10, nproc_per_node=2, device="cpu",
    )  # fmt: skip
    result = distill(config)
    ddp = result.distributed
    assert ddp["world_size"] == 2 and ddp["backend"] == "gloo"
    shards = ddp["shards"]
    assert [s["rank"] for s in shards] == [0, 1]
    # Each rank read 3 steps x 2 micro-batches x 4 rows, and not the same rows.
    assert all(s["rows"] == 24 for s in shards)
    assert shards[0]["sha256"] != shards[1]["sha256"]
    assert not set(shards[0]["first_rows"]) & set(shards[1]["first_rows"])
    # DistributedDataParallel kept the ranks in step: identical weights everywhere.
    assert len(set(ddp["param_sha256"])) == 1
    record = json.loads((out / DISTILL_RECORD).read_text())
    assert record["result"]["distributed"]["world_size"] == 2
    assert "bert.encoder.layer.0.attention.self.query.weight" in load_file(str(out / "model.safetensors"))
    assert not (tmp_path / "student.ckpt").exists()
    # The two ranks together took the same steps a single process does with a doubled batch: the
    # same rows in each step, so the same gradients up to floating-point summation order.
    single = DistillConfig(
        **{**config.__dict__, "out": str(tmp_path / "single"), "nproc_per_node": 1, "batch_size": 8}
    )
    distill(single)
    a, b = (
        load_file(str(out / "model.safetensors")),
        load_file(str(tmp_path / "single" / "model.safetensors")),
    )
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
