"""Scheme V2 in any layer: linear, 1x1 conv and depthwise conv weights carry the code in
blocks of weights (protect/blocks.py). The networks are defined here and their tickets built
directly from weights and masks: signing and verifying read nothing else."""

import copy
import json

import numpy as np
import pytest
import safetensors.torch
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers import assert_one_line_error, make_ticket, run
from torch import nn

from ticketctl.artifacts import Mask, Ticket, save_ticket
from ticketctl.attacks.fake3 import forge
from ticketctl.attacks.removal import added
from ticketctl.errors import CheckFailed, TicketctlError
from ticketctl.models.sources import NetworkInfo
from ticketctl.protect.align import QUANTILES, TOP
from ticketctl.protect.blocks import Blocks, auto_blocks, kernel_blocks
from ticketctl.protect.embed import Placement, grid, placement_costs, write_code
from ticketctl.protect.qr import encode, function_module_map
from ticketctl.protect.receipt import Receipt, load_receipt, save_receipt
from ticketctl.protect.signature import (
    alignable,
    masks_of,
    scan,
    sign_ticket,
    verify_with_receipt,
    wide,
)
from ticketctl.prune import magnitude_prune

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


class Block(nn.Module):
    def __init__(self, dim: int, mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp * dim)
        self.fc2 = nn.Linear(mlp * dim, dim)


class TinyViT(nn.Module):
    """The weights of a ViT (patch embedding, attention and MLP blocks, head), all linear;
    only the parameters matter here, so there is no forward pass."""

    def __init__(self, dim: int = 48, depth: int = 2, mlp: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(4 * 4 * 3, dim)
        self.blocks = nn.ModuleList(Block(dim, mlp) for _ in range(depth))
        self.head = nn.Linear(dim, 10)


class PointwiseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3)
        self.pw = nn.Conv2d(32, 96, 1)  # [96, 32, 1, 1]: blocks of 3 output channels
        self.conv = nn.Conv2d(96, 40, 3)


class DepthwiseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 512, 3)
        self.dw = nn.Conv2d(512, 512, 3, groups=512)  # [512, 1, 3, 3]
        self.pw = nn.Conv2d(512, 16, 1)


