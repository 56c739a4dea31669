"""Packaging a causal LM: the greedy smoke record, generation settings, its report, the checks a
service replays, and what is refused."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from click.testing import CliRunner

from tests.builders import make_causal_lm, make_csv
from trimformer.cli.commands import cli
from trimformer.errors import UserError
from trimformer.exporters import export_model
from trimformer.packaging.package import package_artifact
from trimformer.runtime import MANIFEST, MANIFEST_DIGEST, Predictor, verify_bundle
from trimformer.runtime.bundle import BundleError
from trimformer.runtime.decoder_smoke import SMOKE_NEW_TOKENS, SMOKE_PROMPTS, check_decoder_smoke
from trimformer.runtime.generator import Generator


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from trimformer.pipeline.stages.validate import run_validate
    from trimformer.validation.decoder import DecoderValidateConfig
    from trimformer.validation.validate import ValidateConfig

    root = tmp_path_factory.mktemp("lm")
    folder = make_causal_lm(root / "llama", context=640)
    out = root / "onnx"
    export_model(folder, out, parity_tokens=2)
    decoder = DecoderValidateConfig(
        perplexity_context=64, perplexity_tokens=300, prompts=3, new_tokens=4, runs=2
    )
    config = ValidateConfig(
        model=str(out), data=str(make_csv(root / "t.csv", rows=60)), reference=str(folder),
        out=str(root / "report"), decoder=decoder,
    )  # fmt: skip
    run_validate(config)
    bundle = root / "bundle"
    package_artifact(out, bundle, report=root / "report" / "report.json", generation={"max_new_tokens": 12})
    return {"folder": folder, "onnx": out, "report": root / "report" / "report.json", "bundle": bundle}


def _rewrite_manifest(bundle: Path, change: dict) -> None:
    """Edit the manifest and re-pin its digest, as someone who rewrites the whole folder could."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    for key, value in change.items():
        manifest["smoke"][key] = value
    raw = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    (bundle / MANIFEST).write_bytes(raw)
    (bundle / MANIFEST_DIGEST).write_text(f"{hashlib.sha256(raw).hexdigest()}  manifest.json\n")


def test_manifest_records_greedy_smoke_settings_and_decoder_metrics(lm: dict[str, Path]) -> None:
    manifest = json.loads((lm["bundle"] / MANIFEST).read_text())
    assert manifest["task"] == "causal-lm"
    assert {"tokenizer.json", "model.onnx", "trimformer.json", "config.json"} <= set(manifest["files"])
    smoke = manifest["smoke"]
    assert smoke["kind"] == "greedy-tokens" and smoke["prompts"] == list(SMOKE_PROMPTS)
    assert [len(row) for row in smoke["tokens"]] == [SMOKE_NEW_TOKENS] * len(SMOKE_PROMPTS)
    # The recorded tokens are the artifact's own greedy tokens (no stop at eos: all are compared).
    generator = Generator(lm["onnx"])
    for prompt, tokens in zip(SMOKE_PROMPTS, smoke["tokens"], strict=True):
        assert generator.session.greedy(generator.encode(prompt), SMOKE_NEW_TOKENS) == tokens
    assert manifest["generation"]["max_new_tokens"] == 12 and manifest["generation"]["temperature"] == 0
    metrics = manifest["validation"]["metrics"]
    assert metrics["token_agreement"] == 1.0 and metrics["perplexity"] > 1
    assert set(metrics["decode_tokens_per_s"]) == {"128", "512"}
    assert manifest["validation"]["reference"]["perplexity"] == pytest.approx(metrics["perplexity"], rel=1e-3)


