"""``verify_bundle``: recheck every hash of a bundle and run its smoke inference.

What is checked, in order (any failure raises a BundleError, a UserError, and nothing else runs):

1. an archive: its ``.sha256`` sidecar when present, then every member's name and type before
   anything is unpacked (no absolute paths, ``..``, links or devices), into a private temp folder;
2. ``manifest.sha256`` against ``manifest.json``, then every file's size and sha256 against the
   manifest; a missing, extra or non-plain file is refused;
3. an archive again: its gzip header and whole tar stream must be the canonical re-creation;
4. the model loads in onnxruntime from the verified bytes and, on the smoke texts recorded at
   packaging time, gives the recorded outputs within the recorded tolerance; the same for the
   ORT-format copy when the bundle has one. A causal-LM bundle loads in the Generator instead, which
   replays the greedy smoke tokens (:mod:`trimformer.runtime.decoder_smoke`);
5. a Triton repository (``package --layout triton``): every entry the manifest names has its
   ``config.pbtxt``, and the repository's model and tokenizer are the bundle's own, byte for byte
   (their hashes in the manifest agree): a repository that serves another model is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnxruntime as ort

from trimformer.formats.tasks import CAUSAL_LM
from trimformer.runtime.archive import archive_sidecar, is_archive_path
from trimformer.runtime.bundle import BundleError, VerifiedBundle
from trimformer.runtime.generator import Generator
from trimformer.runtime.manifest import Manifest
from trimformer.runtime.predictor import Predictor, open_verified

__all__ = ["verify_bundle"]


def verify_bundle(
    path: str | Path, provider: str | list[str] = "cpu", expected_digest: str | None = None
) -> dict[str, Any]:
    """Verify a bundle folder or ``.tar.gz``; return what was checked (raise BundleError if anything fails)."""
    path = Path(path)
    # open_verified checks the sidecar itself; this only reports whether there was one.
    sidecar_checked = path.is_file() and is_archive_path(path) and archive_sidecar(path).is_file()
    with open_verified(path, expected_digest) as verified:
        common = {
            "bundle": str(path),
            "ok": True,
            "digest": verified.digest,
            "archive": path.is_file(),
            "archive_sha256_checked": bool(sidecar_checked),
            "files": len(verified.spec.files) + 2,
            "onnxruntime": ort.__version__,
        }
        if verified.spec.task == CAUSAL_LM:
            return {**common, **_verify_decoder(verified, provider)}
        return {**common, **_verify_encoder(verified, provider)}


def _check_triton(spec: Manifest) -> dict[str, Any] | None:
    """The Triton repository's entries are there and carry the bundle's model and tokenizer."""
    layout = (spec.layouts or {}).get("triton")
    if layout is None:
        return None
    try:
        root, models = str(layout["repository"]), dict(layout["models"])
        same = {
            f"{root}/{models['onnx']}/1/model.onnx": spec.model.file,
            f"{root}/{models['tokenizer']}/1/tokenizer.json": spec.tokenizer.file,
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(
            f"the manifest's Triton layout is unreadable (no {exc}); re-package the bundle"
        ) from exc
    files = spec.files
    missing = [f"{root}/{m}/config.pbtxt" for m in models.values() if f"{root}/{m}/config.pbtxt" not in files]
    missing += [copy for copy in same if copy not in files]
    if missing:
        raise BundleError(f"the bundle's Triton repository lacks {', '.join(missing)}; re-package the bundle")
    for copy, original in same.items():
        if files[copy].sha256 != files[original].sha256:
            raise BundleError(
                f"the Triton repository's {copy} is not the bundle's {original}; re-package the bundle"
            )
    return {"repository": root, "models": sorted(models.values())}


def _verify_encoder(verified: VerifiedBundle, provider: str | list[str]) -> dict[str, Any]:
    """An encoder bundle: the Predictor (and the ORT-format copy's) replays the smoke outputs."""
    spec = verified.spec
    triton = _check_triton(spec)  # cheap: before any session is built
    predictor = Predictor(verified, provider=provider)
    ort_predictor = Predictor(verified, model_format="ort") if spec.ort_format else None
    return {
        "triton": triton,
        "task": predictor.task,
        "labels": list(predictor.labels),
        "providers": predictor.providers,
        "smoke": {"texts": len(spec.smoke["texts"]), "max_abs_diff": predictor.smoke_max_abs_diff},
        "ort_format": None
        if ort_predictor is None or spec.ort_format is None
        else {"file": spec.ort_format["file"], "smoke_max_abs_diff": ort_predictor.smoke_max_abs_diff},
    }


def _verify_decoder(verified: VerifiedBundle, provider: str | list[str]) -> dict[str, Any]:
    """A causal-LM bundle: the Generator loads it and replays its greedy smoke tokens."""
    generator = Generator(verified, provider=provider)
    smoke = verified.spec.smoke
    return {
        "task": CAUSAL_LM,
        "labels": [],
        "providers": generator.providers,
        "smoke": {
            "texts": len(smoke["prompts"]),
            "tokens": sum(len(row) for row in smoke["tokens"]),
            "max_abs_diff": generator.smoke_max_abs_diff,
        },
        "generation": generator.default_settings.to_dict(),
        "ort_format": None,
    }
