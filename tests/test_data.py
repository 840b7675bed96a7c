"""Tests for the data registry: splits, CIFAR/imagefolder readers, safe unpickling, augmentation."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ticketctl.data import DATASETS, Dataset, augment_batch, load_dataset
from ticketctl.data.augment import PAD, crop_flip
from ticketctl.data.digits import split_indices
from ticketctl.data.safe_pickle import safe_load, safe_loads
from ticketctl.data.splits import holdout_indices
from ticketctl.errors import TicketctlError

# ---------------------------------------------------------------- helpers


def raw_pixels(ds: Dataset, x: torch.Tensor, scale: float) -> np.ndarray:
    """Un-normalise a split back to integer pixel values."""
    return torch.round(ds.denormalize(x) * scale).to(torch.int64).numpy()


def write_cifar10(root: Path, *, bytes_keys: bool = False, per_batch: int = 20, seed: int = 0):
    """Write a tiny CIFAR-10 in the standard layout; return (train_x, train_y, test_x, test_y)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def key(k: str):
        return k.encode() if bytes_keys else k

    def batch(n: int):
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, size=n).tolist()
        return x, y

    xs, ys = [], []
    for i in range(1, 6):
        x, y = batch(per_batch)
        xs.append(x)
        ys += y
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({key("data"): x, key("labels"): y, key("batch_label"): "b"}, f)
    test_x, test_y = batch(per_batch)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({key("data"): test_x, key("labels"): test_y}, f)
    names = [f"c{i}" for i in range(10)]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({key("label_names"): [n.encode() if bytes_keys else n for n in names]}, f)
    return np.concatenate(xs), np.array(ys), test_x, np.array(test_y)


def write_cifar100(root: Path, n_train: int = 60, n_test: int = 20, seed: int = 1):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train_x = rng.integers(0, 256, size=(n_train, 3072), dtype=np.uint8)
    train_y = rng.integers(0, 100, size=n_train)
    test_x = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    test_y = rng.integers(0, 100, size=n_test)
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": x, "fine_labels": y.tolist(), "coarse_labels": [0] * len(y)}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)]}, f)
    return train_x, train_y, test_x, test_y


def write_pngs(root: Path, split: str, cls: str, n: int, size=(6, 5), seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    folder = root / split / cls
    folder.mkdir(parents=True, exist_ok=True)
    arrays = []
    for i in range(n):
        a = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(a).save(folder / f"{i:03d}.png")
        arrays.append(a)
    return arrays


# ---------------------------------------------------------------- registry


def test_registry_names_and_unknown():
    assert set(DATASETS) == {"digits", "cifar10", "cifar100", "imagefolder", "synthetic"}
    with pytest.raises(TicketctlError, match="known datasets: .*digits.*cifar10"):
        load_dataset("mnist")


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "imagefolder"])
def test_needs_data_dir(name):
    with pytest.raises(TicketctlError, match="--data-dir"):
        load_dataset(name)


# ---------------------------------------------------------------- digits


def test_digits_shapes_and_splits():
    ds = load_dataset("digits")
    assert ds.num_classes == 10 and ds.input_shape == (1, 8, 8) and ds.augment == "none"
    n_train, n_val, n_test = len(ds.train_y), len(ds.val_y), len(ds.test_y)
    assert n_train + n_val + n_test == 1797
    assert n_test == 1797 // 6 and n_val == (1797 - n_test) // 10
    assert ds.train_x.shape == (n_train, 1, 8, 8) and ds.train_x.dtype == torch.float32
    assert ds.train_y.dtype == torch.int64
    assert abs(ds.train_x.mean().item()) < 1e-4
    assert abs(ds.train_x.std(correction=0).item() - 1) < 1e-3
    info = ds.info()
    assert info["train_size"] == n_train and info["val_size"] == n_val
    assert info["data_dir"] is None and info["split_seed"] == 0


def test_digits_split_disjoint_and_matches_indices():
    from sklearn.datasets import load_digits

    idx = split_indices(split_seed=3)
    sets = [set(idx[k].tolist()) for k in ("train", "val", "test")]
    assert sum(len(s) for s in sets) == 1797 and set.union(*sets) == set(range(1797))
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])

    ds = load_dataset("digits", split_seed=3)
    images = load_digits().images
    for split, x in (("train", ds.train_x), ("val", ds.val_x), ("test", ds.test_x)):
        np.testing.assert_array_equal(raw_pixels(ds, x, 16.0)[:, 0], images[idx[split].numpy()])


