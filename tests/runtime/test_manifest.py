"""The typed manifest: what packaging writes reads back as the same types; a manifest whose
structure is wrong (with a matching digest) is refused in one line; model names are plain tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trimformer.packaging.package import package_artifact
from trimformer.runtime import MANIFEST, MANIFEST_DIGEST, verify_bundle
from trimformer.runtime.bundle import BundleError, check_bundle_folder, digest_line
from trimformer.runtime.manifest import Manifest, ManifestError, check_model_name


@pytest.fixture(scope="module")
def packaged(tiny_bert_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("manifest") / "sentiment"
    package_artifact(tiny_bert_onnx, out, name="tweets-sentiment")
    return out


def test_the_written_manifest_reads_back_as_types_and_writes_the_same_json(packaged: Path) -> None:
    raw = json.loads((packaged / MANIFEST).read_text())
    spec = check_bundle_folder(packaged).spec
    assert spec.to_dict() == raw
    assert spec.name == "tweets-sentiment" and spec.task == "sequence-classification"
    assert spec.model.inputs[0].name == "input_ids"
    assert spec.model.inputs[0].fixed_shape == [-1, -1] and spec.model.outputs[0].fixed_shape[-1] == 3
    assert spec.tokenizer.max_length >= 8 and spec.files["model.onnx"].size > 0


def _rewrite(bundle: Path, change) -> None:  # type: ignore[no-untyped-def]
    manifest = json.loads((bundle / MANIFEST).read_text())
    change(manifest)
    raw = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    (bundle / MANIFEST).write_bytes(raw)
    (bundle / MANIFEST_DIGEST).write_text(digest_line(raw))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda m: m["model"].pop("inputs"), "manifest.json.model has no 'inputs'"),
        (
            lambda m: m["tokenizer"].update(max_length="512"),
            "manifest.json.tokenizer.max_length is str, not int",
        ),
        (lambda m: m.update(labels=[1, 2, 3]), "manifest.json.labels must be strings"),
        (lambda m: m.update(name="my model/v2"), "model name 'my model/v2' must be"),
    ],
)
def test_a_malformed_manifest_with_a_matching_digest_is_refused(
    packaged: Path,
    tmp_path: Path,
    change,
    reason: str,  # type: ignore[no-untyped-def]
) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(packaged, bundle)
    _rewrite(bundle, change)
    with pytest.raises(BundleError) as caught:
        verify_bundle(bundle)
    assert "malformed manifest" in str(caught.value) and reason in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_bundle_packaged_without_a_name_has_none(tiny_bert_onnx: Path, tmp_path: Path) -> None:
    package_artifact(tiny_bert_onnx, tmp_path / "plain")
    assert check_bundle_folder(tmp_path / "plain").spec.name is None
    assert "name" not in json.loads((tmp_path / "plain" / MANIFEST).read_text())


@pytest.mark.parametrize("name", ["sentiment", "minilm-l6.int8", "A_1"])
def test_plain_model_names(name: str) -> None:
    assert check_model_name(name) == name


@pytest.mark.parametrize("name", ["", "-x", "a b", "a/b", "x" * 129, "ünï"])
def test_names_that_cannot_go_in_a_url_are_refused(name: str) -> None:
    with pytest.raises(ManifestError, match="must be 1 to 128 letters"):
        check_model_name(name)


def test_from_dict_refuses_a_manifest_without_a_model() -> None:
    with pytest.raises(ManifestError, match="has no 'model'"):
        Manifest.from_dict({"format": "x", "format_version": 1, "task": "t", "files": {}}, "m")
