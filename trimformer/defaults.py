"""Each stage's data defaults, as plain numbers: the one home for them.

The typed stage parameters (:mod:`trimformer.pipeline.stages.params`), the quantize pass's config
and the CLI options all take their defaults from here; this module imports nothing, so the CLI
can show them in ``--help`` without loading onnx. docs/RECIPES.md ("Defaults") lists them.
"""

from __future__ import annotations

# Pruning: 1024 rows in batches of 64, the measured default of docs/PRUNING.md (Fisher scores,
# ridge refit and block reconstruction all gain up to about 1024 tweets).
PRUNE_SAMPLES = 1024
PRUNE_BATCH_SIZE = 64
# Quantization: 512 calibration rows (docs/QUANTIZATION.md: MinMax ranges settle by then).
QUANTIZE_SAMPLES = 512
# Any other pass that calibrates (`trimformer optimize`, a recipe pass that is not prune/quantize).
PASS_SAMPLES = 256
CALIBRATION_BATCH_SIZE = 16
# None: each calibration batch at its longest row (the calibrators take any shape, and padding
# every tweet to 128 tokens is slower); a number pads to it, capped at max_length.
CALIBRATION_PAD_TO: int | None = None
# Rows an accuracy-aware pass scores its candidates on.
EVAL_LIMIT = 1000