def test_verify_and_generator_replay_the_bundle(lm: dict[str, Path]) -> None:
    archive = lm["bundle"].with_name("bundle.tar.gz")
    result = verify_bundle(archive)
    assert result["task"] == "causal-lm" and result["smoke"]["tokens"] == SMOKE_NEW_TOKENS * len(
        SMOKE_PROMPTS
    )
    assert result["smoke"]["max_abs_diff"] < 1e-4 and result["generation"]["max_new_tokens"] == 12
    from_bundle = Generator(archive)
    from_folder = Generator(lm["onnx"])
    assert from_bundle.digest == result["digest"] and from_bundle.default_settings.max_new_tokens == 12
    prompts = ["the car is", "sad day"]
    bundled = from_bundle.generate(prompts)
    direct = from_folder.generate(prompts, max_new_tokens=12)
    assert [g.token_ids for g in bundled] == [g.token_ids for g in direct]
    assert all(len(g.token_ids) <= 12 for g in bundled)


def test_packaging_twice_gives_the_same_bytes(lm: dict[str, Path], tmp_path: Path) -> None:
    again = package_artifact(
        lm["onnx"], tmp_path / "again", report=lm["report"], generation={"max_new_tokens": 12}
    )
    assert again.manifest == json.loads((lm["bundle"] / MANIFEST).read_text())
    assert again.archive.read_bytes() == lm["bundle"].with_name("bundle.tar.gz").read_bytes()


def test_changed_smoke_tokens_or_logits_fail_the_check(lm: dict[str, Path], tmp_path: Path) -> None:
    manifest = json.loads((lm["bundle"] / MANIFEST).read_text())
    tokens = [list(row) for row in manifest["smoke"]["tokens"]]
    top = tokens[1][3]
    tokens[1][3] = (top + 1) % 320
    bundle = tmp_path / "tokens"
    shutil.copytree(lm["bundle"], bundle)
    _rewrite_manifest(bundle, {"tokens": tokens})
    with pytest.raises(BundleError, match=rf"smoke prompt 1 .*new token 3: {top} instead of {tokens[1][3]}"):
        verify_bundle(bundle)
    logits = [list(row) for row in manifest["smoke"]["logits"]]
    logits[0][0] += 1.0
    bundle = tmp_path / "logits"
    shutil.copytree(lm["bundle"], bundle)
    _rewrite_manifest(bundle, {"logits": logits})
    with pytest.raises(BundleError, match="smoke prompt 0, new token 0"):
        Generator(bundle)


class _FixedStepper:
    """Two steps of fixed logits: token 0 first, then a near-tie between tokens 1 and 2."""

    rows: ClassVar[list[np.ndarray]] = [np.array([3.0, 0.0, 0.0]), np.array([0.0, 2.0, 1.995])]

    def prompt(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, int]:
        return self.rows[0][None, None], 1

    def step(self, next_ids: np.ndarray, state: int) -> tuple[np.ndarray, int]:
        return self.rows[state][None, None], state + 1


def test_a_tie_within_the_tolerance_is_not_a_regression() -> None:
    smoke = {"prompts": ["x"], "tokens": [[0, 2]], "logits": [[3.0, 1.995]], "atol": 0.01}
    assert check_decoder_smoke(_FixedStepper(), lambda _: [5], smoke, "b") == 0.0
    with pytest.raises(BundleError, match="new token 1: 1 instead of 2"):
        check_decoder_smoke(_FixedStepper(), lambda _: [5], {**smoke, "atol": 0.001}, "b")
    with pytest.raises(BundleError, match="malformed"):
        check_decoder_smoke(_FixedStepper(), lambda _: [5], {**smoke, "logits": [[3.0]]}, "b")


def test_refusals_are_one_line_and_write_nothing(
    lm: dict[str, Path], tiny_bert_onnx: Path, tmp_path: Path
) -> None:
    with pytest.raises(UserError, match="unknown generation settings \\['temprature'\\]"):
        package_artifact(lm["onnx"], tmp_path / "a", generation={"temprature": 0.5})
    with pytest.raises(UserError, match="top_p must be in"):
        package_artifact(lm["onnx"], tmp_path / "a", generation={"top_p": 1.5})
    with pytest.raises(UserError, match="--ort is not supported for causal language models"):
        package_artifact(lm["onnx"], tmp_path / "a", ort_format=True)
    with pytest.raises(UserError, match="generation settings apply to causal language models"):
        package_artifact(tiny_bert_onnx, tmp_path / "a", generation={"temperature": 0.5})
    assert not list(tmp_path.iterdir())
    with pytest.raises(BundleError, match="open it with Generator"):
        Predictor(lm["bundle"])


