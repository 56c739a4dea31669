"""Bundle archives: writing them byte-reproducibly, and unpacking them without trusting them.

Writing: members sorted by name, every one a plain file with mtime 0, mode 0644, uid/gid 0 and
empty owner names, in a gzip stream whose header carries no file name and mtime 0. The same files
therefore always give the same bytes, whatever the folder, clock or user that packaged them.

Reading refuses, before a single byte is written, any member that is not a plain file or folder
(symlinks, hard links, devices, fifos), has an absolute name, a ``..`` part, a backslash or a
duplicate name, or would not fit on the disk. Files are then created by this module itself
(``O_EXCL | O_NOFOLLOW``), never by ``tarfile.extract``.

After the files pass the manifest check, the archive itself must be in the canonical form above
(gzip header and the whole uncompressed tar stream are compared with a re-creation), so a change
to tar headers or padding that the files would not show is refused too. A ``<archive>.sha256``
file next to it, when present, pins the compressed bytes as well.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from trimformer.fsutil import sha256_file
from trimformer.runtime.bundle import MANIFEST, BundleError, check_relative_name

__all__ = [
    "ARCHIVE_SUFFIXES",
    "GZIP_HEADER",
    "Unpacked",
    "archive_sidecar",
    "canonical_archive_problem",
    "check_archive_sidecar",
    "extracted_bundle",
    "is_archive_path",
    "safe_extract",
    "tar_stream_sha256",
    "unpack",
    "write_canonical_tar",
    "write_tar_gz",
]

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
# ID1 ID2, deflate, no flags, mtime 0, XFL 0 (level 6), OS 255 (unknown): what write_tar_gz writes.
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
_COMPRESS_LEVEL = 6
_CHUNK = 1 << 20
_MAX_MEMBERS = 1000
_SIDECAR_RE = re.compile(r"\A([0-9a-f]{64})  (\S[^\n]*)\n\Z")


def is_archive_path(path: Path) -> bool:
    return path.name.endswith(ARCHIVE_SUFFIXES)


# -- writing ------------------------------------------------------------------------------------
def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def write_canonical_tar(files: Iterable[tuple[str, Path]], fileobj: IO[bytes]) -> None:
    """Write an uncompressed tar of ``(member name, source path)`` in canonical form."""
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in sorted(files):
            check_relative_name(name, "archive member")
            with open(path, "rb") as handle:
                tar.addfile(_tarinfo(name, os.fstat(handle.fileno()).st_size), handle)


def write_tar_gz(files: Iterable[tuple[str, Path]], dest: Path) -> None:
    """Write a byte-reproducible ``.tar.gz`` (see the module docstring)."""
    with (
        open(dest, "wb") as raw,
        # filename="" keeps the archive's own name out of the gzip header; mtime=0 the clock.
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=_COMPRESS_LEVEL) as gz,
    ):
        write_canonical_tar(files, gz)  # type: ignore[arg-type]


class _HashSink(io.RawIOBase):
    """A write-only stream that only hashes (to compare a tar with its re-creation cheaply)."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.digest.update(data)
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position


def tar_stream_sha256(files: Iterable[tuple[str, Path]]) -> str:
    sink = _HashSink()
    write_canonical_tar(files, sink)  # type: ignore[arg-type]
    return sink.digest.hexdigest()


def archive_sidecar(archive: Path) -> Path:
    return archive.with_name(archive.name + ".sha256")


def check_archive_sidecar(archive: Path) -> bool:
    """Check ``<archive>.sha256`` when it exists; return whether it was checked."""
    sidecar = archive_sidecar(archive)
    if not sidecar.is_file():
        return False
    match = _SIDECAR_RE.match(sidecar.read_text(encoding="utf-8", errors="replace")[:1024])
    if match is None or match.group(2).lstrip("*") != archive.name:
        raise BundleError(f"{sidecar} is malformed (expected '<sha256>  {archive.name}'); re-download it")
    if sha256_file(archive) != match.group(1):
        raise BundleError(
            f"archive {archive} was changed: it does not match {sidecar.name}; re-download or re-package it"
        )
    return True


# -- reading ------------------------------------------------------------------------------------
def _member_name(member: tarfile.TarInfo, archive: Path) -> str | None:
    """The member's canonical relative name, or None for the archive root ("." or "./")."""
    name = member.name
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/") if member.isdir() else name
    if name in ("", "."):
        return None
    what = f"archive {archive} member"
    if name.startswith("/") or re.match(r"\A[A-Za-z]:", name):
        raise BundleError(f"refusing {what} {member.name!r}: absolute path; nothing was extracted")
    if ".." in name.replace("\\", "/").split("/"):
        raise BundleError(
            f"refusing {what} {member.name!r}: it would land outside the target folder ('..'); nothing was extracted"
        )
    try:
        return check_relative_name(name, what)
    except BundleError as exc:
        raise BundleError(f"{exc}; nothing was extracted") from None


