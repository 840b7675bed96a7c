import json
import pickle

import pytest
import torch
from helpers import assert_one_line_error, make_ticket, run
from torch.nn.utils import prune

from ticketctl.artifacts import load_ticket, save_ticket
from ticketctl.artifacts.convert import export_torch_prune, import_checkpoint, save_torch_prune
from ticketctl.errors import TicketctlError
from ticketctl.models import build_model, prunable_names


def _torch_pruned_model(arch="digits_cnn", amount=0.6, seed=0, **args):
    torch.manual_seed(seed)
    model = build_model(arch, 10, **args)
    modules = dict(model.named_modules())
    for name in prunable_names(model):
        prune.l1_unstructured(modules[name.rsplit(".", 1)[0]], "weight", amount=amount)
    return model


def test_import_torch_prune_state_dict(tmp_path):
    model = _torch_pruned_model(width=8)
    sd = model.state_dict()
    path = tmp_path / "pruned.pt"
    torch.save(sd, path)
    ticket = import_checkpoint(path)
    assert ticket.arch == "digits_cnn" and ticket.arch_args["width"] == 8
    assert ticket.kind == "trained"
    for name in prunable_names(build_model("digits_cnn", width=8)):
        assert torch.equal(ticket.mask[name], sd[name + "_mask"].bool())
        assert torch.equal(ticket.state[name], sd[name + "_orig"] * sd[name + "_mask"])
    assert ticket.density == pytest.approx(0.4, abs=1e-3)
    # and it survives the trip through our own format
    back = load_ticket(save_ticket(ticket, tmp_path / "t.safetensors"))
    assert back.mask == ticket.mask


def test_import_authors_checkpoint_takes_rewind_weights(tmp_path):
    pruned = _torch_pruned_model("resnet20", amount=0.8, seed=1)
    init = build_model("resnet20").state_dict()
    sd = {"module." + k: v for k, v in pruned.state_dict().items()}
    # their ResNet carries an input-normalisation module that its forward never calls
    sd["module.normalize.mean"] = torch.tensor([0.49, 0.48, 0.45])
    sd["module.normalize.std"] = torch.tensor([0.25, 0.24, 0.26])
    init = {**init, "normalize.mean": sd["module.normalize.mean"],
            "normalize.std": sd["module.normalize.std"]}
    path = tmp_path / "res20s_extreme.pth.tar"
    torch.save({"epoch": 3, "state_dict": sd, "best_sa": 91.6, "init_weight": init}, path)

    ticket = import_checkpoint(path)
    assert ticket.kind == "ticket" and ticket.arch == "resnet20"
    assert ticket.dataset["normalize"] is False
    mask = ticket.mask["layer2.0.conv1.weight"]
    assert torch.equal(mask, sd["module.layer2.0.conv1.weight_mask"].bool())
    assert torch.equal(ticket.state["layer2.0.conv1.weight"],
                       init["layer2.0.conv1.weight"] * mask)
    trained = import_checkpoint(path, weights="trained")
    assert trained.kind == "trained"
    assert torch.equal(trained.state["layer3.2.conv2.weight"],
                       sd["module.layer3.2.conv2.weight_orig"]
                       * sd["module.layer3.2.conv2.weight_mask"])


def test_export_to_torch_prune_loads_into_a_pruned_model(tmp_path):
    ticket = make_ticket(seed=2)
    out = save_torch_prune(ticket, tmp_path / "export.pt")
    sd = torch.load(out, weights_only=True)
    assert set(sd) == set(export_torch_prune(ticket))
    model = build_model("digits_cnn", 10, width=8)
    modules = dict(model.named_modules())
    for name in ticket.mask:
        prune.identity(modules[name.rsplit(".", 1)[0]], "weight")
    model.load_state_dict(sd)
    model.eval()
    x = torch.randn(4, 1, 8, 8)
    assert torch.allclose(model(x), ticket.build_model().eval()(x))
    # and importing the export gives the same ticket back
    again = import_checkpoint(out)
    assert again.mask == ticket.mask
    assert all(torch.equal(again.state[k], ticket.state[k]) for k in ticket.state)


class Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_convert_refuses_arbitrary_objects_without_running_them(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth.tar"
    path.write_bytes(pickle.dumps({"state_dict": Boom(str(marker))}, protocol=2))
    with pytest.raises(TicketctlError):
        import_checkpoint(path)
    assert not marker.exists()


def test_convert_wrong_arch_is_a_clear_error(tmp_path):
    model = _torch_pruned_model(width=8)
    path = tmp_path / "p.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(TicketctlError, match="do not fit resnet20"):
        import_checkpoint(path, arch="resnet20")


def test_plain_state_dict_takes_its_zeros_as_the_mask(tmp_path):
    model = build_model("digits_cnn", 10, width=8)
    with torch.no_grad():
        model.conv3.weight[:2] = 0
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)
    ticket = import_checkpoint(path)
    assert not ticket.mask["conv3.weight"][:2].any()
    assert ticket.mask["conv3.weight"][2:].all()


# ---- a round trip keeps the ticket's metadata; --to from the extension ---------------------------