def ticket_of(model: nn.Module, density: float, seed: int = 0,
              scope: str = "global") -> Ticket:
    """Every weight of two or more dimensions masked, magnitude-pruned (globally)."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.dim() >= 2}
    mask = magnitude_prune(params, Mask({k: torch.ones_like(v, dtype=torch.bool)
                                         for k, v in params.items()}), 1.0 - density, scope)
    return Ticket(state={k: v.detach().clone() for k, v in model.state_dict().items()},
                  mask=mask, arch=type(model).__name__.lower(), seed=seed)


def build(cls: type, density: float, seed: int = 0, scope: str = "global") -> Ticket:
    torch.manual_seed(seed)
    return ticket_of(cls(), density, seed, scope)


@pytest.fixture(scope="module")
def vit():
    ticket = build(TinyViT, 0.3)
    signed, receipt, report, qr = sign_ticket(ticket, "signature", private_key=KEY)
    return {"ticket": ticket, "signed": signed, "receipt": receipt, "report": report, "qr": qr}


def region(mask: torch.Tensor, p: Placement, n: int) -> np.ndarray:
    rows, cols = p.region(n)
    return grid(mask, p.blocks(mask.shape))[rows, cols]


def pruned(ticket: Ticket, rate: float) -> dict[str, torch.Tensor]:
    """The masks after removing `rate` of the kept weights by global magnitude."""
    return masks_of(ticket.state, dict(magnitude_prune(ticket.state, ticket.mask, rate)))


# ---- the mapping ---------------------------------------------------------------------------
def test_each_kind_of_layer_gets_its_blocks():
    # a 3x3 conv keeps one module per kernel: the channel grid of older receipts
    assert auto_blocks((64, 32, 3, 3), 3) == kernel_blocks((64, 32, 3, 3)) == \
        Blocks((64, 288), (1, 9))
    # linear and 1x1 conv: blocks of exactly `support` weights, shaped for the largest code
    assert auto_blocks((144, 48), 3) == Blocks((144, 48), (3, 1))
    assert auto_blocks((48, 192), 3) == Blocks((48, 192), (1, 3))
    assert auto_blocks((96, 32, 1, 1), 3) == Blocks((96, 32), (3, 1))
    assert auto_blocks((768, 768), 4).block == (2, 2)
    assert auto_blocks((144, 48), 1) == kernel_blocks((144, 48))  # one weight per module
    # depthwise: kernel rows, channels folded into a square grid (512 = 39 x 13 + 5)
    dw = auto_blocks((512, 1, 3, 3), 3)
    assert dw == Blocks((39, 117), (1, 3)) and dw.grid == (39, 39)
    assert auto_blocks((512, 1, 3, 3), 4).block == (1, 9)  # a row is too small: the kernel
    assert auto_blocks((512,), 3) is None


def test_module_positions_are_the_blocks_of_the_view():
    t = torch.arange(2 * 7 * 5).reshape(2, 7, 5)  # flattened and read as 14 x 5
    b = Blocks((14, 5), (3, 2))  # the last two rows and the last column fill no block
    assert b.grid == (4, 2)
    view = t.reshape(14, 5)
    modules = b.modules(t)
    for r in range(4):
        for c in range(2):
            block = view[3 * r:3 * r + 3, 2 * c:2 * c + 2]
            assert torch.equal(modules[r, c], block)
            assert torch.equal(t.reshape(-1)[b.indices(r, c)], block.reshape(-1))
    mask = t % 3 == 0
    assert b.counts(mask).tolist() == [[int((mask.reshape(14, 5)[3 * r:3 * r + 3,
                                                                  2 * c:2 * c + 2]).sum())
                                         for c in range(2)] for r in range(4)]
    modules[1, 1] = -1  # a view: writing a module writes the weight
    assert int((t == -1).sum()) == 6


def test_placement_costs_count_the_differing_data_modules():
    gen = np.random.default_rng(5)
    dark = gen.random((40, 33)) < 0.4
    qr = encode("sig", mask_pattern=2)
    n = qr.matrix.shape[0]
    data = ~function_module_map(qr.version)
    cost = placement_costs(dark, qr.matrix, data)
    assert cost.shape == (40 - n + 1, 33 - n + 1)
    for r, c in [(0, 0), (19, 12), (7, 3), (19, 0)]:
        want = int(((dark[r:r + n, c:c + n] != qr.matrix) & data).sum())
        assert cost[r, c] == want


# ---- a ViT signed in a linear layer --------------------------------------------------------
def test_vit_is_signed_in_its_first_linear_layer_that_holds_the_code(vit):
    ticket, signed, receipt, qr = vit["ticket"], vit["signed"], vit["receipt"], vit["qr"]
    (p,) = receipt.placements
    # the patch embedding and the projection (48 x 16 modules) are too small for 25 x 25
    assert p.layer == "blocks.0.qkv.weight" and (p.view, p.block) == ((144, 48), (3, 1))
    assert signed.mask.num_kept == ticket.mask.num_kept  # the density, to the weight
    n = qr.matrix.shape[0]
    data = ~function_module_map(qr.version)
    after = region(signed.mask[p.layer], p, n)
    before = region(ticket.mask[p.layer], p, n)
    assert (after[data & qr.matrix] >= 3).all()  # every dark module keeps `support` weights
    assert (after[data & ~qr.matrix] == 0).all()  # every light module is empty
    assert (after[~data] == before[~data]).all()  # function modules are not written
    assert vit["report"].modules_changed > 0
    for name in ticket.mask:
        assert signed.state[name][~signed.mask[name]].eq(0).all()


def test_vit_verifies_after_30_percent_magnitude_pruning(vit, tmp_path):
    """The issue's test: the exact message after 30% magnitude pruning, with a tiny p."""
    signed = vit["signed"]
    receipt = load_receipt(save_receipt(vit["receipt"], tmp_path / "r.json"))
    assert receipt.placements == vit["receipt"].placements  # the blocks survive the file
    masks = pruned(signed, 0.3)
    layer = receipt.placements[0].layer
    assert int(masks[layer].sum()) < int(signed.mask[layer].sum())  # the code's layer lost some
    verdict = verify_with_receipt(masks, receipt, KEY.public_key())
    assert verdict.verified and verdict.message == "signature"
    assert verdict.p_value < 1e-30 and verdict.signature.data_modules == 359
    # 50%: the message may go, the p-value does not
    assert verify_with_receipt(pruned(signed, 0.5), receipt).p_value < 1e-12


