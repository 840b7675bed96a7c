"""Data-parallel `find --nproc 2` with the gloo backend on CPU: identical masks on both ranks,
the same ticket as one process up to what per-rank BatchNorm and augmentation allow, and a
clean stop when one rank fails or the run hangs."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import HANG_GUARD_S

from ticketctl.artifacts import load_ticket
from ticketctl.distributed import DistContext, check_same, relaunch_args
from ticketctl.errors import TicketctlError

ROOT = Path(__file__).resolve().parent.parent
FIND = ["find", "--preset", "demo", "--max-rounds", "2", "--device", "cpu", "--json", "-q"]


def _cli(*args, env=None, timeout=HANG_GUARD_S):
    return subprocess.run([sys.executable, "-m", "ticketctl", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def _jaccard(a, b):
    inter = sum(int((a[k] & b[k]).sum()) for k in a)
    union = sum(int((a[k] | b[k]).sum()) for k in a)
    return inter / union


@pytest.mark.slow
def test_two_processes_find_the_ticket_one_process_finds(tmp_path):
    # Fixed-rate IMP (two rounds at 0.5, each accepted): the extreme search's accept/reject
    # decisions turn on single test images, so per-rank BatchNorm can send one and two
    # processes down different paths (a Jaccard of 0.31 at 2 of 5 seeds); with no decisions
    # both prune the same counts and the masks compare like for like.
    fixed = ("--rounds", "2", "--rate", "0.5")
    two = _cli(*FIND, *fixed, "--nproc", "2", "--out", tmp_path / "t2.safetensors", "--run-dir",
               tmp_path / "run2")
    assert two.returncode == 0, two.stderr[-2000:]
    doc = json.loads(two.stdout)  # rank 0 alone prints
    assert doc["distributed"]["world_size"] == 2 and doc["distributed"]["backend"] == "gloo"
    # every round's mask was compared across the ranks (a mismatch would have failed the run)
    assert doc["distributed"]["mask_checks"] == len(doc["rounds"]) == 2
    one = _cli(*FIND, *fixed, "--out", tmp_path / "t1.safetensors", "--run-dir",
               tmp_path / "run1")
    assert one.returncode == 0, one.stderr[-2000:]
    a = load_ticket(tmp_path / "t1.safetensors").mask
    b = load_ticket(tmp_path / "t2.safetensors").mask
    assert a.num_kept == b.num_kept  # exact counts either way
    # The same global batches in the same order; what differs is BatchNorm statistics over
    # half batches and each rank's own crops, so the kept sets overlap closely, not exactly
    # (0.95-0.98 over the seeds where both took the same path).
    assert _jaccard(a, b) >= 0.85
    # only rank 0 wrote the run folder; the epochs log holds one row per epoch, not two
    rows = (tmp_path / "run2" / "epochs.jsonl").read_text().splitlines()
    one_rows = (tmp_path / "run1" / "epochs.jsonl").read_text().splitlines()
    assert len(rows) == len(one_rows)


@pytest.mark.slow
def test_a_failing_rank_stops_every_rank(tmp_path):
    result = _cli(*FIND, "--nproc", "2", "--out", tmp_path / "t.safetensors", "--run-dir",
                  tmp_path / "run", env={"TICKETCTL_FAIL_RANK": "1"})
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: a distributed rank failed")
    assert not (tmp_path / "t.safetensors").exists()


@pytest.mark.slow
def test_a_stuck_run_is_stopped_by_the_timeout(tmp_path):
    # 500 epochs take far longer than 2 s on any machine: the limit always cuts the run short
    result = _cli(*FIND, "--nproc", "2", "--epochs", "500", "--dist-timeout", "2", "--out",
                  tmp_path / "t.safetensors", "--run-dir", tmp_path / "run")
    assert result.returncode == 2
    assert "did not finish within 2 s" in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_bad_distributed_options(tmp_path):
    result = _cli(*FIND, "--nproc", "2", "--batch-size", "63", "--out",
                  tmp_path / "t.safetensors", "--run-dir", tmp_path / "run")
    assert result.returncode == 2
    assert "divide evenly" in result.stderr
    result = _cli(*FIND, "--nnodes", "2", "--out", tmp_path / "t.safetensors")
    assert result.returncode == 2 and "--rdzv-endpoint" in result.stderr


def test_relaunch_args_drop_the_launch_options():
    argv = ["find", "--nproc", "2", "--nnodes=1", "--rdzv-endpoint", "h:1", "--epochs", "3"]
    assert relaunch_args(argv) == ["find", "--epochs", "3"]


def _mismatch_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    ctx = DistContext(rank, 2, rank)
    check_same(ctx, "ab" * 32, "a mask")  # equal: passes
    try:
        check_same(ctx, ("ab" if rank == 0 else "cd") * 32, "a mask")
        Path(out, f"{rank}").write_text("no error")
    except TicketctlError as e:
        Path(out, f"{rank}").write_text(str(e))
    dist.destroy_process_group()


def test_ranks_holding_different_masks_are_caught(tmp_path):
    port = _free_port()
    mp.spawn(_mismatch_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert "ranks disagree on a mask" in (tmp_path / f"{rank}").read_text()




@pytest.mark.slow
def test_ddp_scaling_benchmark_smoke(tmp_path):
    out = tmp_path / "ddp.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks/ddp_scaling.py"), "--smoke",
                        "--round", "--compare-eager", "--compare-bf16-reduce", "--comm",
                        "--compare-buckets", "8", "--round-epochs", "8",
                        "--json-out", str(out)],
                       capture_output=True, text=True,
                       cwd=ROOT, timeout=HANG_GUARD_S,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-2000:]
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    # 2 ranks four times: the --compare-eager row, the --compare-bf16-reduce row and the
    # --compare-buckets row (no rounds), then the graph's row
    assert [r["gpus"] for r in rows] == [1, 2, 2, 2, 2]
    assert [r["reduce"] for r in rows] == ["fp32", "fp32", "bf16", "fp32", "fp32"]
    # the trainer's default, one all-reduce after backward (0), and one row in buckets of
    # 8 MiB (the smoke test's network is one bucket; the CPU's eager step compiles no units)
    assert [r["bucket_mb"] for r in rows] == [None, 0.0, 0.0, 8.0, 0.0]
    assert [r["buckets"] for r in rows] == [0, 0, 0, 1, 0]
    assert [r["units"] for r in rows] == [0] * 5
    # on a CPU there is no graph to compare; the extra row runs the same eager step
    assert [r["cuda_graph"] for r in rows] == [False] * 5
    assert all("round_seconds" not in rows[i] and rows[i]["ddp"] is True for i in (1, 2, 3))
    # --comm: the all-reduce alone at the network's size, fp32 then bf16 (half the bytes)
    (comm,) = doc["all_reduce"]
    assert comm["gpus"] == 2 and [r["dtype"] for r in comm["runs"]] == ["float32", "bfloat16"]
    fp32, bf16 = comm["runs"]
    assert fp32["mb"] == 2 * bf16["mb"] == comm["numel"] * 4 / 1e6
    assert all(r["ms"] > 0 and not r["graph"] for r in comm["runs"])  # no graphs on a CPU
    rows = [rows[0], rows[4]]
    # strong scaling: the same global batch and steps at both counts; one rank is no DDP
    assert rows[0]["efficiency"] == 1.0 and rows[0]["ddp"] is False and rows[1]["ddp"] is True
    assert rows[0]["global_batch"] == rows[1]["global_batch"] == 128
    assert rows[1]["steps_per_epoch"] == rows[0]["steps_per_epoch"]
    assert all(r["images_per_second"] > 0 and r["round_seconds"] > 0 for r in rows)
    # --round-epochs reached the rounds (8: the demo preset's own length, so the masks below
    # are those of the preset)
    assert all(r["round_epochs"] == 8 for r in rows)
    # one fixed-rate round: overlapping as in the two-process test above; the 1-GPU round
    # ran twice, and on a CPU the two runs find the same mask
    assert rows[1]["mask_jaccard_vs_1"] >= 0.85 and "mask_jaccard_vs_1" not in rows[0]
    assert rows[0]["mask_jaccard_1_repeat"] == 1.0


@pytest.mark.slow
def test_retrain_runs_data_parallel(tmp_path):
    import torch

    found = _cli(*FIND, "--max-rounds", "1", "--out", tmp_path / "t.safetensors", "--run-dir",
                 tmp_path / "run")
    assert found.returncode == 0, found.stderr[-2000:]
    result = _cli("retrain", tmp_path / "t.safetensors", "--nproc", "2", "--device", "cpu",
                  "--out", tmp_path / "r.safetensors", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    doc = json.loads(result.stdout)  # one document: rank 0's
    assert doc["test_accuracy"] > 80  # 97.3-99.0% seen
    ticket = load_ticket(tmp_path / "t.safetensors")
    assert load_ticket(tmp_path / "r.safetensors").mask == ticket.mask
    bad = _cli("retrain", tmp_path / "t.safetensors", "--nproc", "2", "--trigger",
               tmp_path / "missing.npz", "--out", tmp_path / "x.safetensors")
    assert bad.returncode == 2 and "does not run distributed" in bad.stderr
    # --reduce-bf16 reaches the ranks (they are started without --nproc): their gradients
    # are rounded to bf16, so the weights leave the fp32 run's (CPU arithmetic is otherwise
    # the same run to run); and it is refused where there are no ranks
    bf16 = _cli("retrain", tmp_path / "t.safetensors", "--nproc", "2", "--reduce-bf16",
                "--device", "cpu", "--out", tmp_path / "b.safetensors", "--json")
    assert bf16.returncode == 0, bf16.stderr[-2000:]
    assert json.loads(bf16.stdout)["test_accuracy"] > 80
    fp32, rounded = (load_ticket(tmp_path / f).state for f in ("r.safetensors", "b.safetensors"))
    assert any(not torch.equal(fp32[k], rounded[k]) for k in fp32)
    alone = _cli("retrain", tmp_path / "t.safetensors", "--reduce-bf16", "--device", "cpu",
                 "--out", tmp_path / "y.safetensors")
    assert alone.returncode == 2 and "give --nproc 2 or more" in alone.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_hosts_on_one_machine(tmp_path):
    """`--nnodes 2 --rdzv-endpoint`: the same command started on two "hosts" (here two
    launchers on one machine, each with its own folders, as two machines would have) forms
    one world of two ranks over gloo. Which host gets rank 0 is the rendezvous' choice: that
    one writes the ticket and prints the result, the other only trains."""
    endpoint = f"127.0.0.1:{_free_port()}"
    fixed = ("--rounds", "1", "--rate", "0.5", "--nproc", "1", "--nnodes", "2",
             "--rdzv-endpoint", endpoint)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    hosts = []
    for h in ("a", "b"):
        (tmp_path / h).mkdir()
        hosts.append(subprocess.Popen(
            [sys.executable, "-m", "ticketctl", *FIND, *fixed, "--out",
             str(tmp_path / h / "t.safetensors"), "--run-dir", str(tmp_path / h / "run")],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=HANG_GUARD_S) for p in hosts]
    assert [p.returncode for p in hosts] == [0, 0], [o[1][-1500:] for o in outs]
    written = [h for h in ("a", "b") if (tmp_path / h / "t.safetensors").exists()]
    assert len(written) == 1  # rank 0's host alone
    printed = [json.loads(o[0]) for o in outs if o[0].strip()]
    assert len(printed) == 1
    assert printed[0]["distributed"]["world_size"] == 2
    assert printed[0]["distributed"]["backend"] == "gloo"
    assert printed[0]["distributed"]["mask_checks"] == 1
    assert load_ticket(tmp_path / written[0] / "t.safetensors").mask.num_kept > 0


def _digits_net(seed=0):
    """No BatchNorm: the global batch's gradient is then the mean of the ranks' gradients.
    And a layer its forward never uses (an auxiliary head, say): no gradient ever reaches it."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(4 * 8 * 8, 10))
            self.unused = nn.Linear(2, 2)

        def forward(self, x):
            return self.seq(x)

    torch.manual_seed(seed)
    return Net()


