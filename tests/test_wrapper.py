"""The wrapper as a drop-in torch.optim.Optimizer: the contract, over every base optimizer."""

from __future__ import annotations

import copy
import io
import math
import pickle
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import adaptive_lr
from adaptive_lr import AdaptiveOptimizer, ControllerOptions


class SignMomentum(torch.optim.Optimizer):
    """A third-party optimizer: sign of a heavy-ball buffer (as Lion-like methods do)."""

    def __init__(self, params, lr=0.01, momentum=0.9):
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("buf", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                p.add_(buf.sign(), alpha=-group["lr"])
        return loss


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-4),
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=1e-2),
    "radam": lambda ps: torch.optim.RAdam(ps, lr=1e-2),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
    "adamax": lambda ps: torch.optim.Adamax(ps, lr=1e-2),
    "third_party": lambda ps: SignMomentum(ps, lr=1e-3),
}
NO_MOMENTUM = {"sgd", "adagrad"}


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))


def batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(16, 4, generator=g)
        yield x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, *, scheduler=None, seed: int = 1):
    losses = []
    for x, y in batches(steps, seed):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


# -- identity ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_all_components_off_reproduces_the_bare_optimizer_bit_for_bit(name):
    bare_model, wrapped_model = make_model(), make_model()
    bare = OPTIMIZERS[name](bare_model.parameters())
    wrapped = AdaptiveOptimizer(OPTIMIZERS[name](wrapped_model.parameters()), ControllerOptions.all_off())
    sched_bare = torch.optim.lr_scheduler.StepLR(bare, step_size=5, gamma=0.5)
    sched_wrapped = torch.optim.lr_scheduler.StepLR(wrapped, step_size=5, gamma=0.5)
    train(bare_model, bare, 20, scheduler=sched_bare)
    train(wrapped_model, wrapped, 20, scheduler=sched_wrapped)
    assert params_equal(bare_model, wrapped_model)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_default_wrapper_trains_every_optimizer_downhill(name):
    model = make_model()
    opt = adaptive_lr.wrap(OPTIMIZERS[name](model.parameters()))
    x, y = next(batches(1, seed=3))
    first = nn.functional.cross_entropy(model(x), y).item()
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    assert nn.functional.cross_entropy(model(x), y).item() < first
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_momentum_is_controlled_exactly_where_the_optimizer_has_one(name):
    model = make_model()
    opt = adaptive_lr.wrap(OPTIMIZERS[name](model.parameters()))
    train(model, opt, 3)
    controlled = name not in NO_MOMENTUM
    assert opt.controls_momentum is controlled
    assert all(r.momentum_controlled is controlled for r in opt.history)
    assert all((r.momentum is None) is (not controlled) for r in opt.history)
    assert ("no momentum to control" in repr(opt)) is (not controlled)


# -- a real Optimizer sharing its state ---------------------------------------------------
def test_wrapper_is_an_optimizer_sharing_groups_state_and_defaults():
    base = torch.optim.SGD(make_model().parameters(), lr=0.1, momentum=0.9)
    opt = adaptive_lr.wrap(base)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is base.param_groups
    assert opt.state is base.state
    assert opt.defaults is base.defaults


def test_groups_stay_shared_after_the_base_optimizer_reloads_its_state():
    base = torch.optim.SGD(make_model().parameters(), lr=0.1, momentum=0.9)
    opt = adaptive_lr.wrap(base)
    base.load_state_dict(base.state_dict())  # rebuilds base.param_groups
    opt.param_groups[0]["lr"] = 0.5
    assert base.param_groups[0]["lr"] == 0.5


def test_step_returns_the_closure_loss_and_evaluates_it_once():
    model = make_model()
    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = next(batches(1))
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert opt.history[-1].loss == pytest.approx(loss.item())


