from __future__ import annotations

import pytest

from trimformer.artifact import ArtifactMeta
from trimformer.errors import UserError
from trimformer.formats.tasks import CAUSAL_LM, ENCODER_TASKS, TASK_NAMES, task_spec
from trimformer.runtime.predictor import TASKS as PREDICTOR_TASKS


def test_registry_names_the_runtime_of_each_task() -> None:
    assert TASK_NAMES == ("sequence-classification", "feature-extraction", "causal-lm")
    assert ENCODER_TASKS == ("sequence-classification", "feature-extraction")
    assert task_spec(CAUSAL_LM).runtime == "Generator"
    assert PREDICTOR_TASKS == ENCODER_TASKS
    assert task_spec(CAUSAL_LM).inputs == ("input_ids", "attention_mask", "position_ids")


def test_unknown_task_names_the_known_ones() -> None:
    with pytest.raises(UserError, match="unknown task 'translation'; known tasks: sequence-classification"):
        task_spec("translation")


def test_artifact_meta_accepts_registered_tasks_only() -> None:
    base = {"architecture": "llama", "inputs": [], "outputs": [], "tokenizer": {}, "opset": 17}
    assert ArtifactMeta.model_validate({**base, "task": "causal-lm"}).task == "causal-lm"
    with pytest.raises(ValueError, match="unknown task 'ner'"):
        ArtifactMeta.model_validate({**base, "task": "ner"})