def _described_ticket(tmp_path):
    ticket = make_ticket(seed=4).derive(
        kind="signed", rewind_epoch=3, seed=11, class_names=[f"c{i}" for i in range(10)],
        dataset={"name": "cifar10", "val_size": 5000, "split_seed": 2, "normalize": True},
        extra={"spec": {"0.2": 3}, "note": "[acme] (c)"})
    return ticket, save_ticket(ticket, tmp_path / "t.safetensors")


def test_round_trip_through_torch_prune_keeps_the_metadata(tmp_path):
    ticket, src = _described_ticket(tmp_path)
    exported = tmp_path / "t.pt"
    result = run("convert", src, "-o", exported, "--json")  # .pt: torch-prune, no --to needed
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["format"] == "torch-prune"
    sd = torch.load(exported, weights_only=True)
    meta = sd._metadata["ticketctl"]
    assert all(isinstance(v, (str, int, float)) for v in meta.values())
    assert meta["kind"] == "signed" and meta["rewind_epoch"] == 3
    assert json.loads(meta["dataset"])["name"] == "cifar10"
    # ... and the export still loads as it is into a model pruned with prune.identity
    model = build_model("digits_cnn", 10, width=8)
    modules = dict(model.named_modules())
    for name in ticket.mask:
        prune.identity(modules[name.rsplit(".", 1)[0]], "weight")
    model.load_state_dict(sd)

    back_path = tmp_path / "back.safetensors"
    result = run("convert", exported, "-o", back_path, "--json")  # .safetensors: a ticket
    assert result.exit_code == 0, result.stderr
    back = load_ticket(back_path)
    for name in ("kind", "arch", "arch_args", "num_classes", "class_names", "dataset",
                 "rewind_epoch", "seed"):
        assert getattr(back, name) == getattr(ticket, name), name
    assert {k: back.extra[k] for k in ticket.extra} == ticket.extra
    assert back.extra["imported_from"] == "t.pt"
    assert back.mask == ticket.mask and back.tensors_sha256() == ticket.tensors_sha256()


def test_an_unknown_extension_without_to_is_one_line_listing_the_choices(tmp_path):
    src = save_ticket(make_ticket(), tmp_path / "t.safetensors")
    result = run("convert", src, "-o", tmp_path / "t.bin")
    assert_one_line_error(result, 2, "--to ticket or --to torch-prune")
    assert ".safetensors, .pt, .pth" in result.stderr
    assert not (tmp_path / "t.bin").exists()
    result = run("convert", src, "-o", tmp_path / "t.bin", "--to", "torch-prune", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["format"] == "torch-prune"
    assert_one_line_error(run("convert", src, "-o", tmp_path / "u.safetensors"), 2,
                          "already a ticket")


def _export_with(tmp_path, **changes):
    ticket = make_ticket(seed=3)
    sd = export_torch_prune(ticket)
    sd._metadata["ticketctl"].update(changes)
    path = tmp_path / "crafted.pt"
    torch.save(sd, path)
    return ticket, path


@pytest.mark.parametrize("changes, message", [
    ({"kind": "[/]"}, "'kind' must be one of"),
    ({"rewind_epoch": "3"}, "'rewind_epoch' must be an integer"),
    ({"rewind_epoch": -1}, "'rewind_epoch' must be an integer"),
    ({"seed": 2**70}, "'seed' must be an integer"),
    ({"dataset": "[" * 100000 + "]" * 100000}, "'dataset' is nested more than 32 levels"),
    ({"dataset": "{nope"}, "'dataset' is not valid JSON"),
    ({"dataset": '{"val_size": "100"}'}, "field 'dataset.val_size' must be an integer"),
    ({"dataset": "[1, 2]"}, "'dataset' must be a JSON object"),
    ({"extra": 5}, "'extra' must be JSON text"),
    ({"class_names": "[1, 2]"}, "'class_names' must be a list of strings"),
    ({"arch": "lenet9"}, "'arch' must be one of"),
])
def test_crafted_export_metadata_is_one_line_naming_the_field(tmp_path, changes, message):
    _, path = _export_with(tmp_path, **changes)
    assert_one_line_error(run("convert", path, "-o", tmp_path / "x.safetensors"), 2, message)
    assert not (tmp_path / "x.safetensors").exists()


def test_export_metadata_that_does_not_fit_the_tensors_is_not_taken(tmp_path):
    # arch_args that do not match the tensors: the architecture read from the tensors wins
    ticket, path = _export_with(tmp_path, arch_args=json.dumps({"width": 16}))
    back = import_checkpoint(path)
    assert back.arch_args["width"] == 8 and back.mask == ticket.mask
    # class names for another number of classes are dropped
    _, path = _export_with(tmp_path, class_names=json.dumps(["a", "b"]))
    assert import_checkpoint(path).class_names is None
    # --weights trained says what the weights are, whatever the export recorded
    _, path = _export_with(tmp_path)
    assert import_checkpoint(path).kind == "ticket"
    assert import_checkpoint(path, weights="trained").kind == "trained"
