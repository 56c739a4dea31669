"""The recipe schema: every bad recipe is refused up front with FILE: KEY: problem; allowed: ..."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pipeline.runner_support import (
    TEST_PASS,
    StampConfig,
    register_stamp,
    tiny_recipe_text,
    write_recipe,
)
from trimformer.errors import UserError
from trimformer.passes.base import PASS_REGISTRY, PassConfig, PassEntry
from trimformer.pipeline.plan import build_plan
from trimformer.pipeline.recipe import load_recipe, parse_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.fixture
def stamp(monkeypatch: pytest.MonkeyPatch) -> None:
    register_stamp(monkeypatch)


def _refused(tmp_path: Path, text: str) -> str:
    path = write_recipe(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_recipe(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


def test_valid_recipe_builds_its_plan(tmp_path: Path, tiny_bert: Path, tiny_csv: Path, stamp: None) -> None:
    text = tiny_recipe_text(
        tiny_bert, tiny_csv, passes=[{"name": TEST_PASS, "tag": "a"}, {"name": TEST_PASS}]
    )
    recipe = load_recipe(write_recipe(tmp_path, text))
    assert recipe.seed == 0 and recipe.validate_ is not None and recipe.validate_.grid == ["1x16", "2x16"]
    assert [s.name for s in build_plan(recipe)] == ["export", TEST_PASS, f"{TEST_PASS}-2", "validate"]
    assert recipe.text == text


def test_relative_paths_are_read_from_the_recipe_folder(
    tmp_path: Path, tiny_bert: Path, tiny_csv: Path
) -> None:
    (tmp_path / "data.csv").write_bytes(tiny_csv.read_bytes())
    recipe = load_recipe(write_recipe(tmp_path, tiny_recipe_text(tiny_bert, "data.csv")))
    assert recipe.data is not None
    assert Path(recipe.resolve(recipe.data.source)) == tmp_path / "data.csv"


def test_unknown_pass_parameter_names_key_and_allowed(
    tmp_path: Path, tiny_bert: Path, tiny_csv: Path, stamp: None
) -> None:
    text = tiny_recipe_text(
        tiny_bert, tiny_csv, passes=[{"name": TEST_PASS}, {"name": TEST_PASS, "ratio": 0.5}]
    )
    message = _refused(tmp_path, text)
    assert "passes[1].ratio: unknown key; allowed: " in message
    for field in StampConfig.model_fields:
        assert field in message


def test_pass_parameter_of_wrong_type(tmp_path: Path, tiny_bert: Path, tiny_csv: Path, stamp: None) -> None:
    message = _refused(
        tmp_path, tiny_recipe_text(tiny_bert, tiny_csv, passes=[{"name": TEST_PASS, "scale": "big"}])
    )
    assert "passes[0].scale:" in message and "'big'" in message


def test_unknown_pass_lists_the_known_ones(
    tmp_path: Path, tiny_bert: Path, tiny_csv: Path, stamp: None
) -> None:
    message = _refused(tmp_path, tiny_recipe_text(tiny_bert, tiny_csv, passes=[{"name": "shrink"}]))
    assert "passes[0].name: unknown pass 'shrink'; known passes: " in message
    assert TEST_PASS in message


def test_a_decoder_pass_in_an_encoder_recipe(tmp_path: Path, tiny_bert: Path, tiny_csv: Path) -> None:
    message = _refused(tmp_path, tiny_recipe_text(tiny_bert, tiny_csv, passes=[{"name": "weight-only"}]))
    assert (
        "passes[0]: the weight-only pass works on causal-LM graphs and this recipe is an encoder's" in message
    )


@pytest.mark.parametrize(
    ("extra", "where", "what"),
    [
        ("[export]\nopset = 17\nfoo = 1\n", "export.foo", "unknown key; allowed: opset, atol"),
        ("colour = 'red'\n", "colour", "unknown key; allowed: name, description, seed, target, model, data"),
        ("[export]\nopset = 'x'\n", "export.opset", "valid integer"),
        ("[export]\nopset = 99\n", "export.opset", "must be in [14, 21] (got 99)"),
        ("[export]\nopset = 11\n", "export.opset", "must be in [14, 21] (got 11)"),
        (
            "[data]\nsource = 'x.csv'\ncalibration_samples = 0\n",
            "data.calibration_samples",
            "must be 1 or more (got 0)",
        ),
        (
            "[validate]\ngates = { max_drop = 1 }\n",
            "validate.gates.max_drop",
            "allowed: max_accuracy_drop, min_speedup",
        ),
        (
            "[validate]\nproviders = ['gpu']\n",
            "validate.providers[0]",
            "unknown provider 'gpu'; allowed: cpu, cuda",
        ),
        ("[validate]\ngrid = ['1by128']\n", "validate.grid", "BATCHxSEQ"),
        ("[validate]\ngates = { max_size_mb = 0 }\n", "validate.gates.max_size_mb", "more than 0 (got 0)"),
        ("[data]\nsource = 'nope.csv'\n", "data.source", "does not exist"),
        ("[model]\nsource = 'missing-model'\n", "model.source", "does not exist"),
        ("[model]\nsource = 'builtin:gpt5'\n", "model.source", "unknown built-in model"),
        ("[model.train]\nstepz = 3\n", "model.train.stepz", "unknown key; allowed: steps, epochs"),
        ("[model.train]\nout = 'x'\n", "model.train.out", "set by the recipe"),
        ("[package]\nformat = 'zip'\n", "package.format", "unknown key; allowed: ort_format"),
        ("[package]\nlayout = 'helm'\n", "package.layout", "unknown layout 'helm'; known: triton"),
        (
            "[package]\nlayout = 'triton'\ntriton = { max_batch_size = 0 }\n",
            "package.triton",
            "max_batch_size must be at least 1",
        ),
        (
            "[package]\nlayout = 'triton'\ntriton = { batch = 3 }\n",
            "package.triton",
            "unknown keys ['batch']",
        ),
        ("[package]\ntriton = { kind = 'gpu' }\n", "package.triton", 'add layout = "triton"'),
        ("[package]\nlayout = 'kserve'\n", "package.kserve", "needs storage_uri"),
        (
            "[package]\nlayout = 'kserve'\nkserve = { storage_uri = 'ftp://x/y' }\n",
            "package.kserve",
            "is not a location KServe downloads from",
        ),
    ],
)
def test_bad_keys_types_and_files(
    tmp_path: Path, tiny_bert: Path, tiny_csv: Path, extra: str, where: str, what: str
) -> None:
    # Later tables of the same name replace the base recipe's: build the text by hand.
    base = {
        "model": f"[model]\nsource = '{tiny_bert}'\n",
        "data": f"[data]\nsource = '{tiny_csv}'\n",
        "validate": "[validate]\nruns = 2\n",
    }
    for section in list(base):
        if extra.startswith(f"[{section}]"):
            base[section] = extra
            extra = ""
    if extra.startswith("[model.train]"):
        base["model"] += extra
        extra = ""
    if extra.startswith("[export]") or extra.startswith("[package]"):
        base["validate"] += extra
        extra = ""
    text = extra + "".join(base.values())
    message = _refused(tmp_path, text)
    assert f": {where}: " in message and what in message, message


def test_invalid_toml_is_one_line(tmp_path: Path) -> None:
    message = _refused(tmp_path, "[model\nsource = 1\n")
    assert "not valid TOML" in message


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(tmp_path / "nope.toml")


def test_missing_model_section(tmp_path: Path) -> None:
    assert "model: missing required key" in _refused(tmp_path, "seed = 1\n")


def test_package_needs_validate(tmp_path: Path, tiny_bert: Path, tiny_csv: Path) -> None:
    message = _refused(tmp_path, tiny_recipe_text(tiny_bert, tiny_csv, validate=False, package=True))
    assert "package: needs a [validate] section" in message


def test_a_name_that_cannot_be_a_model_name_is_refused_when_read(tmp_path: Path, tiny_bert: Path) -> None:
    text = f"name = 'my model'\n[model]\nsource = '{tiny_bert}'\n"
    assert "model name 'my model' must be 1 to 128 letters" in _refused(tmp_path, text)


def test_a_vnni_target_validated_on_a_cpu_without_vnni_is_refused_when_read(
    tmp_path: Path, tiny_bert: Path, tiny_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("trimformer.pipeline.recipe.cpu_class", lambda: "x86-avx2")
    text = 'target = "x86-vnni"\n' + tiny_recipe_text(tiny_bert, tiny_csv)
    message = _refused(tmp_path, text)
    assert "built for target x86-vnni and this CPU is x86-avx2" in message and 'target = "auto"' in message
    monkeypatch.setattr("trimformer.pipeline.recipe.cpu_class", lambda: "x86-vnni")
    assert load_recipe(write_recipe(tmp_path, text)).target == "x86-vnni"


def test_passes_need_data(tmp_path: Path, tiny_bert: Path, stamp: None) -> None:
    text = f"[model]\nsource = '{tiny_bert}'\n[[passes]]\nname = '{TEST_PASS}'\n"
    assert "data: missing; passes need a [data] section" in _refused(tmp_path, text)


def test_train_on_an_exported_artifact_is_refused(
    tmp_path: Path, tiny_bert_onnx: Path, tiny_csv: Path
) -> None:
    text = tiny_recipe_text(tiny_bert_onnx, tiny_csv).replace("[data]", "[model.train]\nsteps = 2\n[data]")
    assert "model.train: cannot run on an exported ONNX artifact" in _refused(tmp_path, text)


def test_an_exported_artifact_skips_export(tmp_path: Path, tiny_bert_onnx: Path, tiny_csv: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, tiny_recipe_text(tiny_bert_onnx, tiny_csv)))
    assert recipe.model_is_artifact
    assert [s.name for s in build_plan(recipe)] == ["validate"]


def test_min_speedup_without_anything_to_speed_up(tmp_path: Path, tiny_bert: Path, tiny_csv: Path) -> None:
    message = _refused(tmp_path, tiny_recipe_text(tiny_bert, tiny_csv, gates={"min_speedup": 2.0}))
    assert "validate.gates.min_speedup: nothing in the recipe can speed the model up" in message


class _Cfg(PassConfig):
    pass


def test_pass_order_quantize_before_prune_is_refused(
    tmp_path: Path, tiny_bert: Path, tiny_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("prune", "quantize", "fuse"):
        if name not in PASS_REGISTRY:
            monkeypatch.setitem(PASS_REGISTRY, name, PassEntry(name, _Cfg, lambda config, ctx: None))
    text = tiny_recipe_text(tiny_bert, tiny_csv, passes=[{"name": "quantize"}, {"name": "prune"}])
    message = _refused(tmp_path, text)
    assert "passes[1]: 'prune' cannot run after 'quantize' (passes[0])" in message


def test_distill_table_is_checked_against_its_config(tmp_path: Path, tiny_bert: Path, tiny_csv: Path) -> None:
    good = tiny_recipe_text(tiny_bert, tiny_csv, extra="[distill]\nsteps = 3\ntemperature = 2.0\n")
    recipe = load_recipe(write_recipe(tmp_path, good))
    assert [s.name for s in build_plan(recipe)] == ["distill", "export-teacher", "export", "validate"]
    bad = tiny_recipe_text(tiny_bert, tiny_csv, extra="[distill]\nsteps = 3\ntemprature = 2.0\n")
    message = _refused(tmp_path, bad)
    assert "distill.temprature: unknown key; allowed: " in message and "temperature" in message


def test_several_problems_are_reported_together(tmp_path: Path, tiny_bert: Path, tiny_csv: Path) -> None:
    text = tiny_recipe_text(tiny_bert, "nope.csv", validate=False, package=True)
    message = _refused(tmp_path, text)
    assert "data.source" in message and "package: needs a [validate]" in message


@pytest.mark.parametrize("name", ["edge-cpu.toml", "int8.toml", "prune.toml"])
def test_example_recipes_parse(name: str) -> None:
    path = RECIPES / name
    text = path.read_text(encoding="utf-8")
    if "../work/demo/teacher" in text and not (RECIPES.parent / "work" / "demo" / "teacher").is_dir():
        text = text.replace('"../work/demo/teacher"', '"builtin:minilm"')
    try:
        recipe = parse_recipe(text, path)
    except UserError as exc:
        if "builtin:" in str(exc) and "examples extra" in str(exc):
            pytest.skip(str(exc))
        raise
    assert build_plan(recipe)


@pytest.mark.parametrize(
    ("passes", "where", "what"),
    [
        (
            [{"name": "prune", "heads": 1.5}],
            "passes[0].heads",
            "must be a fraction in [0, 1) to remove (got 1.5)",
        ),
        ([{"name": "prune"}], "passes[0]", "nothing to prune"),
        ([{"name": "quantize", "samples": 0}], "passes[0].samples", "must be 1 or more (got 0)"),
        (
            [{"name": "quantize", "preset": "tpu"}],
            "passes[0].preset",
            "unknown preset 'tpu'; known presets: cpu-vnni",
        ),
        ([{"name": "quantize", "percentile": 101.0}], "passes[0].percentile", "must be in (0.0, 100.0]"),
        ([{"name": "fuse", "num_heads": -1}], "passes[0].num_heads", "must be 0 or more (got -1)"),
        ([{"name": "fp16", "atol": 0.0}], "passes[0].atol", "must be more than 0 (got 0.0)"),
    ],
)
def test_out_of_range_pass_values_exit_2_before_any_stage(
    tmp_path: Path, tiny_bert: Path, tiny_csv: Path, passes: list, where: str, what: str
) -> None:
    from click.testing import CliRunner

    from trimformer.cli import cli

    path = write_recipe(tmp_path, tiny_recipe_text(tiny_bert, tiny_csv, passes=passes))
    workdir = tmp_path / "wd"
    result = CliRunner().invoke(cli, ["run", "--dry-run", str(path), "--workdir", str(workdir)])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and str(path) in line and f": {where}: " in line and what in line, line
    assert not (workdir / "stages").exists()


def test_stage_defaults_apply_unless_the_recipe_gives_a_value(
    tmp_path: Path, tiny_bert: Path, tiny_csv: Path
) -> None:
    from trimformer.pipeline.recipe import stage_params
    from trimformer.pipeline.stages.params import PruneStageParams, QuantizeStageParams

    text = f"[model]\nsource = '{tiny_bert}'\n[data]\nsource = '{tiny_csv}'\n"
    recipe = load_recipe(write_recipe(tmp_path, text))
    assert stage_params(recipe.data, "prune") == PruneStageParams()
    assert stage_params(recipe.data, "quantize") == QuantizeStageParams()
    given = load_recipe(
        write_recipe(tmp_path, text + "calibration_samples = 8\ncalibration_pad_to = 16\n", "b.toml")
    )
    assert stage_params(given.data, "prune") == PruneStageParams(samples=8)
    assert stage_params(given.data, "quantize") == QuantizeStageParams(pad_to=16)
