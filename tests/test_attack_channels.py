"""`attack channel-prune`: which channels go (the smallest by L1 norm, with every tensor
indexed by them), that the smaller model runs and computes what the scored one computes,
that verification finds the code in the smaller model (also after a permutation), the rows'
checks, the saved files and bad input."""

import copy
import json

import pytest
import torch
from helpers import assert_one_line_error, run, signed_files
from trace_nets import INPUTS, Mlp, ResCat, Separable, ticket_of

from ticketctl.attacks.channels import channel_pruned, shrink_model
from ticketctl.attacks.permute import permutable_groups, permute
from ticketctl.errors import TicketctlError
from ticketctl.protect.qr import function_module_map
from ticketctl.protect.signature import masks_of, read_signature


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    return signed_files(tmp_path_factory.mktemp("channels"), b"c" * 32)


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5])
def test_the_smallest_channels_by_l1_go_with_everything_indexed_by_them(signed, rate):
    ticket = signed["ticket"]
    cut = channel_pruned(ticket, rate)
    groups = permutable_groups(ticket)
    assert {g.producer for g in groups} == set(cut.removed)
    for g in groups:
        w = ticket.state[g.producer]
        norms = w.abs().double().reshape(g.size, -1).sum(1)
        gone = cut.removed[g.producer]
        kept = [c for c in range(g.size) if c not in gone]
        assert len(gone) == int(rate * g.size)
        assert float(norms[gone].max()) <= float(norms[kept].min())
        # rows of the kept channels; columns too where the layer reads an earlier group
        cols = torch.ones(w.shape[1], dtype=torch.bool)
        for h in groups:
            for name, fold in h.consumers:
                if name == g.producer:
                    gone_in = torch.tensor(cut.removed[h.producer])
                    cols[(gone_in[:, None] * fold + torch.arange(fold)).reshape(-1)] = False
        assert torch.equal(cut.released[g.producer], w[kept][:, cols])
        for name in g.follow:  # bias and BatchNorm entries of the same channels
            assert torch.equal(cut.released[name], ticket.state[name][kept])
        for name, fold in g.consumers:
            assert cut.released[name].shape[1] == len(kept) * fold
            assert not cut.scored[name].reshape(
                cut.scored[name].shape[0], g.size, -1)[:, gone].any()
    # the classifier's outputs (classes) are never removed
    assert cut.released["fc.weight"].shape[0] == 10


def test_the_smaller_model_runs_and_computes_what_was_scored(signed, float64):
    """The released network, resized, against the original shapes with the removed channels'
    readers zeroed: the same sums less some zero terms. In float64 (u = 1.1e-16, at most 576
    terms a sum, five layers, values of order 1) they agree to about 1e-13; the bound 1e-9
    leaves four orders of margin."""
    ticket = signed["ticket"]
    ticket = ticket.derive(state={k: v.double() if v.is_floating_point() else v
                                  for k, v in ticket.state.items()})
    cut = channel_pruned(ticket, 0.3)
    small = shrink_model(ticket.build_model(), cut.released).double().eval()
    scored = ticket.build_model().double().eval()
    scored.load_state_dict(cut.scored)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(small(x), scored(x), atol=1e-9, rtol=1e-9)
    assert sum(p.numel() for p in small.parameters()) < \
        sum(p.numel() for p in scored.parameters())
    assert small.conv2.in_channels == small.conv1.out_channels == 32 - int(0.3 * 32)


@pytest.mark.parametrize("make", [Mlp, ResCat, Separable])
def test_networks_defined_here_shrink_and_run(make, float64):
    """Units read by a linear layer after a flatten (ResCat), an MLP's hidden units, a conv
    feeding a BatchNorm (Separable): removed with their blocks of inputs, outputs as scored
    (bound as above)."""
    torch.manual_seed(0)
    model = make().eval()
    ticket = ticket_of(model)
    cut = channel_pruned(ticket, 0.5, model=model)
    assert cut.removed
    scored = copy.deepcopy(model)
    scored.load_state_dict(cut.scored)
    small = shrink_model(copy.deepcopy(model), cut.released).eval()
    x = torch.randn(3, *INPUTS[make])
    torch.testing.assert_close(small(x), scored(x), atol=1e-9, rtol=1e-9)