def _check_members(
    archive: Path, members: list[tarfile.TarInfo], dest: Path
) -> list[tuple[str, tarfile.TarInfo]]:
    plan: list[tuple[str, tarfile.TarInfo]] = []
    seen: set[str] = set()
    total = 0
    for member in members:
        name = _member_name(member, archive)
        if member.issym() or member.islnk():
            raise BundleError(
                f"refusing archive {archive} member {member.name!r}: it is a "
                f"{'symlink' if member.issym() else 'hard link'} (to {member.linkname!r}); bundles hold plain "
                "files only; nothing was extracted"
            )
        if not (member.isreg() or member.isdir()):
            raise BundleError(
                f"refusing archive {archive} member {member.name!r}: not a plain file or folder "
                "(device, fifo or special member); nothing was extracted"
            )
        if name is None:
            continue
        if name in seen:
            raise BundleError(
                f"refusing archive {archive}: member {name!r} appears twice; nothing was extracted"
            )
        seen.add(name)
        total += member.size if member.isreg() else 0
        plan.append((name, member))
    names = {name for name, m in plan if m.isreg()}
    for name in names:
        # A file may not also be used as a folder ("a" and "a/b"): that would be ambiguous.
        for parent in Path(name).parents:
            if parent.as_posix() in names:
                raise BundleError(f"refusing archive {archive}: {parent} is both a file and a folder")
    free = shutil.disk_usage(dest).free
    if total > free:
        raise BundleError(
            f"archive {archive} would unpack to {total / 1e6:.0f} MB but only {free / 1e6:.0f} MB are free; "
            "nothing was extracted"
        )
    return plan


def _read_gzip_header(archive: Path) -> bytes:
    with open(archive, "rb") as handle:
        return handle.read(len(GZIP_HEADER))


@dataclass(frozen=True)
class Unpacked:
    folder: Path
    # sha256 of the uncompressed tar stream, to compare with the canonical re-creation.
    tar_sha256: str
    gzip_header: bytes


def _inflate(archive: Path, target: Path) -> str:
    """Decompress once into a plain tar file (tar reads it with cheap seeks), hashing the stream.

    Stops before the disk is full, so a decompression bomb fails here and not in the extraction.
    """
    digest = hashlib.sha256()
    budget = shutil.disk_usage(target.parent).free
    written = 0
    try:
        with gzip.open(archive, "rb") as stream, open(target, "wb") as out:
            for chunk in iter(lambda: stream.read(_CHUNK), b""):
                written += len(chunk)
                if written > budget:
                    raise BundleError(
                        f"archive {archive} unpacks to more than the {budget / 1e6:.0f} MB free here; "
                        "nothing was extracted"
                    )
                digest.update(chunk)
                out.write(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        raise BundleError(
            f"{archive} is not a readable bundle archive (corrupt or truncated: {exc})"
        ) from exc
    return digest.hexdigest()


def unpack(archive: str | Path, dest: str | Path) -> Unpacked:
    """Unpack a bundle archive into the empty folder ``dest`` (see the module docstring)."""
    archive = Path(archive)
    dest = Path(dest)
    if not archive.is_file():
        raise BundleError(f"bundle archive {archive} does not exist")
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise BundleError(f"cannot unpack {archive} into {dest}: the folder is not empty")
    with tempfile.TemporaryDirectory(prefix=".inflate-", dir=dest.parent) as scratch:
        plain = Path(scratch) / "bundle.tar"
        tar_sha256 = _inflate(archive, plain)
        try:
            with tarfile.open(plain, mode="r:") as tar:
                members: list[tarfile.TarInfo] = []
                for member in tar:
                    members.append(member)
                    if len(members) > _MAX_MEMBERS:
                        raise BundleError(
                            f"refusing archive {archive}: more than {_MAX_MEMBERS} members, a bundle has a "
                            "handful; nothing was extracted"
                        )
                plan = _check_members(archive, members, dest)
                for name, member in plan:
                    _write_member(tar, archive, dest, name, member)
        except tarfile.TarError as exc:
            raise BundleError(
                f"{archive} is not a readable bundle archive (corrupt or truncated: {exc})"
            ) from exc
    if not (dest / MANIFEST).is_file():
        raise BundleError(
            f"{archive} holds no trimformer bundle ({MANIFEST} not found); re-package the model"
        )
    return Unpacked(folder=dest, tar_sha256=tar_sha256, gzip_header=_read_gzip_header(archive))


def _write_member(
    tar: tarfile.TarFile, archive: Path, dest: Path, name: str, member: tarfile.TarInfo
) -> None:
    target = dest / name
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    source = tar.extractfile(member)
    if source is None:  # pragma: no cover - isreg() members always have data
        raise BundleError(f"archive {archive} member {name!r} has no data")
    # Created here, never through tarfile.extract: no link is followed, nothing is overwritten.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with source, os.fdopen(os.open(target, flags, 0o644), "wb") as out:
        shutil.copyfileobj(source, out, _CHUNK)


def safe_extract(archive: str | Path, dest: str | Path) -> Path:
    """Unpack a bundle archive into the empty folder ``dest``; return that folder."""
    return unpack(archive, dest).folder


def canonical_archive_problem(unpacked: Unpacked, names: Iterable[str]) -> str | None:
    """Why the archive is not the canonical archive of ``names`` in its folder (None when it is)."""
    if unpacked.gzip_header != GZIP_HEADER:
        return "its gzip header is not the one trimformer writes"
    if unpacked.tar_sha256 != tar_stream_sha256((name, unpacked.folder / name) for name in names):
        return "its tar headers or padding differ from the canonical form"
    return None


@contextlib.contextmanager
def extracted_bundle(archive: Path) -> Iterator[Unpacked]:
    """Unpack into a private temporary folder that is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="trimformer-bundle-") as tmp:
        yield unpack(archive, Path(tmp) / "bundle")
