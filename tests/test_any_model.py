"""Tickets of networks ticketctl does not define (issue 16): the user's own factory, a
torch-prune state dict of an unknown model, a plain state dict with zeros where pruned. The
networks are defined in tests/nets.py, as a user's own code would be."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.utils.prune as tprune
from helpers import assert_one_line_error, run
from nets import ResCat, TinyViT
from safetensors.torch import save_file

from ticketctl.artifacts import Mask, Ticket, load_ticket, save_ticket
from ticketctl.models.sources import NetworkInfo, fingerprint

NETS = Path(__file__).with_name("nets.py")
FAST = ["--epochs", "2", "--max-rounds", "1", "--rates", "0.5"]


def factory(name: str) -> list[str]:
    return ["--model-factory", f"{NETS}:{name}"]


def _json(result):
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def split_and_merge(t: Path, d: Path, scores: tuple[str, ...], *extra: str) -> None:
    """Split `t` by each score into d/k-SCORE and d/l-SCORE; each pair merges back into the
    ticket's exact bytes."""
    for score in scores:
        doc = _json(run("split", t, "--score", score, "--key-ratio", "0.1", *extra,
                        "--key-mask", d / f"k-{score}", "--locked", d / f"l-{score}", "--json"))
        assert doc["key_weights"] > 0
        _json(run("merge", d / f"l-{score}", d / f"k-{score}", "-o",
                  d / f"m-{score}.safetensors", "--json"))
        assert (d / f"m-{score}.safetensors").read_bytes() == t.read_bytes()


@pytest.fixture(scope="module")
def rescat(tmp_path_factory):
    """A ticket found on digits for the residual-and-concatenation net (width 16: its 32x32
    mix layer holds a version-1 code)."""
    d = tmp_path_factory.mktemp("rescat")
    doc = _json(run("find", *factory("rescat"), "--arch-arg", "width=16", *FAST, "--out",
                    d / "t.safetensors", "--trained", d / "trained.safetensors",
                    "--run-dir", d / "run", "--json"))
    return d, doc


def test_a_factory_ticket_records_its_source_never_its_code(rescat):
    d, doc = rescat
    t = load_ticket(d / "t.safetensors")
    assert t.arch == "factory" and t.arch_args == {"width": 16, "in_channels": 1}
    assert t.network.source == "factory" and t.network.factory.endswith("nets.py:rescat")
    assert t.network.fingerprint == fingerprint(ResCat(10, 1, width=16))
    shown = run("inspect", d / "t.safetensors", "--json")
    meta = json.loads(shown.stdout)["metadata"]
    assert meta["network"]["fingerprint"] == t.network.fingerprint
    # conv weights but the first, in call order, are the prunable ones
    assert sorted(t.mask) == ["a1.weight", "a2.weight", "b.weight", "mix.weight"]
    assert 0 < doc["density"] < 1


def test_a_factory_ticket_through_split_merge_sign_verify_and_attacks(rescat, tmp_path):
    d, _ = rescat
    t = d / "t.safetensors"
    split_and_merge(t, tmp_path, ("omp", "random"))
    signed, receipt = tmp_path / "s.safetensors", tmp_path / "r.json"
    _json(run("sign", d / "trained.safetensors", "--message", "mine", "-o", signed,
              "--receipt", receipt, "--json"))
    v = _json(run("verify", signed, "--receipt", receipt, "--json"))
    assert v["verified"] is True and v["message"] == "mine"
    # with the factory the attacked models' accuracy is measured; without, it is not
    measured = _json(run("attack", "prune", signed, "--rates", "0.3", "--receipt", receipt,
                         *factory("rescat"), "--json"))
    blind = _json(run("attack", "prune", signed, "--rates", "0.3", "--receipt", receipt,
                      "--json"))
    assert measured["reference_accuracy"] > 10 and measured["rows"][0]["accuracy"] is not None
    assert blind["reference_accuracy"] is None and blind["rows"][0]["accuracy"] is None
    assert measured["rows"][0]["message"] == blind["rows"][0]["message"] == "mine"


