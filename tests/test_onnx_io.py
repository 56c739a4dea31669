from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from trimformer.errors import UserError
from trimformer.onnx_io import load_onnx


def _model_with_external(folder: Path, location: str) -> Path:
    weight = numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "W")
    weight.data_location = onnx.TensorProto.EXTERNAL
    weight.ClearField("raw_data")
    entry = weight.external_data.add()
    entry.key, entry.value = "location", location
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    path = folder / "model.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    return path


@pytest.mark.parametrize("location", ["/etc/passwd", "../secret.bin", "sub/../../secret.bin"])
def test_external_data_outside_folder_is_refused(tmp_path: Path, location: str) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\0" * 64)
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    path = _model_with_external(model_dir, location)
    with pytest.raises(UserError, match="refusing model"):
        load_onnx(path)


def test_external_data_symlink_out_of_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\0" * 64)
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    os.symlink(tmp_path / "secret.bin", model_dir / "w.bin")
    path = _model_with_external(model_dir, "w.bin")
    with pytest.raises(UserError, match="symlink"):
        load_onnx(path)


def test_external_data_inside_folder_loads(tmp_path: Path) -> None:
    (tmp_path / "w.bin").write_bytes(np.ones((4, 4), dtype=np.float32).tobytes())
    model = load_onnx(_model_with_external(tmp_path, "w.bin"))
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[0]), np.ones((4, 4)))


def test_truncated_model_is_a_user_error(tiny_bert_onnx: Path, tmp_path: Path) -> None:
    data = (tiny_bert_onnx / "model.onnx").read_bytes()
    bad = tmp_path / "model.onnx"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match=r"corrupt or truncated|not a readable ONNX"):
        load_onnx(bad)
