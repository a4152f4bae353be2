from __future__ import annotations

import hashlib
import mmap
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from optimizer_cli.errors import UserInputError
from optimizer_cli.model_io import file_size, load_model, save_model

from .builders import mlp, random_feed, run


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty"), (b"hello, not a model", "not a readable ONNX model"), (None, "not found")],
)
def test_bad_files_raise_one_line_errors(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserInputError) as err:
        load_model(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_truncated_model(tmp_path: Path) -> None:
    good = tmp_path / "good.onnx"
    onnx.save(mlp(), str(good))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserInputError, match="not a readable ONNX model|not an ONNX model"):
        load_model(bad)


def test_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="directory"):
        load_model(tmp_path)


def test_external_data_roundtrip_and_missing_data(tmp_path: Path) -> None:
    model = mlp((64, 256, 10))
    feed = random_feed(model)
    expected = run(model, feed)[0]
    src = tmp_path / "ext.onnx"
    onnx.save(model, str(src), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    loaded = load_model(src)
    out = tmp_path / "copy.onnx"
    save_model(loaded, out, input_path=src, external_data=True)
    assert (tmp_path / "copy.onnx.data").exists()
    np.testing.assert_array_equal(run(onnx.load(str(out)), feed)[0], expected)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(UserInputError, match="external data file 'ext.onnx.data' not found"):
        load_model(src)


def test_truncated_external_data(tmp_path: Path) -> None:
    src = tmp_path / "ext.onnx"
    onnx.save(mlp((64, 256, 10)), str(src), save_as_external_data=True, location="d.bin", size_threshold=0)
    data = tmp_path / "d.bin"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(UserInputError, match="truncated"):
        load_model(src)


def test_save_refuses_to_overwrite_input_and_its_data(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(mlp(), str(src))
    before = _digest(src)
    model = load_model(src)
    with pytest.raises(UserInputError, match="refusing to overwrite"):
        save_model(model, src, input_path=src)
    ext = tmp_path / "e.onnx"
    onnx.save(mlp(), str(ext), save_as_external_data=True, location="shared.data", size_threshold=0)
    with pytest.raises(UserInputError, match="refusing to overwrite"):
        save_model(load_model(ext), tmp_path / "shared", input_path=ext, external_data=True)
    assert _digest(src) == before


def test_save_is_atomic_and_sizes_count_external_data(tmp_path: Path) -> None:
    model = ir.serde.deserialize_model(mlp((64, 256, 10)))
    out = tmp_path / "out.onnx"
    save_model(model, out, external_data=True)
    assert not list(tmp_path.glob(".optimize-*")), "temporary folder left behind"
    assert file_size(out) == out.stat().st_size + (tmp_path / "out.onnx.data").stat().st_size


@pytest.mark.slow
def test_model_over_2gb_loads_mapped_and_saves_with_external_data(tmp_path: Path) -> None:
    """A 2.1 GB model: loads without reading weights into memory, runs through cleanup, saves."""
    import psutil

    from optimizer_cli.data import Dataset
    from optimizer_cli.passes.base import PassContext
    from optimizer_cli.passes.cleanup import CleanupConfig, CleanupPass

    n = 23_000  # 23000^2 float32 = 2.1 GB
    src = tmp_path / "big.onnx"
    data = np.lib.format.open_memmap(tmp_path / "w.npy", mode="w+", dtype=np.float32, shape=(n, n))
    data[:] = 0
    data[0, :8] = 1
    del data
    weights = np.load(tmp_path / "w.npy", mmap_mode="r")
    x = ir.Value(name="x", shape=ir.Shape([1, n]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(
        name="w",
        shape=ir.Shape([n, n]),
        type=ir.TensorType(ir.DataType.FLOAT),
        const_value=ir.tensor(weights, name="w"),
    )
    node = ir.Node("", "MatMul", [x, w], name="mm")
    node.outputs[0].name = "y"
    node.outputs[0].dtype = ir.DataType.FLOAT
    node.outputs[0].shape = ir.Shape([1, n])
    graph = ir.Graph([x], [node.outputs[0]], nodes=[node], initializers=[w], opset_imports={"": 17}, name="big")
    ir.save(ir.Model(graph, ir_version=8), src, external_data="big.onnx.data")
    (tmp_path / "w.npy").unlink()
    del weights

    rss = psutil.Process().memory_info().rss
    model = load_model(src)
    assert psutil.Process().memory_info().rss - rss < 200e6, "load must memory-map, not read, the weights"
    ctx = PassContext(calibration=None, verify_data=Dataset([]), rng=np.random.default_rng(0), tmp_dir=tmp_path)
    CleanupPass(CleanupConfig(fold_constants=False), ctx)(model)
    out = tmp_path / "out.onnx"
    save_model(model, out, input_path=src)
    assert (tmp_path / "out.onnx.data").stat().st_size >= n * n * 4
    assert out.stat().st_size < 10_000_000
    onnx.checker.check_model(str(out))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_has_nan_finds_nan_anywhere_and_is_not_fooled_by_inf(dtype: type) -> None:
    from optimizer_cli.model_io import has_nan

    size = 3 * 1024 + 7  # whole rows of the probe and a tail
    clean = np.random.default_rng(0).standard_normal(size).astype(dtype)
    assert not has_nan(clean)
    for where in (0, 1500, size - 1):  # in the probed rows and in the tail
        bad = clean.copy()
        bad[where] = np.nan
        assert has_nan(bad.reshape(-1, 1) if where else bad)
    # +inf and -inf in one probed row make the probe NaN; the exact check still says no NaN.
    infinite = clean.copy()
    infinite[3], infinite[4] = np.inf, -np.inf
    assert not has_nan(infinite)
    assert not has_nan(np.zeros(0, dtype))


def test_mapped_weights_and_hashes_read_external_data_in_pieces(tmp_path: Path, monkeypatch) -> None:
    import optimizer_cli.model_io as model_io

    model = mlp()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    loaded = ir.load(path)  # load_model reads data this small into memory
    for name, value in loaded.graph.initializers.items():
        tensor = value.const_value
        assert isinstance(tensor, ir.ExternalTensor)
        mapped = model_io.map_weight(tensor)
        assert type(mapped) is np.ndarray and not mapped.flags.writeable
        np.testing.assert_array_equal(mapped, model_io.read_weight(tensor), err_msg=name)
    whole = hashlib.sha256(path.read_bytes() + (tmp_path / "m.data").read_bytes()).hexdigest()
    assert model_io.model_sha256(path) == whole
    monkeypatch.setattr(model_io, "HASH_WINDOW", mmap.ALLOCATIONGRANULARITY)  # several windows of the data file
    assert (tmp_path / "m.data").stat().st_size > 2 * mmap.ALLOCATIONGRANULARITY
    assert model_io.model_sha256(path) == whole