def test_digits_split_depends_on_split_seed_only():
    a, b = split_indices(0), split_indices(0)
    c = split_indices(1)
    for k in ("train", "val", "test"):
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["test"], c["test"])
    d0, d1 = load_dataset("digits", split_seed=0), load_dataset("digits", split_seed=0)
    assert torch.equal(d0.val_x, d1.val_x) and torch.equal(d0.test_y, d1.test_y)


def test_digits_val_size_and_raw_scale():
    ds = load_dataset("digits", val_size=0, normalize=False)
    assert ds.val_x.shape == (0, 1, 8, 8) and len(ds.val_y) == 0
    assert len(ds.train_y) == 1797 - 1797 // 6
    assert ds.train_x.min() >= 0 and ds.train_x.max() <= 1 and ds.train_x.max() > 0.9
    assert ds.mean == (0.0,) and ds.std == (1.0,)
    with pytest.raises(TicketctlError, match="val_size"):
        load_dataset("digits", val_size=5000)


# ---------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar10_roundtrip(tmp_path, bytes_keys):
    train_x, train_y, test_x, test_y = write_cifar10(tmp_path, bytes_keys=bytes_keys)
    ds = load_dataset("cifar10", tmp_path, val_size=10, split_seed=5)
    assert ds.num_classes == 10 and ds.class_names == [f"c{i}" for i in range(10)]
    assert ds.input_shape == (3, 32, 32) and ds.augment == "crop_flip"
    assert ds.train_x.shape == (90, 3, 32, 32) and ds.val_x.shape == (10, 3, 32, 32)
    assert ds.test_x.shape == (20, 3, 32, 32)
    assert ds.mean == pytest.approx((0.4914, 0.4822, 0.4465))
    kept, held = holdout_indices(100, 10, 5)
    images = train_x.reshape(-1, 3, 32, 32)
    np.testing.assert_array_equal(raw_pixels(ds, ds.train_x, 255.0), images[kept.numpy()])
    np.testing.assert_array_equal(raw_pixels(ds, ds.val_x, 255.0), images[held.numpy()])
    np.testing.assert_array_equal(raw_pixels(ds, ds.test_x, 255.0), test_x.reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(ds.train_y.numpy(), train_y[kept.numpy()])
    np.testing.assert_array_equal(ds.val_y.numpy(), train_y[held.numpy()])
    np.testing.assert_array_equal(ds.test_y.numpy(), test_y)


def test_cifar10_data_dir_either_level_and_unnormalised(tmp_path):
    train_x, *_ = write_cifar10(tmp_path)
    outer = load_dataset("cifar10", tmp_path, val_size=0)
    inner = load_dataset("cifar10", tmp_path / "cifar-10-batches-py", val_size=0)
    assert torch.equal(outer.train_x, inner.train_x)
    raw = load_dataset("cifar10", str(tmp_path), val_size=0, normalize=False)
    expected = torch.from_numpy(train_x.reshape(-1, 3, 32, 32)).float() / 255
    assert torch.equal(raw.train_x, expected) and raw.std == (1.0, 1.0, 1.0)


def test_cifar10_default_val_too_big_for_tiny_files(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(TicketctlError, match="val_size 5000"):
        load_dataset("cifar10", tmp_path)


def test_cifar100(tmp_path):
    train_x, train_y, test_x, test_y = write_cifar100(tmp_path)
    for where in (tmp_path, tmp_path / "cifar-100-python"):
        ds = load_dataset("cifar100", where, val_size=6, split_seed=2)
        assert ds.num_classes == 100 and ds.class_names[7] == "f7"
        assert ds.train_x.shape == (54, 3, 32, 32) and ds.test_x.shape == (20, 3, 32, 32)
        kept, held = holdout_indices(60, 6, 2)
        images = train_x.reshape(-1, 3, 32, 32)
        np.testing.assert_array_equal(raw_pixels(ds, ds.val_x, 255.0), images[held.numpy()])
        test_images = test_x.reshape(-1, 3, 32, 32)
        np.testing.assert_array_equal(raw_pixels(ds, ds.test_x, 255.0), test_images)
        np.testing.assert_array_equal(ds.train_y.numpy(), train_y[kept.numpy()])
        np.testing.assert_array_equal(ds.test_y.numpy(), test_y)


def test_cifar_missing_files(tmp_path):
    with pytest.raises(TicketctlError, match="does not exist"):
        load_dataset("cifar10", tmp_path / "nowhere")
    with pytest.raises(TicketctlError) as err:
        load_dataset("cifar10", tmp_path)
    msg = str(err.value)
    assert "cifar-10-batches-py" in msg and "data_batch_1" in msg and "test_batch" in msg
    assert "batches.meta" in msg and "make_cifar10.py" in msg
    with pytest.raises(TicketctlError, match="cifar-100-python.*train, test, meta"):
        load_dataset("cifar100", tmp_path)
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(TicketctlError, match="missing: data_batch_3"):
        load_dataset("cifar10", tmp_path, val_size=0)


# ---------------------------------------------------------------- safe unpickling

CALLS: list[str] = []


def record_call(arg: str) -> str:
    """A global that a malicious pickle would call: it must never run."""
    CALLS.append(arg)
    return arg


class CallsRecorder:
    def __reduce__(self):
        return (record_call, ("pwned",))


class RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_safe_pickle_refuses_foreign_globals(tmp_path):
    CALLS.clear()
    with pytest.raises(TicketctlError, match="record_call"):
        safe_loads(pickle.dumps({"data": CallsRecorder()}))
    assert CALLS == []

    marker = tmp_path / "marker"
    payload = pickle.dumps({"data": RunsShell(marker)})
    with pytest.raises(TicketctlError, match="refusing to unpickle"):
        safe_loads(payload)
    assert not marker.exists()

    # The same payload planted as a CIFAR batch is refused by load_dataset too.
    write_cifar10(tmp_path / "d")
    (tmp_path / "d" / "cifar-10-batches-py" / "data_batch_2").write_bytes(payload)
    with pytest.raises(TicketctlError, match="data_batch_2.*refusing"):
        load_dataset("cifar10", tmp_path / "d", val_size=0)
    assert not marker.exists()


class ArrayOverBytes:
    """Unpickles as numpy.ndarray((1,), object, b"AAAAAAAA"): an object array whose one
    element is the pointer 0x4141414141414141 (reading it crashes the process)."""

    def __reduce__(self):
        return (np.ndarray, ((1,), np.dtype("O"), b"A" * 8))


class ArrayOfOtherType:
    """Unpickles through numpy's `_reconstruct` with a class other than numpy.ndarray."""

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return (_reconstruct, (np.dtype, (0,), b"b"))


def test_safe_pickle_refuses_arrays_built_over_the_files_bytes(tmp_path):
    with pytest.raises(TicketctlError, match="calls numpy.ndarray directly"):
        safe_loads(pickle.dumps({"label_names": [ArrayOverBytes()]}))
    with pytest.raises(TicketctlError, match="another type than numpy.ndarray"):
        safe_loads(pickle.dumps(ArrayOfOtherType(), protocol=2))
    # planted as CIFAR's label names, the CLI's loader refuses it with one error
    write_cifar10(tmp_path / "d")
    (tmp_path / "d" / "cifar-10-batches-py" / "batches.meta").write_bytes(
        pickle.dumps({b"label_names": [ArrayOverBytes()]}))
    with pytest.raises(TicketctlError, match="batches.meta.*numpy.ndarray directly"):
        load_dataset("cifar10", tmp_path / "d", val_size=0)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_safe_pickle_loads_numpy(tmp_path, protocol):
    value = {"a": np.arange(12, dtype=np.uint8).reshape(3, 4), "s": np.int64(7), "l": [1, "x"]}
    path = tmp_path / "p"
    path.write_bytes(pickle.dumps(value, protocol=protocol))
    got = safe_load(path)
    np.testing.assert_array_equal(got["a"], value["a"])
    assert got["s"] == 7 and got["l"] == [1, "x"]


def test_safe_pickle_corrupt(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(pickle.dumps({"a": np.zeros(100)})[:30])
    with pytest.raises(TicketctlError, match="not a readable pickle"):
        safe_load(path)


# ---------------------------------------------------------------- imagefolder


def test_imagefolder(tmp_path):
    a = write_pngs(tmp_path, "train", "cat", 6, seed=1)
    b = write_pngs(tmp_path, "train", "dog", 4, seed=2)
    write_pngs(tmp_path, "test", "cat", 2, seed=3)
    t = write_pngs(tmp_path, "test", "dog", 2, seed=4)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("ignored")
    ds = load_dataset("imagefolder", tmp_path, val_size=0)
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2
    assert ds.input_shape == (3, 5, 6) and ds.train_x.shape == (10, 3, 5, 6)
    assert ds.train_y.tolist() == [0] * 6 + [1] * 4 and ds.test_y.tolist() == [0, 0, 1, 1]
    expected = np.stack(a + b).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(raw_pixels(ds, ds.train_x, 255.0), expected)
    np.testing.assert_array_equal(raw_pixels(ds, ds.test_x, 255.0)[3], t[1].transpose(2, 0, 1))
    assert ds.train_x.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert len(load_dataset("imagefolder", tmp_path).val_y) == 1  # 10% of 10


def test_imagefolder_errors(tmp_path):
    with pytest.raises(TicketctlError, match="does not exist"):
        load_dataset("imagefolder", tmp_path / "none")
    with pytest.raises(TicketctlError, match="train.*does not exist"):
        load_dataset("imagefolder", tmp_path)
    write_pngs(tmp_path, "train", "cat", 2)
    write_pngs(tmp_path, "test", "dog", 1)
    with pytest.raises(TicketctlError, match="only in train: \\['cat'\\]"):
        load_dataset("imagefolder", tmp_path, val_size=0)
    write_pngs(tmp_path, "test", "cat", 1)
    write_pngs(tmp_path, "train", "dog", 1, size=(7, 5))
    with pytest.raises(TicketctlError, match="dog.000.png is 7x5 but .* is 6x5"):
        load_dataset("imagefolder", tmp_path, val_size=0)
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "test" / "empty").mkdir()
    with pytest.raises(TicketctlError, match="empty has no images"):
        load_dataset("imagefolder", tmp_path, val_size=0)


# ---------------------------------------------------------------- synthetic


def test_synthetic():
    ds = load_dataset("synthetic", synthetic_size=200)
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10
    assert ds.train_x.shape == (180, 3, 32, 32) and ds.val_x.shape == (20, 3, 32, 32)
    assert ds.test_x.shape == (10000, 3, 32, 32) and ds.test_y.max() < 10
    assert ds.augment == "crop_flip" and ds.train_x.dtype == torch.float32
    again = load_dataset("synthetic", synthetic_size=200)
    assert torch.equal(ds.train_x, again.train_x)


# ---------------------------------------------------------------- augmentation


def test_augment_none_and_shape():
    x = torch.randn(5, 3, 8, 8)
    assert augment_batch(x, "none") is x
    out = augment_batch(x, "crop_flip", torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    with pytest.raises(TicketctlError, match="unknown augmentation"):
        augment_batch(x, "mixup")


def test_augment_matches_manual_crop_and_flip():
    n, h, w = 16, 6, 7
    x = torch.randn(n, 3, h, w)
    out = augment_batch(x, "crop_flip", torch.Generator().manual_seed(123))
    # Replay the documented draws: dy, dx in [0, 2*PAD], then flip in {0, 1}.
    g = torch.Generator().manual_seed(123)
    dy = torch.randint(0, 2 * PAD + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * PAD + 1, (n,), generator=g)
    flip = torch.randint(0, 2, (n,), generator=g)
    assert flip.any() and not flip.all()
    for i in range(n):
        padded = torch.zeros(3, h + 2 * PAD, w + 2 * PAD)
        padded[:, PAD : PAD + h, PAD : PAD + w] = x[i]
        ref = padded[:, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        if flip[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref), i


def test_crop_flip_exact_mirror_and_identity():
    x = torch.arange(2 * 3 * 6 * 5, dtype=torch.float32).view(2, 3, 6, 5) + 1
    centre = torch.full((2,), PAD)
    same = crop_flip(x, centre, centre, torch.zeros(2, dtype=torch.bool))
    assert torch.equal(same, x)
    mirrored = crop_flip(x, centre, centre, torch.tensor([True, False]))
    assert torch.equal(mirrored[0], x[0].flip(-1)) and torch.equal(mirrored[1], x[1])
    up = torch.full((2,), PAD - 2)  # content moves down by 2 rows, zeros enter at the top
    shifted = crop_flip(x, up, centre, torch.zeros(2, dtype=torch.bool))
    assert torch.equal(shifted[:, :, 2:], x[:, :, :4]) and shifted[:, :, :2].eq(0).all()
