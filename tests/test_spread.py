"""Sweeps spread over devices (`--devices`): two CPU worker processes give the results one
process gives, the parent trains nothing itself, a rerun reads the workers' cache, and a bad
device list is refused with one line."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import HANG_GUARD_S, assert_one_line_error, make_ticket, run

from ticketctl.artifacts import save_ticket
from ticketctl.attacks.runner import AttackRunner
from ticketctl.attacks.spread import (
    environment,
    parse_devices,
    worker_threads,
    worker_visible_devices,
)
from ticketctl.data import load_dataset
from ticketctl.device import CudaSwitches
from ticketctl.errors import TicketctlError
from ticketctl.train.config import TrainConfig

CFG = TrainConfig(epochs=2, batch_size=64, lr=0.05, momentum=0.9, seed=0)
TWO = [torch.device("cpu"), torch.device("cpu")]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _tickets():
    return [make_ticket(seed=s, density_rate=0.5, width=8) for s in (1, 2, 3)]


def test_two_workers_give_the_results_of_one(digits, tmp_path):
    """Each job trains alone on CPU with its own seed and the parent's thread count, so the
    workers' arithmetic is the parent's: the results are equal, not merely close."""
    one = AttackRunner(digits, CFG).retrain_many(_tickets(), ["a", "b", "c"])
    spread = AttackRunner(digits, CFG, out_dir=tmp_path, devices=TWO)
    both = spread.retrain_many(_tickets(), ["a", "b", "c"])
    assert [r.accuracy for r in both] == [r.accuracy for r in one]
    assert [r.best_epoch for r in both] == [r.best_epoch for r in one]
    assert spread.jobs_run == 0 and spread.jobs_cached == 3  # the workers trained them
    assert len(list((tmp_path / "jobs").glob("*.json"))) == 3
    again = AttackRunner(digits, CFG, out_dir=tmp_path)  # the cache serves one device too
    assert [r.accuracy for r in again.retrain_many(_tickets())] == [r.accuracy for r in one]
    assert again.jobs_run == 0


def test_spread_finetuning_keeps_each_schedule_and_its_weights(digits):
    ticket = make_ticket(seed=4, density_rate=0.5, width=8)
    cfgs = [TrainConfig(epochs=e, batch_size=64, lr=0.01, seed=0) for e in (1, 2)]
    one = AttackRunner(digits, CFG).finetune_many(ticket, cfgs, False, ["1", "2"])
    both = AttackRunner(digits, CFG, devices=TWO).finetune_many(ticket, cfgs, False,
                                                                 ["1", "2"])
    for (r1, s1), (r2, s2) in zip(one, both, strict=True):
        assert r1.accuracy == r2.accuracy
        assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_cli_devices(tmp_path):
    ticket = make_ticket(seed=5, density_rate=0.5, width=8)
    path = save_ticket(ticket, tmp_path / "t.safetensors")
    args = ["attack", "finetune", str(path), "--sweep-epochs", "1,2", "--dataset", "digits",
            "--json"]
    alone = run(*args)
    spread = run(*args, "--devices", "cpu,cpu")
    assert alone.exit_code == spread.exit_code == 0, spread.stderr
    rows = [json.loads(r.stdout)["rows"] for r in (alone, spread)]
    assert [r["accuracy"] for r in rows[0]] == [r["accuracy"] for r in rows[1]]
    plain = args[:-1]  # errors: one line on stderr (with --json they are a JSON document)
    assert_one_line_error(run(*plain, "--devices", "tpu:0"), 2, "--devices")
    assert_one_line_error(run(*plain, "--devices", "cuda:7"), 2, "--devices")


def test_parse_devices():
    assert parse_devices(None) is None and parse_devices(" ") is None
    assert parse_devices("cpu,cpu") == TWO
    with pytest.raises(TicketctlError, match="not a device"):
        parse_devices("gpu0")
    if torch.cuda.device_count() == 0:
        with pytest.raises(TicketctlError, match="no CUDA device"):
            parse_devices("all")


def test_devices_default_to_every_gpu_when_the_data_are_on_one(monkeypatch):
    gpu, cpu = torch.device("cuda:0"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_devices(None, gpu) == [torch.device("cuda:0"), torch.device("cuda:1")]
    assert parse_devices(None, cpu) is None  # data on the CPU: one process, as before
    assert parse_devices(None) is None
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert parse_devices(None, gpu) is None  # one GPU: nothing to spread over


def test_spread_calibration_measures_what_one_process_does(digits):
    """Null models are trained from their own seeds: spreading the packs changes where each
    trains, not what it measures."""
    from ticketctl.protect.calibrate import calibrate
    from ticketctl.protect.trigger import generate

    ts = generate(b"s" * 32, n=10, size=8, channels=1)
    one = calibrate("digits_cnn", digits, ts, CFG, models=3, arch_args={"width": 8})
    two = calibrate("digits_cnn", digits, ts, CFG, models=3, arch_args={"width": 8},
                    devices=TWO)
    assert two["agreements"] == one["agreements"]
    assert two["test_accuracies"] == one["test_accuracies"]
    assert two["null_rate"] == one["null_rate"]


def test_cli_calibrate_devices(tmp_path):
    from ticketctl.protect.trigger import generate, save_trigger_set

    trig = save_trigger_set(generate(b"t" * 32, n=10, size=8, channels=1), tmp_path / "t.npz")
    args = ["calibrate", "--trigger", str(trig), "--arch", "digits_cnn", "--dataset", "digits",
            "--epochs", "1", "--models", "2", "--json"]
    alone, spread = run(*args), run(*args, "--devices", "cpu,cpu")
    assert alone.exit_code == spread.exit_code == 0, spread.stderr
    a, b = json.loads(alone.stdout), json.loads(spread.stdout)
    assert a["agreements"] == b["agreements"] and b["models"] == 2


FIND = ["find", "--preset", "demo", "--trials", "3", "--max-rounds", "2", "--pack", "2",
        "--device", "cpu", "--json", "-q"]


def test_find_spreads_a_rounds_trials_and_finds_what_one_device_finds(tmp_path):
    """Three trials a round, the first two packed as one device packs them: over two CPU
    workers (the parent's thread count, the same trainer and seeds) every trial's accuracy,
    the ticket and trial 0's weights are equal to one process's, not merely close."""
    from ticketctl.artifacts import load_ticket

    got = {}
    for name, extra in (("one", []), ("two", ["--devices", "cpu,cpu"])):
        p = run(*FIND, *extra, "--out", tmp_path / f"{name}.safetensors", "--trained",
                tmp_path / f"{name}-trained.safetensors", "--run-dir", tmp_path / name)
        assert p.exit_code == 0, p.stderr[-2000:]
        got[name] = json.loads(p.stdout)
    one, two = got["one"], got["two"]
    assert [r["accuracies"] for r in two["rounds"]] == [r["accuracies"] for r in one["rounds"]]
    assert [r["accepted"] for r in two["rounds"]] == [r["accepted"] for r in one["rounds"]]
    assert all(len(r["accuracies"]) == 3 for r in two["rounds"])
    a, b = (load_ticket(tmp_path / f"{n}.safetensors") for n in ("one", "two"))
    assert all(torch.equal(a.mask[k], b.mask[k]) for k in a.mask)
    ta, tb = (load_ticket(tmp_path / f"{n}-trained.safetensors") for n in ("one", "two"))
    assert all(torch.equal(ta.state[k], tb.state[k]) for k in ta.state)
    # the parent logged every epoch of every trial the workers trained
    rows = [json.loads(line) for line in (tmp_path / "two" / "epochs.jsonl").read_text()
            .splitlines()]
    ones = [json.loads(line) for line in (tmp_path / "one" / "epochs.jsonl").read_text()
            .splitlines()]
    assert sorted(r["training"] for r in rows) == sorted(r["training"] for r in ones)


def test_find_devices_and_nproc_are_refused_together(tmp_path):
    args = [a for a in FIND if a != "--json"]
    p = run(*args, "--devices", "cpu,cpu", "--nproc", "2", "--out", tmp_path / "t.safetensors")
    assert_one_line_error(p, contains="cannot be combined with --nproc")
    assert not (tmp_path / "t.safetensors").exists()


def test_find_progress_follows_one_spread_trial(tmp_path):
    """The parent logs every epoch of the three trials, but its progress (the CLI's bar)
    follows one trial, as for packed trials: one round's bar ends at its epoch count."""
    from ticketctl.prune import Events, find_ticket, resolve_settings
    from ticketctl.prune.search import SearchOverrides

    class Count(Events):
        def __init__(self) -> None:
            self.epochs, self.rounds = 0, 0

        def epoch(self, stats) -> None:
            self.epochs += 1

        def round(self, record) -> None:
            self.rounds += 1

    settings = resolve_settings("demo", search=SearchOverrides(trials=3, max_rounds=1))
    count = Count()
    find_ticket(settings, tmp_path / "run", device="cpu", events=count, devices="cpu,cpu")
    dense, rewind = settings.train.epochs, settings.search.rewind_epoch
    assert count.rounds == 1
    assert count.epochs == dense + (dense - rewind)  # the dense run, then one trial's
    rows = (tmp_path / "run" / "epochs.jsonl").read_text().splitlines()
    assert len(rows) == dense + 3 * (dense - rewind)  # every trial's epochs are logged


def test_workers_load_the_dataset_the_parent_holds(tmp_path):
    """A resized image folder (`--image-size` held in memory): the worker's copy has the
    parent's size, statistics and therefore its job keys (they include `info()`)."""
    from test_stream import write_folder

    from ticketctl.attacks.spread import DataSpec

    folder = write_folder(tmp_path / "f")  # mixed sizes: only a resize keeps it in memory
    parent = load_dataset("imagefolder", folder, image_size=6, stream=False, val_size=4)
    worker = DataSpec.of(parent).load(torch.device("cpu"))
    assert worker.info() == parent.info()
    assert torch.equal(worker.train_x, parent.train_x) and worker.input_shape == (3, 6, 6)


def test_find_devices_on_a_streamed_folder(tmp_path):
    """One device is no spreading, so a streamed folder takes it; two are refused in one
    line (the workers would need every image in memory)."""
    from test_stream import SIZE, write_folder

    from ticketctl.prune import find_ticket, resolve_settings
    from ticketctl.prune.search import SearchOverrides

    folder = write_folder(tmp_path / "f")
    from ticketctl.train.config import TrainOverrides

    settings = resolve_settings("demo", arch="digits_cnn", dataset="imagefolder",
                                data_dir=str(folder), val_size=4, image_size=SIZE,
                                train=TrainOverrides(batch_size=8, epochs=2),
                                search=SearchOverrides(trials=2, max_rounds=0))
    find_ticket(settings, tmp_path / "one", device="cpu", devices="cpu")
    with pytest.raises(TicketctlError, match="--devices cannot use a streamed dataset"):
        find_ticket(settings, tmp_path / "two", device="cpu", devices="cpu,cpu")
    assert not (tmp_path / "two").exists()


def test_find_spreads_only_more_than_one_trial(tmp_path):
    """One trial a round is one job: no workers are started for it; two trials that one
    device would pack together go one to each of two devices."""
    from ticketctl.prune import Events, find_ticket, resolve_settings
    from ticketctl.prune.search import SearchOverrides

    class Labels(Events):
        def __init__(self) -> None:
            self.seen: list[str] = []

        def training(self, label, first, last) -> None:
            self.seen.append(label)

    for trials, want in ((1, "round-1-trial-0"), (2, "round-1-trials-0-1 on 2 devices")):
        settings = resolve_settings("demo", search=SearchOverrides(trials=trials,
                                                                   max_rounds=1))
        labels = Labels()
        find_ticket(settings, tmp_path / f"run{trials}", device="cpu", pack=2, events=labels,
                    devices="cpu,cpu")
        assert labels.seen == ["dense", want]


def test_spread_width_gives_every_device_a_pack():
    """Sixteen jobs that one device packs 16 to a network go 8 and 8 to two devices (one pack
    of 16 would leave the second idle); never wider than one device packs; one device or one
    job keeps the device's width."""
    from ticketctl.attacks.spread import spread_width

    assert spread_width(16, 16, 2) == 8
    assert spread_width(16, 17, 2) == 9
    assert spread_width(4, 16, 2) == 4
    assert spread_width(16, 3, 4) == 1
    assert spread_width(16, 16, 1) == 16
    assert spread_width(8, 1, 2) == 8
    assert spread_width(1, 16, 2) == 1


def test_a_gpu_worker_sees_its_gpu_alone(monkeypatch):
    """A worker for cuda:N starts with CUDA_VISIBLE_DEVICES naming that one GPU (the Nth of
    the parent's own list), so every worker compiles for cuda:0 and shares Inductor's cache."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # as CUDA counts the list
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert worker_visible_devices(torch.device("cuda:1")) == "1"
    assert worker_visible_devices(torch.device("cuda")) == "0"
    assert worker_visible_devices(torch.device("cpu")) is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4, 6")
    assert worker_visible_devices(torch.device("cuda:0")) == "4"
    assert worker_visible_devices(torch.device("cuda:1")) == "6"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaa,GPU-bbb,MIG-ccc")
    assert worker_visible_devices(torch.device("cuda:1")) == "GPU-bbb"
    with pytest.raises(TicketctlError, match="cuda:2 is not visible"):
        worker_visible_devices(torch.device("cuda:2"))
    monkeypatch.setattr(torch.version, "hip", "6.0")  # ROCm: HIP's variables rule; untouched
    assert worker_visible_devices(torch.device("cuda:1")) is None


def _fake_spawn(monkeypatch, process) -> None:
    """torch.multiprocessing's spawn context replaced: `process` as its Process, queues of
    this process as its queues (a pool then starts nothing)."""
    import queue as queue_mod

    class FakeContext:
        Process = process

        @staticmethod
        def Queue():
            return queue_mod.Queue()

    monkeypatch.setattr(torch.multiprocessing, "get_context", lambda kind: FakeContext)


def test_the_pool_starts_each_gpu_worker_on_its_own_gpu(monkeypatch):
    """SpreadPool gives every GPU worker the device cuda:0 and starts it with its own GPU in
    CUDA_VISIBLE_DEVICES; the parent's environment is left as it was."""
    from ticketctl.attacks.spread import DataSpec, SpreadPool

    started, switches = [], []

    class FakeProcess:
        def __init__(self, target, args, daemon):
            self.args, self.exitcode = args, None

        def start(self):
            started.append((self.args[0], os.environ.get("CUDA_VISIBLE_DEVICES")))
            switches.append(self.args[7])

    _fake_spawn(monkeypatch, FakeProcess)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    spec = DataSpec("digits", None, 0, 0, False, 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(6)
    try:
        pool = SpreadPool([torch.device("cuda:0"), torch.device("cuda:1")], spec,
                          CFG.to_dict(), None, None)
        parent = CudaSwitches.current()
        started_gpu, switches_gpu = list(started), list(switches)
        started.clear()
        switches.clear()
        cpu = SpreadPool(TWO, spec, CFG.to_dict(), None, None)
    finally:
        torch.set_num_threads(threads)
    assert started_gpu == [("cuda:0", "5"), ("cuda:0", "7")]
    # the parent's switches to each worker; its 6 threads shared by the two GPU workers
    assert switches_gpu == [replace(parent, threads=3)] * 2
    assert pool.remapped and os.environ["CUDA_VISIBLE_DEVICES"] == "5,7"
    assert started == [("cpu", "5,7"), ("cpu", "5,7")] and not cpu.remapped
    assert [s.threads for s in switches] == [6, 6]  # CPU workers: the parent's arithmetic
    assert switches == [parent] * 2


def test_a_new_pool_first_waits_for_the_workers_an_earlier_one_left(monkeypatch):
    """close(wait=False) leaves the workers to exit on their own; the next pool joins them
    before it starts its own (two workers on one GPU would hold the dataset twice)."""
    from ticketctl.attacks import spread as spread_mod

    log = []

    class FakeProcess:
        count = 0

        def __init__(self, target, args, daemon):
            FakeProcess.count += 1
            self.name, self.exitcode = f"w{FakeProcess.count}", None

        def start(self):
            log.append(("start", self.name))

        def join(self, timeout=None):
            log.append(("join", self.name))
            self.exitcode = 0

        def is_alive(self):
            return self.exitcode is None

    _fake_spawn(monkeypatch, FakeProcess)
    monkeypatch.setattr(spread_mod, "_LEAVING", [])
    spec = spread_mod.DataSpec("digits", None, 0, 0, False, 0)
    first = spread_mod.SpreadPool(TWO, spec, CFG.to_dict(), None, None)
    first.close(wait=False)
    assert log == [("start", "w1"), ("start", "w2")]  # told to stop, not waited for
    assert first.todo.qsize() == 2  # one stop for each worker
    spread_mod.SpreadPool(TWO, spec, CFG.to_dict(), None, None)
    assert log[2:] == [("join", "w1"), ("join", "w2"), ("start", "w3"), ("start", "w4")]
    assert spread_mod._LEAVING == []
    first.close()  # idempotent: no second stop
    assert first.todo.qsize() == 2


def test_gpu_workers_share_the_cores_and_cpu_workers_keep_the_parents_threads():
    gpu, cpu = torch.device("cuda:0"), torch.device("cpu")
    assert worker_threads([gpu, torch.device("cuda:1")], 32) == [16, 16]
    assert worker_threads([gpu] * 3, 32) == [10, 10, 10]
    assert worker_threads([gpu] * 4, 2) == [1, 1, 1, 1]  # never below one
    assert worker_threads([gpu], 7) == [7]
    assert worker_threads([cpu, cpu], 2) == [2, 2]
    assert worker_threads([gpu, torch.device("cuda:1"), cpu], 8) == [4, 4, 8]


def test_a_finished_sweeps_workers_leave_on_their_own(digits, tmp_path, monkeypatch):
    """run_spread returns once every result is in, without waiting for its workers' exit;
    they were told to stop and leave on their own (were they not told, they would wait for
    jobs as long as the parent lives)."""
    import multiprocessing
    import time

    from ticketctl.attacks import spread as spread_mod
    from ticketctl.attacks.spread import DataSpec, Job, run_spread

    tickets = _tickets()[:2]
    jobs = [Job("retrain", [t], [f"j{i}"]) for i, t in enumerate(tickets)]
    before = set(multiprocessing.active_children())
    monkeypatch.setattr(spread_mod, "_LEAVING", [])
    run_spread(jobs, TWO, DataSpec.of(digits), CFG.to_dict(), tmp_path, None)
    assert len(list((tmp_path / "jobs").glob("*.json"))) == 2  # both results written
    # returned without joining: the pool is left for the next one (or the exit) to reap
    (pool,) = spread_mod._LEAVING
    assert pool.closed and len(pool.workers) == 2
    deadline = time.monotonic() + HANG_GUARD_S
    while set(multiprocessing.active_children()) - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not set(multiprocessing.active_children()) - before


def _report_switches(switches, out):
    out.put(CudaSwitches.current())
    switches.apply()
    out.put(CudaSwitches.current())


def test_a_spawned_worker_runs_with_the_parents_cuda_switches():
    """A spawned process starts from PyTorch's defaults, without cuDNN autotuning or TF32
    (a sweep's workers trained slower than the parent, and missed its compiled code); the
    switches SpreadPool hands its workers make the child's the parent's."""
    before = CudaSwitches.current()
    torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = False  # every switch away from a fresh process's
    torch.set_num_threads(1)
    try:
        parent = CudaSwitches.current()
    finally:
        before.apply()
        # (apply never takes a recorded precision back to "none": the flag itself then)
        torch.backends.cuda.matmul.allow_tf32 = before.matmul_tf32
    assert parent.cudnn_benchmark and parent.matmul_tf32 and parent.threads == 1
    assert not parent.cudnn_tf32
    fresh, applied = _in_child(_report_switches, parent)
    assert not fresh.cudnn_benchmark and not fresh.matmul_tf32  # what workers ran with
    assert fresh.cudnn_tf32  # PyTorch's default, which the parent's switch overrides
    assert applied == parent


def _precisions() -> tuple:
    """PyTorch's recorded fp32 precisions (part of Inductor's cache key: "none" until set)."""
    b = torch.backends
    return tuple(getattr(x, "fp32_precision", None)
                 for x in (b.cuda.matmul, b.cudnn, b.cudnn.conv))


def _apply_switches(switches, out):
    out.put(_precisions())
    (switches or CudaSwitches.current()).apply()  # None: a parent with PyTorch's defaults
    out.put(_precisions())


def _in_child(report, switches) -> tuple:
    """What a spawned child reports (`report`) before and after applying `switches`."""
    ctx = torch.multiprocessing.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=report, args=(switches, out))
    child.start()
    fresh, applied = out.get(timeout=120), out.get(timeout=120)
    child.join(timeout=60)
    return fresh, applied


def test_a_worker_ends_with_the_parents_exact_matmul_precision():
    """Setting a TF32 flag to the value it already has records an explicit precision ("ieee"
    for "none"), which Inductor's cache key includes: a worker of a parent that never set
    it compiled under another key and missed the parent's compiled code (seen on the CPU
    with compilation on). Switches that are a fresh process's own change nothing; a parent
    that did set the flag to its default value ("ieee") hands that on exactly."""
    fresh, applied = _in_child(_apply_switches, None)
    assert fresh[0] == "none"  # this torch records the precision (2.9 and later)
    assert applied == fresh
    # a parent that set the flag to its default value (this process's own state is not
    # touched: once set, PyTorch's record cannot go back to "none" through the flag)
    parent = replace(CudaSwitches.current(), matmul_tf32=False, matmul_precision="ieee")
    fresh, applied = _in_child(_apply_switches, parent)
    assert fresh[0] == "none" and applied[0] == "ieee"


def _report_env(name, out):
    out.put(os.environ.get(name))


@pytest.mark.parametrize("before", [None, "7"])
def test_a_spawned_child_starts_with_the_environment_given(monkeypatch, before):
    name = "TICKETCTL_TEST_VISIBLE"
    if before is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, before)
    ctx = torch.multiprocessing.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_report_env, args=(name, out))
    with environment(name, "3"):
        child.start()
    assert out.get(timeout=120) == "3"
    child.join(timeout=60)
    assert os.environ.get(name) == before  # the parent's own environment is as it was
    with environment(name, None):  # None: nothing changes
        assert os.environ.get(name) == before