def test_a_plain_state_dict_of_the_pruned_vit_verifies_on_the_command_line(vit, tmp_path):
    """No masks, no architecture: the mask is what is nonzero in a plain safetensors file."""
    signed = vit["signed"]
    mask = magnitude_prune(signed.state, signed.mask, 0.3)
    state = {k: v.contiguous() for k, v in mask.apply_state(signed.state).items()}
    safetensors.torch.save_file(state, str(tmp_path / "vit.safetensors"))
    save_receipt(vit["receipt"], tmp_path / "r.json")
    result = run("verify", tmp_path / "vit.safetensors", "--receipt", tmp_path / "r.json",
                 "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["verified"] is True and doc["message"] == "signature"


def test_unsigned_vits_do_not_verify(vit):
    for seed in range(1, 4):  # masks from seeded initialisations: the same on every machine
        other = build(TinyViT, 0.3, seed)
        verdict = verify_with_receipt(masks_of(other.state, dict(other.mask)), vit["receipt"])
        assert not verdict.verified and verdict.p_value > 1e-6


def test_which_layers_get_channel_fingerprints(vit):
    """Kernel grids and linear layers up to 8192 units a side; a wide linear layer's are
    sampled (64 ranks of its sorted neighbour degrees), a narrow one's whole, as before."""
    layer = vit["receipt"].placements[0].layer
    assert set(vit["receipt"].fingerprints) == {layer}
    assert alignable((144, 48)) and alignable((512, 512, 3, 3))
    assert alignable((2304, 768)) and alignable((768, 3072, 1, 1))
    assert not alignable((10_000, 768))
    assert wide((2304, 768)) and not wide((144, 48)) and not wide((512, 512, 3, 3))


def test_a_wide_linear_layer_verifies_after_its_units_are_permuted_and_drifted():
    """A 1024 x 256 linear weight (beyond the whole-vector budget): signed, its rows and
    columns permuted, every weight scaled by 0.3-1.7; the sampled fingerprints put the
    layer back and the exact message is read."""
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(1024, 256, generator=gen)
    mask = Mask({"w": w.abs() > 1.0})  # about 32% kept
    ticket = Ticket(state={"w": w * mask["w"]}, mask=mask, arch="none",
                    network=NetworkInfo("none"))
    signed, receipt, _, _ = sign_ticket(ticket, "wide layer")
    rows = receipt.fingerprints["w"]["rows"]
    assert len(rows) == 1024 and len(rows[0]) == TOP + QUANTILES
    r, c = torch.randperm(1024, generator=gen), torch.randperm(256, generator=gen)
    state = {"w": (signed.state["w"] * (0.3 + 1.4 * torch.rand(1024, 256, generator=gen)))
             [r][:, c]}
    masks = {"w": signed.mask["w"][r][:, c]}
    assert verify_with_receipt(masks_of(state, masks), receipt).message is None
    verdict = verify_with_receipt(masks_of(state, masks), receipt, state=state)
    assert verdict.signature.alignment == "re-aligned"
    assert verdict.message == "wide layer" and verdict.bit_match == 1.0


def test_scan_finds_the_code_in_linear_blocks(vit):
    """Without a receipt: every layer, its grids at one weight and at 3 weights per module,
    versions 1-4, every mask pattern and offset."""
    p = vit["receipt"].placements[0]
    for masks in (masks_of(vit["signed"].state, dict(vit["signed"].mask)),
                  pruned(vit["signed"], 0.3)):
        found = scan(masks)
        assert [(f["message"], f["layer"], f["row"], f["col"], f["block"]) for f in found] \
            == [("signature", p.layer, p.row, p.col, [3, 1])]
    assert scan(masks_of(vit["ticket"].state, dict(vit["ticket"].mask))) == []


def test_add_on_weights_in_linear_blocks_are_stripped_by_the_defence(vit):
    signed, receipt = vit["signed"], vit["receipt"]
    layer = receipt.placements[0].layer
    # at a third of the median kept |w| some revived weights pass the magnitude floor
    state = added(signed, 0.2, seed=3, scale=0.3)
    masks = masks_of(state)
    assert int((masks[layer] & ~signed.mask[layer] &
                (state[layer].abs() >= receipt.magnitude_floor)).sum()) > 0
    plain = verify_with_receipt(masks, receipt)
    defended = verify_with_receipt(masks, receipt, floor_defence=True, state=state)
    assert plain.bit_match < 0.95
    assert defended.bit_match >= 0.99 and defended.message == "signature"


def test_fake3_overwrites_the_same_blocks(vit):
    signed, receipt = vit["signed"], vit["receipt"]
    forged, forger = forge(signed, receipt, "mine now")
    assert forger.placements == receipt.placements
    assert forged.mask.num_kept == signed.mask.num_kept
    masks = masks_of(forged.state, dict(forged.mask))
    assert verify_with_receipt(masks, forger).message == "mine now"
    owner = verify_with_receipt(masks, receipt)
    assert owner.message is None and owner.bit_match < 0.9


def test_copies_in_several_linear_layers_and_a_chosen_layer():
    ticket = build(TinyViT, 0.3, seed=7)
    signed, receipt, _, _ = sign_ticket(ticket, "sig", copies=2)
    assert [p.layer for p in receipt.placements] == ["blocks.0.qkv.weight",
                                                     "blocks.0.fc1.weight"]
    assert signed.mask.num_kept == ticket.mask.num_kept
    verdict = verify_with_receipt(pruned(signed, 0.3), receipt)
    assert verdict.verified and verdict.message == "sig"
    signed, receipt, _, _ = sign_ticket(ticket, "sig", layer="blocks.1.fc2.weight")
    assert (receipt.placements[0].layer, receipt.placements[0].block) == \
        ("blocks.1.fc2.weight", (1, 3))
    assert verify_with_receipt(masks_of(signed.state, dict(signed.mask)),
                               receipt).message == "sig"
    with pytest.raises(TicketctlError, match="'blocks.0.proj.weight' has 48x16 modules of "
                                             "1x3 weights, too small"):
        sign_ticket(ticket, "signature", layer="blocks.0.proj.weight")


# ---- convolutions: 1x1 and depthwise -------------------------------------------------------
@pytest.mark.parametrize("cls,layer,blocks", [
    (PointwiseNet, "pw.weight", Blocks((96, 32), (3, 1))),
    (DepthwiseNet, "dw.weight", Blocks((39, 117), (1, 3))),
])
def test_convolutions_carry_the_code_in_blocks(cls, layer, blocks):
    ticket = build(cls, 0.25)
    signed, receipt, _, qr = sign_ticket(ticket, "sig")
    (p,) = receipt.placements
    assert p.layer == layer and p.blocks(signed.mask[layer].shape) == blocks
    assert signed.mask.num_kept == ticket.mask.num_kept
    n = qr.matrix.shape[0]
    data = ~function_module_map(qr.version)
    after = region(signed.mask[layer], p, n)
    assert (after[data & qr.matrix] >= 3).all() and (after[data & ~qr.matrix] == 0).all()
    verdict = verify_with_receipt(pruned(signed, 0.3), receipt)
    assert verdict.verified and verdict.message == "sig" and verdict.p_value < 1e-30


def test_density_is_kept_whether_the_code_adds_or_removes_weights():
    """A sparse layer gains weights (compensated by pruning elsewhere), a dense one loses them
    (compensated by restoring pruned positions)."""
    qr = encode("sig", mask_pattern=0)
    p = Placement("pw.weight", 3, 4, (96, 32), (3, 1))
    for density, sign in ((0.1, 1), (0.9, -1)):
        ticket = build(PointwiseNet, density, scope="layer")
        before = {k: v.clone() for k, v in ticket.mask.items()}
        state, masks, report = write_code(ticket.state, ticket.mask, qr, [p], seed=1)
        assert report.compensated * sign > 0
        assert sum(int(m.sum()) for m in masks.values()) == ticket.mask.num_kept
        inside = torch.zeros_like(masks[p.layer])
        rows, cols = p.region(qr.matrix.shape[0])
        p.blocks(inside.shape).modules(inside)[rows, cols] = True
        changed = sum(int((m != before[k]).sum()) for k, m in masks.items()) - \
            int((masks[p.layer] != before[p.layer])[inside].sum())
        assert changed == abs(report.compensated)  # all of it outside the region
        for k, m in masks.items():
            assert state[k][~m].eq(0).all() and (state[k][m] != 0).all()
        assert all(torch.equal(ticket.mask[k], before[k]) for k in before)  # input unchanged


# ---- receipts written before blocks ---------------------------------------------------------
def _without_blocks(receipt: Receipt) -> Receipt:
    old = copy.deepcopy(receipt)
    old.placements = [Placement(p.layer, p.row, p.col) for p in old.placements]
    return old.sign(KEY)


def test_receipts_without_blocks_read_the_kernel_grid(vit):
    """A receipt that records no blocks (written before they existed) reads one module per
    kernel, or per weight of a linear layer: the same reading as the receipt that records
    that grid."""
    ticket = make_ticket(seed=20, density_rate=0.6, width=32)
    signed, receipt, _, _ = sign_ticket(ticket, "owner", private_key=KEY)
    assert receipt.placements[0].block == (1, 9)  # a 3x3 conv: the kernel grid, recorded
    old = _without_blocks(receipt)
    assert "view" not in old.fields()["placements"][0]
    masks = masks_of(signed.state, dict(magnitude_prune(signed.state, signed.mask, 0.3)))
    new_reading = verify_with_receipt(masks, receipt, KEY.public_key())
    old_reading = verify_with_receipt(masks, old, KEY.public_key())
    assert old_reading.verified and old_reading.message == "owner"
    assert (old_reading.bit_match, old_reading.p_value) == (new_reading.bit_match,
                                                            new_reading.p_value)
    # a linear layer signed one weight per module (support 1) is the old linear reading
    vit_ticket = vit["ticket"]
    signed, receipt, _, _ = sign_ticket(vit_ticket, "sig", support=1, private_key=KEY)
    assert receipt.placements[0].block == (1, 1)
    verdict = verify_with_receipt(masks_of(signed.state, dict(signed.mask)),
                                  _without_blocks(receipt))
    assert verdict.verified and verdict.message == "sig"


def test_a_receipt_whose_view_does_not_fit_the_layer_is_for_another_ticket(vit):
    receipt = copy.deepcopy(vit["receipt"])
    p = receipt.placements[0]
    receipt.placements = [Placement(p.layer, p.row, p.col, (10_000, 48), p.block)]
    with pytest.raises(CheckFailed, match="receipt is for another ticket.*10000x48"):
        verify_with_receipt(masks_of(vit["signed"].state, dict(vit["signed"].mask)),
                            receipt.sign(None))


# ---- too small -----------------------------------------------------------------------------
def test_a_model_too_small_for_any_code_names_its_largest_grid(tmp_path):
    torch.manual_seed(0)
    small = ticket_of(TinyViT(dim=16), 0.3)
    with pytest.raises(TicketctlError) as e:
        sign_ticket(small, "signature")
    text = str(e.value)
    assert "\n" not in text
    # fc1 [64, 16] in blocks of 3x1 is 21x16; fc2 [16, 64] in blocks of 1x3 is 16x21
    assert "largest grid found: 21x16 in blocks.0.fc1.weight (blocks of 3x1 weights)" in text
    assert "version-2 code (the smallest that holds the message)" in text
    assert "25x25 modules" in text
    t = save_ticket(make_ticket(seed=4, width=8), tmp_path / "small.safetensors")
    result = run("sign", t, "--message", "signature", "--out", tmp_path / "s.safetensors",
                 "--receipt", tmp_path / "r.json")
    assert_one_line_error(result, 2, "largest grid found: 16x16 in conv4.weight")
    assert "25x25" in result.stderr