def test_zero_grad_sets_to_none_or_zero_as_asked():
    model = make_model()
    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    train(model, opt, 1)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_added_param_group_is_trained_with_its_own_lr():
    model, extra = make_model(), nn.Linear(3, 1)
    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    opt.add_param_group({"params": extra.parameters(), "lr": 0.01})
    before = extra.weight.detach().clone()
    x, y = next(batches(1))
    opt.zero_grad()
    (nn.functional.cross_entropy(model(x), y) + extra(model(x)).pow(2).mean()).backward()
    opt.step()
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["momentum"] == 0.9
    assert not torch.equal(before, extra.weight)
    assert len(opt.history[-1].group_grad_norms) == 2


def test_step_pre_and_post_hooks_run_in_order():
    model = make_model()
    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    train(model, opt, 1)
    assert calls == ["pre", "post"]


def test_repr_names_the_base_optimizer_what_is_controlled_and_changed_options():
    opt = adaptive_lr.wrap(torch.optim.Adam(make_model().parameters()), growth_rate=0.01)
    text = repr(opt)
    assert "Adam" in text and "betas[0]" in text and "growth_rate" in text


# -- composition with schedules -----------------------------------------------------------
SCHEDULERS = {
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "exponential": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9),
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
    "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)),
    "sequential": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o,
        [
            torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=3),
            torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9),
        ],
        milestones=[3],
    ),
    "one_cycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20),
}


@pytest.mark.parametrize("base", ["sgd_momentum", "adam"])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scheduler_values_between_steps_are_exactly_the_bare_schedule(name, base):
    """The controller never writes into the schedule: group['lr'] (and momentum) between
    steps are the values the same scheduler produces on the bare optimizer."""
    bare_model, model = make_model(), make_model()
    bare = OPTIMIZERS[base](bare_model.parameters())
    opt = adaptive_lr.wrap(OPTIMIZERS[base](model.parameters()))
    sched_bare, sched = SCHEDULERS[name](bare), SCHEDULERS[name](opt)
    key = "momentum" if "momentum" in bare.param_groups[0] else "betas"
    for (x, y), _ in zip(batches(15), range(15), strict=True):
        for o, m, s in ((bare, bare_model, sched_bare), (opt, model, sched)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
            s.step()
        assert opt.param_groups[0]["lr"] == bare.param_groups[0]["lr"]
        assert opt.param_groups[0][key] == bare.param_groups[0][key]


def test_lr_used_is_the_scheduled_lr_times_the_multiplier():
    model = make_model()
    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8)
    seen = []
    opt.optimizer.register_step_pre_hook(
        lambda o, *_: seen.append((o.param_groups[0]["lr"], o.param_groups[0]["momentum"]))
    )
    for x, y in batches(6):
        scheduled = opt.param_groups[0]["lr"]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        record = opt.history[-1]
        assert seen[-1][0] == pytest.approx(scheduled * record.lr_multiplier)
        assert record.lr == pytest.approx(seen[-1][0])
        assert record.momentum == seen[-1][1]
        sched.step()


def test_one_cycle_with_cycle_momentum_drives_betas_through_the_wrapper():
    opt = adaptive_lr.wrap(torch.optim.Adam(make_model().parameters(), lr=1e-3))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=10, cycle_momentum=True)
    betas = []
    for _ in range(5):
        opt.step()  # no gradients: nothing moves, the schedule still advances
        sched.step()
        betas.append(opt.param_groups[0]["betas"][0])
    # beta1 falls to base_momentum while lr warms up (3 steps), then rises again
    assert betas[:2] == sorted(betas[:2], reverse=True) and betas[2:] == sorted(betas[2:])
    assert min(betas) == pytest.approx(0.85) and max(betas) < 0.95


def test_reduce_lr_on_plateau_lowers_the_scheduled_lr():
    model = make_model()
    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    for _ in range(3):
        train(model, opt, 1)
        sched.step(1.0)  # a flat metric
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)


