from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from optimizer_cli.data import input_specs, load_dataset, random_dataset
from optimizer_cli.errors import UserInputError

from .builders import mlp


@pytest.fixture
def model() -> ir.Model:
    return ir.serde.deserialize_model(mlp((8, 16, 4)))


def test_specs_and_random_is_seeded(model: ir.Model) -> None:
    (spec,) = input_specs(model)
    assert spec.name == "x" and spec.shape == ("batch", 8)
    a = random_dataset(model, 3, seed=1, dims={"batch": 5})
    b = random_dataset(model, 3, seed=1, dims={"batch": 5})
    assert a.feeds[0]["x"].shape == (5, 8)
    np.testing.assert_array_equal(a.feeds[2]["x"], b.feeds[2]["x"])


def test_npz_with_sample_axis_and_labels(tmp_path: Path, model: ir.Model) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((6, 2, 8), np.float32), labels=np.arange(12))
    ds = load_dataset(path, model)
    assert len(ds) == 6 and ds.feeds[0]["x"].shape == (2, 8)
    assert ds.labels is not None and list(ds.labels[1]) == [2, 3]


def test_npz_split_into_batches_and_cast(tmp_path: Path, model: ir.Model) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((6, 8), np.float64))
    ds = load_dataset(path, model, batch_size=3)
    assert len(ds) == 2 and ds.feeds[0]["x"].dtype == np.float32 and ds.labels is None


def test_folder_of_npy(tmp_path: Path, model: ir.Model) -> None:
    np.save(tmp_path / "x.npy", np.zeros((4, 8), np.float32))
    np.save(tmp_path / "labels.npy", np.arange(4))
    ds = load_dataset(tmp_path, model)
    assert len(ds) == 4 and ds.labels is not None


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"y": np.zeros((2, 8), np.float32)}, "no array for model input"),
        ({"x": np.zeros((2, 2, 2, 8), np.float32)}, "rank"),
        ({"x": np.array(["a", "b"])}, "model wants"),
        ({"x": np.zeros((4, 8), np.float32), "labels": np.arange(2)}, "labels"),
    ],
)
def test_bad_data_is_reported(tmp_path: Path, model: ir.Model, arrays: dict, message: str) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(UserInputError, match=message):
        load_dataset(path, model)


def test_missing_and_unreadable(tmp_path: Path, model: ir.Model) -> None:
    with pytest.raises(UserInputError, match="not found"):
        load_dataset(tmp_path / "nope.npz", model)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage")
    with pytest.raises(UserInputError, match="cannot read"):
        load_dataset(bad, model)


def test_random_data_says_which_symbolic_dims_defaulted(model: ir.Model) -> None:
    assert any("batch" in n for n in random_dataset(model, 1, seed=0).notes)
    assert not random_dataset(model, 1, seed=0, dims={"batch": 4}).notes


def test_random_token_ids_stay_inside_the_embedding_table() -> None:
    from .builders import tiny_encoder

    model = ir.serde.deserialize_model(tiny_encoder(vocab=7))
    ids = next(s for s in input_specs(model) if s.index_limit is not None)
    assert ids.index_limit == 7
    feeds = random_dataset(model, 4, seed=0, dims={"batch": 2, "sequence": 64}).feeds
    assert max(int(f[ids.name].max()) for f in feeds) < 7, "ids past the vocabulary make Gather fail"
