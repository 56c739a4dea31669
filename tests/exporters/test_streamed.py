"""The streamed weight writer: a traced graph plus the module's tensors gives the same model as a
normal export, with the Linear transposes folded, a tied weight stored once, the weights as aligned
external data (the decoder export's choice) or inline in the protobuf."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import trimformer.exporters.streamed as streamed
from tests.builders import make_causal_lm
from trimformer.exporters import decoder as decoder_export
from trimformer.exporters.decoder_module import CachedDecoder
from trimformer.formats.decoder import DecoderSpec
from trimformer.sources import load_source


def _export(tmp_path: Path, family: str) -> tuple[Path, dict, torch.nn.Module, DecoderSpec]:
    source = load_source(make_causal_lm(tmp_path / family, family=family, context=64))
    spec = DecoderSpec.from_dict(source.config["trimformer_decoder"], family)
    module = CachedDecoder(source.model, spec).eval()
    path = tmp_path / "model.onnx"
    written = decoder_export._trace(module, spec, 17, path)
    return path, written, module, spec


def _feeds(spec: DecoderSpec) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(3, spec.vocab_size, (2, 5)),
        "attention_mask": np.ones((2, 8), np.int64),
        "position_ids": np.tile(np.arange(3, 8), (2, 1)),
    }
    for name in spec.past_names():
        feeds[name] = rng.standard_normal((2, spec.num_kv_heads, 3, spec.head_dim)).astype(np.float32)
    return feeds


def _torch_logits(module: torch.nn.Module, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.inference_mode():
        out = module(*(torch.from_numpy(v) for v in feeds.values()))
    return out[0].numpy()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_streamed_model_equals_pytorch_and_stores_each_weight_once(tmp_path: Path, family: str) -> None:
    path, written, module, spec = _export(tmp_path, family)
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    feeds = _feeds(spec)
    logits = ort.InferenceSession(str(path)).run(["logits"], feeds)[0]
    assert np.abs(logits - _torch_logits(module, feeds)).max() < 1e-4
    # Weights are initializers now, not graph inputs, and every Linear weight was folded.
    assert [i.name for i in model.graph.input] == spec.input_names()
    stored = {t.name: t for t in model.graph.initializer}
    assert len(stored) == written["initializers"] and written["external"]
    assert (tmp_path / streamed.EXTERNAL_DATA_FILE).is_file()
    raw = onnx.load(str(path), load_external_data=False).graph.initializer
    offsets = [int(e.value) for t in raw for e in t.external_data if e.key == "offset"]
    assert len(offsets) == len(stored) and all(offset % 4096 == 0 for offset in offsets)
    # Never more than the module's own tensors (the exporter also merges weights of equal value).
    assert written["bytes"] <= sum(p.numel() * 4 for p in module.parameters())
    embedding = module.model.get_input_embeddings().weight
    same_shape = [
        t for t in stored.values() if list(t.dims) in (list(embedding.shape), list(embedding.shape)[::-1])
    ]
    tied = module.model.get_output_embeddings().weight.data_ptr() == embedding.data_ptr()
    assert len(same_shape) == (1 if tied else 2)  # a tied embedding / lm_head: one copy
    if family == "llama":  # q/k/v/o/gate/up/down per layer: each stored transposed, no Transpose left
        assert written["folded_transposes"] == 7 * spec.num_layers + 1  # and the untied lm_head
        q = stored["model.model.layers.0.self_attn.q_proj.weight.T"]
        weight = module.model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(q), weight.T)


def test_below_the_protobuf_limit_the_weights_can_stay_inline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def inline(graph: Path, weights: dict, out: Path, external: bool | None = None) -> dict:
        return streamed.write_with_weights(graph, weights, out, external=None)

    monkeypatch.setattr(decoder_export, "write_with_weights", inline)
    path, written, module, spec = _export(tmp_path, "llama")
    assert not written["external"] and not (tmp_path / streamed.EXTERNAL_DATA_FILE).exists()
    assert len(onnx.load(str(path)).graph.initializer) == written["initializers"]
    feeds = _feeds(spec)
    logits = ort.InferenceSession(str(path)).run(["logits"], feeds)[0]
    assert np.abs(logits - _torch_logits(module, feeds)).max() < 1e-4


def test_a_relative_output_folder_exports_and_hashes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trimformer.artifact import ModelArtifact
    from trimformer.exporters import export_model

    folder = make_causal_lm(tmp_path / "src", context=64)
    monkeypatch.chdir(tmp_path)
    export_model(folder, Path("out"), parity_tokens=2)
    relative, absolute = ModelArtifact.open("out"), ModelArtifact.open(tmp_path / "out")
    assert [p.name for p in relative.model_files()] == ["model.onnx", streamed.EXTERNAL_DATA_FILE]
    assert relative.model_hash() == absolute.model_hash() == relative.meta.lineage[-1].output_hash