def test_tensor_lr_is_restored_as_the_same_tensor():
    params = make_model().parameters()
    lr = torch.tensor(0.01)
    opt = adaptive_lr.wrap(torch.optim.Adam(params, lr=lr))
    train(make_model(), opt, 0)
    model = make_model()
    opt = adaptive_lr.wrap(torch.optim.Adam(model.parameters(), lr=lr))
    train(model, opt, 3)
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(0.01)


# -- copies and pickling --------------------------------------------------------------------
def test_deepcopy_with_a_scheduler_is_independent_of_the_original():
    model = make_model()
    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    train(model, opt, 3)
    clone = copy.deepcopy(opt)
    step_before, history_before = opt._controller_state.step, len(opt.history)
    clone.step()
    clone.step()
    assert opt._controller_state.step == step_before and len(opt.history) == history_before
    assert clone._controller_state.step == step_before + 2
    assert clone.param_groups[0]["params"][0] is not opt.param_groups[0]["params"][0]


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda obj: pickle.loads(pickle.dumps(obj))])
def test_a_copy_taken_mid_training_continues_exactly_as_the_original(copier):
    model = make_model()
    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    train(model, opt, 3)
    model_copy, opt_copy = copier((model, opt))
    assert train(model_copy, opt_copy, 4, seed=2) == train(model, opt, 4, seed=2)
    assert [r.curvature for r in opt_copy.history] == [r.curvature for r in opt.history]
    assert opt_copy.history[-1].curvature is not None


def test_pickle_round_trip_with_a_scheduler_attached():
    model = make_model()
    opt = adaptive_lr.wrap(torch.optim.Adam(model.parameters()))
    torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    train(model, opt, 3)
    clone = pickle.loads(pickle.dumps(opt))
    assert clone.lr_multiplier == opt.lr_multiplier
    assert clone._controller_state == opt._controller_state
    clone.register_step_pre_hook(lambda *_: None)  # hooks are rebuilt


# -- checkpoints ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sgd_momentum", "adam", "rmsprop", "adagrad", "third_party"])
def test_resume_from_a_checkpoint_file_continues_bit_for_bit(name, tmp_path):
    def run(steps, resume_at=None):
        model = make_model()
        opt = adaptive_lr.wrap(OPTIMIZERS[name](model.parameters()))
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.95)
        data = list(batches(steps))
        start = 0
        if resume_at is not None:
            for x, y in data[:resume_at]:
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                sched.step()
            path = tmp_path / "ckpt.pt"
            torch.save(
                {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, path
            )
            model = make_model(seed=123)  # a fresh process: other weights, fresh optimizer
            opt = adaptive_lr.wrap(OPTIMIZERS[name](model.parameters()))
            sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.95)
            ckpt = torch.load(path, weights_only=True)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            sched.load_state_dict(ckpt["sched"])
            start = resume_at
        for x, y in data[start:]:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
        return model, opt

    straight, opt_a = run(25)
    resumed, opt_b = run(25, resume_at=11)
    assert params_equal(straight, resumed)
    assert opt_a._controller_state == opt_b._controller_state


def test_state_dict_keeps_the_standard_layout_with_plain_values():
    model = make_model()
    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    train(model, opt, 3)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert "adaptive_lr" in sd["param_groups"][0]
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)
    assert "adaptive_lr.descent" not in opt.state[model[0].weight]  # live state untouched


def test_loading_a_checkpoint_of_another_optimizer_class_fails_and_changes_nothing():
    model = make_model()
    sgd = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    train(model, sgd, 2)
    adam = adaptive_lr.wrap(torch.optim.Adam(model.parameters()))
    train(model, adam, 2)
    state_before = copy.deepcopy(adam.state_dict())
    with pytest.raises(ValueError, match="SGD"):
        adam.load_state_dict(sgd.state_dict())
    after = adam.state_dict()
    assert after["param_groups"][0]["adaptive_lr"] == state_before["param_groups"][0]["adaptive_lr"]


