"""The channel graph by tracing: the built-ins' traced graphs equal the hand-written ones
(kept here as the reference), networks defined in the tests get the graphs the rules of
ticketctl/models/trace.py state, the path scores run on them (betweenness equal to
networkx's), and what cannot be traced is one error naming the operation."""

import importlib.util
import json
import textwrap
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_one_line_error, make_ticket, run
from torch import nn
from trace_nets import ResCat, Separable, Tiny, hand_chain, hand_resnet, ticket_of

from ticketctl.artifacts import Mask, Ticket, save_ticket
from ticketctl.errors import TicketctlError
from ticketctl.models.registry import skeleton
from ticketctl.models.resnet_cifar import CifarResNet
from ticketctl.models.sources import NetworkInfo, fingerprint
from ticketctl.models.topology import Link, topology
from ticketctl.protect import compute_scores, split_ticket
from ticketctl.protect.channel_graph import build_channel_graph
from ticketctl.protect.scores import UNSEEN, _networkx_betweenness, edge_betweenness

# ---- the hand-written graphs the library had before tracing -------------------------------


@pytest.mark.parametrize("arch", ["resnet20", "resnet18", "resnet50", "vgg16", "digits_cnn"])
def test_traced_graph_equals_the_hand_written_one(arch):
    model = skeleton(arch)
    traced = topology(model)
    hand = hand_resnet(model) if isinstance(model, CifarResNet) else hand_chain(model)
    # in the same order too: the same node ids and edge order, so every score is unchanged
    assert list(traced.sizes.items()) == list(hand.sizes.items())
    assert traced.links == hand.links
    assert (traced.source, traced.sink) == (hand.source, hand.sink)
    # the BatchNorm of each conv, found by dataflow, is the one registered after it
    modules = list(model.named_modules())
    for (name, m), (bn_name, bn) in zip(modules, modules[1:], strict=False):
        if isinstance(m, nn.Conv2d) and name in traced.sizes:
            assert isinstance(bn, nn.BatchNorm2d)
            assert traced.follow[name] == [f"{bn_name}.{k}" for k in
                                           ("weight", "bias", "running_mean", "running_var")]
    assert not traced.fixed


def test_option_a_shortcut_lands_channel_c_on_c_plus_pad():
    graph = build_channel_graph(ticket_of(skeleton_on_cpu("resnet20")),
                                skeleton_on_cpu("resnet20"))
    passes = graph.param_id == -1
    stage2 = graph.node_range("layer2.0.add")  # 16 channels in, 32 out: pad 8 on each side
    to_stage2 = passes & np.isin(graph.dst, list(stage2))
    assert sorted(graph.out_ch[to_stage2].tolist()) == list(range(8, 24))
    assert sorted(graph.in_ch[to_stage2].tolist()) == list(range(16))


def skeleton_on_cpu(arch: str) -> nn.Module:
    from ticketctl.models import build_model

    return build_model(arch, seed=0)


# ---- networks defined here ---------------------------------------------------------------


def test_residual_add_and_concatenation():
    topo = topology(ResCat())
    assert topo.sizes == {"input": 3, "stem": 8, "add": 8, "b": 4, "merge.in": 12,
                          "merge": 6, "output": 5}
    assert Counter(topo.links) == Counter([
        Link("input", "stem", "stem.weight"),
        Link("stem", "add", "a.weight"),  # the residual branch writes into the sum
        Link("stem", "add"),  # the shortcut
        Link("add", "b", "b.weight"),
        Link("add", "merge.in"),  # cat([r, b(r)]): r at channels 0-7,
        Link("b", "merge.in", offset=8),  # b(r) at 8-11
        Link("merge.in", "merge", "merge.weight"),
        Link("merge", "output", "fc.weight", fold=64),  # 6 channels x 8 x 8 after the pool
    ])
    assert topo.follow["add"] == ["bn_a.weight", "bn_a.bias", "bn_a.running_mean",
                                  "bn_a.running_var"]
    assert topo.follow["merge"] == ["merge.bias"]