def test_spread_speed_benchmark_smoke(tmp_path):
    """benchmarks/spread_speed.py on two CPU workers: the warm-up runs in a worker and in a
    copy of the script, and both timed runs give the same accuracies (CPU arithmetic is the
    same in every process), each pack's timing recorded."""
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "spread.json"
    res = subprocess.run([sys.executable, str(root / "benchmarks/spread_speed.py"), "--smoke",
                          "--worker-baseline", "--json-out", str(out)], capture_output=True,
                         text=True, cwd=root, timeout=HANG_GUARD_S)
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["warm_up_s"] > 0 and "warm-up (a worker, then a copy" in res.stderr
    # the copy of the script trained in itself and reported what it compiled: nothing here
    assert doc["compiled_warm_up_copy"] == {"compile_cache": {}, "compile_seconds": {}}
    assert doc["max_accuracy_difference"] == 0
    # --worker-baseline: the one-device sweep again, in one spawned worker, the same results
    assert doc["max_accuracy_difference_one_worker"] == 0 and "in one worker" in res.stderr
    assert doc["one_worker_s"] > 0 and len(doc["packs_one_worker"]) == 4
    # the speed-up is worker time over spread time; both are reported rounded to 0.05 s
    w, sp = doc["one_worker_s"], doc["spread_s"]
    # (w + 0.05) / (sp - 0.05) - w / sp = 0.05 (sp + w) / (sp (sp - 0.05)) at worst, and the
    # speed-up itself rounded to 5e-4
    assert abs(doc["speedup_vs_one_worker"] - w / sp) <= 0.05 * (sp + w) / (sp * (sp - 0.05)) \
        + 5e-4
    assert doc["jobs"] == 4 and len(doc["packs_spread"]) == 4
    # what the one-device run compiled in this process: nothing on a CPU, which runs eager
    assert doc["compiled_one_device"] == {"compile_cache": {}, "compile_seconds": {}}
    assert all(p["first_epoch_end_s"] <= p["last_epoch_end_s"]
               for p in doc["packs_spread"].values())
    # the start-up split at the first epoch's start: the two parts, each rounded to 0.05 s,
    # add up to the first epoch's end, itself rounded
    for p in doc["packs_spread"].values():
        assert p["first_epoch_s"] >= 0 and p["before_first_epoch_s"] >= 0
        assert abs(p["first_epoch_s"] + p["before_first_epoch_s"] - p["first_epoch_end_s"]) \
            <= 0.15 + 1e-9


