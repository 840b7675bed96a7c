"""The permutation attack over the traced graph: which units it relabels in networks defined
here (an MLP's hidden units, a conv read by a linear layer after a flatten, a transformer
block's MLP), that every output stays the same, and that a signed linear layer's mask is put
back in order by the receipt's fingerprints even after the weights drifted."""

import copy

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from trace_nets import INPUTS, Mlp, ResCat, Separable, Tiny, WideMlp, ticket_of

from ticketctl.attacks.permute import permutable_groups, permute
from ticketctl.protect.align import align, fingerprints
from ticketctl.protect.signature import masks_of, sign_ticket, verify_with_receipt


@pytest.mark.parametrize("make, groups", [
    (Mlp, {"fc1.weight": ["fc1.bias"], "fc2.weight": ["fc2.bias"]}),
    (ResCat, {"merge.weight": ["merge.bias"]}),  # the rest is summed or concatenated
    (Separable, {"point.weight": ["point.bias", "bn.weight", "bn.bias", "bn.running_mean",
                                  "bn.running_var"]}),  # the rest feeds grouped convs
    (Tiny, {"block.fc1.weight": ["block.fc1.bias"]}),  # the rest is attention or residual
])
def test_permutation_keeps_every_output(make, groups, float64):
    """Relabelling units reorders the terms of the sums of the layers that read them, and
    nothing else. In float64 (u = 1.1e-16; at most 384 terms a sum, four layers deep, values
    of order 1) outputs agree to about 1e-13; the bound 1e-9 leaves four orders of margin."""
    torch.manual_seed(0)
    model = make().eval()
    ticket = ticket_of(model)
    found = permutable_groups(ticket, model)
    assert {g.producer: g.follow for g in found} == groups
    moved, perms = permute(ticket, seed=3, model=model)
    assert set(perms) == set(groups)
    x = torch.randn(4, *INPUTS[make])
    before, after = copy.deepcopy(model), copy.deepcopy(model)
    before.load_state_dict(ticket.state)
    after.load_state_dict(moved.state)
    torch.testing.assert_close(after(x), before(x), atol=1e-9, rtol=1e-9)
    assert moved.mask.num_kept == ticket.mask.num_kept
    assert any(not torch.equal(moved.mask[k], ticket.mask[k]) for k in ticket.mask)
    for name, values in ticket.state.items():  # everything that moved was reordered
        if not torch.equal(values, moved.state[name]):
            assert torch.equal(values.flatten().sort().values,
                               moved.state[name].flatten().sort().values), name


def test_flattened_channels_move_with_their_block_of_features(float64):
    """ResCat's fc reads `merge`'s 6 channels as 6 blocks of 64 features: the blocks move
    whole."""
    model = ResCat()
    ticket = ticket_of(model)
    moved, perms = permute(ticket, seed=1, model=model)
    p = perms["merge.weight"]
    assert sorted(p) == list(range(6)) and p != list(range(6))
    fc, fc_moved = ticket.state["fc.weight"].view(5, 6, 64), moved.state["fc.weight"]
    assert torch.equal(fc_moved.view(5, 6, 64), fc[:, p])


def test_linear_layer_realigns_when_only_its_mask_is_left():
    """Every weight of a 48 x 64 linear layer drawn anew after its rows and columns were
    permuted: the weights say nothing, each unit's degree is shared by several, but the
    degrees of a unit's neighbours identify it."""
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(48, 64, generator=gen) < 0.3
    reference = fingerprints(torch.randn(mask.shape, generator=gen) * mask, mask)
    rows, cols = torch.randperm(48, generator=gen), torch.randperm(64, generator=gen)
    moved = mask[rows][:, cols]
    redrawn = torch.randn(mask.shape, generator=gen) * moved
    assert torch.equal(align(redrawn, moved, reference), mask)
    degrees = mask.sum(1)
    assert len(torch.unique(degrees)) < len(degrees)  # degree alone could not tell them apart


def test_permuted_mlp_hidden_layer_realigns_after_drift():
    """fc2 of an MLP has both axes permuted (its inputs are fc1's hidden units, its outputs
    hidden units too); after the weights drift by factors of 0.3-1.7 its receipt's
    fingerprints still put its mask back in order."""
    model = Mlp()
    ticket = ticket_of(model)
    reference = fingerprints(ticket.state["fc2.weight"], ticket.mask["fc2.weight"])
    gen = torch.Generator().manual_seed(7)
    drifted = ticket.derive(state={
        k: v * (0.3 + 1.4 * torch.rand(v.shape, generator=gen)) for k, v in
        ticket.state.items()})
    for seed in range(3):
        moved, perms = permute(drifted, seed, model=model)
        assert set(perms) == {"fc1.weight", "fc2.weight"}
        mask = moved.mask["fc2.weight"]
        assert not torch.equal(mask, ticket.mask["fc2.weight"])
        assert torch.equal(align(moved.state["fc2.weight"], mask, reference),
                           ticket.mask["fc2.weight"])


def test_signed_linear_layer_verifies_after_its_units_are_permuted_and_retrained():
    """The code in fc2 of an MLP (48 x 144: its rows and its columns, fc1's 144 hidden units,
    are both permuted), every weight drifted: the receipt's fingerprints put the layer's
    rows and columns back and the exact message is read."""
    torch.manual_seed(0)
    model = WideMlp()
    ticket = ticket_of(model, rate=0.7)
    signed, receipt, _, _ = sign_ticket(ticket, "signature", layer="fc2.weight",
                                        private_key=Ed25519PrivateKey.generate())
    assert "fc2.weight" in receipt.fingerprints
    gen = torch.Generator().manual_seed(5)
    drifted = signed.derive(state={
        k: v * (0.3 + 1.4 * torch.rand(v.shape, generator=gen)) for k, v in
        signed.state.items()})
    moved, perms = permute(drifted, seed=2, model=model)
    assert set(perms) == {"fc1.weight", "fc2.weight"}
    as_stored = verify_with_receipt(masks_of(moved.state, dict(moved.mask)), receipt)
    assert as_stored.message is None  # the code's rows are scattered
    verdict = verify_with_receipt(masks_of(moved.state, dict(moved.mask)), receipt,
                                  state=moved.state)
    assert verdict.signature.alignment == "re-aligned"
    assert verdict.message == "signature" and verdict.bit_match == 1.0
