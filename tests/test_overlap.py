"""Data-parallel gradients averaged in buckets during backward: which pieces of a network
are compiled apart (`overlap_units`), how parameters fall into buckets, and that a bucket's
all-reduce starts before backward is over only when the network is compiled in pieces."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ticketctl import distributed
from ticketctl.distributed import BucketReducer, DistContext, plan_buckets
from ticketctl.train.overlap import compile_units, overlap_units


def test_buckets_cover_every_parameter_once_from_the_last():
    # float32: 40, 1200, 20, 20, 800 and 4 bytes
    params = [torch.zeros(n) for n in (10, 300, 5, 5, 200, 1)]
    assert plan_buckets(params, 100) == [[5, 4], [3, 2, 1], [0]]
    assert plan_buckets(params, 1) == [[5], [4], [3], [2], [1], [0]]
    assert plan_buckets(params, 10**9) == [[5, 4, 3, 2, 1, 0]]
    assert plan_buckets([], 100) == []


class _Block(nn.Module):
    """Not a container: its forward does more than call its children, so it stays whole."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(torch.relu(self.a(x)))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.act = nn.ReLU()  # no parameters: never a unit
        self.body = nn.Sequential(_Block(16), _Block(16), _Block(16))
        self.heads = nn.ModuleList([nn.Linear(16, 4), nn.Linear(16, 2)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.body(self.act(self.stem(x)))
        return [head(h) for head in self.heads]


class _Wrapper(nn.Module):
    """Every parameter in one child: split as the child would be."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _Net()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net(x)


def test_units_split_containers_above_the_bucket_size_and_keep_other_modules_whole():
    body = sum(p.numel() * 4 for p in _Net().body.parameters())  # 3 blocks of 2 x 272 floats
    small = [n for n, _ in overlap_units(_Wrapper(), body - 1)]
    assert small == ["net.stem", "net.body.0", "net.body.1", "net.body.2", "net.heads.0",
                     "net.heads.1"]
    # the body fits in a bucket: one unit; a ModuleList is never called, so it is always
    # split into what its parent calls
    assert [n for n, _ in overlap_units(_Wrapper(), body)] == \
        ["net.stem", "net.body", "net.heads.0", "net.heads.1"]
    # a block beside others is never split, however large
    assert [n for n, _ in overlap_units(nn.Sequential(_Block(16), nn.Linear(16, 4)), 0)] == \
        ["0", "1"]
    # the root is always split, and so is the one child of a module that is only its
    # wrapper (else the whole network would be one unit)
    assert [n for n, _ in overlap_units(_Block(16), 0)] == ["a", "b"]
    assert [n for n, _ in overlap_units(nn.Sequential(_Block(16)), 0)] == ["0.a", "0.b"]
    assert overlap_units(nn.ReLU(), 0) == []  # nothing to train


def test_compiled_units_keep_the_module_and_its_state_and_are_compiled_once():
    net = _Net()
    keys = list(net.state_dict())
    calls = []

    def compile_(fn):
        calls.append(fn.__code__.co_name)
        return fn

    units = overlap_units(net, 0)
    compile_units(units, compile_)
    compile_units(units, compile_)  # a second trainer of the same network: left as it is
    # each unit its own code object (Dynamo's cache is per code object)
    assert calls == ["unit0_stem", "unit1_body_0", "unit2_body_1", "unit3_body_2",
                     "unit4_heads_0", "unit5_heads_1"]
    assert list(net.state_dict()) == keys
    x = torch.randn(3, 8)
    torch.manual_seed(0)
    ref = _Net()
    ref.load_state_dict(net.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(net(x), ref(x), strict=True))


def _compiled_backwards(root) -> list:
    """The compiled functions' backward nodes in the autograd graph below `root`."""
    out, todo, seen = [], [root], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "CompiledFunction" in node.name():
            out.append(node)
        todo.extend(n for n, _ in node.next_functions)
    return out


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize("units", [True, False])
def test_buckets_start_during_backward_only_when_compiled_in_units(units):
    """Compiled whole, a network has one backward function and every bucket starts after
    it; compiled in units (here through AOTAutograd, `aot_eager`, as Inductor compiles on a
    GPU), each unit's backward starts after the buckets of the layers behind it started.
    The gradients are those of plain autograd either way (one rank: the mean is the sum)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model, ref = _mlp(), _mlp()
        x = torch.randn(16, 8)
        ref(x).square().mean().backward()
        # a bucket per parameter: 8 buckets, 2 for each linear layer
        reducer = BucketReducer(DistContext(0, 1, 0), list(model.parameters()), 1)

        def compile_(fn):
            return torch.compile(fn, backend="aot_eager", dynamic=False)

        if units:
            compile_units(overlap_units(model, 0), compile_)
            forward = model
        else:
            forward = compile_(model)
        for step in range(2):  # the second step runs what the first compiled
            for p in model.parameters():
                p.grad = None
            loss = forward(x).square().mean()
            began = []  # buckets started when each compiled backward began, in the order run
            for node in _compiled_backwards(loss.grad_fn):
                node.register_prehook(lambda grads, began=began: began.append(reducer.launched))
            reducer.arm()
            loss.backward()
            reducer.finish()
            assert reducer.launched == 8
            assert began == ([0, 2, 4, 6] if units else [0]), (step, began)
            for p, q in zip(model.parameters(), ref.parameters(), strict=True):
                # AOTAutograd's traced graphs run the same operators as eager autograd, on
                # the same numbers: the same bits
                assert torch.equal(p.grad, q.grad)
        reducer.close()
        assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wire", [None, torch.bfloat16])
def test_every_bucket_is_averaged_once_in_order_with_the_chosen_wire(monkeypatch, wire):
    """Buckets go to the all-reduce in their order, each once, in the wire dtype the settings
    give; a parameter that got no gradient (unused this step) holds its bucket back until
    backward is over, and the buckets after it wait their turn (every rank must issue the
    collectives in one order)."""
    seen = []
    monkeypatch.setattr(distributed, "average_grads_",
                        lambda ctx, grads, w: seen.append(([g.shape for g in grads], w)))
    model = _mlp()
    unused = nn.Linear(3, 3)  # registered after the network: the first bucket
    params = list(model.parameters()) + list(unused.parameters())
    reducer = BucketReducer(DistContext(0, 2, 0), params, 1, wire)
    reducer.arm()
    model(torch.randn(4, 8)).sum().backward()
    assert seen == []  # the unused layer's buckets come first and never filled
    reducer.finish()
    shapes = [s for s, _ in seen]
    # its two buckets have no gradients: nothing to send; then the network's, last first
    assert shapes == [[p.shape] for p in reversed(list(model.parameters()))]
    assert all(w == wire for _, w in seen)
