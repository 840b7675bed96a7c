"""Streamed image folders (`ticketctl/data/stream.py`): the exact seeded order, resuming,
sharding over ranks, the per-image transforms, the automatic choice between streaming and
holding in memory, and `find`/`retrain` on a folder of mixed-size PNGs and JPEGs, on one
process and on two (gloo). Every folder is written by the test: 40 images of 9-30 pixels
(24 for training, 16 for testing)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import HANG_GUARD_S, assert_one_line_error, run
from PIL import Image
from torch import nn

from ticketctl.artifacts import load_ticket
from ticketctl.data import Dataset, StreamedDataset, load_dataset, load_recorded_dataset, registry
from ticketctl.data.stream import BatchReader, fits_in_memory, step_indices
from ticketctl.data.transforms import (
    EVAL_CROP,
    RATIO,
    SCALE,
    crop_box,
    epoch_order,
    eval_box,
    read_eval,
    read_train,
    sample_rng,
)
from ticketctl.distributed import DistContext
from ticketctl.errors import TicketctlError
from ticketctl.protect.trigger import generate, save_trigger_set
from ticketctl.prune import Events, find_ticket, resolve_settings
from ticketctl.train import TrainConfig, Trainer
from ticketctl.train.config import TrainOverrides

ROOT = Path(__file__).resolve().parent.parent
SIZE = 8  # the side images are trained at here


def write_folder(root: Path, *, mixed: bool = True, train: int = 12, test: int = 8,
                 seed: int = 0) -> Path:
    """Two classes (reddish, bluish noise), `train` + `test` images each, half PNG and half
    JPEG, of random sizes between 9 and 30 pixels (or all 12 x 10 when not `mixed`)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("test", test)):
        for label, name in enumerate(("red", "blue")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = (int(v) for v in rng.integers(9, 31, 2)) if mixed else (12, 10)
                a = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
                a[..., 0 if label == 0 else 2] += 150
                Image.fromarray(a).save(folder / f"{i:02d}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("mixed"))


@pytest.fixture(scope="module")
def streamed(folder) -> StreamedDataset:
    ds = load_dataset("imagefolder", folder, image_size=SIZE, val_size=4)
    assert isinstance(ds, StreamedDataset)
    return ds


def epoch_batches(ds: StreamedDataset, seed: int, epoch: int, global_batch: int = 8,
                  rank: int = 0, per_rank: int | None = None) -> list[tuple[torch.Tensor, ...]]:
    steps = len(ds.train) // global_batch
    return list(ds.train_batches(seed, epoch, steps, global_batch, rank, per_rank))


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for p, q in zip(a, b, strict=True)
                                    for x, y in zip(p, q, strict=True))


# ---- order, resume, sharding ---------------------------------------------------------------

def test_each_epoch_is_a_permutation_drawn_from_seed_and_epoch():
    a = epoch_order(100, seed=3, epoch=2)
    assert sorted(a.tolist()) == list(range(100))
    assert np.array_equal(a, epoch_order(100, seed=3, epoch=2))
    assert not np.array_equal(a, epoch_order(100, seed=4, epoch=2))
    assert not np.array_equal(a, epoch_order(100, seed=3, epoch=3))


def test_batches_are_exact_and_seeded(streamed):
    first = epoch_batches(streamed, seed=3, epoch=1)
    assert len(first) == len(streamed.train) // 8 == 2
    assert all(x.shape == (8, SIZE, SIZE, 3) and x.dtype == torch.uint8 for x, _ in first)
    order = epoch_order(len(streamed.train), 3, 1)
    for b, (_, y) in enumerate(first):  # the labels of the images the order names
        assert torch.equal(y, streamed.train.labels[torch.from_numpy(order[8 * b:8 * b + 8])])
    assert same(first, epoch_batches(streamed, seed=3, epoch=1))
    assert not same(first, epoch_batches(streamed, seed=4, epoch=1))


def test_a_restarted_stream_replays_the_epochs_it_resumes_at(folder, streamed):
    """Nothing but (seed, epoch) decides a batch: a stream opened afresh (a resumed run) at
    epoch 2 gives what the one that ran through epoch 1 gave at epochs 2 and 3."""
    through = [epoch_batches(streamed, seed=5, epoch=e) for e in (1, 2, 3)]
    fresh = load_dataset("imagefolder", folder, image_size=SIZE, val_size=4,
                         reader=BatchReader(workers=1, prefetch=1))
    assert same(through[1], epoch_batches(fresh, seed=5, epoch=2))
    assert same(through[2], epoch_batches(fresh, seed=5, epoch=3))
    assert not same(through[1], through[2])


def test_two_ranks_share_each_global_batch_exactly(streamed):
    one = epoch_batches(streamed, seed=7, epoch=4, global_batch=8)
    ranks = [epoch_batches(streamed, seed=7, epoch=4, global_batch=8, rank=r, per_rank=4)
             for r in (0, 1)]
    order = epoch_order(len(streamed.train), 7, 4)
    for b, (x, y) in enumerate(one):
        idx = [step_indices(order, b, 8, r, 4) for r in (0, 1)]
        assert not set(idx[0].tolist()) & set(idx[1].tolist())
        assert np.array_equal(np.concatenate(idx), order[8 * b:8 * b + 8])
        # each image's crop depends on its index, not on the rank decoding it
        assert torch.equal(torch.cat([ranks[0][b][0], ranks[1][b][0]]), x)
        assert torch.equal(torch.cat([ranks[0][b][1], ranks[1][b][1]]), y)


def test_worker_processes_decode_what_threads_decode(streamed):
    procs = BatchReader(workers=1, processes=True, prefetch=2)
    threads = BatchReader(workers=2, processes=False, prefetch=2)
    try:
        plan = [np.arange(0, 5), np.arange(5, 9)]
        a = list(procs.batches(streamed.train, plan, SIZE, train=True, seed=1, epoch=2))
        b = list(threads.batches(streamed.train, plan, SIZE, train=True, seed=1, epoch=2))
        assert same(a, b)
    finally:
        procs.close()
        threads.close()


def test_processes_decode_into_shared_slots_and_give_them_back(streamed, monkeypatch):
    """Worker processes write batches into shared slots (nothing pickled back): the batches
    equal the threads' ones; a batch larger than the slots goes the old way while others hold
    slots, and makes them grow when none does; every slot is free again after a full pass and
    after a pass cut short, and a batch from before `close` gives nothing to the next pool;
    without shared memory every batch goes the old way, with the same result."""
    from ticketctl.data import stream

    n = len(streamed.train)
    assert n >= 18  # the last batch is larger than the first
    plan = [np.arange(0, 5), np.arange(5, 9), np.arange(9, 12), np.arange(12, n)]
    threads = BatchReader(workers=2, processes=False, prefetch=2)
    want = list(threads.batches(streamed.train, plan, SIZE, train=True, seed=3, epoch=1))
    threads.close()
    row = SIZE * SIZE * 3
    monkeypatch.setattr(stream, "SLOT_MIN_BYTES", 1)  # slots sized by the first batch
    procs = BatchReader(workers=2, processes=True, prefetch=2)
    try:
        got = list(procs.batches(streamed.train, plan, SIZE, train=True, seed=3, epoch=1))
        assert same(got, want)
        # the first three fit a 5-image slot; the last came while others held slots
        assert procs.shared_batches == 3 and procs._slots[0].numel() == 5 * row
        assert sorted(procs._free) == [0, 1, 2]
        # a pass that starts with the large batch, all slots free: they grow to take it
        big = list(procs.batches(streamed.train, plan[::-1], SIZE, train=True, seed=3,
                                 epoch=1))
        assert same(big, want[::-1]) and procs.shared_batches == 3 + 4
        assert procs._slots[0].numel() == (n - 12) * row
        cut = procs.batches(streamed.train, plan, SIZE, train=True, seed=3, epoch=1)
        assert same([next(cut)], want[:1])
        cut.close()  # the batches decoded ahead are dropped, their slots freed
        assert sorted(procs._free) == [0, 1, 2]
        # a batch that took its slot before the reader was closed gives it back to no one
        old = procs._submit(streamed.train, plan[0], SIZE, True, 3, 1, False)
        assert old.slot is not None and len(procs._free) == 2
        procs.close()
        assert same(list(procs.batches(streamed.train, plan, SIZE, train=True, seed=3,
                                       epoch=1)), want)
        procs._release(old)
        assert sorted(procs._free) == [0, 1, 2] and old.slot is None
    finally:
        procs.close()
    monkeypatch.setattr(stream, "_shared_slots", lambda count, nbytes: [])
    none = BatchReader(workers=2, processes=True, prefetch=2)
    try:
        assert same(list(none.batches(streamed.train, plan, SIZE, train=True, seed=3,
                                      epoch=1)), want)
        assert none._slots == [] and none.shared_batches == 0
    finally:
        none.close()


def test_many_workers_decode_in_processes_unless_told():
    """Threads share the GIL around pillow's decode: from PROCESSES_FROM workers on the
    reader uses processes (measured 4.7x faster with 32 on the H200 host); an explicit
    choice wins either way."""
    from ticketctl.data.stream import PROCESSES_FROM

    assert BatchReader(workers=PROCESSES_FROM - 1).processes is False
    assert BatchReader(workers=PROCESSES_FROM).processes is True
    assert BatchReader(workers=32, processes=False).processes is False
    assert BatchReader(workers=1, processes=True).processes is True


# ---- the transforms ---------------------------------------------------------------------------

def coordinate_image(path: Path, w: int = 200, h: int = 200) -> Path:
    """R = x, G = y: a pixel's colour says where it came from."""
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.arange(w)[None, :]
    a[..., 1] = np.arange(h)[:, None]
    Image.fromarray(a).save(path)
    return path


def test_training_crops_follow_the_sample_generator_and_stay_in_bounds(tmp_path):
    path = coordinate_image(tmp_path / "c.png")
    out, flips = 16, 0
    for index in range(64):
        x = read_train(path, out, seed=5, epoch=2, index=index)
        assert x.shape == (out, out, 3) and x.dtype == np.uint8
        assert np.array_equal(x, read_train(path, out, seed=5, epoch=2, index=index))
        rng = sample_rng(5, 2, index)
        left, top, w, h = crop_box(rng, 200, 200)
        flipped = rng.random() < 0.5  # drawn after the box
        flips += flipped
        # bilinear resampling reads up to one source pixel per output pixel (w / out) and one
        # more beyond the box's edge
        slack = max(w, h) / out + 1
        r, g = x[..., 0].astype(int), x[..., 1].astype(int)
        assert left - slack <= r.min() and r.max() <= left + w + slack
        assert top - slack <= g.min() and g.max() <= top + h + slack
        assert (r[:, 0] > r[:, -1]).all() == flipped and (r[:, 0] < r[:, -1]).all() != flipped
    # 64 fair coins: outside 12..52 with probability below 1e-6
    assert 12 <= flips <= 52


def test_crop_boxes_cover_8_to_100_percent_at_3_4_to_4_3():
    width, height = 1000, 800
    for i in range(300):
        left, top, w, h = crop_box(np.random.default_rng(i), width, height)
        assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
        # w and h are rounded from sqrt(area * ratio) and sqrt(area / ratio), each at least
        # sqrt(0.08 * 800000 * 3/4) > 200 pixels: rounding moves each by at most 0.5, 0.25%
        assert SCALE[0] * 0.995 <= w * h / (width * height) <= SCALE[1]
        assert RATIO[0] * 0.995 <= w / h <= RATIO[1] * 1.005


def test_a_box_that_never_fits_falls_back_to_the_centre():
    # 400 x 10: every box of 8% of the area at ratio 3:4..4:3 is taller than 10 pixels
    assert crop_box(np.random.default_rng(0), 400, 10) == (193, 0, 13, 10)
    assert crop_box(np.random.default_rng(0), 10, 400) == (0, 193, 10, 13)


def test_evaluation_resizes_the_short_side_then_takes_the_centre(tmp_path):
    size = 64
    short = round(size / EVAL_CROP)  # 73
    left, top, right, bottom = eval_box(400, 200, size)
    sx, sy = 400 / (2 * short), 200 / short
    assert (right - left, bottom - top) == pytest.approx((size * sx, size * sy))
    # centred up to the rounding of the offset to a whole pixel of the resized image
    assert abs((left + right) / 2 - 200) <= sx and abs((top + bottom) / 2 - 100) <= sy
    assert eval_box(200, 400, size) == pytest.approx((top, left, bottom, right))
    # a red centre in green margins: the crop (x in 112..288, y in 11..186, plus the resize's
    # reach of about 3 pixels) sees red only
    a = np.zeros((200, 400, 3), np.uint8)
    a[..., 1] = 255
    a[5:195, 100:300] = (255, 0, 0)
    Image.fromarray(a).save(tmp_path / "wide.png")
    x = read_eval(tmp_path / "wide.png", size)
    assert x.shape == (size, size, 3)
    assert (x == np.array([255, 0, 0], np.uint8)).all()


# ---- choosing ----------------------------------------------------------------------------------

def test_a_small_folder_of_one_size_stays_in_memory(tmp_path):
    write_folder(tmp_path, mixed=False, train=3, test=1)
    ds = load_dataset("imagefolder", tmp_path, val_size=0)
    assert isinstance(ds, Dataset) and not ds.streamed
    assert ds.input_shape == (3, 10, 12) and ds.augment == "crop_flip"
    assert "stream" not in ds.info() and "image_size" not in ds.info()
    forced = load_dataset("imagefolder", tmp_path, val_size=0, stream=True)
    assert forced.streamed and forced.input_shape == (3, 10, 10)  # the shorter side
    assert forced.why == "--stream"


def test_a_folder_that_does_not_fit_streams(tmp_path, monkeypatch):
    write_folder(tmp_path, mixed=False, train=3, test=1)
    monkeypatch.setattr(registry, "fits_in_memory", lambda *a, **k: False)
    ds = load_dataset("imagefolder", tmp_path, val_size=0)
    assert ds.streamed and "do not fit in memory" in ds.why


def test_the_memory_rule():
    shape = (3, 100, 100)  # ten images: 1.2 MB as float32, 0.6 MB as two uint8 copies
    gpu = torch.device("cuda")
    assert fits_in_memory(10, shape, gpu, device_free=2_400_000, host_free=1_200_000)
    assert not fits_in_memory(10, shape, gpu, device_free=2_399_999, host_free=10**9)
    assert not fits_in_memory(10, shape, gpu, device_free=10**9, host_free=1_199_999)
    cpu = torch.device("cpu")  # both copies in RAM
    assert fits_in_memory(10, shape, cpu, device_free=3_600_000)
    assert not fits_in_memory(10, shape, cpu, device_free=3_599_999)


def test_mixed_sizes_stream_and_record_how(folder, streamed, monkeypatch):
    assert streamed.input_shape == (3, SIZE, SIZE) and streamed.why == "images of mixed sizes"
    info = streamed.info()
    assert info["stream"] is True and info["image_size"] == SIZE
    assert (info["train_size"], info["val_size"], info["test_size"]) == (20, 4, 16)
    assert json.loads(json.dumps(info)) == info
    # reloaded from the record: streamed again, with the recorded statistics (not measured)
    monkeypatch.setattr(registry, "measure_stats", lambda *a: pytest.fail("measured again"))
    again = load_recorded_dataset(info)
    assert again.streamed and (again.mean, again.std) == (streamed.mean, streamed.std)
    assert again.image_size == SIZE and "when the model was made" in again.why
    with pytest.raises(TicketctlError, match="cannot use a streamed dataset.*--no-stream"):
        again.train_x  # noqa: B018


def test_held_in_memory_images_are_the_evaluation_crops(folder, streamed):
    ds = load_dataset("imagefolder", folder, image_size=SIZE, val_size=4, stream=False)
    assert not ds.streamed and ds.train_x.shape == (20, 3, SIZE, SIZE)
    assert ds.info()["image_size"] == SIZE and "stream" not in ds.info()
    pixels = torch.round(ds.denormalize(ds.test_x) * 255).to(torch.uint8)
    expected = torch.from_numpy(np.stack([read_eval(f, SIZE) for f in streamed.test.files]))
    assert torch.equal(pixels, expected.permute(0, 3, 1, 2))
    # and the streamed test batches are the same images
    x, y = next(streamed.eval_batches("test", 100))
    assert torch.equal(x, expected) and torch.equal(y, ds.test_y)


def test_bad_streaming_input(folder):
    with pytest.raises(TicketctlError, match="images of mixed sizes.*pass --image-size"):
        load_dataset("imagefolder", folder)
    with pytest.raises(TicketctlError, match="one size to be held in memory.*--image-size"):
        load_dataset("imagefolder", folder, stream=False)
    with pytest.raises(TicketctlError, match="--image-size must be between 1 and 4096"):
        load_dataset("imagefolder", folder, image_size=0)
    with pytest.raises(TicketctlError, match="--stream is for image folders"):
        load_dataset("digits", stream=True)


# ---- training ------------------------------------------------------------------------------------

FIND = ["find", "--dataset", "imagefolder", "--arch", "digits_cnn", "--preset", "demo",
        "--epochs", "3", "--rewind-epoch", "1", "--rounds", "1", "--rate", "0.5",
        "--batch-size", "8", "--val-size", "4", "--device", "cpu"]


def test_find_and_retrain_on_a_streamed_folder(folder, tmp_path):
    out, run_dir = tmp_path / "t.safetensors", tmp_path / "run"
    result = run(*FIND, "--data-dir", folder, "--image-size", SIZE, "--out", out,
                 "--run-dir", run_dir, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["settings"]["image_size"] == SIZE and "stream" not in doc["settings"]
    # red against blue: 100% of the 16 test images at 5 seeds on 2 folders measured (dense,
    # ticket and retrained); 75% leaves 4 images of margin, chance is 50%
    assert doc["dense_accuracy"] >= 75
    ticket = load_ticket(out)
    assert ticket.dataset["stream"] is True and ticket.dataset["image_size"] == SIZE
    assert json.loads((run_dir / "dataset.json").read_text()) == ticket.dataset
    # resuming the finished run reloads the data as recorded and gives the same ticket
    again = run(*FIND, "--data-dir", folder, "--image-size", SIZE, "--out",
                tmp_path / "t2.safetensors", "--run-dir", run_dir, "--resume", "--json")
    assert again.exit_code == 0, again.stderr
    assert load_ticket(tmp_path / "t2.safetensors").mask == ticket.mask
    # retrain reloads it from the ticket: streamed, at its size
    retrained = run("retrain", out, "--epochs", "3", "--batch-size", "8", "--device", "cpu",
                    "--out", tmp_path / "r.safetensors", "--json")
    assert retrained.exit_code == 0, retrained.stderr
    assert json.loads(retrained.stdout)["test_accuracy"] >= 75  # as above
    assert load_ticket(tmp_path / "r.safetensors").dataset["stream"] is True
    # verify --trigger normalises the trigger images with the recorded statistics
    trigger = save_trigger_set(generate(b"k" * 32, n=20, size=SIZE, channels=3, num_classes=2),
                               tmp_path / "trigger.npz")
    checked = run("verify", tmp_path / "r.safetensors", "--trigger", trigger, "--json")
    assert checked.exit_code in (0, 1), checked.stderr
    assert json.loads(checked.stdout)["trigger_accuracy"] is not None
    # commands that need every image in memory say so, and how to load it so
    refused = run("attack", "prune", out, "--rates", "0.1", "--device", "cpu")
    assert_one_line_error(refused, 2, "the attacks cannot use a streamed dataset")
    assert run("attack", "prune", out, "--rates", "0.1", "--device", "cpu", "--no-stream",
               "-q").exit_code == 0


class Stop(Exception):
    pass


class StopAfter(Events):
    def __init__(self, epochs: int) -> None:
        self.left = epochs

    def epoch(self, stats) -> None:
        self.left -= 1
        if self.left == 0:
            raise Stop


def test_a_stopped_streamed_search_resumes_to_the_same_ticket(folder, tmp_path):
    def settings():
        s = resolve_settings("demo", arch="digits_cnn", dataset="imagefolder",
                             data_dir=str(folder), val_size=4, image_size=SIZE,
                             train=TrainOverrides(epochs=3, batch_size=8))
        s.search.rewind_epoch, s.search.max_rounds = 1, 2
        return s

    whole = find_ticket(settings(), tmp_path / "whole", device="cpu", checkpoint_seconds=0)
    with pytest.raises(Stop):  # in round 1's training, after its first epoch is saved
        find_ticket(settings(), tmp_path / "cut", device="cpu", checkpoint_seconds=0,
                    events=StopAfter(4))
    resumed = find_ticket(settings(), tmp_path / "cut", resume=True, device="cpu",
                          checkpoint_seconds=0)
    assert resumed.ticket.mask == whole.ticket.mask
    assert all(torch.equal(resumed.trained.state[k], whole.trained.state[k])
               for k in whole.trained.state)
    assert [r.accuracy for r in resumed.rounds] == [r.accuracy for r in whole.rounds]


@pytest.mark.parametrize("args,message", [
    (["--image-size", "0"], "--image-size must be"),
    ([], "images of mixed sizes stream at one size"),
    (["--image-size", SIZE, "--pack", "2"], "--pack cannot use a streamed dataset"),
])
def test_bad_input_through_find(folder, tmp_path, args, message):
    result = run(*FIND, "--data-dir", folder, "--out", tmp_path / "t.safetensors",
                 "--run-dir", tmp_path / "run", *args)
    assert_one_line_error(result, 2, message)
    assert not (tmp_path / "run").exists()


def test_stream_on_a_dataset_that_cannot(tmp_path):
    result = run("find", "--stream", "--epochs", "2", "--out", tmp_path / "t.safetensors",
                 "--run-dir", tmp_path / "run")
    assert_one_line_error(result, 2, "--stream is for image folders")


# ---- two processes ---------------------------------------------------------------------------

def tiny_net() -> nn.Module:
    """No BatchNorm: the gradient of the global batch is then the mean of the ranks'
    gradients, so data-parallel training follows one process's arithmetic."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 2))


CFG = TrainConfig(epochs=2, batch_size=8, lr=0.05, seed=11)


def _train(folder: Path, ctx: DistContext | None) -> tuple[dict, list]:
    ds = load_dataset("imagefolder", folder, image_size=SIZE, val_size=4,
                      reader=BatchReader(workers=1))
    trainer = Trainer(tiny_net(), ds, CFG, dist=ctx)
    result = trainer.fit()
    return trainer.model_state(), [(h.val_accuracy, h.test_accuracy) for h in result.history]


def _ddp_worker(rank: int, port: int, folder: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        state, history = _train(Path(folder), DistContext(rank, 2, rank))
        torch.save({"state": state, "history": history}, Path(out) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_train_on_the_stream_as_one(folder, tmp_path, float64):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(folder), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1)]
    one_state, one_history = _train(folder, None)
    # the ranks hold the same weights and the same accuracies (each scored half the files)
    assert all(torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]) for k in one_state)
    assert ranks[0]["history"] == ranks[1]["history"]
    # and follow one process: the same images in the same steps, gradients summed in
    # another order. In float64 each of the 6 steps rounds at about 1e-16 relative; 1e-9 is
    # far above what 6 steps of SGD at lr 0.05 can amplify that to.
    for k, v in one_state.items():
        assert torch.allclose(ranks[0]["state"][k], v, rtol=0, atol=1e-9), k
    assert ranks[0]["history"] == one_history
    assert all(math.isfinite(t) for _, t in one_history)


def test_packing_refuses_a_streamed_dataset(streamed):
    from ticketctl.train.packed import PackedTrainer

    with pytest.raises(TicketctlError, match="packed together.*cannot use a streamed"):
        PackedTrainer(tiny_net(), streamed, CFG, None, [0, 1])



@pytest.mark.slow
def test_stream_speed_benchmark_smoke(tmp_path):
    """benchmarks/stream_speed.py at toy sizes on the CPU: the folder it writes and one row
    with every measurement (torchvision's baseline only where torchvision is installed)."""
    out = tmp_path / "speed.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "stream_speed.py"), "--folder",
           str(tmp_path / "jpegs"), "--files", "64", "--image-size", "32", "--steps", "2",
           "--warmup", "1", "--arch", "digits_cnn", "--batch", "8", "--device", "cpu",
           "--json-out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=HANG_GUARD_S,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-2000:]
    train = sorted((tmp_path / "jpegs" / "train").glob("*/*.jpg"))
    assert len(train) == 64 and len({f.parent.name for f in train}) == 10
    (row,) = json.loads(out.read_text())["rows"]
    assert row["gpus"] == 1 and row["global_batch"] == 8 and row["steps"] == 2
    assert all(row[k] > 0 for k in ("stream_model", "stream_alone", "model_alone"))
    assert row["stream_vs_model"] == row["stream_model"] / row["model_alone"]
    assert row["gpu_decode"].startswith("no GPU decoding here")  # a CPU run
    if importlib.util.find_spec("torchvision") is None:
        assert row["torchvision"] == "torchvision not installed"
    else:
        assert row["torchvision_model"] > 0
    assert "| 1 |" in p.stdout  # the markdown table


def _choice_worker(rank: int, port: int, folder: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # rank 0 has room for the folder, rank 1 does not
        registry.fits_in_memory = lambda *a, **k: rank == 0
        ds = load_dataset("imagefolder", folder, val_size=4)
        Path(out, str(rank)).write_text(str(ds.streamed))
    finally:
        dist.destroy_process_group()


def test_ranks_stream_a_folder_that_one_of_them_cannot_hold(tmp_path):
    """Each rank measures its own memory; they decide together: it stays in memory only if
    it fits on every rank."""
    folder = write_folder(tmp_path / "f", mixed=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_choice_worker, args=(port, str(folder), str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / str(r)).read_text() for r in (0, 1)] == ["True", "True"]
    assert load_dataset("imagefolder", folder, val_size=4).streamed is False  # one process


def test_a_streamed_step_compiles_whole_and_trains_as_before(folder, monkeypatch):
    """The fused step on a streamed folder (its batches copied into the step's input buffers):
    traced once as one graph (dynamo's "eager" backend, fullgraph=True) and bitwise the eager
    trainer's weights and accuracies after two epochs."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from ticketctl.train import engine

    reference = _train(folder, None)
    counters: dict[str, CompileCounterWithBackend] = {}

    def strict(fn, cfg):
        counter = counters.setdefault(getattr(fn, "__name__", type(fn).__name__),
                                      CompileCounterWithBackend("eager"))
        return torch.compile(fn, backend=counter, fullgraph=True, dynamic=False)

    monkeypatch.setattr(engine, "COMPILE_ON_CPU", True)
    monkeypatch.setattr(engine, "_compile", strict)
    torch._dynamo.reset()
    state, history = _train(folder, None)
    assert counters["_batch_loss"].frame_count == 1 and counters["_sgd_update"].frame_count == 1
    assert history == reference[1]
    for name, t in reference[0].items():
        assert torch.equal(state[name], t), name
    assert not torch.equal(state["0.weight"], tiny_net().state_dict()["0.weight"])  # trained