def test_cli_package_generation_options_and_generate_defaults(lm: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "b"
    args = ["package", str(lm["onnx"]), "--out", str(out), "--generation", "max_new_tokens=3",
            "--generation", "temperature=0.8", "--generation", "seed=7"]  # fmt: skip
    assert runner.invoke(cli, args).exit_code == 0
    assert json.loads((out / MANIFEST).read_text())["generation"]["seed"] == 7
    first = runner.invoke(cli, ["--json", "generate", str(out), "--prompt", "the car"])
    second = runner.invoke(cli, ["--json", "generate", str(out), "--prompt", "the car"])
    assert first.exit_code == 0 and first.output == second.output  # the bundle's seed: reproducible
    assert json.loads(first.output)["generations"][0]["tokens"] <= 3
    bad = runner.invoke(
        cli, ["package", str(lm["onnx"]), "--out", str(tmp_path / "c"), "--generation", "top_k"]
    )
    assert bad.exit_code == 2 and "KEY=VALUE" in bad.output and not (tmp_path / "c").exists()


def _until_eos(tokens: list[int], eos: tuple[int, ...]) -> list[int]:
    cut = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
    return list(tokens[:cut])


def _genai_greedy(bundle: Path, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens from onnxruntime-genai's own Generator, reading only the bundle's folder."""
    import onnxruntime_genai as og

    model = og.Model(og.Config(str(bundle)))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([prompt_ids], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(prompt_ids) :]]


@pytest.fixture(scope="module")
def fused_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fused Llama (GroupQueryAttention rotating itself: the cache can be kept in place), packaged."""
    root = tmp_path_factory.mktemp("fused-lm")
    export_model(make_causal_lm(root / "hf", context=96, head_dim=16), root / "onnx", parity_tokens=2)
    result = CliRunner().invoke(cli, ["--quiet", "fuse", str(root / "onnx"), "--out", str(root / "fused")])
    assert result.exit_code == 0, result.output
    package_artifact(root / "fused", root / "bundle", generation={"max_new_tokens": 8})
    return root / "bundle"


@pytest.mark.parametrize("which", ["plain", "fused"])
def test_onnxruntime_genai_runs_the_bundle_as_trimformer_does(
    which: str, lm: dict[str, Path], fused_bundle: Path
) -> None:
    bundle = lm["bundle"] if which == "plain" else fused_bundle
    config = json.loads((bundle / "genai_config.json").read_text())
    decoder, model = config["model"]["decoder"], json.loads((bundle / MANIFEST).read_text())["model"]
    ins, outs, layers = decoder["inputs"], decoder["outputs"], range(decoder["num_hidden_layers"])
    assert {io["name"] for io in model["inputs"]} == {
        ins["input_ids"], ins["attention_mask"], ins["position_ids"],
        *(ins["past_key_names"] % i for i in layers), *(ins["past_value_names"] % i for i in layers),
    }  # fmt: skip
    assert {io["name"] for io in model["outputs"]} == {
        outs["logits"],
        *(outs["present_key_names"] % i for i in layers), *(outs["present_value_names"] % i for i in layers),
    }  # fmt: skip
    # The builder's own setting for GroupQueryAttention graphs: one buffer per layer, written in place.
    assert config["search"]["past_present_share_buffer"] is (which == "fused")
    ours = Generator(bundle)
    compared = []
    for prompt in ["the car is", "my new phone is the best", "sad"]:
        expected = _until_eos(ours.generate(prompt, max_new_tokens=10)[0].token_ids, ours.eos_token_ids)
        got = _until_eos(_genai_greedy(bundle, ours.encode(prompt), 10), ours.eos_token_ids)
        assert got == expected
        compared += expected
    assert len(compared) > 6  # the tokens compared include steps on the cache, not only first tokens