def test_retrain_needs_the_same_factory(rescat, tmp_path):
    d, _ = rescat
    t = d / "t.safetensors"
    out = tmp_path / "r.safetensors"
    assert_one_line_error(run("retrain", t, "--epochs", "1", "-o", out), 2, "--model-factory")
    # a factory that builds another network is refused before training
    assert_one_line_error(run("retrain", t, "--epochs", "1", "-o", out,
                              *factory("rescat_wider")), 2, "does not match this ticket")
    assert_one_line_error(run("retrain", t, "--epochs", "1", "-o", out, *factory("tiny_vit")),
                          2, "takes no argument width")
    assert not out.exists()
    doc = _json(run("retrain", t, "--epochs", "1", "-o", out, *factory("rescat"), "--json"))
    assert load_ticket(out).arch == "factory" and doc["test_accuracy"] > 0


def test_find_resume_refuses_another_network(rescat, tmp_path):
    d, _ = rescat
    result = run("find", *factory("rescat"), *FAST, "--out", tmp_path / "t2.safetensors",
                 "--run-dir", d / "run", "--resume")  # the run was made with width=16
    assert result.exit_code == 2 and "Traceback" not in result.stderr


def test_depthwise_and_transformer_nets_find_tickets(tmp_path):
    dw = _json(run("find", *factory("depthwise"), *FAST, "--out", tmp_path / "dw.safetensors",
                   "--run-dir", tmp_path / "dw", "--json"))
    t = load_ticket(tmp_path / "dw.safetensors")
    assert set(t.mask) == {"dw1.weight", "pw1.weight", "g.weight"} and dw["density"] < 1
    # a transformer has no convolution to prune by default: its Linear layers by name
    assert_one_line_error(run("find", *factory("tiny_vit"), *FAST, "--out",
                              tmp_path / "v.safetensors", "--run-dir", tmp_path / "v0"),
                          2, "--prunable")
    _json(run("find", *factory("tiny_vit"), *FAST, "--prunable", r"block\.(q|k|v|proj|fc1|fc2)",
              "--out", tmp_path / "v.safetensors", "--run-dir", tmp_path / "v", "--json"))
    v = load_ticket(tmp_path / "v.safetensors")
    assert sorted(v.mask) == sorted(f"block.{n}.weight" for n in
                                    ("q", "k", "v", "proj", "fc1", "fc2"))
    assert v.network.prunable == r"block\.(q|k|v|proj|fc1|fc2)"
    for score in ("omp", "random"):
        _json(run("split", tmp_path / "v.safetensors", "--score", score, "--key-ratio", "0.1",
                  "--key-mask", tmp_path / f"vk-{score}", "--locked", tmp_path / f"vl-{score}",
                  "--json"))


def test_masks_in_name_order_are_the_same_masks(tmp_path):
    """A mask read back from a run folder is in name order (`3.10` before `3.2`); a second
    round must still take it (the GPU ViT run failed here with a 12-block network)."""
    doc = _json(run("find", *factory("deep_mlp"), "--epochs", "2", "--max-rounds", "3",
                    "--rates", "0.5", "--tolerance", "100", "--prunable", r"^3\.",
                    "--out", tmp_path / "t.safetensors", "--run-dir", tmp_path / "run",
                    "--json"))
    assert len(doc["rounds"]) == 3 and doc["density"] == pytest.approx(0.125, abs=0.01)


@pytest.mark.parametrize("spec,needle", [
    ("nowhere.py:build", "no such file"),
    ("{nets}:missing", "has no 'missing'"),
    ("{nets}:NOT_A_FUNCTION", "not a function"),
    ("{nets}:raises", "raised ValueError: the factory's own error"),
    ("{nets}:not_a_module", "not a torch.nn.Module"),
    ("no.such.module:build", "cannot import module"),
    ("justtext", "FILE.py:FUNCTION"),
])
def test_bad_factories_are_one_line(tmp_path, spec, needle):
    result = run("find", "--model-factory", spec.format(nets=NETS), *FAST, "--out",
                 tmp_path / "t.safetensors", "--run-dir", tmp_path / "run")
    assert_one_line_error(result, 2, needle)
    assert not (tmp_path / "run").exists() and not (tmp_path / "t.safetensors").exists()


