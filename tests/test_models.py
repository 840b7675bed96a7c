import pytest
import torch
from torch import nn

from ticketctl.errors import TicketctlError
from ticketctl.models import ARCHS, build_model, prunable_names

# Parameter counts of the registered architectures (10 classes); ResNet-20 is the paper's 0.27M.
PARAMS = {"resnet20": 269_722, "resnet18": 11_173_962, "resnet50": 23_520_842,
          "vgg16": 14_724_042, "digits_cnn": 65_834}


def test_resnet20_has_the_papers_prunable_weight_count():
    model = build_model("resnet20")
    params = dict(model.named_parameters())
    names = prunable_names(model)
    assert len(names) == 18
    assert sum(params[n].numel() for n in names) == 267_264
    assert "conv1.weight" not in names and "fc.weight" not in names


def test_resnet20_shortcuts_have_no_parameters():
    model = build_model("resnet20")
    assert not any("shortcut" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_parameter_counts_and_forward_shapes(arch):
    model = build_model(arch, num_classes=10).eval()
    assert sum(p.numel() for p in model.parameters()) == PARAMS[arch]
    x = torch.randn(2, 1, 8, 8) if arch == "digits_cnn" else torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    model100 = build_model(arch, num_classes=100).eval()
    assert model100(x).shape == (2, 100)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_prunable_excludes_first_conv_and_linear_by_default(arch):
    model = build_model(arch)
    convs = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    names = prunable_names(model)
    assert names == convs[1:]
    with_linear = prunable_names(model, prune_linear=True)
    assert with_linear[-1] == "fc.weight" and with_linear[:-1] == names


def test_digits_cnn_has_a_grid_large_enough_for_a_qr_code():
    model = build_model("digits_cnn")
    grids = [tuple(dict(model.named_parameters())[n].shape[:2]) for n in prunable_names(model)]
    assert any(o >= 32 and i >= 32 for o, i in grids)


def test_unknown_arch_and_bad_args_are_refused():
    with pytest.raises(TicketctlError, match="unknown architecture 'resnet21'"):
        build_model("resnet21")
    with pytest.raises(TicketctlError, match="takes no argument"):
        build_model("resnet20", depth=3)


def test_seeded_build_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(7)
    expected_next = torch.rand(1)
    torch.manual_seed(7)
    a = build_model("digits_cnn", seed=3).state_dict()
    assert torch.equal(torch.rand(1), expected_next)
    b = build_model("digits_cnn", seed=3).state_dict()
    c = build_model("digits_cnn", seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv2.weight"], c["conv2.weight"])
