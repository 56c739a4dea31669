"""File-system helpers: atomic output folders and content hashes.

The sha256 helpers here are the one place files and bytes are hashed, for artifacts, bundles (the
runtime verifies with them), archives, pruning records and the QAT weight digest.

An artifact folder is built under a temporary sibling name and renamed into place only when
complete, so a crash, a full disk or Ctrl-C never leaves a folder that a later step could mistake
for a finished one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from trimformer.errors import UserError

__all__ = ["atomic_output_dir", "check_output_dir", "hash_files", "sha256_bytes", "sha256_file"]

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_files(paths: list[Path], root: Path) -> str:
    """One hash over several files, keyed by their paths relative to ``root`` (order-independent)."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.relative_to(root).as_posix()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(sha256_file(path).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing output folder unless the user asked to replace it."""
    if out.exists() and not overwrite:
        raise UserError(
            f"output folder {out} already exists; pass --overwrite to replace it or choose another --out"
        )
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a folder; remove it or choose another --out")


def _new_folder(parent: Path, prefix: str) -> Path:
    """A new, uniquely named folder with the permissions the user's umask gives (``mkdtemp``'s are
    private, and an output folder such as a bundle or a Triton repository is meant to be read by a
    service that may run as another user)."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(6)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free temporary name under {parent}")


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success it replaces ``out`` in one rename.

    On any exception the temporary folder is removed and ``out`` is left as it was.
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_folder(parent, f".{out.name}.tmp-")
    except OSError as exc:
        raise UserError(f"cannot create output folder under {parent}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise UserError(f"no space left on the device while writing {out}; free space and rerun") from exc
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise UserError(f"cannot write {out}: {exc.strerror}") from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
