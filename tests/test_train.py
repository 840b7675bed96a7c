import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from ticketctl.artifacts import Mask
from ticketctl.data import load_dataset
from ticketctl.models import build_model, prunable_names
from ticketctl.prune import magnitude_prune, resolve_settings
from ticketctl.train import TrainConfig, Trainer, lr_at
from ticketctl.train.sgd import MaskedSGD


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _fresh_gradients(*models: torch.nn.Module) -> None:
    """One random digits-shaped batch's gradients in every model (the old ones dropped)."""
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for model in models:
        for p in model.parameters():
            p.grad = None
        F.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("nesterov", [False, True])
def test_masked_sgd_equals_torch_sgd_without_a_mask(nesterov, float64):
    """The same update in another kernel order: in float64 each of the 5 steps can differ by a
    few roundings of |w| <= ~1 (u = 1.1e-16), so 1e-12 leaves a margin of 10^3."""
    torch.manual_seed(0)
    a = build_model("digits_cnn", width=8)
    b = copy.deepcopy(a)
    ref = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4,
                          nesterov=nesterov)
    ours = MaskedSGD(list(a.parameters()), [None] * len(list(a.parameters())), momentum=0.9,
                     weight_decay=5e-4, nesterov=nesterov)
    lr = torch.tensor(0.05)
    for _ in range(5):
        _fresh_gradients(a, b)
        ours.step(lr)
        ref.step()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-12, rtol=0, msg=n)


@pytest.mark.parametrize("nesterov", [False, True])
def test_masked_sgd_reads_given_gradients_and_leaves_them_as_they_were(nesterov):
    """Data-parallel steps hand the update the ranks' means (views of the all-reduce's
    buffer) instead of `.grad`: the same update as from `.grad`, bit for bit (the same
    operations on the same numbers), masked, and the gradients it read unchanged."""
    torch.manual_seed(0)
    a = build_model("digits_cnn", width=8)
    b = copy.deepcopy(a)
    masks = [(torch.rand_like(p) > 0.5) if p.dim() > 1 else None for p in a.parameters()]
    opts = [MaskedSGD(list(m.parameters()), masks, momentum=0.9, weight_decay=5e-4,
                      nesterov=nesterov) for m in (a, b)]
    with torch.no_grad():  # the masks applied to the weights, as a trainer does
        for model in (a, b):
            for p, m in zip(model.parameters(), masks, strict=True):
                if m is not None:
                    p.mul_(m)
    lr = torch.tensor(0.05)
    for _ in range(3):
        _fresh_gradients(a, b)
        given = [p.grad.clone() for p in b.parameters()]
        before = [g.clone() for g in given]
        for p in b.parameters():
            p.grad = None  # b's update must use what it is given
        opts[0].step(lr)
        opts[1].step(lr, given)
        assert all(torch.equal(g, h) for g, h in zip(given, before, strict=True))
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), n
    for p, m in zip(a.parameters(), masks, strict=True):
        if m is not None:
            assert bool((p[~m] == 0).all())