def test_linear_after_flatten_reads_each_channel_as_a_block_of_features():
    model = ResCat()
    ticket = ticket_of(model)
    graph = build_channel_graph(ticket, model)
    pid = graph.names.index("fc.weight")
    assert graph.folds[pid] == 64
    sel = graph.param_id == pid
    # kernel (o, c) of fc is columns 64c..64c+63: its strength is their summed |w|
    w = (ticket.state["fc.weight"].abs() * ticket.mask["fc.weight"]).double().view(5, 6, 64)
    expected = w.sum(-1)[graph.out_ch[sel], graph.in_ch[sel]].numpy()
    np.testing.assert_allclose(graph.strength[sel], expected, rtol=1e-12)
    assert sel.sum() == int((expected > 0).sum()) == int((w.sum(-1) > 0).sum())
    scores = compute_scores(ticket, "betweenness", model=model)["fc.weight"].view(5, 6, 64)
    assert torch.equal(scores, scores[..., :1].expand(5, 6, 64))  # one score a block


def test_grouped_and_depthwise_convs_connect_only_within_their_groups():
    model = Separable()
    topo = topology(model)
    assert topo.sizes == {"input": 3, "stem": 8, "group": 8, "depth": 16, "point": 12,
                          "output": 4}
    assert topo.links == [
        Link("input", "stem", "stem.weight"),
        Link("stem", "group", "group.weight", groups=4),
        Link("group", "depth", "depth.weight", groups=8),
        Link("depth", "point", "point.weight"),
        Link("point", "output", "head.weight"),
    ]
    graph = build_channel_graph(ticket_of(model, rate=0.0), model)
    for name, per_group_in, per_group_out in (("group.weight", 2, 2), ("depth.weight", 1, 2)):
        sel = graph.param_id == graph.names.index(name)
        src = graph.src[sel] - graph.base[topo.into(name.split(".")[0])[0].src]
        dst = graph.dst[sel] - graph.base[name.split(".")[0]]
        assert (src // per_group_in == dst // per_group_out).all()
        # unpruned: every channel of a group reaches every output of it, nothing more
        assert sel.sum() == topo.sizes[name.split(".")[0]] * per_group_in


@pytest.mark.parametrize("sdpa", [False, True])
def test_transformer_block_graph(sdpa):
    topo = topology(Tiny(sdpa=sdpa))
    att = "block.scaled_dot_product_attention" if sdpa else "block.matmul"
    scores, out = (f"{att}.scores", att) if sdpa else (att, f"{att}.1")
    assert topo.sizes == {"input": 6, "embed": 16, "block.q": 16, "block.k": 16, scores: 4,
                          out: 16, "block.add": 16, "block.fc1": 32, "block.add.1": 16,
                          "output": 3}
    assert Counter(topo.links) == Counter([
        Link("input", "embed", "embed.weight"),
        Link("embed", "block.q", "block.q.weight"),
        Link("embed", "block.k", "block.k.weight"),
        Link("embed", out, "block.v.weight"),  # channel j of head h: value j of head h...
        Link("block.q", scores, groups=4, dense=True),  # ...and the head's score, made
        Link("block.k", scores, groups=4, dense=True),  # of all its q and k channels
        Link(scores, out, groups=4, dense=True),
        Link(out, "block.add", "block.proj.weight"),
        Link("embed", "block.add"),  # residual
        Link("block.add", "block.fc1", "block.fc1.weight"),
        Link("block.fc1", "block.add.1", "block.fc2.weight"),
        Link("block.add", "block.add.1"),  # residual
        Link("block.add.1", "output", "head.weight"),  # after the mean over tokens
    ])
    assert topo.follow["embed"] == ["embed.bias", "block.ln1.weight", "block.ln1.bias"]
    assert not topo.fixed


class Glu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 12), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.a(x).chunk(2, dim=-1)
        return self.b(u * torch.sigmoid(v))


