"""The KV cache kept in place: a GroupQueryAttention graph stepped with one buffer per layer gives
the logits the copying session gives, left-padded batches and a buffer that has to grow included,
and the fused artifact tells the Generator to run it so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from click.testing import CliRunner

from tests.builders import make_causal_lm
from trimformer.artifact import ModelArtifact
from trimformer.cli.commands import cli
from trimformer.exporters import export_model
from trimformer.formats.decoder import CACHE_IN_PLACE_KEY, DecoderSpec
from trimformer.passes.base import PassContext
from trimformer.passes.fuse.decoder import DecoderFuseConfig, DecoderFusePass
from trimformer.runtime.decoding import CachedSession, left_pad
from trimformer.runtime.generator import Generator
from trimformer.runtime.session import cpu_session

PROMPTS = [[1, 17, 43, 9, 88], [1, 5], [1, 200, 31, 7, 7, 64, 12, 3, 99]]


@pytest.fixture(scope="module")
def fused(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ir.Model, ir.Model, DecoderSpec, dict]:
    root = tmp_path_factory.mktemp("in-place")
    make_causal_lm(root / "hf", context=64, head_dim=16)
    export_model(root / "hf", root / "onnx", parity_tokens=2)
    artifact = ModelArtifact.open(root / "onnx")
    spec = DecoderSpec.from_extras(artifact.meta.extras)
    plain = artifact.load_model()
    report = DecoderFusePass(
        DecoderFuseConfig(new_tokens=4), PassContext(decoder_spec=spec, prompts=PROMPTS)
    )(ir.from_proto(plain))
    return root / "onnx", plain, ir.to_proto(report.model), spec, report.extras


def _decode(session: CachedSession, ids: np.ndarray, mask: np.ndarray, steps: int) -> np.ndarray:
    logits, state = session.prompt(ids, mask)
    out = [logits[:, -1]]
    for _ in range(steps):
        logits, state = session.step(np.argmax(out[-1], axis=-1)[:, None], state)
        out.append(logits[:, -1])
    return np.stack(out)


def test_in_place_cache_decodes_as_the_copying_one(fused: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, graph, spec, extras = fused
    assert extras == {CACHE_IN_PLACE_KEY: True}  # every present comes from GroupQueryAttention
    # Room for 3 more tokens: the 20 steps below make the buffers grow (twice the room, copied).
    monkeypatch.setattr(CachedSession, "HEADROOM", 3)
    ids, mask = left_pad(PROMPTS, spec.pad_token_id or 0)
    copying = CachedSession(cpu_session(graph), spec)
    in_place = CachedSession(cpu_session(graph), spec, in_place=True)
    np.testing.assert_allclose(_decode(in_place, ids, mask, 20), _decode(copying, ids, mask, 20), atol=1e-5)
    _, state = in_place.prompt(ids, mask)
    buffer = next(iter(state.buffers.values()))  # type: ignore[union-attr]
    assert buffer.shape == (3, spec.num_kv_heads, ids.shape[1] + 3, spec.head_dim)
    for _ in range(4):  # the 4th token outgrows the room: the buffer doubles, the cache is copied
        _, state = in_place.step(np.full((3, 1), 7), state)
    assert next(iter(state.buffers.values())).shape[2] == 2 * (ids.shape[1] + 3)  # type: ignore[union-attr]


def test_the_generator_keeps_the_cache_in_place_where_the_artifact_says_so(
    fused: tuple, tmp_path: Path
) -> None:
    folder, plain, _, spec, _ = fused
    unfused = DecoderFusePass(
        DecoderFuseConfig(attention=False, new_tokens=2), PassContext(decoder_spec=spec, prompts=PROMPTS)
    )(ir.from_proto(plain))
    assert unfused.extras == {}  # Concat writes the presents: they cannot share the past's buffer
    result = CliRunner().invoke(cli, ["--quiet", "fuse", str(folder), "--out", str(tmp_path / "fused")])
    assert result.exit_code == 0, result.output
    assert ModelArtifact.open(tmp_path / "fused").meta.extras[CACHE_IN_PLACE_KEY] is True
    plain_generator, fused_generator = Generator(folder), Generator(tmp_path / "fused")
    assert fused_generator.session.in_place and not plain_generator.session.in_place
    prompts = ["the car", "my new phone is the best"]
    expected = [g.token_ids for g in plain_generator.generate(prompts, max_new_tokens=12)]
    assert [g.token_ids for g in fused_generator.generate(prompts, max_new_tokens=12)] == expected


def test_the_cache_is_kept_in_place_on_the_cpu_provider_only(fused: tuple) -> None:
    _, _, graph, spec, _ = fused
    assert CachedSession(cpu_session(graph), spec, in_place=True).in_place

    class DeviceSession:  # a session on another provider: host buffers would not be the kernel's memory
        def __init__(self, session: object) -> None:
            self._session = session

        def get_providers(self) -> list[str]:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

        def __getattr__(self, name: str) -> object:
            return getattr(self._session, name)

    on_device = CachedSession(DeviceSession(cpu_session(graph)), spec, in_place=True)  # type: ignore[arg-type]
    assert not on_device.in_place
    # ... and it steps through the copying path: new presents one token longer each step.
    ids = np.asarray([PROMPTS[0]], dtype=np.int64)
    _, state = on_device.prompt(ids, np.ones_like(ids))
    assert state.buffers is None and state.past[spec.past_names()[0]].shape()[2] == len(PROMPTS[0])