class _WithIdleParts(torch.nn.Module):
    """A user's network as many are: a frozen layer and a head its forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = torch.nn.Linear(64, 32)
        self.frozen.requires_grad_(False)
        self.head = torch.nn.Linear(32, 10)
        self.aux = torch.nn.Linear(32, 3)  # no gradient ever reaches it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.frozen(x.flatten(1))))


def test_masked_sgd_leaves_parameters_without_gradients_as_torch_sgd_does(float64):
    """Frozen and unused parameters have no gradient: the update leaves them (and their
    momentum) as they are and moves the rest as torch.optim.SGD does (float64: 1e-12, as
    above)."""
    torch.manual_seed(0)
    a = _WithIdleParts()
    b = copy.deepcopy(a)
    ref = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4,
                          nesterov=True)
    params = list(a.parameters())
    masks = [None if p.dim() < 2 else torch.rand_like(p) > 0.3 for p in params]
    with torch.no_grad():
        for p, q, m in zip(params, b.parameters(), masks, strict=True):
            if m is not None:
                p.mul_(m)
                q.mul_(m)
    ours = MaskedSGD(params, masks, momentum=0.9, weight_decay=5e-4, nesterov=True)
    idle = {n: p.clone() for n, p in a.named_parameters() if not n.startswith("head")}
    head = a.head.weight.clone()
    lr = torch.tensor(0.05)
    for _ in range(3):
        _fresh_gradients(a, b)
        for q, m in zip(b.parameters(), masks, strict=True):  # the mask, as ours applies it
            if m is not None and q.grad is not None:
                q.grad.mul_(m)
        ours.step(lr)
        ref.step()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-12, rtol=0, msg=n)
        if n in idle:
            assert torch.equal(pa, idle[n]), n
    assert all(not b.any() for b, p in zip(ours.bufs, params, strict=True) if p.grad is None)
    assert not torch.equal(a.head.weight, head)  # the comparison above is of moved weights


def test_a_network_with_frozen_and_unused_parameters_trains(digits):
    """The trainer takes such a network as it is (it failed on the first step before)."""
    torch.manual_seed(0)
    model = _WithIdleParts()
    idle = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head")}
    head = model.head.weight.detach().clone()
    trainer = Trainer(model, digits, TrainConfig(epochs=1, batch_size=64, lr=0.05))
    result = trainer.fit()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in idle.items())
    assert not torch.equal(state["head.weight"], head)
    # ten classes (chance: 10%); one epoch through a frozen random layer gave 48-63% over
    # 8 model and data-order seeds
    assert result.test_accuracy > 30


def test_pruned_weights_stay_exactly_zero_and_momentum_never_grows(digits):
    model = build_model("digits_cnn", seed=0)
    mask = magnitude_prune(dict(model.named_parameters()),
                           Mask.ones(model, prunable_names(model)), 0.7)
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.05, schedule="cosine", seed=0)
    trainer = Trainer(model, digits, cfg, mask=mask)
    result = trainer.fit()
    params = dict(model.named_parameters())
    for name in mask:
        assert bool((params[name][~mask[name]] == 0).all()), name
        assert bool((params[name][mask[name]] != 0).any()), name
        buf = trainer.opt.bufs[trainer.param_names.index(name)]
        assert bool((buf[~mask[name]] == 0).all()), name
    assert result.test_accuracy > 50  # 82.6-93.0% over 25 model and data-order seeds
    # the test accuracy reported is the one at the best-validation epoch
    best = max(result.history, key=lambda h: (h.val_accuracy, -h.epoch))
    assert result.best_epoch == best.epoch and result.test_accuracy == best.test_accuracy


def test_same_seed_same_weights_other_seed_other_weights(digits):
    def run(seed):
        model = build_model("digits_cnn", seed=0)
        Trainer(model, digits, TrainConfig(epochs=1, batch_size=64, lr=0.05, seed=seed)).fit()
        return model.state_dict()

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv2.weight"], c["conv2.weight"])


def test_in_place_rewind_restores_weights_statistics_and_momentum(digits):
    model = build_model("digits_cnn", seed=0)
    trainer = Trainer(model, digits, TrainConfig(epochs=2, batch_size=64, lr=0.05), None)
    trainer.train_epoch(1)
    state, opt = trainer.model_state(), trainer.optimizer_state()
    ptrs = [t.data_ptr() for t in model.state_dict().values()]
    trainer.train_epoch(2)
    trainer.load_model_state(state)
    trainer.load_optimizer_state(opt)
    assert [t.data_ptr() for t in model.state_dict().values()] == ptrs  # same storage
    now = trainer.model_state()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert all(torch.equal(v, opt[k]) for k, v in trainer.optimizer_state().items())


def test_schedules():
    cfg = TrainConfig(epochs=10, lr=0.4, schedule="cosine", warmup_epochs=2)
    assert lr_at(cfg, 0, 10) == pytest.approx(0.4 / 20)
    assert lr_at(cfg, 19, 10) == pytest.approx(0.4)
    assert lr_at(cfg, 20, 10) == pytest.approx(0.4)
    assert lr_at(cfg, 99, 10) < 0.001
    step = TrainConfig(epochs=182, lr=0.1, milestones=[91, 136])
    assert lr_at(step, 90 * 10, 10) == pytest.approx(0.1)
    assert lr_at(step, 91 * 10, 10) == pytest.approx(0.01)
    assert lr_at(step, 136 * 10, 10) == pytest.approx(0.001)


def _fit(data, test_eval):
    model = build_model("digits_cnn", width=8, seed=0)
    cfg = TrainConfig(epochs=6, batch_size=64, lr=0.05, seed=0, test_eval=test_eval)
    trainer = Trainer(model, data, cfg)
    return trainer.fit(), trainer.best_state()


def test_scoring_the_test_split_at_new_best_validation_epochs_gives_the_same_result(digits):
    every, w_every = _fit(digits, "every")
    best, w_best = _fit(digits, "best")
    # the same training (CPU: the same arithmetic), the same epoch picked, the same numbers
    assert (best.best_epoch, best.val_accuracy, best.test_accuracy) == \
        (every.best_epoch, every.val_accuracy, every.test_accuracy)
    assert all(torch.equal(w_every[k], w_best[k]) for k in w_every)
    # test scored exactly at the epochs whose validation accuracy beat every earlier one
    running = -1.0
    for e, b in zip(every.history, best.history, strict=True):
        assert e.val_accuracy == b.val_accuracy
        if e.val_accuracy > running:
            running = e.val_accuracy
            assert b.test_accuracy == e.test_accuracy
        else:
            assert b.test_accuracy is None
    assert any(b.test_accuracy is None for b in best.history)  # something was saved


def test_without_a_validation_split_the_test_split_is_scored_every_epoch():
    data = load_dataset("digits", val_size=0)
    res, _ = _fit(data, "best")
    assert all(h.test_accuracy is not None for h in res.history)
    assert res.best_epoch == 6  # the last epoch is the result


def test_new_training_settings_leave_old_settings_hashes_alone():
    """Run folders and job caches are keyed by the settings: fields added later appear in
    them only when changed."""
    d = TrainConfig().to_dict()
    assert "compile_mode" not in d and "test_eval" not in d and "fuse_step" not in d
    assert TrainConfig(fuse_step=False).to_dict()["fuse_step"] is False
    assert TrainConfig(test_eval="best").to_dict()["test_eval"] == "best"
    assert TrainConfig.from_dict(TrainConfig(compile_mode="max-autotune-no-cudagraphs")
                                 .to_dict()).compile_mode == "max-autotune-no-cudagraphs"
    problems = TrainConfig(compile_mode="fast", test_eval="never").problems()
    assert any("--compile-mode" in p for p in problems) and any("--test-eval" in p
                                                                 for p in problems)


def test_a_batch_larger_than_the_training_set_is_refused_in_one_line(digits):
    from ticketctl.errors import TicketctlError

    n = len(digits.train_y)
    with pytest.raises(TicketctlError, match=f"more than the {n} training images"):
        Trainer(build_model("digits_cnn", width=8), digits, TrainConfig(batch_size=n + 1))
    Trainer(build_model("digits_cnn", width=8), digits, TrainConfig(batch_size=n))  # fits


@pytest.mark.parametrize("kind", ["single", "plain", "trigger", "packed"])
def test_fused_step_traces_whole_and_trains_as_before(kind, digits, monkeypatch):
    """`fuse_step` compiles the step's gather, crop and flip, triggers, loss and masked SGD
    with the network. Compiled here with dynamo's "eager" backend and fullgraph=True: a graph
    break in either function fails (it would split the fused kernels again); each function is
    traced once, not again after a new schedule, a re-mask, an evaluation or a second epoch
    (a retrace every step would cost the speed the fusion is for), and a second trainer reuses
    the traces; and the traced graphs run the same operators in the same order as the eager
    step, so the weights after training are bitwise those of the trainer that compiles
    nothing, for both trainers."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from ticketctl.train import engine
    from ticketctl.train.packed import PackedTrainer

    counters: dict[str, CompileCounterWithBackend] = {}

    def strict(fn, cfg):
        counter = counters.setdefault(getattr(fn, "__name__", type(fn).__name__),
                                      CompileCounterWithBackend("eager"))
        return torch.compile(fn, backend=counter, fullgraph=True, dynamic=False)

    # "plain": no augmentation (no random draws go into the step)
    data = digits if kind == "plain" else replace(digits, augment="crop_flip")
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, momentum=0.9, nesterov=True)
    trigger = (data.test_x[:8], torch.arange(8) % 10) if kind == "trigger" else None

    def train(fuse: bool) -> dict[str, torch.Tensor]:
        model = build_model("digits_cnn", 10, seed=0, width=8)
        mask = magnitude_prune(dict(model.named_parameters()),
                               Mask.ones(model, prunable_names(model)), 0.5)
        c = replace(cfg, fuse_step=fuse)
        if kind == "packed":  # two models, each at its own learning rate
            packed = PackedTrainer(model, data, c, [mask, mask], [1, 2])
            packed.restart([mask.apply_state(model.state_dict())] * 2, [1, 2])
            packed.set_schedules([c, replace(c, lr=0.02)])
            t = packed.engine
        else:
            t = Trainer(model, data, c, mask=mask, trigger=trigger, trigger_per_batch=2)
        t.train_epoch(1, steps=4)
        if kind == "packed":
            packed.set_schedules([replace(c, lr=0.03), replace(c, lr=0.01)])
        else:
            t.set_schedule(replace(c, lr=0.03))
            t.set_mask(magnitude_prune(dict(model.named_parameters()), mask, 0.2))
        t.evaluate_models("val")
        t.train_epoch(2, steps=3)
        assert t.fused == fuse
        return t.model_state()  # packed: both models' weights, stacked

    reference = train(False)  # plain eager: COMPILE_ON_CPU is off
    monkeypatch.setattr(engine, "COMPILE_ON_CPU", True)
    monkeypatch.setattr(engine, "_compile", strict)
    torch._dynamo.reset()
    fused = train(True)
    # a second trainer in the process reuses the traced step: it must read its own tensors
    again = train(True)
    assert counters["_batch_loss"].frame_count == 1, counters["_batch_loss"].frame_count
    assert counters["_sgd_update"].frame_count == 1, counters["_sgd_update"].frame_count
    # autocast is entered around the step, not inside a traced function: a graph that
    # enters it is never kept in AOTAutograd's on-disk cache (each process traced again)
    for fn, counter in counters.items():
        for graph in counter.graphs:
            called = [str(getattr(n.target, "__name__", n.target)) for n in graph.graph.nodes
                      if n.op == "call_function"]
            assert called and not any("autocast" in c for c in called), (fn, called)
    for name, t in reference.items():
        assert torch.equal(fused[name], t), name
        assert torch.equal(again[name], t), name
    # seven steps moved the weights, so the comparison above means something
    untrained = build_model("digits_cnn", 10, seed=0, width=8).state_dict()
    first = reference[next(iter(reference))]
    assert not torch.equal(first[:len(untrained["conv1.weight"])], untrained["conv1.weight"])