def _digits_train(ctx, bucket_mb=0.0):
    from ticketctl.data import load_dataset
    from ticketctl.train import TrainConfig, Trainer

    # 1,437 training images; a validation split of 7 cannot be halved evenly between 2 ranks
    data = load_dataset("digits", val_size=7)
    # each rank starts from its own weights: the trainer must start them all from rank 0's
    net = _digits_net(seed=ctx.rank if ctx is not None else 0)
    trainer = Trainer(net, data, TrainConfig(epochs=2, batch_size=16, lr=0.05, seed=3,
                                             bucket_mb=bucket_mb), dist=ctx)
    result = trainer.fit()
    units = trainer.units
    return trainer.model_state(), [(h.val_accuracy, h.test_accuracy) for h in result.history], \
        units, len(trainer.reducer.buckets) if trainer.reducer else 0


def _compile_units_on_cpu():
    """The trainer compiling on the CPU, through AOTAutograd (`aot_eager`: its graphs run as
    traced), so a compiled unit has a backward function of its own, as on a GPU."""
    import torch

    from ticketctl.train import engine

    engine.COMPILE_ON_CPU = True
    engine._compile = lambda fn, cfg: torch.compile(fn, backend="aot_eager", dynamic=False)


def _digits_worker(rank, port, out, bucket_mb=0.0, units=False):
    import torch

    from ticketctl.distributed import DistContext

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    if units:
        _compile_units_on_cpu()
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        state, history, names, buckets = _digits_train(DistContext(rank, 2, rank), bucket_mb)
        torch.save({"state": state, "history": history, "units": names, "buckets": buckets},
                   Path(out) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


# bucket_mb: the default, one all-reduce after backward (0); one bucket (the network is
# 41 kB); a bucket per parameter or two (1 kB), with the network compiled unit by unit
@pytest.mark.parametrize("bucket_mb,units", [(0.0, False), (8.0, False), (2**-10, True)])
def test_two_ranks_average_gradients_and_share_evaluation_like_one_process(
        tmp_path, float64, bucket_mb, units):
    """The step's own all-reduce (no DDP wrapper) and each rank scoring its share of the
    evaluation images: two ranks end with one process's weights and accuracies, whether the
    gradients go in one all-reduce after backward or in buckets during it."""
    import torch

    port = _free_port()
    mp.spawn(_digits_worker, args=(port, str(tmp_path), bucket_mb, units), nprocs=2,
             join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1)]
    # what the trainer made of the setting: buckets and, compiled, the layers as units (the
    # unused one too: compiled, never called). In float64 the unused layer's bias and weight
    # are 16 + 32 bytes, the linear layer's 80 + 20,480, the conv's 32 + 288: 1 KiB buckets,
    # filled from the end, are the unused and the linear layer's four, then the conv's two
    assert ranks[0]["buckets"] == {8.0: 1, 0.0: 0, 2**-10: 2}[bucket_mb]
    assert ranks[0]["units"] == (["seq.0", "seq.3", "unused"] if units else [])
    # the unused layer kept rank 0's initial weights (no gradient, no weight decay)
    assert torch.equal(ranks[1]["state"]["unused.weight"], _digits_net(0).unused.weight)
    one_state, one_history, _, _ = _digits_train(None)
    if bucket_mb:  # buckets during backward: bitwise the weights of one all-reduce after it
        flat = tmp_path / "flat"
        flat.mkdir()
        mp.spawn(_digits_worker, args=(_free_port(), str(flat), 0.0, False), nprocs=2,
                 join=True)
        after = torch.load(flat / "0.pt", weights_only=True)["state"]
        assert all(torch.equal(ranks[0]["state"][k], v) for k, v in after.items())
    assert all(torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]) for k in one_state)
    # 2 epochs of 89 steps: float64 sums of 8 + 8 instead of 16 terms round at about 1e-16
    # relative per step; SGD at lr 0.05 over 178 steps stays many orders below 1e-9
    for k, v in one_state.items():
        assert torch.allclose(ranks[0]["state"][k], v, rtol=0, atol=1e-9), k
    # accuracies are counts over whole splits: the ranks' shares (3 + 4 validation images,
    # half the test set each) add up to exactly one process's numbers
    assert ranks[0]["history"] == ranks[1]["history"] == one_history
    assert all(0 < t <= 100 for _, t in one_history)