def test_loading_a_checkpoint_with_other_param_groups_fails_clearly():
    model = make_model()
    one = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    two = adaptive_lr.wrap(
        torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.1)
    )
    with pytest.raises(ValueError, match="parameter groups"):
        two.load_state_dict(one.state_dict())


def test_a_bare_optimizer_checkpoint_loads_with_a_fresh_controller():
    model = make_model()
    bare = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, bare, 2)
    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    opt.load_state_dict(bare.state_dict())
    assert opt._controller_state == adaptive_lr.init_state(opt.options)
    assert torch.equal(
        opt.state[model[0].weight]["momentum_buffer"], bare.state[model[0].weight]["momentum_buffer"]
    )


# -- gradients that are missing, not finite, or spiking --------------------------------------
def test_frozen_and_unused_parameters_are_left_alone():
    model = make_model()
    unused = nn.Parameter(torch.ones(3))
    model[0].weight.requires_grad_(False)
    opt = adaptive_lr.wrap(torch.optim.AdamW([*model.parameters(), unused], weight_decay=0.1))
    frozen = model[0].weight.detach().clone()
    train(model, opt, 5)
    assert torch.equal(model[0].weight, frozen)
    assert torch.equal(unused, torch.ones(3))


def test_a_parameter_whose_gradient_appears_only_sometimes_is_handled():
    model, extra = make_model(), nn.Linear(3, 1)
    opt = adaptive_lr.wrap(torch.optim.SGD([*model.parameters(), *extra.parameters()], lr=0.1, momentum=0.9))
    for i, (x, y) in enumerate(batches(12)):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if i % 3 == 0:
            loss = loss + extra(model(x)).pow(2).mean()
        loss.backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in [*model.parameters(), *extra.parameters()])
    assert all(math.isfinite(r.grad_norm) for r in opt.history)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["sgd_momentum", "adam"])
def test_non_finite_gradient_skips_the_step_leaving_parameters_and_state_exactly(name, bad):
    model = make_model()
    opt = adaptive_lr.wrap(OPTIMIZERS[name](model.parameters()))
    train(model, opt, 3)
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.optimizer.state_dict())
    multiplier = opt.lr_multiplier
    x, y = next(batches(1))
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0] = bad
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    after = opt.optimizer.state_dict()
    for k, v in state["state"].items():
        for key, value in v.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after["state"][k][key]))
    assert opt.history[-1].event == "skip"
    assert opt.lr_multiplier == pytest.approx(multiplier * opt.options.skip_backoff)


def test_non_finite_loss_from_a_closure_skips_the_step():
    model = make_model()
    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(torch.randn(4, 4)), torch.zeros(4, dtype=torch.long))
        loss.backward()
        return loss * float("inf")

    opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert opt.history[-1].event == "skip"


def test_a_gradient_spike_is_clipped_and_cuts_the_multiplier():
    model = make_model()
    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    train(model, opt, 20)
    multiplier = opt.lr_multiplier
    x, y = next(batches(1, seed=9))
    opt.zero_grad()
    (1e4 * nn.functional.cross_entropy(model(x), y)).backward()
    opt.step()
    record = opt.history[-1]
    assert record.event == "spike"
    assert record.clip_coef < 1e-2
    assert opt.lr_multiplier <= multiplier * opt.options.spike_backoff * (1 + 1e-9)


def test_sparse_gradients_raise_a_clear_error_without_changing_anything():
    embedding = nn.Embedding(10, 3, sparse=True)
    opt = adaptive_lr.wrap(torch.optim.SGD(embedding.parameters(), lr=0.1))
    embedding(torch.tensor([1, 2])).sum().backward()
    before = embedding.weight.detach().clone()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    assert torch.equal(before, embedding.weight)