@pytest.mark.parametrize("fuse", [True, False])
def test_compiled_bf16_step_trains_as_the_eager_bf16_step(fuse, digits, monkeypatch):
    """With bf16 autocast (the trainer's CUDA mode, turned on here on the CPU) the compiled
    step's backward is traced as eager autograd runs `loss.backward()`, outside autocast:
    AOTAutograd traces it with `backward_pass_autocast="off"` (its default traces the
    backward under the forward's autocast, which on a GPU computes the classifier's bias
    gradient in fp32 instead of bf16), and compiled through AOTAutograd (`aot_eager`, whose
    traced graphs run as traced), fused or the network alone, the weights after training
    are bitwise those of the eager step. (CPU autocast widens none of the backward's
    operations, so the weights alone would not tell the two settings apart.)"""
    from ticketctl.train import engine

    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.05, momentum=0.9, fuse_step=fuse)
    aot_eager = torch._dynamo.lookup_backend("aot_eager")
    traced_with: dict[str, object] = {}  # by compiled function: the setting its backward got

    def compile_(fn, cfg):
        name = getattr(fn, "__name__", type(fn).__name__)

        def backend(gm, example_inputs):
            traced_with[name] = torch._functorch.config.backward_pass_autocast
            return aot_eager(gm, example_inputs)
        return torch.compile(fn, backend=backend, dynamic=False)

    def train() -> dict[str, torch.Tensor]:
        model = build_model("digits_cnn", 10, seed=0, width=8)
        t = Trainer(model, digits, cfg, mask=Mask.ones(model, prunable_names(model)))
        t.bf16 = True  # bf16 autocast, as on a GPU (on a CPU the trainer runs in fp32)
        t.train_epoch(1, steps=3)
        return t.model_state()

    reference = train()  # eager: COMPILE_ON_CPU is off
    monkeypatch.setattr(engine, "COMPILE_ON_CPU", True)
    monkeypatch.setattr(engine, "_compile", compile_)
    torch._dynamo.reset()
    compiled = train()
    # what has a backward: the step's loss (fused) or the network (alone); the update has none
    assert traced_with["_batch_loss" if fuse else "DigitsCNN"] == "off", traced_with
    for name, t in reference.items():
        assert torch.equal(compiled[name], t), name
    untrained = build_model("digits_cnn", 10, seed=0, width=8).state_dict()
    assert not torch.equal(reference["fc.bias"], untrained["fc.bias"])  # three steps moved it