def test_shutdown_releases_captured_graphs_before_destroying_the_group():
    """A CUDA graph holding NCCL collectives must be gone before the process group is
    destroyed (pytorch#115388: it can hang otherwise); shutdown() releases every registered
    owner first, while the group still exists, and forgets them."""
    from ticketctl.distributed import release_before_shutdown, shutdown

    seen = []

    class Owner:
        def release_graph(self, sync=True):
            seen.append(dist.is_initialized())

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    owner = Owner()
    release_before_shutdown(owner)
    shutdown()
    assert seen == [True]  # released once, before the group was destroyed
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    shutdown()
    assert seen == [True]  # not released twice


def _alive(pid: int) -> bool:
    """Running (a zombie has exited: only its parent has yet to collect it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_stop_kills_a_rank_that_left_the_launchers_tree():
    """A rank torchrun started just as the launch was stopped is no longer below the launch
    (torchrun's ranks run in their own sessions, and an orphan goes to init); it held a CI
    run's pipes open for good. It still carries the launch's mark, and the stop kills it."""
    import time
    import uuid

    from ticketctl.distributed import LAUNCH_MARK, _stop_tree, marked

    mark = uuid.uuid4().hex
    # the orphan outlives the test's wait below: only the stop can end it in time
    spawn = ("import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', "
             f"'import time; time.sleep({2 * HANG_GUARD_S})'], start_new_session=True, "
             "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)")
    orphan = int(subprocess.run([sys.executable, "-c", spawn], capture_output=True, text=True,
                                check=True, env={**os.environ, LAUNCH_MARK: mark},
                                timeout=HANG_GUARD_S).stdout)
    try:
        assert marked(mark) == [orphan] and _alive(orphan)
        launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        _stop_tree(launcher, mark)
        deadline = time.monotonic() + HANG_GUARD_S  # SIGKILL is delivered, not awaited
        while _alive(orphan) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(orphan) and launcher.returncode is not None
    finally:
        if _alive(orphan):
            os.kill(orphan, 9)


@pytest.mark.slow
def test_sigterm_to_the_command_stops_its_ranks(tmp_path):
    """The ranks run in their own session; a SIGTERM to the command the user started (from
    `timeout`, a scheduler, `kill`) stops them before it exits 143, leaving nothing on the
    devices."""
    import signal
    import time

    from ticketctl.distributed import _descendants

    cmd = [sys.executable, "-m", "ticketctl", *FIND, "--nproc", "2", "--epochs", "500",
           "--out", str(tmp_path / "t.safetensors"), "--run-dir", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + HANG_GUARD_S
    ranks: list[int] = []
    while time.monotonic() < deadline:  # torchrun and its two ranks are running
        ranks = _descendants(proc.pid)
        if len(ranks) >= 3 or proc.poll() is not None:
            break
        time.sleep(0.2)
    assert proc.poll() is None and len(ranks) >= 3, "the ranks never started"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 143
    assert err.strip().splitlines()[-1] == "error: stopped by SIGTERM; every rank was stopped"

    assert not [pid for pid in ranks if _alive(pid)]


@pytest.mark.slow
def test_an_error_every_rank_meets_is_reported_once(tmp_path):
    """Every rank refuses the same bad input (here, resuming with other settings): the user
    gets it once, as one process would say it (rank 0's words, the user's own run folder,
    exit 2), and with --json exactly one document on stdout, not one per rank."""
    run_dir = tmp_path / "run"
    first = _cli(*FIND, "--nproc", "2", "--out", tmp_path / "t.safetensors", "--run-dir",
                 run_dir)
    assert first.returncode == 0, first.stderr[-2000:]
    again = _cli(*FIND[:-2], "--nproc", "2", "--max-rounds", "3", "--resume", "--json",
                 "--out", tmp_path / "t.safetensors", "--force", "--run-dir", run_dir)
    assert again.returncode == 2
    doc = json.loads(again.stdout)  # one document: json.loads refuses a second one
    assert doc["exit_code"] == 2 and doc["error"] == "bad input"
    assert doc["message"].startswith(f"cannot resume {run_dir}:")
    last = again.stderr.strip().splitlines()[-1]
    assert last == f"error: {doc['message']}"
    assert sum(line.startswith("error:") for line in again.stderr.splitlines()) == 1


def test_the_reported_rank_error_is_the_cause(tmp_path):
    """Of the errors the ranks wrote: not a rank that lost its peer (unless nothing else was
    written); rank 0's when it came within the grace the other ranks wait (the same bad
    input, in the user's words); otherwise the first written; with its code and kind."""
    from ticketctl.cli.common import LOST_PEER, RANK_ERROR_GRACE_S, rank_error

    def write(folder, rank, t, message, code=2, kind=None):
        folder.mkdir(exist_ok=True)
        (folder / f"rank{rank}.json").write_text(json.dumps(
            {"time": t, "message": message, "code": code, "kind": kind}))

    a = tmp_path / "a"  # rank 1 failed; rank 0 then lost it, and wrote first
    write(a, 1, 10.5, "boom", kind="unexpected")
    write(a, 0, 10.0, "Connection closed by peer", kind=LOST_PEER)
    assert rank_error(a) == (1, "boom", 2, "unexpected")
    b = tmp_path / "b"  # every rank refused the same input
    write(b, 1, 10.0, "cannot resume /tmp/scratch/run")
    write(b, 0, 10.0 + RANK_ERROR_GRACE_S / 2, "cannot resume /home/u/run")
    assert rank_error(b) == (0, "cannot resume /home/u/run", 2, None)
    c = tmp_path / "c"  # rank 0 failed later, on its own: the first is the cause
    write(c, 1, 10.0, "first", code=1, kind="check failed")
    write(c, 0, 10.0 + 2 * RANK_ERROR_GRACE_S, "later")
    assert rank_error(c) == (1, "first", 1, "check failed")
    d = tmp_path / "d"  # nothing but a lost peer: still reported
    write(d, 0, 10.0, "Connection closed by peer", kind=LOST_PEER)
    assert rank_error(d) == (0, "Connection closed by peer", 2, LOST_PEER)
    (tmp_path / "e").mkdir()
    assert rank_error(tmp_path / "e") is None


def test_a_lost_peer_is_told_from_a_cause():
    from ticketctl.cli.options import lost_peer

    gloo = ("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer "
            "[127.0.0.1]:29500")
    assert lost_peer(RuntimeError(gloo))
    assert not lost_peer(RuntimeError("TICKETCTL_FAIL_RANK: rank 1 fails on purpose"))
    assert not lost_peer(ValueError("cannot resume"))


def _grads(rank):
    import torch

    g = torch.Generator().manual_seed(10 + rank)
    # also the layouts a GPU step has: a channels_last convolution's (flattened in memory
    # order, not copied) and a transposed one (not in logical order either)
    return [torch.randn(1000, generator=g), torch.randn(7, 3, generator=g),
            torch.randn(4, 3, 3, 2, generator=g).to(memory_format=torch.channels_last),
            torch.randn(5, 6, generator=g).t()]


def _average_worker(rank, port, out):
    import torch

    from ticketctl.distributed import average_grads_, averaged_grads

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        got = {}
        for wire in (None, torch.bfloat16):
            grads = _grads(rank)
            average_grads_(DistContext(rank, 2, rank), grads, wire)
            got[str(wire)] = grads
            # what the step's update reads: views of the flat buffer, nothing copied back
            grads = _grads(rank)
            means = averaged_grads(DistContext(rank, 2, rank), grads, wire)
            got[f"views {wire}"] = [m.clone() for m in means]
            got[f"strides {wire}"] = [torch.tensor([m.stride() == g.stride() for m, g in
                                                    zip(means, grads, strict=True)])]
            got[f"untouched {wire}"] = [torch.tensor([torch.equal(g, h) for g, h in
                                                      zip(grads, _grads(rank), strict=True)])]
        torch.save(got, Path(out) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gradients_are_averaged_in_fp32_exactly_and_in_bf16_within_its_rounding(tmp_path):
    """`--reduce-bf16` sends half the bytes; what it costs is bf16's rounding, bounded."""
    import torch

    port = _free_port()
    mp.spawn(_average_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1)]
    exact = [(a + b) / 2 for a, b in zip(_grads(0), _grads(1), strict=True)]
    for wire in ("None", "torch.bfloat16"):
        for a, b in zip(ranks[0][wire], ranks[1][wire], strict=True):
            assert torch.equal(a, b) and a.dtype == torch.float32  # every rank the same
        # the means as views: the same numbers, each with its gradient's strides (a
        # channels_last and a transposed one among them), the gradients left as they were
        for a, b in zip(ranks[0][f"views {wire}"], ranks[0][wire], strict=True):
            assert torch.equal(a, b)
        assert ranks[0][f"strides {wire}"][0].all() and ranks[0][f"untouched {wire}"][0].all()
        # averaged in place: each gradient keeps its layout
        assert ranks[0][wire][2].is_contiguous(memory_format=torch.channels_last)
        assert ranks[0][wire][3].stride() == (1, 6)  # the transpose of a 5 x 6
    # fp32: one IEEE sum of two terms and a halving, as here: equal, not merely close
    assert all(torch.equal(g, e) for g, e in zip(ranks[0]["None"], exact, strict=True))
    # bf16 (8 significant bits, unit roundoff u = 2**-8): each gradient rounded (u |g_r|),
    # their sum rounded (u |r_0 + r_1|), halving exact, so the mean is off by at most
    # (u (|g_0| + |g_1|) + u (1 + u) (|g_0| + |g_1|)) / 2 <= u (1 + u) (|g_0| + |g_1|)
    u = 2.0 ** -8
    for g, e, a, b in zip(ranks[0]["torch.bfloat16"], exact, _grads(0), _grads(1), strict=True):
        assert ((g - e).abs() <= u * (1 + u) * (a.abs() + b.abs())).all()
        assert not torch.equal(g, e)  # rounded: the option took effect


def test_memory_order_flattens_dense_layouts_without_a_copy():
    """A channels_last gradient (1x1 kernels too, whose strides tie) and a transposed one
    come back as contiguous views of the same memory; one with gaps comes back as it is."""
    import torch

    from ticketctl.distributed import memory_order

    for t in (torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last),
              torch.randn(8, 4, 1, 1).to(memory_format=torch.channels_last),
              torch.randn(5, 6).t(), torch.randn(3, 4), torch.tensor(2.0)):
        v = memory_order(t)
        assert v.is_contiguous() and v.data_ptr() == t.data_ptr() and v.numel() == t.numel()
        assert sorted(v.shape) == sorted(t.shape)
    # channels_last is N, H, W, C in memory: the permutation that makes it contiguous
    cl = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)
    assert memory_order(cl).shape == (8, 3, 3, 4)
    gaps = torch.randn(5, 6)[:, ::2]
    assert memory_order(gaps) is gaps
