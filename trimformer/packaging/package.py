"""Packaging: an artifact (+ its validation report) -> a self-verifying, byte-reproducible bundle.

``package_artifact`` writes ``OUT/`` (see :mod:`trimformer.runtime.bundle` for the layout) and
``OUT.tar.gz`` next to it, plus ``OUT.tar.gz.sha256``. The folder is built in a temporary sibling
and renamed into place only after it passed the same check a service runs (``verify_bundle``):
every hash, and the smoke inference through :class:`trimformer.runtime.Predictor`.

Reproducible: the model, tokenizer and metadata files are copied byte for byte, config.json is
only rewritten (sorted keys) when its labels must be fixed, the manifest is sorted JSON with no
timestamps or absolute paths, and the archive is canonical (:mod:`trimformer.runtime.archive`).
Packaging the same artifact and report twice, into any folder, gives identical bytes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from trimformer import __version__
from trimformer.artifact import EXPORTED_FROM, MODEL_FILE, ModelArtifact, write_meta
from trimformer.errors import UserError
from trimformer.formats.decoder import (
    CACHE_IN_PLACE_KEY,
    DECODER_EXTRAS_KEY,
    GENAI_CONFIG_FILE,
    DecoderSpec,
    genai_config,
)
from trimformer.formats.targets import built_for
from trimformer.formats.tasks import CAUSAL_LM
from trimformer.formats.tokenizer_files import TOKENIZER_FILES
from trimformer.fsutil import atomic_output_dir, check_output_dir, sha256_bytes, sha256_file
from trimformer.packaging.kserve import KSERVE_FILE, KServeOptions, inference_service, kubernetes_name
from trimformer.packaging.manifest import lineage_facts, model_facts, validation_facts
from trimformer.packaging.ort_format import ORT_CONFIG_FILE, ORT_FILE, convert_to_ort
from trimformer.packaging.triton import (
    LAYOUTS,
    TritonOptions,
    TritonSource,
    check_triton,
    write_triton_repository,
)
from trimformer.runtime.archive import ARCHIVE_SUFFIXES, archive_sidecar, write_tar_gz
from trimformer.runtime.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    MANIFEST,
    MANIFEST_DIGEST,
    digest_line,
)
from trimformer.runtime.decoder_smoke import record_decoder_smoke
from trimformer.runtime.encoding import KNOWN_INPUTS, TextEncoder
from trimformer.runtime.generator import Generator
from trimformer.runtime.manifest import (
    FileEntry,
    Manifest,
    ManifestError,
    ModelSpec,
    TokenizerFacts,
    check_model_name,
)
from trimformer.runtime.predictor import SMOKE_TEXTS, smoke_difference
from trimformer.runtime.sampling import GenerationSettings
from trimformer.runtime.session import make_session
from trimformer.runtime.verify import verify_bundle

__all__ = ["BUNDLE_TOKENIZER_FILES", "PackageResult", "archive_path_for", "package_artifact"]

logger = logging.getLogger(__name__)

# The tokenizer files Hugging Face loaders (and Optimum) read; tokenizer.json is the one the runtime reads.
BUNDLE_TOKENIZER_FILES = TOKENIZER_FILES
CONFIG_FILE = "config.json"
# Smoke tolerance, times max(1, largest |output|): float graphs agree to ~1e-6 across machines;
# integer kernels differ more between CPUs (VNNI or not), hence the wider margin for quantized graphs.
_SMOKE_ATOL = {False: 1e-3, True: 5e-2}


@dataclass(frozen=True)
class PackageResult:
    folder: Path
    archive: Path
    manifest: dict[str, Any]
    digest: str
    archive_sha256: str

    def to_dict(self) -> dict[str, Any]:
        files = self.manifest["files"]
        return {
            "folder": str(self.folder),
            "archive": str(self.archive),
            "digest": self.digest,
            "archive_sha256": self.archive_sha256,
            "files": sorted([*files, MANIFEST, MANIFEST_DIGEST]),
            "size_mb": round(sum(entry["size"] for entry in files.values()) / 1e6, 3),
            "validated": self.manifest["validation"] is not None,
            "ort_format": self.manifest["ort_format"] is not None,
        }


def archive_path_for(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".tar.gz")


def _check_destinations(artifact: ModelArtifact, out: Path, archive: Path, overwrite: bool) -> None:
    if out.name.endswith(ARCHIVE_SUFFIXES):
        raise UserError(
            f"--out names the bundle folder; the archive is written next to it as <out>.tar.gz: "
            f"use --out {out.name[: -len('.tar.gz') if out.name.endswith('.tar.gz') else -len('.tgz')]}"
        )
    source = artifact.path.resolve()
    target = out.resolve()
    if target == source or target in source.parents or source in target.parents:
        raise UserError(f"--out {out} overlaps the model folder {artifact.path}; choose a folder outside it")
    check_output_dir(out, overwrite)
    if archive.exists() and not overwrite:
        raise UserError(
            f"archive {archive} already exists; pass --overwrite to replace it or choose another --out"
        )
    if archive.exists() and not archive.is_file():
        raise UserError(f"{archive} exists and is not a file; remove it or choose another --out")


def _config_bytes(artifact: ModelArtifact) -> bytes:
    """config.json with id2label/label2id matching the artifact's labels (Optimum reads them)."""
    path = artifact.path / CONFIG_FILE
    config: dict[str, Any] = {}
    if path.is_file():
        raw = path.read_bytes()
        try:
            config = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise UserError(f"{path} is not valid JSON ({exc}); re-export the model") from exc
        if not isinstance(config, dict):
            raise UserError(f"{path} is not a JSON object; re-export the model")
    labels = artifact.labels
    wanted: dict[str, Any] = {}
    if labels:
        wanted = {
            "id2label": {str(i): label for i, label in enumerate(labels)},
            "label2id": {label: i for i, label in enumerate(labels)},
        }
    if path.is_file() and all(config.get(k) == v for k, v in wanted.items()):
        return raw  # unchanged: byte for byte what the artifact carried
    config.update(wanted)
    config.setdefault("architectures", [artifact.meta.architecture])
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _copy_files(artifact: ModelArtifact, tmp: Path) -> tuple[list[str], list[str]]:
    """Model (+ external data), tokenizer files, config.json and trimformer.json; returns
    (external data names, tokenizer file names)."""
    model_files = artifact.model_files()
    external = [p.relative_to(artifact.path.resolve()).as_posix() for p in model_files[1:]]
    shutil.copyfile(artifact.model_path, tmp / MODEL_FILE)
    for name in external:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(artifact.path / name, tmp / name)
    tokenizer_file = artifact.meta.tokenizer.file
    if not (artifact.path / tokenizer_file).is_file():
        raise UserError(
            f"{artifact.path} has no {tokenizer_file}; the runtime needs a tokenizers file: re-export the model"
        )
    tokenizer_files = sorted(
        {tokenizer_file} | {n for n in BUNDLE_TOKENIZER_FILES if (artifact.path / n).is_file()}
    )
    for name in tokenizer_files:
        shutil.copyfile(artifact.path / name, tmp / name)
    (tmp / CONFIG_FILE).write_bytes(_config_bytes(artifact))
    # The bundle's own copy, without where the model was built (a local path).
    shipped = artifact.meta.model_copy(deep=True)
    shipped.extras.pop(EXPORTED_FROM, None)
    write_meta(tmp, shipped)
    skipped = sorted(
        p.relative_to(artifact.path).as_posix()
        for p in artifact.side_files()
        if p.relative_to(artifact.path).as_posix() not in {*tokenizer_files, CONFIG_FILE}
    )
    if skipped:
        logger.info("not shipped (pipeline-only files): %s", ", ".join(skipped))
    return external, tokenizer_files