def test_step_without_any_gradient_changes_nothing():
    model = make_model()
    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_history_is_bounded_and_streams_to_the_callback_and_csv(tmp_path):
    model = make_model()
    records = []
    opt = adaptive_lr.wrap(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), history_size=5, callback=records.append
    )
    train(model, opt, 8)
    assert len(opt.history) == 5 and len(records) == 8
    assert [r.step for r in opt.history] == [4, 5, 6, 7, 8]
    path = tmp_path / "history.csv"
    adaptive_lr.write_history_csv(opt.history, path)
    lines = path.read_text().splitlines()
    assert lines[0].startswith("step,lr,lr_multiplier,momentum,grad_norm,curvature,event")
    assert len(lines) == 6


def test_streaming_csv_writer_writes_a_row_per_step(tmp_path):
    model = make_model()
    path = tmp_path / "stream.csv"
    with adaptive_lr.CSVHistoryWriter(path) as writer:
        opt = adaptive_lr.wrap(torch.optim.Adam(model.parameters()), callback=writer)
        train(model, opt, 4)
    assert len(path.read_text().splitlines()) == 5


# -- bad input ---------------------------------------------------------------------------------
def test_wrapping_something_that_is_not_an_optimizer_raises_type_error():
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        adaptive_lr.wrap(make_model())


def test_wrapping_twice_raises_type_error():
    opt = adaptive_lr.wrap(torch.optim.SGD(make_model().parameters(), lr=0.1))
    with pytest.raises(TypeError, match="already"):
        adaptive_lr.wrap(opt)


def test_an_optimizer_without_parameters_raises_value_error():
    base = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    base.param_groups[0]["params"] = []
    with pytest.raises(ValueError, match="no parameters"):
        adaptive_lr.wrap(base)


@pytest.mark.parametrize(
    ("options", "error", "name"),
    [
        ({"growth_rate": -1.0}, ValueError, "growth_rate"),
        ({"spike_threshold": 0.0}, ValueError, "spike_threshold"),
        ({"max_momentum": 1.0}, ValueError, "max_momentum"),
        ({"growth_rte": 0.1}, TypeError, "growth_rte"),
        ({"history_size": "10"}, TypeError, "history_size"),
    ],
)
def test_bad_options_raise_naming_the_option(options, error, name):
    with pytest.raises(error, match=name):
        adaptive_lr.wrap(torch.optim.SGD(make_model().parameters(), lr=0.1), **options)


def test_probe_without_a_closure_raises_before_anything_is_applied():
    model = make_model()
    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.1), curvature_probe_every=1)
    x, y = next(batches(1))
    nn.functional.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert opt._controller_state.step == 0