def test_bad_network_options_are_one_line(tmp_path):
    out = ["--out", tmp_path / "t.safetensors", "--run-dir", tmp_path / "run"]
    cases = [
        (["--arch-arg", "width=wide", *factory("rescat")], "raised TypeError"),
        (["--arch-arg", "depth=3", *factory("rescat")], "takes no argument depth"),
        (["--arch-arg", "width", *factory("rescat")], "KEY=VALUE"),
        (["--arch-arg", "num_classes=3", *factory("rescat")], "set from the dataset"),
        (["--arch", "digits_cnn", *factory("rescat")], "not both"),
        (["--arch", "digits_cnn", "--arch-arg", "width=4"], "takes none"),
        (["--prunable", "nothing_matches", *factory("rescat")], "matches no weight"),
        (["--prunable", "(", *factory("rescat")], "not a regular expression"),
    ]
    for extra, needle in cases:
        assert_one_line_error(run("find", *FAST, *extra, *out), 2, needle)


def _signed_unknown_model(tmp_path) -> tuple[Path, Path]:
    """A user's model, pruned with torch.nn.utils.prune, imported, signed and exported."""
    torch.manual_seed(0)
    m = ResCat(10, 1, width=32)
    tprune.global_unstructured([(x, "weight") for x in (m.a1, m.a2, m.b, m.mix)],
                               pruning_method=tprune.L1Unstructured, amount=0.8)
    torch.save(m.state_dict(), tmp_path / "pruned.pt")
    doc = _json(run("convert", tmp_path / "pruned.pt", "-o", tmp_path / "t.safetensors",
                    "--json"))
    assert doc["arch"] == "none"
    _json(run("sign", tmp_path / "t.safetensors", "--message", "(c) acme 2026", "-o",
              tmp_path / "s.safetensors", "--receipt", tmp_path / "r.json", "--json"))
    return tmp_path / "s.safetensors", tmp_path / "r.json"


def test_a_torch_prune_dict_of_an_unknown_model_survives_30_percent_more_pruning(tmp_path):
    signed, receipt = _signed_unknown_model(tmp_path)
    t = load_ticket(signed)
    assert t.arch == "none" and t.network.source == "none"
    _json(run("convert", signed, "-o", tmp_path / "export.pt", "--json"))
    # the export loads into the user's own (pruned) model as it is
    m = ResCat(10, 1, width=32)
    for x in (m.a1, m.a2, m.b, m.mix):
        tprune.identity(x, "weight")
    missing, unexpected = m.load_state_dict(torch.load(tmp_path / "export.pt",
                                                       weights_only=True))
    assert missing == [] and unexpected == []
    for x in (m.a1, m.a2, m.b, m.mix):  # a thief prunes 30% more, by magnitude
        tprune.l1_unstructured(x, "weight", amount=0.3)
    torch.save(m.state_dict(), tmp_path / "stolen.pt")
    v = _json(run("verify", tmp_path / "stolen.pt", "--receipt", receipt, "--json"))
    assert v["verified"] is True and v["message"] == "(c) acme 2026"
    assert v["p_value"] < 1e-12


