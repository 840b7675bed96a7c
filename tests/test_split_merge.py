"""Scheme V1: scores, split and merge, and their integrity checks."""

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, make_ticket, run, write_raw

from ticketctl.artifacts import Mask, Ticket, load_ticket, save_ticket
from ticketctl.errors import CheckFailed, TicketctlError
from ticketctl.models import build_model, prunable_names
from ticketctl.models.topology import Link, Topology
from ticketctl.protect import compute_scores, merge_parts, split_ticket
from ticketctl.protect.channel_graph import ChannelGraph, build_channel_graph
from ticketctl.protect.scores import UNSEEN, edge_betweenness, ewp_edge_ranks
from ticketctl.prune import magnitude_prune

SCORES = ["omp", "ewp", "betweenness", "random"]


def resnet20_ticket(density_rate=0.8, seed=0):
    model = build_model("resnet20", seed=seed)
    mask = magnitude_prune(dict(model.named_parameters()),
                           Mask.ones(model, prunable_names(model)), density_rate)
    return Ticket.from_model(model, mask, arch="resnet20", rewind_epoch=3, seed=seed)


def hand_graph(edges, sizes):
    """A ChannelGraph from (src_node, dst_node, strength) with global node ids."""
    names = list(sizes)
    base, n = {}, 0
    for k in names:
        base[k] = n
        n += sizes[k]
    src, dst, strength = (np.array([e[i] for e in edges]) for i in range(3))
    m = len(edges)
    return ChannelGraph(Topology(sizes, [Link(names[0], names[-1])], names[0], names[-1]), base,
                        n, src.astype(np.int64), dst.astype(np.int64),
                        strength.astype(np.float64), np.zeros(m, dtype=np.int64),
                        np.zeros(m, dtype=np.int64), np.zeros(m, dtype=np.int64), ["w"])


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("which", ["digits", "resnet20"])
def test_split_is_a_partition_with_exactly_n_key_weights(score, which):
    ticket = make_ticket(seed=1) if which == "digits" else resnet20_ticket()
    ratio = 0.1
    key, locked = split_ticket(ticket, score, ratio, seed=3,
                               **({"pivots": 64} if score == "betweenness" and
                                  which == "resnet20" else {}))
    n = round(ratio * ticket.mask.num_kept)
    assert key.mask.num_kept == n
    for name in ticket.mask:
        assert not bool((key.mask[name] & locked.mask[name]).any()), name
        assert torch.equal(key.mask[name] | locked.mask[name], ticket.mask[name]), name
    assert key.kind == "key" and locked.kind == "locked"
    for part in (key, locked):
        assert part.extra["parent_sha256"] == ticket.tensors_sha256()
        assert part.extra["score"] == score and part.extra["key_ratio"] == ratio
        assert part.extra["seed"] == 3