@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs"])
@pytest.mark.parametrize("combo", [False, True])
def test_combo_kernels_reach_every_compiled_function(monkeypatch, digits, mode, combo):
    """--combo-kernels is an Inductor option, which torch.compile takes only in place of a
    mode: every function the trainer compiles (network, batch loss, update) gets the mode's
    own options and combo kernels; without it, the mode as before."""
    from ticketctl.train import engine

    calls = []

    def record(fn, **kwargs):
        calls.append((getattr(fn, "__name__", type(fn).__name__), kwargs))
        return fn  # eager: what is compiled is not the question here

    cfg = TrainConfig(epochs=1, batch_size=32, compile_mode=mode, combo_kernels=combo)
    # this torch knows the options (it checks their names when the wrapper is made)
    torch.compile(lambda x: x, dynamic=False, **engine.compile_kwargs(cfg))
    monkeypatch.setattr(engine, "COMPILE_ON_CPU", True)
    monkeypatch.setattr(torch, "compile", record)
    model = build_model("digits_cnn", 10, seed=0, width=8)
    t = Trainer(model, digits, cfg, mask=Mask.ones(model, ["conv1.weight"]))
    t.train_epoch(1, steps=2)
    assert sorted(name for name, _ in calls) == ["DigitsCNN", "_batch_loss", "_sgd_update"]
    for _, kwargs in calls:
        assert kwargs["dynamic"] is False
        if combo:
            assert "mode" not in kwargs
            assert kwargs["options"]["combo_kernels"] is True
            assert kwargs["options"].get("max_autotune", False) is (mode != "default")
        else:
            assert "options" not in kwargs
            assert kwargs["mode"] == (None if mode == "default" else mode)


