from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.builders import make_causal_lm
from trimformer.errors import UserError
from trimformer.exporters import export_model
from trimformer.exporters.decoder import torch_greedy
from trimformer.runtime.generator import GenerationSettings, Generator
from trimformer.runtime.sampling import next_token
from trimformer.sources import load_source


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = make_causal_lm(tmp_path_factory.mktemp("src") / "llama", context=64)
    out = tmp_path_factory.mktemp("onnx") / "llama"
    export_model(folder, out, parity_tokens=4)
    return folder, out


def test_greedy_batch_equals_pytorch_row_by_row(llama: tuple[Path, Path]) -> None:
    folder, out = llama
    source = load_source(folder)
    generator = Generator(out)
    prompts = ["the car", "my new phone is the best", "sad"]
    results = generator.generate(prompts, max_new_tokens=12)
    for prompt, result in zip(prompts, results, strict=True):
        ids = source.tokenizer.encode(prompt).ids
        expected, _ = torch_greedy(source.model, ids, 12)
        # Greedy stops at eos (id 2): compare up to it.
        cut = expected.index(2) if 2 in expected else len(expected)
        assert result.token_ids == expected[:cut] and result.prompt_tokens == len(ids)
        assert result.text == source.tokenizer.decode(result.token_ids)


def test_cache_is_kept_so_the_prompt_runs_once(llama: tuple[Path, Path]) -> None:
    generator = Generator(llama[1])
    shapes: list[tuple[int, ...]] = []
    real_run = generator.session.session.run_with_ort_values

    def recording(names, feeds):  # type: ignore[no-untyped-def]
        shapes.append(tuple(feeds["input_ids"].shape()))
        # The cache goes back in as onnxruntime values, never through numpy.
        assert all(isinstance(feeds[name], ort.OrtValue) for name in generator.spec.past_names())
        return real_run(names, feeds)

    generator.session.session.run_with_ort_values = recording  # type: ignore[method-assign]
    result = generator.generate(["my new phone is the best"], max_new_tokens=6, stop_tokens=())
    prompt_len = result[0].prompt_tokens
    assert shapes[0] == (1, prompt_len) and all(shape == (1, 1) for shape in shapes[1:])
    assert len(shapes) == len(result[0].step_seconds) + 1


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(llama: tuple[Path, Path]) -> None:
    generator = Generator(llama[1])
    sample = GenerationSettings(max_new_tokens=10, temperature=1.5, top_p=0.95, seed=7)
    first = generator.generate("the phone", sample)[0].token_ids
    assert generator.generate("the phone", sample)[0].token_ids == first
    draws = {tuple(generator.generate("the phone", sample, seed=s)[0].token_ids) for s in range(5)}
    assert len(draws) > 1
    greedy = generator.generate("the phone", max_new_tokens=10)[0].token_ids
    assert (
        generator.generate("the phone", max_new_tokens=10, temperature=1.0, top_k=1, seed=3)[0].token_ids
        == greedy
    )


def test_stop_strings_tokens_length_and_streaming(llama: tuple[Path, Path]) -> None:
    generator = Generator(llama[1])
    free = generator.generate("the car", max_new_tokens=20)[0]
    assert free.finish_reason in ("stop", "length") and len(free.token_ids) <= 20
    limited = generator.generate("the car", max_new_tokens=3)[0]
    assert len(limited.token_ids) <= 3
    # A stop token: the row ends before it, with finish "stop".
    stopped = generator.generate("the car", max_new_tokens=20, stop_tokens=(free.token_ids[2],))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[:2]
    # A stop string: the text is cut where it starts, and the stream delivers exactly that text.
    target = free.text[len(free.text) // 2 :][:3]
    pieces: list[str] = []
    cut = generator.generate(
        "the car", max_new_tokens=20, stop_strings=(target,), on_text=lambda _, t: pieces.append(t)
    )[0]
    assert target and cut.finish_reason == "stop" and cut.text == free.text[: free.text.find(target)]
    assert "".join(pieces) == cut.text


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"temperature": -0.1}, "temperature must be 0 \\(greedy\\) or more"),
    ],
)
def test_bad_settings_are_refused(settings: dict[str, float], message: str) -> None:
    with pytest.raises(UserError, match=message):
        GenerationSettings(**settings)  # type: ignore[arg-type]


def test_prompt_longer_than_the_context_is_refused(llama: tuple[Path, Path]) -> None:
    with pytest.raises(UserError, match="leaves no room in the model's context of 64 tokens"):
        Generator(llama[1]).generate("the car is good " * 40)


def test_encoder_is_refused(tiny_bert_onnx: Path) -> None:
    with pytest.raises(
        UserError, match="is a sequence-classification model; generation takes a causal language model"
    ):
        Generator(tiny_bert_onnx)


def test_top_p_keeps_the_nucleus_and_the_penalty_demotes_seen_tokens() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    nucleus = GenerationSettings(temperature=1.0, top_p=0.7)
    drawn = {next_token(logits, np.array([], dtype=np.int64), nucleus, rng) for _ in range(300)}
    assert drawn == {0, 1}
    penalised = GenerationSettings(repetition_penalty=10.0)
    assert next_token(np.array([2.0, 1.9, -1.0]), np.array([0]), penalised, rng) == 1


def test_artifact_without_a_decoder_description_is_one_line(llama: tuple[Path, Path], tmp_path: Path) -> None:
    import json
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(llama[1], broken)
    meta = json.loads((broken / "trimformer.json").read_text())
    del meta["extras"]["decoder"]
    (broken / "trimformer.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="has no usable decoder description \\(KeyError: 'decoder'\\)"):
        Generator(broken)


def test_settings_from_a_table_and_from_a_hugging_face_generation_config() -> None:
    settings = GenerationSettings.from_dict({"top_k": 5, "temperature": 1, "stop_strings": ["\n"]}, "recipe")
    assert settings.top_k == 5 and settings.temperature == 1.0 and settings.stop_strings == ("\n",)
    assert GenerationSettings.from_dict(settings.to_dict(), "again") == settings
    for bad in ({"top_k": 1.5}, {"seed": "x"}, {"stop_strings": "\n"}, {"temperature": True}):
        with pytest.raises(UserError, match="is not a valid value"):
            GenerationSettings.from_dict(bad, "recipe")
    hf = GenerationSettings.from_hf_config({"do_sample": True, "top_p": 0.9, "max_new_tokens": 20})
    # Sampling fields HF leaves out take HF's defaults (temperature 1, top_k 50).
    assert (hf.temperature, hf.top_k, hf.top_p, hf.max_new_tokens) == (1.0, 50, 0.9, 20)
    assert GenerationSettings.from_hf_config({"temperature": 0.6, "eos_token_id": 2}).greedy
