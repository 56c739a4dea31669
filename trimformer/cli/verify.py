"""``trimformer verify``: recheck a bundle's hashes and run its smoke inference."""

from __future__ import annotations

import click

from trimformer.cli.main import State, emit, pass_state
from trimformer.cli.options import input_argument


@click.command("verify")
@input_argument("bundle", "--bundle", help="Bundle folder or .tar.gz to verify.")
@click.option(
    "--provider", default="cpu", show_default=True, help="Execution provider for the smoke inference."
)
@click.option(
    "--expect", "expected_digest", default=None, help="Refuse unless the bundle digest is this sha256."
)
@pass_state
def verify_command(state: State, bundle: str, provider: str, expected_digest: str | None) -> None:
    """Verify BUNDLE (a folder or .tar.gz): every file's sha256, no extra or missing file, smoke run.

    Exits 0 when the bundle is intact, 2 with one line naming the problem otherwise.

    \b
    Example:
      trimformer verify dist/sentiment.tar.gz --expect sha256:3f2a...
    """
    from trimformer.runtime import verify_bundle

    result = verify_bundle(bundle, provider=provider, expected_digest=expected_digest)
    ort_note = ", ORT-format copy too" if result["ort_format"] else ""
    emit(
        state,
        result,
        f"ok: {bundle} ({result['task']}, {result['files']} files) matches its manifest; smoke inference "
        f"within tolerance (max diff {result['smoke']['max_abs_diff']:.2e}{ort_note})\ndigest {result['digest']}",
    )