def test_combo_kernels_reach_the_training_settings_and_may_change_on_resume():
    """The CLI flag reaches the settings (and their hash); a run folder started without it
    may be resumed with it, as it changes how the step is compiled, not what it computes."""
    from ticketctl.cli.options import Training
    from ticketctl.prune.rundir import RESUMABLE

    on = resolve_settings("demo", train=Training(combo_kernels=True).overrides()).train
    off = resolve_settings("demo", train=Training().overrides()).train
    assert on.combo_kernels is True and off.combo_kernels is False
    assert "combo_kernels" not in off.to_dict() and on.to_dict()["combo_kernels"] is True
    assert "train.combo_kernels" in RESUMABLE


def test_reduce_bf16_reaches_the_training_settings_with_ranks_only(monkeypatch):
    """--reduce-bf16 (a data-parallel option) reaches the settings where there are ranks to
    average over: the launching process (--nproc) and a rank (started without it); without
    either it is refused. Off, it stays out of the settings, so run folders made before it
    existed resume as they were; a resume may take or drop it, as it may change --nproc."""
    from ticketctl.cli.options import Distributed, Training
    from ticketctl.errors import TicketctlError
    from ticketctl.prune.rundir import RESUMABLE

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    plain = Training().overrides()
    on = resolve_settings("demo", train=Distributed(nproc=2, reduce_bf16=True)
                          .train_overrides(plain)).train
    off = resolve_settings("demo", train=Distributed(nproc=2).train_overrides(plain)).train
    assert on.reduce_bf16 is True and off.reduce_bf16 is False
    assert "reduce_bf16" not in off.to_dict() and on.to_dict()["reduce_bf16"] is True
    assert "train.reduce_bf16" in RESUMABLE
    with pytest.raises(TicketctlError, match="give --nproc 2 or more"):
        Distributed(reduce_bf16=True).train_overrides(plain)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert Distributed(reduce_bf16=True).train_overrides(plain).reduce_bf16 is True