def test_halves_of_a_layer_pass_through_at_their_offsets():
    model = Glu()
    topo = topology(model)
    assert topo.sizes == {"input": 4, "a": 12, "mul": 6, "output": 3}
    assert Counter(topo.links) == Counter([
        Link("input", "a", "a.weight"), Link("a", "mul", first=0, count=6),
        Link("a", "mul", offset=-6, first=6, count=6), Link("mul", "output", "b.weight")])
    graph = build_channel_graph(ticket_of(model), model)
    passes = graph.param_id == -1
    pairs = sorted(zip((graph.src[passes] - graph.base["a"]).tolist(),
                       (graph.dst[passes] - graph.base["mul"]).tolist(), strict=True))
    assert pairs == sorted([(j, j) for j in range(6)] + [(j + 6, j) for j in range(6)])


def test_image_patches_unfolded_into_a_linear_embedding():
    """tests/nets.py's ViT (a --model-factory network): F.unfold cuts 2x2 patches of the
    grey image, a linear layer embeds them (each input channel owns 4 features), a learned
    position table is added (a per-channel constant: the embedding's order is fixed)."""
    from nets import TinyViT

    topo = topology(TinyViT(10, 1))
    assert topo.into("embed") == [Link("input", "embed", "embed.weight", fold=4)]
    assert topo.sizes["block.matmul"] == 4 and topo.sizes["block.fc1"] == 64
    assert topo.fixed == {"embed"}
    assert Link("block.matmul", "block.matmul.1", groups=4, dense=True) in topo.links


def test_betweenness_equals_networkx():
    for model in (Separable(), Tiny()):
        graph = build_channel_graph(ticket_of(model), model)
        np.testing.assert_allclose(edge_betweenness(graph), _networkx_betweenness(graph, None, 0),
                                   rtol=1e-12, atol=1e-15)
    model = skeleton_on_cpu("resnet20")
    graph = build_channel_graph(ticket_of(model, rate=0.8), model)
    ours = edge_betweenness(graph, pivots=16, seed=5)
    np.testing.assert_allclose(ours, _networkx_betweenness(graph, 16, 5), rtol=1e-12, atol=1e-15)
    assert (ours > 0).sum() > 100


def test_pivots_below_one_are_refused(tmp_path):
    path = save_ticket(make_ticket(), tmp_path / "t.safetensors")
    result = run("split", path, "--score", "betweenness", "--pivots", "0", "--key-ratio", "0.1",
                 "--key-mask", tmp_path / "k.safetensors", "--locked", tmp_path / "l.safetensors")
    assert_one_line_error(result, 2, "--pivots must be at least 1")
    assert not (tmp_path / "k.safetensors").exists()


@pytest.mark.parametrize("make", [ResCat, Separable, Tiny])
def test_path_scores_reach_every_layer(make):
    model = make()
    ticket = ticket_of(model)
    between = compute_scores(ticket, "betweenness", model=model)
    ewp = compute_scores(ticket, "ewp", seed=1, walks=3000, model=model)
    for name in ticket.mask:  # every masked layer lies on paths from the input to the output
        assert float(between[name].max()) > 0, name
        assert float(ewp[name].max()) > UNSEEN, name
    key, locked = split_ticket(ticket, "betweenness", 0.1, model=model)
    assert key.mask.num_kept == round(0.1 * ticket.mask.num_kept)
    for name in ticket.mask:
        assert torch.equal(key.mask[name] | locked.mask[name], ticket.mask[name])


def test_parallel_edges_leave_the_paths_to_the_shorter():
    """In ResCat channel c of `stem` reaches channel c of the sum both through the shortcut
    (distance 1) and through conv `a` (distance 1 / its kernel's summed |w|)."""
    model = ResCat()
    ticket = ticket_of(model, rate=0.0)
    graph = build_channel_graph(ticket, model)
    central = edge_betweenness(graph)
    pair = graph.src * graph.num_nodes + graph.dst
    shortcut = np.flatnonzero(graph.param_id == -1)[:8]  # stem c -> add c
    for e in shortcut:
        twin = np.flatnonzero((pair == pair[e]) & (graph.param_id >= 0))
        (t,) = twin
        longer, shorter = (e, t) if graph.strength[e] < graph.strength[t] else (t, e)
        assert central[longer] == 0 and central[shorter] > 0