def test_weights_only_tickets_split_merge_and_attacks(tmp_path):
    signed, receipt = _signed_unknown_model(tmp_path)
    t = tmp_path / "t.safetensors"
    split_and_merge(t, tmp_path, ("omp", "random"))
    # a graph score needs the network
    assert_one_line_error(run("split", t, "--score", "betweenness", "--key-ratio", "0.1",
                              "--key-mask", tmp_path / "k", "--locked", tmp_path / "l"), 2,
                          "--model-factory")
    for attack, extra in (("prune", ["--rates", "0.3"]), ("addon", ["--rates", "0.02"])):
        doc = _json(run("attack", attack, signed, *extra, "--receipt", receipt, "--json"))
        assert doc["rows"][0]["accuracy"] is None and doc["rows"][0]["verified"] is True
    moved = _json(run("attack", "permute", signed, "--receipt", receipt, "-o",
                      tmp_path / "p.safetensors", "--json"))
    row = moved["rows"][0]
    assert row["accuracy"] is None and row["verified"] is True and row["message"] == \
        "(c) acme 2026"
    before, after = load_ticket(signed), load_ticket(tmp_path / "p.safetensors")
    assert after.mask.sha256() != before.mask.sha256()
    fake = _json(run("attack", "fake3", signed, "--receipt", receipt, "--message", "thief",
                     "--json"))
    assert fake["delta"] is None and fake["forger_on_forged"]["message"] == "thief"
    assert_one_line_error(run("attack", "prune", signed, "--receipt", receipt, "--trigger",
                              tmp_path / "x.npz"), 2)