def test_bucket_mb_reaches_the_training_settings_with_ranks_only(monkeypatch):
    """--bucket-mb (a data-parallel option) reaches the settings with --nproc or in a rank,
    is refused without ranks and when negative; left out, the default (0: one all-reduce
    after backward) stays out of the settings, so earlier run folders keep their hash."""
    from ticketctl.cli.options import Distributed, Training
    from ticketctl.errors import TicketctlError
    from ticketctl.prune.rundir import RESUMABLE

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    plain = Training().overrides()
    on = resolve_settings("demo", train=Distributed(nproc=2, bucket_mb=8.0)
                          .train_overrides(plain)).train
    off = resolve_settings("demo", train=Distributed(nproc=2).train_overrides(plain)).train
    assert on.bucket_mb == 8.0 and off.bucket_mb == 0.0
    assert "bucket_mb" not in off.to_dict() and on.to_dict()["bucket_mb"] == 8.0
    assert "train.bucket_mb" in RESUMABLE
    with pytest.raises(TicketctlError, match="--bucket-mb: .*give --nproc 2 or more"):
        Distributed(bucket_mb=8.0).train_overrides(plain)
    with pytest.raises(TicketctlError, match="--bucket-mb must be 0 or more"):
        TrainConfig(bucket_mb=-1.0).validate()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert Distributed(bucket_mb=2.0).train_overrides(plain).bucket_mb == 2.0


@pytest.mark.parametrize("bf16", [False, True])
def test_the_data_parallel_step_averages_in_the_chosen_dtype(monkeypatch, digits, bf16):
    """The trainer hands every gradient to the all-reduce, on the wire in bf16 only when its
    settings say so."""
    from ticketctl.distributed import DistContext
    from ticketctl.train import engine

    seen = []
    means = []

    def averaged(ctx, grads, wire):
        seen.append((ctx.world, len(grads), wire))
        means.extend(torch.ones_like(g) for g in grads)
        return means

    monkeypatch.setattr(engine, "averaged_grads", averaged)
    model = build_model("digits_cnn", seed=0)
    trainer = Trainer(model, digits, TrainConfig(epochs=1, batch_size=64, reduce_bf16=bf16))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    trainer.dist = DistContext(0, 2, 0)
    got = trainer._average_grads()  # what the update reads
    assert len(got) == len(means) and all(g is m for g, m in zip(got, means, strict=True))
    assert seen == [(2, len(list(model.parameters())), torch.bfloat16 if bf16 else None)]


def test_no_fuse_step_reaches_the_training_settings():
    """The CLI flag turns the whole-step compilation off (and so enters the settings hash);
    without it the default stays out of the settings."""
    from ticketctl.cli.options import Training

    off = resolve_settings("demo", train=Training(no_fuse_step=True).overrides()).train
    on = resolve_settings("demo", train=Training().overrides()).train
    assert off.fuse_step is False and on.fuse_step is True
    assert off.to_dict() != on.to_dict()