# ---- what cannot be traced -----------------------------------------------------------------


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.sum() > 0:
            x = -x
        return self.fc(x.mean((2, 3)))


def test_data_dependent_control_flow_is_one_error_naming_the_operation():
    model = Branchy()
    with pytest.raises(TicketctlError) as err:
        topology(model)
    message = str(err.value)
    assert "\n" not in message
    assert "control flow" in message and "`gt`" in message and "x.sum() > 0" in message
    assert "omp and random" in message
    ticket = ticket_of(model)
    for score in ("omp", "random"):  # need no graph
        scores = compute_scores(ticket, score, model=model)
        assert set(scores) == set(ticket.mask)
    key, _ = split_ticket(ticket, "omp", 0.2, model=model)
    assert key.mask.num_kept == round(0.2 * ticket.mask.num_kept)
    for score in ("ewp", "betweenness"):
        with pytest.raises(TicketctlError, match="control flow"):
            split_ticket(ticket, score, 0.2, model=model)


class Einsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.einsum("bi,bi->bi", self.a(x), x))


class Upsampler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.up = nn.ConvTranspose2d(4, 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.relu(self.conv(x)))


class Torch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.att(h, h, h)[0]


@pytest.mark.parametrize("model, named", [
    (Einsum(), "operation `einsum`"),
    (Upsampler(), "layer up (ConvTranspose2d)"),
    (Torch(), "layer att (MultiheadAttention) is not supported: write attention with nn.Linear"),
])
def test_operations_without_a_channel_rule_are_named(model, named):
    with pytest.raises(TicketctlError) as err:
        topology(model)
    assert named in str(err.value) and "\n" not in str(err.value)


USERS_CODE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes, branchy):
        super().__init__()
        self.branchy = branchy
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + torch.relu(self.b(torch.relu(self.a(x))))
        if self.branchy and x.mean() > 0:
            x = -x
        return self.head(x.mean((2, 3)))


def plain(num_classes):
    return Net(num_classes, False)


def branchy(num_classes):
    return Net(num_classes, True)
"""


def test_the_command_line_traces_the_users_own_network(tmp_path):
    """`--model-factory`: a network ticketctl does not define gets its graph for betweenness
    and the permutation attack; one that branches on a tensor value is exit 2 naming the
    operation, while omp still splits it."""
    code = tmp_path / "mine.py"
    code.write_text(textwrap.dedent(USERS_CODE))
    spec = importlib.util.spec_from_file_location("mine", code)
    mine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mine)
    tickets = {}
    for name in ("plain", "branchy"):
        torch.manual_seed(0)
        m = getattr(mine, name)(10)
        mask = Mask({n: torch.rand(dict(m.named_parameters())[n].shape) < 0.5
                     for n in ("a.weight", "b.weight")})
        t = Ticket.from_model(m, mask, kind="trained", arch="factory", num_classes=10,
                              network=NetworkInfo("factory", fingerprint(m), f"{code}:{name}"))
        tickets[name] = save_ticket(t, tmp_path / f"{name}.safetensors")

    def split(name: str, score: str, *extra: str) -> object:
        return run("split", tickets[name], "--score", score, "--key-ratio", "0.1",
                   "--model-factory", f"{code}:{name}", "--key-mask", tmp_path / f"k-{score}",
                   "--locked", tmp_path / f"l-{score}", "--force", *extra)

    result = split("plain", "betweenness", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["key_weights"] > 0
    result = run("attack", "permute", tickets["plain"], "--model-factory", f"{code}:plain",
                 "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["rows"][0]["delta"] == pytest.approx(0.0, abs=1e-9)
    assert_one_line_error(split("branchy", "betweenness"), 2,
                          "control flow on a tensor value (the result of `gt`)")
    assert "x.mean() > 0" in split("branchy", "ewp").stderr
    assert split("branchy", "omp").exit_code == 0