def test_verification_reads_the_code_from_the_smaller_model(signed):
    """Re-alignment must find every surviving channel of the signed layer: then every module
    it still has matches (nothing else changed), and the modules of removed channels are
    left out of the test, as many as the removed rows and columns cross the code's data."""
    ticket, receipt = signed["ticket"], signed["receipt_doc"]
    p = receipt.placements[0]
    assert (p.layer, p.block) == ("conv2.weight", (1, 9))  # modules are kernels here
    version = int(receipt.qr_version)
    n = 17 + 4 * version
    data = ~function_module_map(version)
    for rate in (0.05, 0.1, 0.2, 0.3):
        cut = channel_pruned(ticket, rate)
        got = read_signature(masks_of(cut.released), receipt, state=cut.released)
        rows_gone = set(cut.removed["conv2.weight"])  # its own output channels
        cols_gone = set(cut.removed["conv1.weight"])  # the inputs it reads
        missing = sum(1 for i in range(n) for j in range(n) if data[i, j] and (
            p.row + i in rows_gone or p.col + j in cols_gone))
        assert got.alignment == "re-aligned"
        assert got.unobserved_modules == missing, rate
        assert got.matches == got.data_modules == int(data.sum()) - missing
        assert got.p_value < 1e-12  # 0.3: 83 of 83 observed modules, p = 2 x 2^-83 = 2e-25
    assert read_signature(masks_of(channel_pruned(ticket, 0.05).released), receipt,
                          state=channel_pruned(ticket, 0.05).released).message == "signature"


def test_verification_reads_it_after_a_permutation_too(signed):
    """A thief who relabels the channels before pruning them: the removed channels are the
    same (L1 norms do not depend on the order), so the reading must be the same."""
    ticket, receipt = signed["ticket"], signed["receipt_doc"]
    moved, _ = permute(ticket, seed=5)
    cut, plain = channel_pruned(moved, 0.1), channel_pruned(ticket, 0.1)
    got = read_signature(masks_of(cut.released), receipt, state=cut.released)
    unmoved = read_signature(masks_of(plain.released), receipt, state=plain.released)
    assert (got.matches, got.unobserved_modules) == (unmoved.matches, unmoved.unobserved_modules)
    assert got.message == unmoved.message == "signature"


def test_cli_rows_carry_every_check_and_saved_models_verify(signed, tmp_path):
    out = tmp_path / "cut"
    result = run("attack", "channel-prune", str(signed["path"]), "--rates", "0.05,0.2",
                 "--receipt", str(signed["receipt"]), "--trigger", str(signed["trigger"]),
                 "--save", str(out), "--json")
    assert result.exit_code in (0, 1), result.output
    doc = json.loads(result.stdout)
    assert doc["attack"] == "channel-prune" and [r["strength"] for r in doc["rows"]] == [0.05, 0.2]
    for row in doc["rows"]:
        assert row["accuracy"] is not None and row["p_value"] is not None
        assert row["trigger_accuracy"] is not None
    saved = out / "channel-pruned-0.05.safetensors"
    check = run("verify", str(saved), "--receipt", str(signed["receipt"]), "--trigger",
                str(signed["trigger"]), "--dataset", "digits", "--json")
    assert check.exit_code == 0, check.output
    verdict = json.loads(check.stdout)
    assert verdict["message"] == "signature"
    # the trigger set ran through the smaller network, rebuilt from the file's shapes
    assert verdict["trigger_accuracy"] is not None
    again = run("attack", "channel-prune", str(signed["path"]), "--rates", "0.05,0.2",
                "--save", str(out))
    assert_one_line_error(again, contains="--force")  # nothing overwritten by surprise
    # the spelling is accepted
    old = run("attack", "channel-prune", str(signed["path"]), "--ratios", "0.1", "--json")
    assert old.exit_code == 0 and json.loads(old.stdout)["rows"][0]["strength"] == 0.1


@pytest.mark.parametrize("rates", ["0", "1", "0.1,1.5", "-0.2", "x"])
def test_rates_outside_zero_one_are_refused(signed, rates):
    assert_one_line_error(run("attack", "channel-prune", str(signed["path"]), "--rates", rates))


def test_a_network_without_removable_channels_is_refused():
    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x)

    model = Flat()
    with pytest.raises(TicketctlError, match="no channel of this network can be removed"):
        channel_pruned(ticket_of(model, rate=0), 0.5, model=model)
