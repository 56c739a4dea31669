"""Entry point of one torchrun process started by ``trimformer distill --nproc-per-node N``.

``python -m trimformer.training.distill.worker FOLDER``: reads ``FOLDER/config.json``, runs its rank
of the distillation, and leaves rank 0's result in ``FOLDER/result.json`` or the first rank's
one-line error in ``FOLDER/error.txt`` for the launching process to report.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

__all__ = ["main"]


def _write_once(path: Path, text: str) -> None:
    try:
        with open(path, "x", encoding="utf-8") as handle:
            handle.write(text)
    except FileExistsError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    folder = Path(args[0])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from trimformer.errors import TrimformerError
    from trimformer.progress import set_progress_enabled
    from trimformer.training.distill.api import DistillConfig, run_distillation
    from trimformer.training.distill.ddp import ERROR_FILE, RESULT_FILE

    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        set_progress_enabled(False)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    config = DistillConfig(**json.loads((folder / "config.json").read_text(encoding="utf-8")))
    try:
        result = run_distillation(config)
    except TrimformerError as exc:
        _write_once(folder / ERROR_FILE, f"{exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    if rank == 0:
        tmp = folder / (RESULT_FILE + ".tmp")
        tmp.write_text(json.dumps(result.to_dict(), default=str), encoding="utf-8")
        os.replace(tmp, folder / RESULT_FILE)
    return 0


def _exit(code: int) -> None:
    """Leave without C++ static destructors: everything is written and the process group is
    destroyed by now, and gloo's threads torn down at interpreter exit have aborted a rank
    ("terminate called without an active exception", SIGABRT) after a finished run."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