def _run_smoke(model: bytes | Path, encoder: TextEncoder, output: str, label: str) -> np.ndarray:
    session = make_session(model, ["CPUExecutionProvider"], threads=None, label=label)
    values = session.run([output], encoder(list(SMOKE_TEXTS)))[0]
    if not np.all(np.isfinite(values)):
        raise UserError(
            f"the {label} outputs NaN or infinity on the smoke texts; validate the model before packaging"
        )
    return np.asarray(values)


def _check_decoder_io(artifact: ModelArtifact, facts: ModelSpec) -> None:
    """A causal LM must carry its cache contract, and its graph must have exactly that io."""
    extras = artifact.meta.extras.get(DECODER_EXTRAS_KEY)
    if not isinstance(extras, dict):
        raise UserError(f"{artifact.path} is a causal LM without its decoder description; re-export it")
    spec = DecoderSpec.from_dict(extras, str(artifact.path))
    wanted_inputs = ["input_ids", "attention_mask", "position_ids", *spec.past_names()]
    wanted_outputs = ["logits", *spec.present_names()]
    inputs = [io.name for io in facts.inputs]
    outputs = [io.name for io in facts.outputs]
    if sorted(inputs) != sorted(wanted_inputs) or sorted(outputs) != sorted(wanted_outputs):
        raise UserError(
            f"{artifact.model_path} does not have the KV-cache io its trimformer.json describes "
            f"({len(spec.past_names())} past inputs, logits and presents); re-export it"
        )