def test_worker_startup_benchmark_smoke(tmp_path):
    """benchmarks/worker_startup.py on the CPU: the four runs (three in spawned workers, the
    last in the calling process), each with its start-up and epoch recorded."""
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "startup.json"
    res = subprocess.run([sys.executable, str(root / "benchmarks/worker_startup.py"), "--smoke",
                          "--json-out", str(out)], capture_output=True, text=True, cwd=root,
                         timeout=HANG_GUARD_S)
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert [r["run"].split(",")[0] for r in doc["rows"]] == ["worker"] * 3 + ["this process"]
    assert "one compile thread" not in res.stderr  # not one of the default runs
    assert doc["jobs"] == 2 and doc["epochs"] == 2
    assert doc["compiler_cache"] == "fresh"  # its own folder: the first run is cold
    # the calling process's compile-cache counts (none on a CPU, where nothing compiles)
    assert doc["rows"][-1]["compile_cache"] == {}
    assert doc["rows"][-1]["compile_seconds"] == {}  # and no compilation phases
    assert all("compile_cache" not in r for r in doc["rows"][:3])
    assert all(0 <= r["first_epoch_end_s"] <= r["wall_s"] and r["epoch_s"] > 0
               for r in doc["rows"])


def test_worker_startup_runs_the_runs_it_is_given_and_profiles_this_process(tmp_path):
    """`--runs` picks the runs and their order (here a worker with one Inductor compile thread,
    then this process), an unknown name is refused before anything runs, and `--profile`
    writes the calling process's profile, the trainer's epoch among its calls (refused
    without a run in this process)."""
    root = Path(__file__).resolve().parent.parent
    script = str(root / "benchmarks/worker_startup.py")
    out, prof = tmp_path / "startup.json", tmp_path / "profile.txt"
    res = subprocess.run([sys.executable, script, "--smoke", "--runs", "threads1,here",
                          "--profile", str(prof), "--json-out", str(out)],
                         capture_output=True, text=True, cwd=root, timeout=HANG_GUARD_S)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["run"] for r in rows] == [
        "worker, autotuner on, warm cache, one compile thread",
        "this process, autotuner on, after the workers (profiled: slower)"]
    assert "train_epoch" in prof.read_text()  # listed by own time if not by cumulative
    bad = subprocess.run([sys.executable, script, "--smoke", "--runs", "cold,bogus"],
                         capture_output=True, text=True, cwd=root, timeout=HANG_GUARD_S)
    assert bad.returncode == 2 and "unknown 'bogus'" in bad.stderr
    lone = subprocess.run([sys.executable, script, "--smoke", "--runs", "on",
                           "--profile", str(prof)], capture_output=True, text=True, cwd=root,
                          timeout=HANG_GUARD_S)
    assert lone.returncode == 2 and "add here to --runs" in lone.stderr
