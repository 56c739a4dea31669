"""The ORT-format copy of a bundle's model, made by onnxruntime's own converter.

``onnxruntime.tools.convert_onnx_models_to_ort`` (optimization style "Fixed", level "all", without
the hardware-specific NCHWc layout) writes ``model.ort`` and ``model.required_operators.config``,
the operator list a minimal onnxruntime build is configured from (``--include_ops_by_config``).
The converter names the absolute path of the model in a comment of that file; the copy in the
bundle names only ``model.ort``.

onnxruntime's ORT-format writer is not deterministic on its own: it serializes a hash map (the
kernel type-string resolver) whose order is seeded by an address, so two conversions of the same
model mostly differ in byte layout (measured: 18 conversions at levels disable, basic and extended gave
16 distinct files).
The conversion therefore runs in a child interpreter with address-space randomization switched
off for it alone (``personality(ADDR_NO_RANDOMIZE)``, Linux), a minimal fixed environment and
relative paths inside a scratch folder; then the same model gives the same bytes. Where the
kernel refuses that (some locked-down containers) the copy is still made and checked, the
manifest says ``"reproducible": false``, and only model.ort (and so the manifest and archive)
differ between runs.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from trimformer.errors import UserError

__all__ = ["ORT_CONFIG_FILE", "ORT_FILE", "convert_to_ort"]

logger = logging.getLogger(__name__)

ORT_FILE = "model.ort"
ORT_CONFIG_FILE = "model.required_operators.config"
_ADDR_NO_RANDOMIZE = 0x0040000

# Runs in a fresh interpreter, in a scratch folder, with relative paths: the converter's own
# steps (the body of convert_onnx_models_to_ort for one file) without its path resolution.
_CHILD = """
import contextlib, io, pathlib
from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, _convert
from onnxruntime.tools.ort_format_model import create_config_from_models
with contextlib.redirect_stdout(io.StringIO()):
    models = _convert(
        model_path_or_dir=pathlib.Path("src/model.onnx"),
        output_dir=pathlib.Path("out"),
        optimization_level_str="all",
        optimization_style=OptimizationStyle.Fixed,
        custom_op_library=None,
        create_optimized_onnx_model=False,
        allow_conversion_failures=False,
        target_platform=None,
        session_options_config_entries={"session.qdqisint8allowed": "0"},
    )
    create_config_from_models(models, pathlib.Path("out/model.required_operators.config"), False)
"""


def _portable_config(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if line.startswith("# - "):
            line = f"# - {ORT_FILE}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _no_aslr() -> None:  # pragma: no cover - runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.personality(_ADDR_NO_RANDOMIZE) == -1:
        raise OSError(ctypes.get_errno(), "personality(ADDR_NO_RANDOMIZE) refused")


def _run_converter(scratch: Path, pinned: bool) -> subprocess.CompletedProcess[str]:
    env = {"ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL": "all", "PYTHONNOUSERSITE": "1"}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return subprocess.run(
        [sys.executable, "-c", _CHILD],
        cwd=scratch,
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=_no_aslr if pinned else None,
        timeout=3600,
        check=False,
    )


def convert_to_ort(model_path: Path, dest: Path) -> tuple[Path, Path, bool]:
    """Convert ``model_path`` (an ONNX file) into ``dest/model.ort`` and its operator config.

    Returns the two paths and whether the conversion ran pinned (see the module docstring).
    """
    with tempfile.TemporaryDirectory(prefix="trimformer-ort-") as tmp:
        scratch = Path(tmp)
        (scratch / "src").mkdir()
        (scratch / "out").mkdir()
        shutil.copyfile(model_path, scratch / "src" / "model.onnx")
        pinned = sys.platform.startswith("linux")
        try:
            result = _run_converter(scratch, pinned)
        except (subprocess.SubprocessError, OSError) as exc:
            if not pinned:
                raise UserError(
                    f"onnxruntime's ORT-format converter did not run ({exc}); package without --ort"
                ) from exc
            # personality() refused (a locked-down container): convert unpinned, not reproducible.
            logger.warning(
                "cannot disable address randomization here (%s); model.ort will not be reproducible", exc
            )
            pinned = False
            result = _run_converter(scratch, pinned)
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            last = lines[-1][:300] if lines else f"exit code {result.returncode}"
            raise UserError(f"onnxruntime's ORT-format converter failed ({last}); package without --ort")
        converted = scratch / "out" / ORT_FILE
        config = scratch / "out" / ORT_CONFIG_FILE
        if not converted.is_file() or not config.is_file():
            raise UserError(f"onnxruntime's ORT-format converter wrote no {ORT_FILE}; package without --ort")
        shutil.copyfile(converted, dest / ORT_FILE)
        (dest / ORT_CONFIG_FILE).write_text(
            _portable_config(config.read_text(encoding="utf-8")), encoding="utf-8"
        )
    return dest / ORT_FILE, dest / ORT_CONFIG_FILE, pinned
