"""Packed training: K models in one network train exactly as each would alone.

The packed network computes the same sums as K separate ones in another order (grouped
convolutions, a batched matmul), so the two differ by rounding alone. These tests run in
float64 (the `float64` fixture): unit roundoff u = 1.1e-16 instead of fp32's 6e-8. One layer
sums at most 64 x 3 x 3 = 576 products, so its two orders differ by at most 576u relative to
the magnitudes summed (6e-14), and 20 layers by at most ~1.3e-12. Training then amplifies a
difference step by step; these runs are short (2-3 epochs of digits), and in fp32 the same
comparisons were seen to end within 3.3e-5 of each other from rounding at 6e-8 (a growth
below 10^3). In float64 that growth leaves differences near 1e-13; the bounds below (1e-9 for
a forward pass, 1e-8 after training) keep a margin of 10^4 or more, on any CPU. Accuracies are
then exactly equal: a prediction would change only if two logits of an image were within
~1e-12 of each other."""

import json
from dataclasses import replace

import pytest
import torch

from ticketctl.artifacts import Mask
from ticketctl.data import load_dataset
from ticketctl.models import build_model, prunable_names
from ticketctl.prune import SearchOverrides, magnitude_prune, resolve_settings
from ticketctl.train import Trainer
from ticketctl.train.config import TrainOverrides
from ticketctl.train.packed import PackedTrainer
from ticketctl.train.packing import pack_model, pack_states, stack_inputs, unpack_state


@pytest.mark.parametrize("arch,args,shape", [("digits_cnn", {"width": 8}, (1, 8, 8)),
                                             ("resnet20", {}, (3, 32, 32))])
def test_packed_forward_equals_each_model(arch, args, shape, float64):
    models = [build_model(arch, 10, seed=s, **args).eval() for s in range(3)]
    packed = pack_model(models[0], 3).eval()
    packed.load_state_dict(pack_states([m.state_dict() for m in models]))
    x = torch.randn(3, 5, *shape)
    out = packed(stack_inputs(x)).view(5, 3, 10)
    for k, m in enumerate(models):
        torch.testing.assert_close(out[:, k], m(x[k]), atol=1e-9, rtol=1e-9)
        back = unpack_state(packed.state_dict(), k, 3)
        assert all(torch.equal(back[n], t) for n, t in m.state_dict().items()
                   if n != "num_batches_tracked" and t.dim() > 0)


def test_packed_training_matches_training_alone(float64):
    data = load_dataset("digits", split_seed=0)
    cfg = replace(resolve_settings("demo").train, epochs=2, batch_size=64)
    seeds = [3, 4, 5]
    models = [build_model("digits_cnn", 10, seed=s, width=8) for s in seeds]
    masks = []
    for i, m in enumerate(models):
        names = prunable_names(m)
        masks.append(magnitude_prune(dict(m.named_parameters()), Mask.ones(m, names),
                                     0.3 + 0.2 * i))
    initial = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]

    packed = PackedTrainer(build_model("digits_cnn", 10, seed=0, width=8), data, cfg, masks,
                           seeds)
    packed.restart([masks[k].apply_state(initial[k]) for k in range(3)], seeds)
    results = packed.fit()
    states = packed.model_states()

    for k, seed in enumerate(seeds):
        model = build_model("digits_cnn", 10, seed=0, width=8)
        model.load_state_dict(initial[k])
        alone = Trainer(model, data, replace(cfg, seed=seed), mask=masks[k])
        res = alone.fit()
        ref = alone.model_state()
        for name, t in ref.items():
            if t.is_floating_point():
                diff = float((states[k][name] - t).abs().max())
                assert diff <= 1e-8, (k, name, diff)
        for name, m in masks[k].items():
            assert not bool(states[k][name][~m].any())  # masked weights stay exactly zero
        assert results[k].test_accuracy == res.test_accuracy
    # the models really are different: different seeds, masks and data orders
    assert not torch.equal(states[0]["conv2.weight"], states[1]["conv2.weight"])


def test_packed_calibration_equals_one_model_at_a_time(float64):
    import numpy as np

    from ticketctl.protect.calibrate import calibrate
    from ticketctl.protect.trigger import TriggerSet

    data = load_dataset("digits", split_seed=0)
    rng = np.random.default_rng(0)
    ts = TriggerSet(rng.integers(0, 255, (20, 8, 8, 1), dtype=np.uint8),
                    rng.integers(0, 10, 20))
    cfg = replace(resolve_settings("demo").train, epochs=2)
    alone = calibrate("digits_cnn", data, ts, cfg, models=3, pack=1)
    packed = calibrate("digits_cnn", data, ts, cfg, models=3, pack=2)  # a pack of 2, then 1
    assert packed["pack"] == 2 and alone["pack"] == 1
    assert packed["agreements"] == alone["agreements"]
    assert packed["test_accuracies"] == alone["test_accuracies"]


def test_find_with_packed_trials_matches_unpacked(tmp_path, float64):
    from ticketctl.prune import find_ticket

    # 2 epochs (the demo rewinds to epoch 1, so each trial trains one): float64 is slow on CPU
    settings = resolve_settings("demo", train=TrainOverrides(epochs=2),
                                search=SearchOverrides(trials=3, rates=[0.5], max_rounds=1))
    a = find_ticket(settings, tmp_path / "a", pack=1)
    b = find_ticket(settings, tmp_path / "b", pack=3)
    assert len(a.rounds) == len(b.rounds) == 1
    assert len(b.rounds[0].accuracies) == 3
    assert a.rounds[0].accuracies == b.rounds[0].accuracies
    assert a.ticket.mask == b.ticket.mask
    rows = [json.loads(line) for line in (tmp_path / "b" / "epochs.jsonl").read_text()
            .splitlines()]
    trained = {r["training"] for r in rows}
    assert {"round-1-trial-0", "round-1-trial-1", "round-1-trial-2"} <= trained
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))


def test_default_pack_follows_model_size_on_cuda():
    """Packing is the default only where it measured faster: small models on CUDA."""
    from ticketctl.errors import TicketctlError
    from ticketctl.train.packed import PACK_MAX_PARAMS, default_pack, param_count

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    small = torch.nn.Linear(10, 10)
    assert param_count(small) == 110
    assert param_count({"w": torch.zeros(3, 4), "steps": torch.zeros(2, dtype=torch.long)}) == 12
    assert default_pack(cuda, None, param_count(small)) == 8
    assert default_pack(cuda, None, PACK_MAX_PARAMS + 1) == 1
    assert default_pack(cuda, None) == 8  # size unknown: the old default
    assert default_pack(cpu, None, 10) == 1
    assert default_pack(cuda, 3, PACK_MAX_PARAMS * 10) == 3  # asked for: as asked
    with pytest.raises(TicketctlError):
        default_pack(cuda, 0)