def test_a_closure_returning_a_non_scalar_raises_before_anything_is_applied():
    model = make_model()
    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        out = model(torch.randn(4, 4))
        out.sum().backward()
        return out

    with pytest.raises(ValueError, match="scalar"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_a_closure_that_raises_propagates_and_applies_nothing():
    model = make_model()
    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        raise RuntimeError("data loader failed")

    with pytest.raises(RuntimeError, match="data loader"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert opt._controller_state.step == 0


# -- the curvature probe ---------------------------------------------------------------------------
def test_probe_measures_the_top_eigenvalue_of_a_quadratic_through_the_training_closure():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    eigenvalues = torch.logspace(-1, 1, 20, dtype=torch.float64)
    a = q @ torch.diag(eigenvalues) @ q.T
    x = nn.Parameter(torch.randn(20, dtype=torch.float64))
    opt = adaptive_lr.wrap(
        torch.optim.SGD([x], lr=1e-3, momentum=0.9),
        curvature_probe_every=5,
        probe_iterations=100,
        probe_tolerance=1e-3,
    )

    def closure():
        opt.zero_grad()
        loss = 0.5 * x @ a @ x
        loss.backward()
        return loss

    opt.step(closure)
    # the probe stops once the Rayleigh quotient changes by < 1e-3 per iteration: 1% accuracy
    assert opt.history[-1].sharpness == pytest.approx(eigenvalues.max().item(), rel=1e-2)
    before = [p.detach().clone() for p in [x]]
    opt.step(closure)  # not a probe step
    assert opt.history[-1].sharpness is None
    assert not torch.equal(before[0], x)


class CountedQuadratic:
    """``f(x) = scale / 2 x'Ax`` with the given spectrum, wrapped SGD probing every
    ``probe_every`` steps; ``step()`` steps once and returns the closure calls it made."""

    def __init__(self, eigenvalues: Tensor, probe_every: int, **options: Any) -> None:
        torch.manual_seed(0)
        n = len(eigenvalues)
        q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
        self.a = q @ torch.diag(eigenvalues) @ q.T
        self.scale = 1.0
        self.x = nn.Parameter(torch.randn(n, dtype=torch.float64))
        self.opt = adaptive_lr.wrap(
            torch.optim.SGD([self.x], lr=1e-3), curvature_probe_every=probe_every, **options
        )
        self.calls = 0

    def closure(self) -> Tensor:
        self.calls += 1
        self.opt.zero_grad()
        loss = 0.5 * self.scale * (self.x @ self.a @ self.x)
        loss.backward()
        return loss

    def step(self) -> int:
        self.calls = 0
        self.opt.step(self.closure)
        return self.calls


def test_default_probes_of_a_few_products_each_continue_one_power_iteration_across_steps():
    from adaptive_lr.wrapper import COLD_PROBE_FACTOR

    eigenvalues = torch.linspace(0.1, 1.0, 60, dtype=torch.float64)  # small gaps: slow to converge
    problem = CountedQuadratic(eigenvalues, probe_every=1)
    opt = problem.opt
    estimates, counts = [], []
    for _ in range(60):
        counts.append(problem.step())
        estimates.append(opt.history[-1].sharpness)
    products = opt.options.probe_iterations
    # the step's own call, then two per product: more for the cold start, few afterwards
    assert counts[0] <= 1 + 2 * COLD_PROBE_FACTOR * products
    assert max(counts[1:]) <= 1 + 2 * products < counts[0]  # measured 13 calls, then 3
    top = eigenvalues.max().item()
    assert estimates[0] < 0.98 * top  # the cold start, from the gradient: 0.926 here
    assert estimates[-1] == pytest.approx(top, rel=0.02)  # warm starts carry the iteration on
    assert all(e <= top * (1 + 1e-6) for e in estimates)  # a Rayleigh quotient of a PSD matrix


def test_a_warm_probe_spends_one_product_while_its_estimate_holds_and_more_when_it_moves():
    problem = CountedQuadratic(
        torch.logspace(-2, 0, 30, dtype=torch.float64), probe_every=2
    )  # top 1, next 0.85

    def probe() -> tuple[int, float]:
        spent = problem.step()  # a probing step
        sharpness = problem.opt.history[-1].sharpness
        assert problem.step() == 1  # not one
        return spent, sharpness

    counts = [probe()[0] for _ in range(40)]
    settled = counts.index(3)
    assert all(c == 3 for c in counts[settled:])  # the step's call and one product (two calls)
    calls_now, estimate = probe()
    assert calls_now == 3 and estimate == pytest.approx(1.0, rel=0.02)
    problem.scale = 3.0  # the Hessian triples between two probes
    calls_now, estimate = probe()
    assert calls_now > 3  # the first quotient no longer matches the last estimate
    assert estimate == pytest.approx(3.0, rel=0.02)


def test_the_krylov_probe_reads_closer_to_the_top_than_the_power_probe_on_a_crowded_spectrum():
    eigenvalues = torch.logspace(-2, 0, 200, dtype=torch.float64)  # top 1, next 0.977
    readings = {}
    for solver in ("power", "krylov"):
        problem = CountedQuadratic(eigenvalues, probe_every=100, probe_solver=solver)
        calls = [problem.step() for _ in range(201)]  # probes at steps 0, 100 and 200
        probes = [record.sharpness for record in problem.opt.history if record.sharpness is not None]
        assert len(probes) == 3
        readings[solver] = (probes, calls)
    (power, power_calls), (krylov, krylov_calls) = readings["power"], readings["krylov"]
    # The same cold probe, six products (13 calls with the step's); then power iteration
    # settles on one product per warm probe while Krylov, started from the last vector
    # and the gradient, spends its three.
    assert power_calls[0] == krylov_calls[0] == 13
    assert power_calls[100] == power_calls[200] == 3 and krylov_calls[100] == krylov_calls[200] == 7
    assert all(k > p for k, p in zip(krylov, power, strict=True))
    assert all(k <= 1.0 + 1e-9 for k in krylov)  # Ritz values of a PSD matrix
    assert krylov[0] > 0.99 > power[-1]  # measured 0.995 cold, 0.999 last; power 0.955, 0.972


@pytest.mark.parametrize("solver", ["power", "krylov"])
def test_a_sharper_direction_appearing_between_probes_is_found_by_the_krylov_probe_alone(solver):
    """A warm probe whose first quotient matches the last estimate stops there: power
    iteration keeps reading the old top. Krylov starts from the last vector and the
    gradient, which the new direction's curvature weights, and finds it at once."""
    eigenvalues = torch.logspace(-2, 0, 30, dtype=torch.float64)
    problem = CountedQuadratic(eigenvalues, probe_every=2, probe_solver=solver)
    for _ in range(40):
        problem.step()
    assert problem.opt.history[-2].sharpness == pytest.approx(1.0, rel=1e-3)  # settled on the top
    values, vectors = torch.linalg.eigh(problem.a)
    flattest = vectors[:, 0]  # orthogonal to the old top eigenvector
    problem.a = problem.a + (3.0 - values[0]) * torch.outer(flattest, flattest)  # now the top: 3
    calls = problem.step()
    estimate = problem.opt.history[-1].sharpness
    if solver == "power":
        assert calls == 3 and estimate == pytest.approx(1.0, rel=1e-3)  # measured 0.99983
    else:
        assert calls == 7 and estimate == pytest.approx(3.0, rel=1e-3)  # measured 2.999998


def test_a_cold_probe_at_a_zero_gradient_starts_at_random_instead():
    eigenvalues = torch.linspace(0.1, 1.0, 20, dtype=torch.float64)
    x = nn.Parameter(torch.zeros(20, dtype=torch.float64))  # the minimum: g = 0
    opt = adaptive_lr.wrap(torch.optim.SGD([x], lr=0.1), curvature_probe_every=1)

    def closure():
        opt.zero_grad()
        loss = 0.5 * (eigenvalues * x * x).sum()
        loss.backward()
        return loss

    opt.step(closure)
    sharpness = opt.history[-1].sharpness
    assert sharpness is not None and 0.5 < sharpness <= 1.0 + 1e-9
    assert torch.count_nonzero(x) == 0  # a zero gradient moves nothing


def test_a_value_error_from_the_closure_inside_a_cold_probe_propagates_without_a_retry():
    """The zero-gradient fallback is decided from the measured norm, so the probe never
    mistakes the closure's own ValueError for a zero start vector and calls it again."""
    x = nn.Parameter(torch.ones(5))
    opt = adaptive_lr.wrap(torch.optim.SGD([x], lr=0.1), curvature_probe_every=1)
    calls = 0

    def closure():
        nonlocal calls
        calls += 1
        if calls == 2:  # the probe's first call
            raise ValueError("bad batch")
        opt.zero_grad()
        loss = (x * x).sum()
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="bad batch"):
        opt.step(closure)
    assert calls == 2
    assert torch.equal(x.detach(), torch.ones(5))


def test_grad_scaler_overflow_steps_never_reach_the_controller_and_norms_are_unscaled():
    model = make_model()
    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = next(batches(1))
    steps = []
    for i in range(4):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if i == 2:
            model[0].weight.grad[0, 0] = float("inf")  # an fp16-style overflow
        scaler.step(opt, loss=loss)
        scaler.update()
        steps.append(opt._controller_state.step)
        unscaled = nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()
        if i != 2:
            assert opt.history[-1].grad_norm == pytest.approx(unscaled, rel=1e-5)
    assert steps == [1, 2, 2, 3]
    assert all(r.event != "skip" for r in opt.history)


def test_resume_with_the_successive_cosine_tracked_continues_bit_for_bit(tmp_path):
    def fresh(seed=0):
        model = make_model(seed)
        return model, adaptive_lr.wrap(
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), track_successive_cosine=True
        )

    data = list(batches(12))
    straight, opt_a = fresh()
    for x, y in data:
        opt_a.zero_grad()
        nn.functional.cross_entropy(straight(x), y).backward()
        opt_a.step()
    resumed, opt_b = fresh()
    for x, y in data[:5]:
        opt_b.zero_grad()
        nn.functional.cross_entropy(resumed(x), y).backward()
        opt_b.step()
    torch.save({"model": resumed.state_dict(), "opt": opt_b.state_dict()}, tmp_path / "ckpt.pt")
    resumed, opt_b = fresh(seed=9)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    for x, y in data[5:]:
        opt_b.zero_grad()
        nn.functional.cross_entropy(resumed(x), y).backward()
        opt_b.step()
    assert params_equal(straight, resumed)
    assert [r.successive_grad_cosine for r in list(opt_a.history)[5:]] == [
        r.successive_grad_cosine for r in opt_b.history
    ]