@pytest.mark.parametrize("score", SCORES)
def test_scores_are_deterministic_for_a_seed(score):
    ticket = make_ticket(seed=2)
    a = compute_scores(ticket, score, seed=5)
    b = compute_scores(ticket, score, seed=5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    if score in ("random", "ewp"):
        c = compute_scores(ticket, score, seed=6)
        assert any(not torch.equal(a[k], c[k]) for k in a)


def test_omp_key_takes_the_largest_weights():
    ticket = make_ticket(seed=4)
    key, locked = split_ticket(ticket, "omp", 0.2)
    in_key = torch.cat([ticket.state[k][key.mask[k]].abs() for k in key.mask])
    in_locked = torch.cat([ticket.state[k][locked.mask[k]].abs() for k in key.mask])
    assert in_key.min() >= in_locked.max()


def test_betweenness_prefers_the_bridge_edge():
    # input(2) -> A(3) fully connected; A -> B(3) only through A2 -> B0 (the bridge) plus
    # edges inside each side; B -> output(1). Every input-output path crosses the bridge.
    sizes = {"input": 2, "A": 3, "B": 3, "output": 1}
    i, a, b, o = 0, 2, 5, 8
    edges = [(i + s, a + t, 1.0) for s in range(2) for t in range(3)]
    edges += [(a + 0, a + 2, 1.0), (a + 1, a + 2, 1.0)]  # within A, towards the bridge
    edges += [(a + 2, b + 0, 1.0)]  # the bridge
    edges += [(b + 0, b + 1, 1.0), (b + 0, b + 2, 1.0)]
    edges += [(b + t, o, 1.0) for t in range(3)]
    graph = hand_graph(edges, sizes)
    central = edge_betweenness(graph)
    bridge = edges.index((a + 2, b + 0, 1.0))
    assert int(np.argmax(central)) == bridge
    assert central[bridge] > sorted(central)[-2]


def test_betweenness_treats_strong_kernels_as_close():
    # two parallel routes input -> {A0 | A1} -> output; the strong one carries the shortest
    # paths, so its edges are more central (the authors' unweighted version ties them)
    sizes = {"input": 1, "A": 2, "output": 1}
    edges = [(0, 1, 10.0), (1, 3, 10.0), (0, 2, 0.1), (2, 3, 0.1)]
    central = edge_betweenness(hand_graph(edges, sizes))
    assert central[0] > central[2] and central[1] > central[3]


def test_ewp_starts_from_every_input_channel_including_the_last():
    # each of 3 input channels has its own single edge to the output
    sizes = {"input": 3, "output": 1}
    edges = [(0, 3, 1.0), (1, 3, 1.0), (2, 3, 1.0)]
    rank = ewp_edge_ranks(hand_graph(edges, sizes), walks=200, seed=0)
    assert np.isfinite(rank).all()


def test_ewp_follows_strength_and_drops_dead_ends():
    # input -> A0 (strong, dead end) or A1 (weak) -> output
    sizes = {"input": 1, "A": 2, "output": 1}
    edges = [(0, 1, 100.0), (0, 2, 1.0), (2, 3, 1.0)]
    rank = ewp_edge_ranks(hand_graph(edges, sizes), walks=500, seed=1)
    assert np.isinf(rank[0])  # walks into the dead end never count
    assert np.isfinite(rank[1]) and np.isfinite(rank[2]) and rank[1] < rank[2]


def test_ewp_never_picks_a_pruned_kernel():
    ticket = make_ticket(seed=5, density_rate=0.9)
    scores = compute_scores(ticket, "ewp", seed=0, walks=2000)
    for name in ticket.mask:
        kernel_kept = ticket.mask[name].reshape(*ticket.mask[name].shape[:2], -1).any(-1)
        ranked = scores[name].reshape(*scores[name].shape[:2], -1)[..., 0] > UNSEEN
        assert not bool((ranked & ~kernel_kept).any()), name
    graph = build_channel_graph(ticket)
    assert (graph.strength > 0).all()


def test_channel_graph_of_resnet20_has_shortcuts():
    graph = build_channel_graph(resnet20_ticket())
    passes = graph.param_id == -1
    # option A at stage changes: channel c of the 16-channel input lands on channel c + 8
    stage2 = graph.node_range("layer2.0.add")
    to_stage2 = passes & np.isin(graph.dst, list(stage2))
    assert sorted(graph.out_ch[to_stage2].tolist()) == list(range(8, 24))


def test_merge_is_bit_identical(tmp_path):
    ticket = make_ticket(seed=6)
    path = save_ticket(ticket, tmp_path / "t.safetensors")
    key, locked = split_ticket(load_ticket(path), "betweenness", 0.15)
    save_ticket(key, tmp_path / "k.safetensors")
    save_ticket(locked, tmp_path / "l.safetensors")
    result = run("merge", tmp_path / "l.safetensors", tmp_path / "k.safetensors", "--out",
                 tmp_path / "m.safetensors", "--json")
    assert result.exit_code == 0, result.stderr
    assert '"identical": true' in result.stdout
    merged = load_ticket(tmp_path / "m.safetensors")
    for k, v in ticket.state.items():
        assert torch.equal(v.view(torch.int32) if v.is_floating_point() else v,
                           merged.state[k].view(torch.int32) if v.is_floating_point()
                           else merged.state[k]), k
    assert merged.mask == ticket.mask
    assert merged.metadata() == ticket.metadata()
    assert (tmp_path / "m.safetensors").read_bytes() == path.read_bytes()


def test_key_from_another_ticket_fails_with_exit_1(tmp_path):
    _, locked = split_ticket(make_ticket(seed=7), "omp", 0.1)
    other_key, _ = split_ticket(make_ticket(seed=8), "omp", 0.1)
    save_ticket(locked, tmp_path / "l.safetensors")
    save_ticket(other_key, tmp_path / "k.safetensors")
    with pytest.raises(CheckFailed, match="another ticket"):
        merge_parts(locked, other_key)
    result = run("merge", tmp_path / "l.safetensors", tmp_path / "k.safetensors", "--out",
                 tmp_path / "m.safetensors")
    assert_one_line_error(result, 1, "another ticket")
    assert not (tmp_path / "m.safetensors").exists()


def test_tampered_parts_fail_with_exit_1(tmp_path):
    key, locked = split_ticket(make_ticket(seed=9), "random", 0.1)
    # a key whose weights were changed and whose file hashes were recomputed to match
    tensors = key.tensors()
    name = next(iter(key.mask))
    w = tensors[name].clone()
    w[key.mask[name]] *= 1.5
    tensors[name] = w
    forged = Ticket(state={k: v for k, v in tensors.items() if not k.endswith(".mask")},
                    mask=key.mask, kind="key", arch=key.arch, arch_args=key.arch_args,
                    num_classes=key.num_classes, extra=key.extra)
    save_ticket(forged, tmp_path / "k.safetensors")
    save_ticket(locked, tmp_path / "l.safetensors")
    result = run("merge", tmp_path / "l.safetensors", tmp_path / "k.safetensors", "--out",
                 tmp_path / "m.safetensors")
    assert_one_line_error(result, 1, "does not match the recorded ticket hash")
    # a key edited in place without its hashes: the file check fails first
    meta = key.metadata()
    raw = key.tensors()
    raw[name] = w
    write_raw(tmp_path / "k2.safetensors", raw, meta)
    result = run("merge", tmp_path / "l.safetensors", tmp_path / "k2.safetensors", "--out",
                 tmp_path / "m.safetensors")
    assert_one_line_error(result, 1, "altered after it was written")


def test_bad_split_and_merge_input_is_exit_2(tmp_path):
    ticket = make_ticket(seed=10)
    t = save_ticket(ticket, tmp_path / "t.safetensors")
    out = ["--key-mask", tmp_path / "k.safetensors", "--locked", tmp_path / "l.safetensors"]
    for ratio, msg in (("0", "(0, 1)"), ("1.5", "(0, 1)"), ("-0.1", "(0, 1)"),
                       ("0.99999", "whole ticket"), ("0.00001", "empty key")):
        result = run("split", t, "--score", "omp", "--key-ratio", ratio, *out)
        assert_one_line_error(result, 2, msg)
    assert_one_line_error(run("split", t, "--score", "magic", "--key-ratio", "0.1", *out), 2,
                          "'magic' is not one of 'omp', 'ewp', 'betweenness', 'random'")
    dense = Ticket(state=ticket.state, mask=Mask({}), arch="digits_cnn",
                   arch_args={"width": 8})
    d = save_ticket(dense, tmp_path / "dense.safetensors")
    assert_one_line_error(run("split", d, "--score", "omp", "--key-ratio", "0.1", *out), 2,
                          "no mask")
    key, locked = split_ticket(ticket, "omp", 0.1)
    k = save_ticket(key, tmp_path / "k.safetensors")
    lk = save_ticket(locked, tmp_path / "l.safetensors")
    assert_one_line_error(run("merge", k, k, "--out", tmp_path / "m.st"), 2, "key and key")
    assert_one_line_error(run("merge", lk, lk, "--out", tmp_path / "m.st"), 2,
                          "locked and locked")
    assert_one_line_error(run("merge", k, lk, "--out", tmp_path / "m.st"), 2, "wrong order")
    wide = make_ticket(seed=10, width=16)
    wide_key, _ = split_ticket(wide, "omp", 0.1)
    wk = save_ticket(wide_key, tmp_path / "wk.safetensors")
    assert_one_line_error(run("merge", lk, wk, "--out", tmp_path / "m.st"), 2,
                          "same shapes")


def test_split_refuses_to_overwrite(tmp_path):
    t = save_ticket(make_ticket(seed=11), tmp_path / "t.safetensors")
    (tmp_path / "k.safetensors").write_bytes(b"keep")
    result = run("split", t, "--score", "omp", "--key-ratio", "0.1", "--key-mask",
                 tmp_path / "k.safetensors", "--locked", tmp_path / "l.safetensors")
    assert_one_line_error(result, 2, "--force")
    assert (tmp_path / "k.safetensors").read_bytes() == b"keep"
    assert not (tmp_path / "l.safetensors").exists()


def test_locked_part_loads_and_its_split_json(tmp_path):
    t = save_ticket(make_ticket(seed=12), tmp_path / "t.safetensors")
    result = run("split", t, "--score", "ewp", "--key-ratio", "0.05", "--key-mask",
                 tmp_path / "k.safetensors", "--locked", tmp_path / "l.safetensors", "--json",
                 "--walks", "500")
    assert result.exit_code == 0, result.stderr
    import json
    doc = json.loads(result.stdout)
    for key in ("key_ratio", "key_weights", "locked_weights", "key", "locked"):
        assert key in doc
    locked = load_ticket(tmp_path / "l.safetensors")
    model = locked.build_model().eval()
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(TicketctlError):
        split_ticket(locked, "omp", 0.1)  # a locked part is not split again


def test_top_kept_equals_a_full_lexicographic_sort_with_ties():
    from ticketctl.protect.scores import top_kept

    ticket = make_ticket(seed=13)
    gen = torch.Generator().manual_seed(0)
    # coarse scores: many ties, broken by |w| and then position
    scores = {k: torch.randint(0, 4, v.shape, generator=gen).double()
              for k, v in ticket.mask.items()}
    n = 777
    got = top_kept(ticket, scores, n)
    names = list(ticket.mask)
    keep = torch.cat([ticket.mask[k].reshape(-1) for k in names]).numpy()
    prim = torch.cat([scores[k].reshape(-1) for k in names]).numpy()
    mag = torch.cat([ticket.state[k].abs().reshape(-1).double() for k in names]).numpy()
    idx = np.flatnonzero(keep)
    want = set(idx[np.lexsort((idx, -mag[idx], -prim[idx]))[:n]].tolist())
    flat = torch.cat([got[k].reshape(-1) for k in names]).numpy()
    assert set(np.flatnonzero(flat).tolist()) == want


@pytest.mark.parametrize("pivots", [None, 200])
def test_betweenness_reports_its_progress_and_the_same_scores(pivots):
    """Exact betweenness on a large network takes minutes to most of an hour on a CPU: it
    reports its work from none to all of it, the costly low-level sources first weighing
    more, and reporting changes nothing."""
    graph = build_channel_graph(resnet20_ticket())
    seen = []
    with_progress = edge_betweenness(graph, pivots, seed=3,
                                     on_progress=lambda d, t: seen.append((d, t)))
    total = seen[0][1]
    assert seen[0] == (0, total) and seen[-1] == (total, total) and total > 0
    assert all(t == total for _, t in seen)
    done = [d for d, _ in seen]
    assert done == sorted(set(done)) and len(done) >= 3
    steps = np.diff(done)  # blocks of sources, lowest level first: each costs no more
    assert steps[0] > steps[-1]
    assert np.array_equal(with_progress, edge_betweenness(graph, pivots, seed=3))


def test_split_shows_betweenness_progress_unless_json(tmp_path):
    t = save_ticket(resnet20_ticket(), tmp_path / "t.safetensors")
    args = ["split", t, "--score", "betweenness", "--key-ratio", "0.05", "--key-mask",
            tmp_path / "k.safetensors", "--locked", tmp_path / "l.safetensors", "--force"]
    shown = run(*args)
    assert shown.exit_code == 0, shown.stderr
    lines = [ln for ln in shown.stderr.splitlines() if "betweenness (% done)" in ln]
    assert lines and "100/100" in lines[-1] and "0/100" in lines[0]
    assert "--pivots" not in shown.stderr  # ResNet-20 is quick exactly: no hint to sample
    quiet = run(*args, "--json")
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_split_suggests_sampling_when_exact_betweenness_is_large(tmp_path, monkeypatch):
    import ticketctl.cli.split as split_cli

    monkeypatch.setattr(split_cli, "SAMPLE_HINT", 10)  # as if ResNet-20 were ResNet-50
    t = save_ticket(resnet20_ticket(), tmp_path / "t.safetensors")
    args = ["split", t, "--score", "betweenness", "--key-ratio", "0.05", "--key-mask",
            tmp_path / "k.safetensors", "--locked", tmp_path / "l.safetensors", "--force"]
    exact = run(*args)
    assert exact.exit_code == 0 and "--pivots 256 samples" in exact.stderr
    sampled = run(*args, "--pivots", "20")
    assert sampled.exit_code == 0 and "--pivots 256" not in sampled.stderr
    assert "betweenness (% done): 100/100" in sampled.stderr
