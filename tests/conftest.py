from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.builders import make_csv, make_hf_model, make_plain_model


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_model(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_plain_model(tmp_path_factory.mktemp("tiny_plain"))


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_csv(tmp_path_factory.mktemp("data") / "tiny.csv")


@pytest.fixture(scope="session")
def tiny_bert_onnx(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trimformer.exporters import export_model

    out = tmp_path_factory.mktemp("exported") / "bert"
    export_model(tiny_bert, out)
    return out


@pytest.fixture(scope="session")
def tiny_plain_onnx(tiny_plain: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trimformer.exporters import export_model

    out = tmp_path_factory.mktemp("exported") / "plain"
    export_model(tiny_plain, out)
    return out
