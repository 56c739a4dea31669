"""A bundle folder on disk: its manifest, and the check that every byte is what the manifest says.

Layout (every name at the top level, so that Hugging Face Optimum's ``from_pretrained`` finds them)::

    model.onnx           the graph (plus model.onnx.data for models over 2 GB)
    config.json          Hugging Face configuration with id2label / label2id
    tokenizer.json       a `tokenizers` file (plus whatever tokenizer files the artifact carried)
    trimformer.json      the artifact's metadata (task, io spec, lineage)
    model.ort            optional: the same model in onnxruntime's ORT format, for minimal builds
    manifest.json        sha256 and size of every file above, io spec, metrics, recipe, lineage
    manifest.sha256      ``<sha256 of manifest.json>  manifest.json`` (the format of ``sha256sum``)

The manifest cannot hash itself, so ``manifest.sha256`` pins it; the pair covers every byte of the
folder. A changed, missing or extra file, a symlink or anything that is not a plain file makes the
check refuse the bundle. This is integrity, not authenticity: whoever can rewrite the whole folder
can rewrite the hashes too, so a service that must trust its source pins the bundle's digest (the
sha256 of manifest.json, printed by ``trimformer verify``) and passes it as ``expected_digest``.

This module imports only the standard library: the runtime must stay free of torch and pydantic.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from trimformer.errors import UserError
from trimformer.fsutil import sha256_bytes, sha256_file
from trimformer.runtime.manifest import Manifest, ManifestError

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_VERSION",
    "MANIFEST",
    "MANIFEST_DIGEST",
    "BundleError",
    "VerifiedBundle",
    "check_bundle_folder",
    "check_relative_name",
    "digest_line",
    "read_verified",
]

BUNDLE_FORMAT = "trimformer-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest.sha256"
# A manifest lists a few files; anything this big is not one of ours.
_MAX_MANIFEST_BYTES = 32 << 20
_DIGEST_RE = re.compile(r"\A([0-9a-f]{64})  manifest\.json\n\Z")


class BundleError(UserError):
    """A bundle is incomplete, was changed after packaging, or is unsafe to open."""


@dataclass(frozen=True)
class VerifiedBundle:
    """A folder whose every file matched its manifest when it was checked."""

    folder: Path
    manifest: dict[str, Any]
    # sha256 of manifest.json: one value that identifies every byte of the bundle.
    digest: str
    # The archive it was unpacked from, if any (for messages: the folder is a temporary one).
    source: Path | None = None
    # The manifest as types (checked when the bundle is: a malformed one never verifies).
    spec: Manifest = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            spec = Manifest.from_dict(self.manifest, MANIFEST)
        except ManifestError as exc:
            raise BundleError(f"bundle {self.name} has a malformed manifest: {exc}; re-package it") from None
        object.__setattr__(self, "spec", spec)

    @property
    def name(self) -> Path:
        return self.source or self.folder

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return dict(self.manifest["files"])


def digest_line(manifest_bytes: bytes) -> str:
    """The content of manifest.sha256 for these manifest bytes."""
    return f"{sha256_bytes(manifest_bytes)}  {MANIFEST}\n"


def check_relative_name(name: str, what: str) -> str:
    """Refuse names that are absolute, climb out with ``..``, or are not plain POSIX paths."""
    if not name or "\\" in name or "\0" in name:
        raise BundleError(f"{what} has an unsafe file name {name!r}; re-package the model")
    pure = PurePosixPath(name)
    if pure.is_absolute() or re.match(r"\A[A-Za-z]:", name):
        raise BundleError(f"{what} names an absolute path {name!r}; bundles hold relative names only")
    if any(part in ("..", "") for part in name.split("/")) or ".." in pure.parts:
        raise BundleError(f"{what} names {name!r}, which points outside the bundle ('..' is not allowed)")
    if pure.as_posix() != name or name.startswith("./"):
        raise BundleError(f"{what} has a non-canonical file name {name!r}; re-package the model")
    return name


def _scan(folder: Path) -> tuple[set[str], set[str]]:
    """Every plain file and folder under ``folder`` by relative POSIX name; refuse anything else."""
    files: set[str] = set()
    dirs: set[str] = set()
    pending = [folder]
    while pending:
        current = pending.pop()
        with os.scandir(current) as entries:
            for entry in entries:
                rel = Path(entry.path).relative_to(folder).as_posix()
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISLNK(mode):
                    raise BundleError(
                        f"bundle {folder} contains a symlink {rel!r}; bundles hold plain files only, re-package it"
                    )
                if stat.S_ISDIR(mode):
                    dirs.add(rel)
                    pending.append(Path(entry.path))
                elif stat.S_ISREG(mode):
                    files.add(rel)
                else:
                    raise BundleError(
                        f"bundle {folder} contains {rel!r}, which is not a plain file; re-package it"
                    )
    return files, dirs


def _load_manifest(folder: Path) -> tuple[dict[str, Any], str]:
    digest_file = folder / MANIFEST_DIGEST
    manifest_file = folder / MANIFEST
    if not manifest_file.is_file() and not digest_file.is_file():
        raise BundleError(
            f"{folder} is not a trimformer bundle (no {MANIFEST}); create one with `trimformer package`"
        )
    for needed in (manifest_file, digest_file):
        if needed.is_symlink() or not needed.is_file():
            raise BundleError(
                f"bundle {folder} is incomplete: {needed.name} is missing; re-package the model"
            )
    if digest_file.stat().st_size > 1024 or manifest_file.stat().st_size > _MAX_MANIFEST_BYTES:
        raise BundleError(f"bundle {folder} has an oversized {MANIFEST_DIGEST} or {MANIFEST}; re-package it")
    manifest_bytes = manifest_file.read_bytes()
    match = _DIGEST_RE.match(digest_file.read_bytes().decode("ascii", errors="replace"))
    if match is None:
        raise BundleError(
            f"bundle {folder} was changed: {MANIFEST_DIGEST} is malformed "
            f"(expected '<sha256>  {MANIFEST}'); re-download or re-package it"
        )
    actual = sha256_bytes(manifest_bytes)
    if actual != match.group(1):
        raise BundleError(
            f"bundle {folder} was changed: {MANIFEST} does not match {MANIFEST_DIGEST} "
            f"(expected {match.group(1)[:12]}…, got {actual[:12]}…); re-download or re-package it"
        )
    try:
        manifest = json.loads(manifest_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"bundle {folder} has an unreadable {MANIFEST} ({exc}); re-package it") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{folder / MANIFEST} is not a trimformer bundle manifest; re-package the model")
    version = manifest.get("format_version")
    if version != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"bundle {folder} has format version {version!r}; this trimformer reads version "
            f"{BUNDLE_FORMAT_VERSION}; upgrade trimformer or re-package the model"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{folder / MANIFEST} lists no files; re-package the model")
    for name, entry in files.items():
        check_relative_name(name, f"{folder / MANIFEST}")
        if name in (MANIFEST, MANIFEST_DIGEST):
            raise BundleError(f"{folder / MANIFEST} lists itself; re-package the model")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not isinstance(entry.get("size"), int)
        ):
            raise BundleError(f"{folder / MANIFEST} has a malformed entry for {name!r}; re-package the model")
    return manifest, "sha256:" + actual


def check_expected_digest(name: Path, digest: str, expected_digest: str | None) -> None:
    """Refuse a bundle whose digest is not the one pinned (``sha256:...`` or the bare hex)."""
    if expected_digest is None:
        return
    want = expected_digest if expected_digest.startswith("sha256:") else "sha256:" + expected_digest
    if want.lower() != digest:
        raise BundleError(
            f"bundle {name} is not the expected one: its digest is {digest}, expected {want}; "
            "deploy the bundle you pinned"
        )


def check_bundle_folder(folder: str | Path, expected_digest: str | None = None) -> VerifiedBundle:
    """Check every file of a bundle folder against its manifest; raise BundleError on any difference."""
    folder = Path(folder)
    if not folder.exists():
        raise BundleError(f"bundle {folder} does not exist")
    if not folder.is_dir():
        raise BundleError(f"{folder} is not a bundle folder or a .tar.gz bundle")
    manifest, digest = _load_manifest(folder)
    check_expected_digest(folder, digest, expected_digest)
    listed: dict[str, dict[str, Any]] = manifest["files"]
    present, dirs = _scan(folder)
    expected = set(listed) | {MANIFEST, MANIFEST_DIGEST}
    missing = sorted(expected - present)
    if missing:
        raise BundleError(
            f"bundle {folder} is incomplete: {', '.join(missing)} missing; re-download or re-package it"
        )
    extra = sorted(present - expected)
    if extra:
        raise BundleError(
            f"bundle {folder} was changed: unexpected file(s) {', '.join(extra)} not in {MANIFEST}; "
            "remove them or re-package"
        )
    needed_dirs = {
        p.as_posix() for name in listed for p in PurePosixPath(name).parents if p.as_posix() != "."
    }
    extra_dirs = sorted(dirs - needed_dirs)
    if extra_dirs:
        raise BundleError(
            f"bundle {folder} was changed: unexpected folder(s) {', '.join(extra_dirs)}; remove them or re-package"
        )
    for name in sorted(listed):
        _check_file(folder, name, listed[name])
    return VerifiedBundle(folder=folder, manifest=manifest, digest=digest)


def _check_file(folder: Path, name: str, entry: dict[str, Any]) -> None:
    path = folder / name
    size = path.stat().st_size
    if size != entry["size"]:
        raise BundleError(
            f"bundle {folder} was changed: {name} has {size} bytes, the manifest says {entry['size']}; "
            "re-download or re-package it"
        )
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise BundleError(
            f"bundle {folder} was changed: {name} does not match its sha256 in {MANIFEST} "
            f"(expected {str(entry['sha256'])[:12]}…, got {actual[:12]}…); re-download or re-package it"
        )


def read_verified(bundle: VerifiedBundle, name: str) -> bytes:
    """Read a file and check its hash again on the bytes actually returned.

    Callers build sessions and tokenizers from these bytes, never from the path, so a file swapped
    after the folder check cannot slip in (time of check = time of use).
    """
    entry = bundle.files.get(name)
    if entry is None:
        raise BundleError(f"bundle {bundle.folder} has no {name} in its manifest; re-package the model")
    data = (bundle.folder / name).read_bytes()
    if len(data) != entry["size"] or sha256_bytes(data) != entry["sha256"]:
        raise BundleError(
            f"bundle {bundle.folder} was changed while loading: {name} no longer matches {MANIFEST}"
        )
    return data