def _check_io(artifact: ModelArtifact, facts: ModelSpec) -> None:
    if artifact.task == CAUSAL_LM:
        _check_decoder_io(artifact, facts)
        return
    unknown = [io.name for io in facts.inputs if io.name not in KNOWN_INPUTS]
    if unknown:
        raise UserError(
            f"{artifact.model_path} has inputs {unknown} the runtime cannot feed (it feeds {KNOWN_INPUTS})"
        )
    if not facts.outputs:
        raise UserError(f"{artifact.model_path} has no outputs")
    if artifact.task == "sequence-classification":
        if not artifact.labels:
            raise UserError(
                f"{artifact.path} is a classifier without labels in trimformer.json; re-export it"
            )
        width = facts.outputs[0].shape[-1]
        if isinstance(width, int) and width != len(artifact.labels):
            raise UserError(
                f"{artifact.model_path} outputs {width} scores but trimformer.json lists {len(artifact.labels)} labels"
            )


def _smoke(model: bytes | Path, encoder: TextEncoder, facts: ModelSpec) -> tuple[dict[str, Any], float]:
    """The smoke record (texts, output, values, tolerance) a service re-checks at load, and the
    unrounded tolerance."""
    output = facts.outputs[0].name
    values = _run_smoke(model, encoder, output, "model")
    scale = max(1.0, float(np.max(np.abs(values), initial=0.0)))
    atol = _SMOKE_ATOL[facts.quantized] * scale
    smoke = {
        "texts": list(SMOKE_TEXTS),
        "output": output,
        "values": np.round(values.astype(np.float64), 6).tolist(),
        "atol": float(f"{atol:.6g}"),
    }
    return smoke, atol


def _ort_copy(tmp: Path, encoder: TextEncoder, smoke: dict[str, Any], atol: float) -> dict[str, Any]:
    """Convert model.onnx to the ORT format next to it, check it gives the smoke outputs, describe it."""
    _, _, reproducible = convert_to_ort(tmp / MODEL_FILE, tmp)
    ort_values = _run_smoke((tmp / ORT_FILE).read_bytes(), encoder, smoke["output"], "ORT-format model")
    diff = smoke_difference(ort_values, smoke)
    if not diff <= atol:
        raise UserError(
            f"the ORT-format copy gives different outputs from model.onnx (max difference {diff:.3g} > "
            f"{atol:.3g}); package without --ort and report it"
        )
    return {
        "file": ORT_FILE,
        "required_operators": ORT_CONFIG_FILE,
        "converter": "onnxruntime.tools.convert_onnx_models_to_ort",
        "optimization": "Fixed, level all, no NCHWc",
        "onnxruntime": ort.__version__,
        "reproducible": reproducible,
        "smoke_max_abs_diff": float(f"{diff:.6g}"),
    }


