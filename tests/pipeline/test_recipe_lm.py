"""A causal-LM recipe: train -> export -> validate -> package through `trimformer run`, with a tiny
model on a small corpus; what such a recipe may not contain is refused when it is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.builders import make_csv
from trimformer.cli.commands import cli
from trimformer.errors import UserError
from trimformer.pipeline.recipe import load_recipe
from trimformer.pipeline.runner import run_recipe
from trimformer.runtime import verify_bundle
from trimformer.runtime.generator import Generator

RECIPE = """
name = "tiny-lm"
seed = 0

[model]
task = "causal-lm"

[model.train]
steps = 30
batch_size = 8
max_length = 16
lr = 0.01
eval_every = 15
vocab_size = 300
shape = {{ hidden_size = 32, layers = 2, heads = 4, kv_heads = 2, ffn_size = 48, context_length = 640 }}

[data]
source = "{data}"

[export]
parity_tokens = 3

[validate]
perplexity_context = 32
perplexity_tokens = 300
prompts = 3
new_tokens = 4
runs = 2

[validate.gates]
min_token_agreement = 0.99
max_perplexity_increase = 0.5

[package]
generation = {{ max_new_tokens = 5 }}
"""


def _recipe(tmp_path: Path, extra: str = "", text: str = RECIPE) -> Path:
    data = make_csv(tmp_path / "corpus.csv", rows=300)
    path = tmp_path / "lm.toml"
    path.write_text(text.format(data=data) + extra)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("lm-recipe")
    workdir = root / "wd"
    return workdir, run_recipe(load_recipe(_recipe(root)), workdir)


def test_train_export_validate_package(run: tuple[Path, object]) -> None:
    workdir, result = run
    stages = {p.name: p for p in result.stages}  # type: ignore[attr-defined]
    assert list(stages) == ["train", "export", "validate", "package"]
    assert result.gates_passed  # type: ignore[attr-defined]
    # Validated against the PyTorch model the train stage wrote: the reference row is that model.
    final = json.loads((stages["validate"].out / "cpu" / "final" / "report.json").read_text())
    assert final["task"] == "causal-lm" and final["token_agreement"] == 1.0
    assert final["reference"]["model"] == str(stages["train"].out)
    assert final["perplexity_context"] == 32 and final["tokens"] == 12
    bundle = stages["package"].out / "bundle"
    checked = verify_bundle(bundle)
    assert checked["task"] == "causal-lm" and checked["generation"]["max_new_tokens"] == 5
    assert Generator(bundle).default_settings.max_new_tokens == 5
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["validation"]["metrics"]["token_agreement"] == 1.0
    assert "[model.train]" in manifest["recipe"]["text"]
    report = (workdir / "report" / "report.md").read_text()
    assert "perplexity (32-token window)" in report and "decode tokens/s @512" in report
    assert "all gates passed" in report and (workdir / "report" / "decode-cpu.png").is_file()


def test_a_second_run_is_all_cached(run: tuple[Path, object], tmp_path: Path) -> None:
    workdir, _ = run
    result = CliRunner().invoke(
        cli, ["--json", "run", str(workdir.parent / "lm.toml"), "--workdir", str(workdir)]
    )
    assert result.exit_code == 0, result.output
    assert "train lm" not in result.output  # nothing retrained
    summary = json.loads(result.output[result.output.index("{") :])
    assert {stage["action"] for stage in summary["stages"]} == {"cached"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[[passes]]\nname = "quantize"\n', "passes\\[0\\]: the quantize pass works on encoder graphs"),
        (
            '[[passes]]\nname = "fuse"\n',
            "passes\\[0\\]: the fuse pass works on encoder graphs.*it takes: fuse-decoder, weight-only",
        ),
        ("[distill]\nepochs = 1\n", "distill: distillation is for encoders"),
        (
            '[[passes]]\nname = "weight-only"\nalgo = "gptq"\nbits = 8\n',
            "GPTQ writes MatMulNBits for 4 bits only",
        ),
    ],
)
def test_what_a_causal_lm_recipe_cannot_take(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_recipe(_recipe(tmp_path, extra))


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("steps = 30", "epochs = 1", "model.train.epochs: unknown key"),
        ("heads = 4", "heads = 'four'", "model.train.shape.heads"),
        ("max_new_tokens = 5", "temprature = 1", "package.generation: .*unknown generation settings"),
        ("max_new_tokens = 5", "top_p = 2", "package.generation: .*top_p must be in"),
        ("min_token_agreement = 0.99", "min_token_agreement = 1.5", "validate.gates.min_token_agreement"),
        ("min_token_agreement = 0.99", "min_speedup = 1.5", "validate.gates.min_speedup: an encoder gate"),
        ('task = "causal-lm"', 'task = "sequence-classification"', "model.source: missing required key"),
    ],
)
def test_bad_values_are_named_when_read(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert old in RECIPE
    with pytest.raises(UserError, match=message):
        load_recipe(_recipe(tmp_path, text=RECIPE.replace(old, new)))


def test_decoder_keys_on_an_encoder_recipe_are_refused(
    tmp_path: Path, tiny_bert: Path, tiny_csv: Path
) -> None:
    path = tmp_path / "enc.toml"
    path.write_text(
        f'[model]\nsource = "{tiny_bert}"\n[data]\nsource = "{tiny_csv}"\n[export]\nparity_tokens = 4\n'
        "[validate]\nperplexity_context = 64\n[validate.gates]\nmin_token_agreement = 0.9\n"
    )
    with pytest.raises(
        UserError,
        match=r"min_token_agreement: only for a causal LM .*perplexity_context: only .*export.parity_tokens: only",
    ):
        load_recipe(path)


def test_the_shipped_recipe_reads(tmp_path: Path) -> None:
    recipe = load_recipe(Path(__file__).parents[2] / "recipes" / "lm.toml")
    assert recipe.is_causal_lm and recipe.model.source is None and recipe.model.train is not None


def test_fuse_and_weight_only_between_export_and_validate(tmp_path: Path) -> None:
    passes = '\n[[passes]]\nname = "fuse-decoder"\n'
    passes += '\n[[passes]]\nname = "weight-only"\nbits = 8\nblock_size = 16\nmin_token_agreement = 0.5\n'
    text = RECIPE.replace("min_token_agreement = 0.99", "min_token_agreement = 0.5").replace(
        "max_perplexity_increase = 0.5", "max_perplexity_increase = 50"
    )
    path = _recipe(tmp_path, text=text.replace("[validate]\n", passes + "\n[validate]\n", 1))
    result = run_recipe(load_recipe(path), tmp_path / "wd")
    stages = {p.name: p for p in result.stages}
    assert list(stages) == ["train", "export", "fuse-decoder", "weight-only", "validate", "package"]
    assert result.gates_passed
    step = json.loads((stages["weight-only"].out / "trimformer.json").read_text())["lineage"][-1]
    assert step["step"] == "weight-only" and step["params"]["bits"] == 8
    # The accuracy level was chosen on this CPU by the recipe's data: every level measured or matched.
    assert set(step["stats"]["accuracy_levels"]) == {"1", "2", "3", "4"}
    assert step["stats"]["fidelity"]["prompts"] >= 1
    # The bundle ships the int4/int8 graph, validated against the PyTorch model.
    bundle = stages["package"].out / "bundle"
    verify_bundle(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"]["quantized"] and manifest["lineage"]["steps"][-1]["step"] == "weight-only"
    assert [s["step"] for s in manifest["lineage"]["steps"]] == ["export", "fuse-decoder", "weight-only"]
    fused = json.loads((stages["fuse-decoder"].out / "trimformer.json").read_text())["lineage"][-1]
    assert fused["stats"]["fusions"]["group_query_attention"] == 2
    final = json.loads((stages["validate"].out / "cpu" / "final" / "report.json").read_text())
    assert final["reference"]["model"] == str(stages["train"].out) and final["token_agreement"] >= 0.5