@pytest.mark.parametrize("solver", ["power", "krylov"])
def test_resume_with_the_probe_carries_its_vector_and_settings_and_continues_bit_for_bit(solver, tmp_path):
    from adaptive_lr.wrapper import PROBE_KEY

    data = list(batches(14))

    def steps(model, opt, chunk):
        calls = []
        for x, y in chunk:
            count = 0

            def closure(x=x, y=y):
                nonlocal count
                count += 1
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
            calls.append(count)
        return calls

    def fresh(seed=0, **options):
        model = make_model(seed)
        return model, adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), **options)

    straight, opt_a = fresh(curvature_probe_every=3, probe_solver=solver)
    calls_a = steps(straight, opt_a, data)
    resumed, opt_b = fresh(curvature_probe_every=3, probe_solver=solver)
    steps(resumed, opt_b, data[:5])  # probes at steps 0 and 3
    torch.save({"model": resumed.state_dict(), "opt": opt_b.state_dict()}, tmp_path / "ckpt.pt")
    resumed, opt_b = fresh(seed=9)  # a fresh process, built with the default options
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all(PROBE_KEY in state for state in ckpt["opt"]["state"].values())
    resumed.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    assert opt_b.options.probe_solver == solver and opt_b.options.curvature_probe_every == 3
    calls_b = steps(resumed, opt_b, data[5:])
    assert params_equal(straight, resumed)
    assert calls_b == calls_a[5:]  # warm probes from the saved vector, not a cold start
    assert [r.sharpness for r in list(opt_a.history)[5:]] == [r.sharpness for r in opt_b.history]
    assert sum(r.sharpness is not None for r in opt_b.history) == 3  # steps 6, 9 and 12


def test_signals_follow_a_parameter_whose_storage_is_replaced_between_steps():
    """The sampled views of x are cached; `p.data = ...` must not leave them reading stale storage."""
    data = list(batches(8))
    runs = []
    for replace_storage in (False, True):
        model = make_model()
        opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), min_sample_size=16)
        for step, (x, y) in enumerate(data):
            if replace_storage and step == 4:
                for p in model.parameters():
                    p.data = p.data.clone()  # same values, new storage
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        runs.append((model, [(r.curvature, r.grad_cosine, r.lr_multiplier) for r in opt.history]))
    assert runs[0][1] == runs[1][1]
    assert params_equal(runs[0][0], runs[1][0])