def _file_table(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        path.relative_to(folder).as_posix(): {"sha256": sha256_file(path), "size": path.stat().st_size}
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@dataclass(frozen=True)
class _Facts:
    """What the manifest records besides the files and the smoke check, gathered before writing."""

    model: ModelSpec
    lineage: dict[str, Any]
    validation: dict[str, Any] | None
    recipe_text: str | None
    # A causal LM's default generation settings (the Generator starts from them); None for encoders.
    generation: GenerationSettings | None = None
    # The model's name for servers (package --name, else the recipe's name).
    name: str | None = None
    # --layout triton (or kserve): the repository's settings and its model name (checked before
    # writing); --layout kserve: the InferenceService's settings too.
    triton: TritonOptions | None = None
    triton_name: str | None = None
    kserve: KServeOptions | None = None
    # What the layouts written into the bundle record in the manifest.
    layouts: dict[str, Any] | None = None


def _manifest(
    artifact: ModelArtifact,
    facts: _Facts,
    tokenizer_files: list[str],
    files: dict[str, dict[str, Any]],
    smoke: dict[str, Any],
    ort_facts: dict[str, Any] | None,
) -> Manifest:
    tok = artifact.meta.tokenizer
    recipe = facts.recipe_text
    return Manifest(
        format=BUNDLE_FORMAT,
        format_version=BUNDLE_FORMAT_VERSION,
        trimformer=__version__,
        task=artifact.task,
        architecture=artifact.meta.architecture,
        labels=None if artifact.labels is None else tuple(artifact.labels),
        model=facts.model,
        tokenizer=TokenizerFacts(
            file=tok.file,
            files=tuple(tokenizer_files),
            max_length=tok.max_length,
            pad_token_id=tok.pad_token_id,
            uses_token_type_ids=tok.uses_token_type_ids,
        ),
        files={name: FileEntry(entry["sha256"], entry["size"]) for name, entry in files.items()},
        # Where packaging itself loaded the model and recorded the smoke outputs.
        runtime={"onnxruntime": ort.__version__, "providers": ["CPUExecutionProvider"]},
        validation=facts.validation,
        smoke=smoke,
        ort_format=ort_facts,
        recipe=None if recipe is None else {"sha256": sha256_bytes(recipe.encode("utf-8")), "text": recipe},
        lineage=facts.lineage,
        generation=None if facts.generation is None else facts.generation.to_dict(),
        name=facts.name,
        target=built_for([step.params for step in artifact.meta.lineage]),
        layouts=facts.layouts,
    )


def _write_bundle(
    artifact: ModelArtifact, tmp: Path, facts: _Facts, ort_format: bool
) -> tuple[dict[str, Any], bytes]:
    """Fill ``tmp`` with the bundle (files, smoke check, manifest and its digest) and check it as a
    service would; returns the manifest and its bytes."""
    external, tokenizer_files = _copy_files(artifact, tmp)
    facts = replace(facts, model=replace(facts.model, external_data=tuple(external)))
    if artifact.task == CAUSAL_LM:
        _write_genai_config(artifact, tmp, facts.generation or GenerationSettings())
        # The copied folder is an artifact the Generator opens as is; it walks the smoke prompts.
        generator = Generator(tmp)
        smoke = record_decoder_smoke(generator.session, generator.encode, _SMOKE_ATOL[facts.model.quantized])
        del generator
        return _finish_bundle(artifact, tmp, facts, tokenizer_files, smoke, None)
    tok = artifact.meta.tokenizer
    encoder = TextEncoder(
        (tmp / tok.file).read_text(encoding="utf-8"),
        [io.name for io in facts.model.inputs],
        tok.max_length,
        tok.pad_token_id,
    )
    model_input: bytes | Path = tmp / MODEL_FILE if external else (tmp / MODEL_FILE).read_bytes()
    smoke, atol = _smoke(model_input, encoder, facts.model)
    ort_facts = _ort_copy(tmp, encoder, smoke, atol) if ort_format else None
    if facts.triton is not None and facts.triton_name is not None:
        source = TritonSource(
            tmp,
            artifact.task,
            facts.model,
            tuple(artifact.labels or ()),
            tok.file,
            tok.max_length,
            tok.pad_token_id,
        )
        layouts = {"triton": write_triton_repository(source, facts.triton_name, facts.triton)}
        if facts.kserve is not None:
            gpu = facts.triton.kind == "gpu"
            (tmp / KSERVE_FILE).parent.mkdir()
            (tmp / KSERVE_FILE).write_text(
                inference_service(facts.triton_name, facts.kserve, gpu), encoding="utf-8"
            )
            layouts["kserve"] = {"file": KSERVE_FILE, "storage_uri": facts.kserve.storage_uri}
        facts = replace(facts, layouts=layouts)
    return _finish_bundle(artifact, tmp, facts, tokenizer_files, smoke, ort_facts)


def _write_genai_config(artifact: ModelArtifact, tmp: Path, settings: GenerationSettings) -> None:
    """onnxruntime-genai's config beside the model, so its Generator runs the bundle's folder as is
    with the bundle's default search (``max_new_tokens`` and stop strings have no genai key:
    genai stops at the context or an eos token)."""
    sampled = not settings.greedy
    search: dict[str, Any] = {
        "do_sample": sampled,
        "temperature": settings.temperature if sampled else 1.0,
        "top_k": settings.top_k,  # 0: no limit, in both
        "top_p": settings.top_p,
        "repetition_penalty": settings.repetition_penalty,
    }
    if settings.seed is not None:
        search["random_seed"] = settings.seed
    config = genai_config(
        DecoderSpec.from_extras(artifact.meta.extras, str(artifact.path)),
        model_file=MODEL_FILE,
        in_place=bool(artifact.meta.extras.get(CACHE_IN_PLACE_KEY)),
        search=search,
    )
    (tmp / GENAI_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _finish_bundle(
    artifact: ModelArtifact,
    tmp: Path,
    facts: _Facts,
    tokenizer_files: list[str],
    smoke: dict[str, Any],
    ort_facts: dict[str, Any] | None,
) -> tuple[dict[str, Any], bytes]:
    """The manifest and its digest over what ``tmp`` holds, then the check a service runs."""
    manifest = _manifest(artifact, facts, tokenizer_files, _file_table(tmp), smoke, ort_facts).to_dict()
    manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
    (tmp / MANIFEST).write_bytes(manifest_bytes)
    (tmp / MANIFEST_DIGEST).write_text(digest_line(manifest_bytes), encoding="ascii")
    # The tool checks itself: what a service will run must accept what we wrote.
    verify_bundle(tmp)
    return manifest, manifest_bytes


def _write_archive(
    tmp: Path, names: list[str], archive_tmp: Path, sidecar_tmp: Path, archive_name: str
) -> str:
    """The canonical tar.gz of ``names`` and its ``.sha256`` sidecar, at their temporary paths;
    returns the archive's sha256."""
    write_tar_gz([(name, tmp / name) for name in names], archive_tmp)
    archive_sha = sha256_file(archive_tmp)
    sidecar_tmp.write_text(f"{archive_sha}  {archive_name}\n", encoding="ascii")
    for done in (archive_tmp, sidecar_tmp):
        os.chmod(done, 0o644)  # mkstemp makes them private; archives are meant to be shared
    return archive_sha


def _generation(artifact: ModelArtifact, overrides: Mapping[str, Any] | None) -> GenerationSettings | None:
    """The artifact's generation_config.json defaults with ``overrides`` on top (causal LMs only)."""
    if artifact.task != CAUSAL_LM:
        if overrides:
            raise UserError(
                f"generation settings apply to causal language models; {artifact.path} is {artifact.task}"
            )
        return None
    base = GenerationSettings.from_hf_config(artifact.meta.extras.get("generation") or {}).to_dict()
    return GenerationSettings.from_dict({**base, **(overrides or {})}, "generation settings")


def _gather_facts(
    artifact: ModelArtifact,
    report: str | Path | None,
    recipe_text: str | None,
    generation: Mapping[str, Any] | None,
    name: str | None = None,
) -> _Facts:
    """Everything checked before a byte is written: io the runtime can feed, the report is this model's."""
    model = model_facts(artifact.load_model(load_weights=False), [])
    _check_io(artifact, model)
    lineage = lineage_facts(artifact)
    validation = validation_facts(Path(report), artifact) if report is not None else None
    return _Facts(
        model,
        lineage,
        validation,
        recipe_text,
        _generation(artifact, generation),
        _model_name(name, recipe_text),
    )


def _model_name(name: str | None, recipe_text: str | None) -> str | None:
    """``name``, else the recipe's top-level ``name``; checked as a model name (it goes in URLs)."""
    if name is None and recipe_text is not None:
        try:
            recipe_name = tomllib.loads(recipe_text).get("name")
        except tomllib.TOMLDecodeError:
            recipe_name = None
        name = recipe_name if isinstance(recipe_name, str) else None
    try:
        return None if name is None else check_model_name(name)
    except ManifestError as exc:
        raise UserError(f"{exc}; pass --name with a plain name") from None


def package_artifact(
    artifact_dir: str | Path,
    out: str | Path,
    report: str | Path | None = None,
    recipe_text: str | None = None,
    ort_format: bool = False,
    overwrite: bool = False,
    generation: Mapping[str, Any] | None = None,
    name: str | None = None,
    layout: str | None = None,
    triton: TritonOptions | None = None,
    kserve: KServeOptions | None = None,
) -> PackageResult:
    """Write the bundle folder ``out`` and ``<out>.tar.gz``; see the module docstring.
    ``generation`` overrides a causal LM's default generation settings (GenerationSettings keys);
    ``name`` is the model's name for servers (default: the recipe's ``name``, if any); ``layout``
    "triton" adds a Triton model repository (``trimformer.packaging.triton``) with ``triton``'s
    settings (default: TritonOptions()); "kserve" that repository and a KServe InferenceService
    (``trimformer.packaging.kserve``) with ``kserve``'s settings (its storage URI is required)."""
    if layout is not None and layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    artifact = ModelArtifact.open(artifact_dir)
    out = Path(out)
    archive = archive_path_for(out)
    _check_destinations(artifact, out, archive, overwrite)
    facts = _gather_facts(artifact, report, recipe_text, generation, name)
    if layout is not None:  # every layout (LAYOUTS) serves the bundle from a Triton repository
        options = triton or TritonOptions()
        triton_name = facts.name or out.name
        check_triton(artifact.task, triton_name, options)
        facts = replace(facts, triton=options, triton_name=triton_name)
    if layout == "kserve":
        service = kserve or KServeOptions()
        service.check()
        kubernetes_name(facts.triton_name or "")
        facts = replace(facts, kserve=service)
    if ort_format and artifact.task == CAUSAL_LM:
        raise UserError("--ort is not supported for causal language models yet; package it without --ort")
    if ort_format and len(artifact.model_files()) > 1:
        raise UserError(
            "--ort needs a model without external data (under 2 GB); package this one without --ort"
        )
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    archive_tmp = Path(tempfile.mkstemp(prefix=f".{archive.name}.tmp-", dir=parent)[1])
    sidecar_tmp = Path(tempfile.mkstemp(prefix=f".{archive.name}.sha256.tmp-", dir=parent)[1])
    try:
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            manifest, manifest_bytes = _write_bundle(artifact, tmp, facts, ort_format)
            names = [*manifest["files"], MANIFEST, MANIFEST_DIGEST]
            archive_sha = _write_archive(tmp, names, archive_tmp, sidecar_tmp, archive.name)
        os.replace(archive_tmp, archive)
        os.replace(sidecar_tmp, archive_sidecar(archive))
    finally:
        archive_tmp.unlink(missing_ok=True)
        sidecar_tmp.unlink(missing_ok=True)
    digest = "sha256:" + sha256_bytes(manifest_bytes)
    logger.info("packaged %s into %s (%s)", artifact.path, out, digest)
    return PackageResult(
        folder=out, archive=archive, manifest=manifest, digest=digest, archive_sha256=archive_sha
    )