def test_plain_and_safetensors_state_dicts_with_zeros(tmp_path):
    torch.manual_seed(1)
    m = TinyViT(10, 1)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    for k in ("block.fc1.weight", "block.fc2.weight"):  # pruned by the user: zeros
        w = sd[k]
        w[w.abs() < w.abs().flatten().kthvalue(w.numel() // 2).values] = 0
    torch.save(sd, tmp_path / "plain.pt")
    save_file(sd, tmp_path / "plain.safetensors")
    assert_one_line_error(run("convert", tmp_path / "plain.pt", "-o", tmp_path / "a.safetensors"),
                          2, "--masks-from-zeros")
    for src in ("plain.pt", "plain.safetensors"):
        out = tmp_path / f"{src}.ticket.safetensors"
        doc = _json(run("convert", tmp_path / src, "--masks-from-zeros", "-o", out, "--json"))
        t = load_ticket(out)
        assert sorted(t.mask) == ["block.fc1.weight", "block.fc2.weight"]
        assert t.num_classes == 10 and doc["density"] == pytest.approx(t.density)
        assert torch.equal(t.state["block.fc1.weight"], sd["block.fc1.weight"])
    out = tmp_path / "regex.safetensors"
    _json(run("convert", tmp_path / "plain.pt", "--prunable", r"block\.(q|k)\.weight", "-o",
              out, "--json"))
    assert sorted(load_ticket(out).mask) == ["block.k.weight", "block.q.weight"]
    assert_one_line_error(run("convert", tmp_path / "plain.pt", "--prunable", "nomatch", "-o",
                              tmp_path / "n.safetensors"), 2, "matches no weight")


def test_a_mask_that_does_not_fit_its_weight_is_refused(tmp_path):
    sd = {"w_orig": torch.ones(4, 4), "w_mask": torch.ones(4, 3)}
    torch.save(sd, tmp_path / "bad.pt")
    assert_one_line_error(run("convert", tmp_path / "bad.pt", "-o", tmp_path / "b.safetensors"),
                          2, "shape")


def test_a_file_naming_a_factory_never_runs_it(tmp_path):
    """A ticket's metadata may name any factory; loading it must never import that code."""
    marker = tmp_path / "imported.txt"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                    "def build(num_classes):\n    raise SystemExit\n")
    m = ResCat(10, 1, width=32)
    names = ["a1.weight", "a2.weight", "b.weight", "mix.weight"]
    mask = Mask({n: torch.rand(dict(m.named_parameters())[n].shape) < 0.5 for n in names})
    t = Ticket.from_model(m, mask, kind="trained", arch="factory", num_classes=10,
                          network=NetworkInfo("factory", fingerprint(m), f"{evil}:build"))
    path = save_ticket(t, tmp_path / "t.safetensors")
    assert run("inspect", path).exit_code == 0
    _json(run("sign", path, "--message", "m", "-o", tmp_path / "s.safetensors", "--receipt",
              tmp_path / "r.json", "--json"))
    _json(run("verify", tmp_path / "s.safetensors", "--receipt", tmp_path / "r.json", "--json"))
    _json(run("split", path, "--score", "omp", "--key-ratio", "0.1", "--key-mask",
              tmp_path / "k", "--locked", tmp_path / "l", "--json"))
    assert_one_line_error(run("retrain", path, "--epochs", "1", "-o", tmp_path / "r"), 2,
                          "--model-factory")
    assert not marker.exists()


@pytest.fixture
def fake_hubs(tmp_path, monkeypatch):
    """Stand-ins for torchvision and timm with their registry calls (neither is installed in
    CI): `get_model(name, weights, num_classes, **kw)` and `create_model(name, pretrained,
    num_classes, in_chans, **kw)`, building tests/nets.py networks."""
    pkg = tmp_path / "hubs"
    (pkg / "torchvision").mkdir(parents=True)
    (pkg / "torchvision" / "__init__.py").write_text(
        "from . import models\n")
    (pkg / "torchvision" / "models.py").write_text(
        f"import sys\nsys.path.insert(0, {str(NETS.parent)!r})\nimport nets\n"
        "def list_models():\n    return ['rescat']\n"
        "def get_model(name, weights=None, num_classes=1000, width=8):\n"
        "    assert weights is None\n    return nets.ResCat(num_classes, 3, width)\n")
    (pkg / "timm.py").write_text(
        f"import sys\nsys.path.insert(0, {str(NETS.parent)!r})\nimport nets\n"
        "def is_model(name):\n    return name == 'tiny_vit'\n"
        "def create_model(name, pretrained=False, num_classes=1000, in_chans=3):\n"
        "    assert not pretrained\n    return nets.TinyViT(num_classes, in_chans)\n")
    monkeypatch.syspath_prepend(str(pkg))
    yield pkg
    for name in ("torchvision", "torchvision.models", "timm"):  # no stand-in left behind
        if getattr(sys.modules.get(name), "__file__", "").startswith(str(pkg)):
            del sys.modules[name]


def test_torchvision_and_timm_names_build_through_their_registries(fake_hubs, tmp_path):
    from ticketctl.models.registry import build_model

    m = build_model("torchvision:rescat", 7, in_channels=3, width=4)
    assert m.head.out_features == 7 and m.stem.out_channels == 4
    v = build_model("timm:tiny_vit", 5, in_channels=1)
    assert v.head.out_features == 5
    for arch, needle in (("torchvision:nope", "torchvision has no model 'nope'"),
                         ("timm:nope", "timm has no model 'nope'")):
        with pytest.raises(Exception, match=needle):
            build_model(arch, 10)
    with pytest.raises(Exception, match="3 input channels"):
        build_model("torchvision:rescat", 10, in_channels=1)
    # a ticket of a torchvision network records the source and its fingerprint
    doc = _json(run("find", "--arch", "timm:tiny_vit", "--prunable", r"fc\d", *FAST, "--out",
                    tmp_path / "t.safetensors", "--run-dir", tmp_path / "run", "--json"))
    t = load_ticket(tmp_path / "t.safetensors")
    assert t.arch == "timm:tiny_vit" and t.network.source == "timm" and doc["density"] < 1
    assert t.network.fingerprint == fingerprint(TinyViT(10, 1))


def test_architecture_arguments_that_load_weights_are_refused(fake_hubs, tmp_path):
    """A ticket file stores its architecture's arguments; one that would make timm or
    torchvision read or fetch weights (timm's checkpoint_path unpickles a file) is refused
    before the package builds anything, whether a file or the command line gives it."""
    from ticketctl.errors import TicketctlError
    from ticketctl.models.registry import build_model

    for arch, args in (("timm:tiny_vit", {"checkpoint_path": "/tmp/evil.pth"}),
                       ("timm:tiny_vit", {"pretrained_cfg_overlay": {"file": "x"}}),
                       ("torchvision:rescat", {"weights_backbone": "DEFAULT"})):
        with pytest.raises(TicketctlError, match=f"refusing the architecture argument.*"
                                                 f"{next(iter(args))}"):
            build_model(arch, 5, **args)
    # a ticket whose file names one: every command that rebuilds its network refuses it
    doc = _json(run("find", "--arch", "timm:tiny_vit", "--prunable", r"fc\d", *FAST, "--out",
                    tmp_path / "t.safetensors", "--run-dir", tmp_path / "run", "--json"))
    assert doc["density"] < 1
    t = load_ticket(tmp_path / "t.safetensors")
    save_ticket(t.derive(arch_args={**t.arch_args, "checkpoint_path": "/tmp/evil.pth"}),
                tmp_path / "planted.safetensors")
    assert_one_line_error(run("retrain", tmp_path / "planted.safetensors", "--epochs", "1",
                              "-o", tmp_path / "r"), 2, "checkpoint_path")
    assert_one_line_error(run("find", "--arch", "timm:tiny_vit", "--arch-arg",
                              "checkpoint_path=/tmp/evil.pth", *FAST, "--out", tmp_path / "u",
                              "--run-dir", tmp_path / "run2"), 2, "checkpoint_path")


def test_a_missing_package_is_named(tmp_path):
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:  # CI: the message to install it
        assert_one_line_error(run("find", "--arch", "torchvision:resnet18", *FAST, "--out",
                                  tmp_path / "t", "--run-dir", tmp_path / "run"), 2,
                              "pip install torchvision")
    assert_one_line_error(run("find", "--arch", "nohub:x", *FAST, "--out", tmp_path / "t",
                              "--run-dir", tmp_path / "run"), 2, "unknown architecture")


# the three kinds of network the issue names, each large enough to carry a version-1 code
PIPELINES = {
    "residual-and-concat": ["--arch-arg", "width=16", *factory("rescat")],
    "depthwise": ["--arch-arg", "width=64", *factory("depthwise")],
    "transformer": ["--arch-arg", "dim=48", "--prunable", r"block\.(q|k|v|proj|fc1|fc2)",
                    *factory("tiny_vit")],
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(PIPELINES))
def test_own_networks_through_every_command(kind, tmp_path):
    """find on digits, split by all four scores, merge, sign, verify and the attacks, for a
    network given with --model-factory (the factory named again wherever it must run)."""
    net = PIPELINES[kind]
    fac = net[-2:]
    t, trained = tmp_path / "t.safetensors", tmp_path / "trained.safetensors"
    # three halvings (12.5% density) leave room for the code's compensation, whatever the
    # accuracy (a tolerance of 100 points accepts every round)
    _json(run("find", *net, "--epochs", "2", "--max-rounds", "3", "--rates", "0.5",
              "--tolerance", "100", "--out", t, "--trained", trained, "--run-dir",
              tmp_path / "run", "--json"))
    split_and_merge(t, tmp_path, ("omp", "random", "ewp", "betweenness"), *fac)
    signed, receipt = tmp_path / "s.safetensors", tmp_path / "r.json"
    _json(run("sign", trained, "--message", kind, "-o", signed, "--receipt", receipt,
              "--json"))
    v = _json(run("verify", signed, "--receipt", receipt, "--json"))
    assert v["verified"] is True and v["message"] == kind
    for attack, extra in (("prune", ["--rates", "0.3"]), ("addon", ["--rates", "0.01"]),
                          ("permute", []), ("finetune", ["--sweep-epochs", "1"])):
        doc = _json(run("attack", attack, signed, *extra, "--receipt", receipt, *fac,
                        "--json"))
        row = doc["rows"][0]
        assert row["accuracy"] is not None and row["verified"] is True, (attack, row)
        assert row["message"] == kind or attack == "addon", (attack, row)
    fake = _json(run("attack", "fake3", signed, "--receipt", receipt, "--message", "thief",
                     *fac, "--json"))
    assert fake["delta"] is not None and fake["forger_on_forged"]["message"] == "thief"
    for attack, extra in (("nokey", []), ("fake1", ["--key-ratios", "0.1"])):
        result = run("attack", attack, tmp_path / "l-omp", *extra, "--key-mask",
                     tmp_path / "k-omp", "--epochs", "2", *fac, "--json")
        # exit 1 means the lock had no effect on this tiny task: still a measured answer
        assert result.exit_code in (0, 1), result.stderr
        assert json.loads(result.stdout)["rows"][0]["accuracy"] is not None
