from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import trimformer.exporters.decoder as decoder_export
from tests.builders import make_causal_lm
from trimformer.artifact import ModelArtifact
from trimformer.errors import ParityError
from trimformer.exporters import export_model
from trimformer.exporters.decoder import PARITY_PROMPTS, check_decoder_parity, torch_greedy
from trimformer.formats.decoder import DecoderSpec
from trimformer.runtime.decoding import CachedSession, left_pad
from trimformer.runtime.session import cpu_session
from trimformer.sources import load_source


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = make_causal_lm(tmp_path_factory.mktemp("src") / request.param, request.param)
    out = tmp_path_factory.mktemp("onnx") / request.param
    export_model(folder, out)
    return folder, out


def _session(out: Path) -> CachedSession:
    artifact = ModelArtifact.open(out)
    return CachedSession(cpu_session(out / "model.onnx"), DecoderSpec.from_extras(artifact.meta.extras))


def test_graph_has_the_cache_contract_with_dynamic_axes(exported: tuple[Path, Path]) -> None:
    _, out = exported
    artifact = ModelArtifact.open(out)
    spec = DecoderSpec.from_extras(artifact.meta.extras)
    graph = onnx.load(str(out / "model.onnx")).graph
    assert [i.name for i in graph.input] == spec.input_names()
    assert [o.name for o in graph.output] == spec.output_names()
    past = next(i for i in graph.input if i.name == "past_key_values.1.value")
    dims = [d.dim_param or d.dim_value for d in past.type.tensor_type.shape.dim]
    assert dims == ["batch", spec.num_kv_heads, "past_sequence", spec.head_dim]
    step = artifact.meta.lineage[-1]
    assert step.step == "export" and step.stats["parity"]["prompts"] == len(PARITY_PROMPTS)
    assert step.stats["parity"]["tokens_compared"] == len(PARITY_PROMPTS) * 32
    assert (out / "tokenizer.json").is_file() and artifact.task == "causal-lm"


def test_one_graph_serves_prompt_and_steps_with_the_models_tokens(exported: tuple[Path, Path]) -> None:
    folder, out = exported
    source = load_source(folder)
    session = _session(out)
    prompt = source.tokenizer.encode("the phone is great today").ids
    expected, _ = torch_greedy(source.model, prompt, 40)
    assert session.greedy(prompt, 40) == expected


def test_left_padded_batch_matches_each_row_alone(exported: tuple[Path, Path]) -> None:
    folder, out = exported
    source = load_source(folder)
    session = _session(out)
    rows = [source.tokenizer.encode(t).ids for t in ("good", "my new car is the best thing", "a sad day")]
    ids, mask = left_pad(rows, source.pad_token_id)
    logits, state = session.prompt(ids, mask)
    batch_tokens = [[int(np.argmax(logits[r, -1]))] for r in range(len(rows))]
    for _ in range(7):
        logits, state = session.step(np.asarray([[t[-1]] for t in batch_tokens]), state)
        for r in range(len(rows)):
            batch_tokens[r].append(int(np.argmax(logits[r, -1])))
    assert batch_tokens == [session.greedy(row, 8) for row in rows]


def test_a_token_mismatch_names_the_prompt_and_position(
    exported: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, out = exported
    source = load_source(folder)
    session = _session(out)
    real = decoder_export.greedy_tokens

    def off_by_one(stepper, prompt: list[int], new_tokens: int):  # type: ignore[no-untyped-def]
        tokens, logits = real(stepper, prompt, new_tokens)
        tokens[5] = (tokens[5] + 1) % 100
        return tokens, logits

    monkeypatch.setattr(decoder_export, "greedy_tokens", off_by_one)
    prompts = [source.tokenizer.encode("the car").ids]
    with pytest.raises(
        ParityError, match=r"prompt 0 \('the car'\): greedy token 5 is \d+ from ONNX but \d+ from PyTorch"
    ):
        check_decoder_parity(source, session, prompts, 8, 1e-3)


def test_parity_prompts_from_the_test_split(tmp_path: Path) -> None:
    folder = make_causal_lm(tmp_path / "llama")
    data = tmp_path / "texts.csv"
    data.write_text(
        "text\n" + "\n".join(f"the car {i} is great and the phone is bad" for i in range(30)) + "\n"
    )
    result = export_model(folder, tmp_path / "out", prompts=str(data), parity_tokens=4)
    assert result.details["greedy_parity"]["prompts"] == 24  # every prompt the file's rows give, up to 24
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "llama"


def test_traced_module_equals_huggingface_on_every_family(tmp_path: Path) -> None:
    from trimformer.exporters.decoder_module import CachedDecoder

    for family in ("llama", "mistral", "qwen2", "qwen3", "gpt2"):
        source = load_source(make_causal_lm(tmp_path / family, family))
        spec = DecoderSpec.from_dict(source.config["trimformer_decoder"])
        module = CachedDecoder(source.model, spec).eval()
        ids = torch.tensor([[1, 40, 41, 42, 43, 44], [0, 0, 1, 50, 51, 52]])
        mask = (ids != 0).long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        empty = [torch.zeros(2, spec.num_kv_heads, 0, spec.head_dim) for _ in spec.past_names()]
        with torch.no_grad():
            reference = source.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            first = module(ids[:, :4], mask[:, :4], positions[:, :4], *empty)
            second = module(ids[:, 4:], mask, positions[:, 4:], *first[1:])
        assert torch.allclose(
            first[0][mask[:, :4].bool()], reference[:, :4][mask[:, :4].bool()], atol=1e-5
        ), family
        assert torch.allclose(second[0], reference[:, 4:], atol=1e-5), family
