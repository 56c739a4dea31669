"""The ``prune`` pass: structured removal of attention heads and feed-forward neurons."""

from __future__ import annotations

from trimformer.passes.prune.structured import *  # noqa: F403
from trimformer.passes.prune.structured import __all__ as __all__
