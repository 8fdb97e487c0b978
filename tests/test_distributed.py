"""Several ranks decide alike: DDP and FSDP2 on CPU with gloo, two processes.

Each scenario spawns two ranks (torch.multiprocessing, file-store rendezvous); every rank
writes what it saw to a file, and the assertions run here, in the parent.
"""

from __future__ import annotations

import gc
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

import adaptive_lr

WORLD = 2
STEPS = 30
NAN_STEP = 12
"""The step at which rank 1 alone hands over a NaN loss (DDP scenario)."""
NAN_GRAD_STEP = 20
"""The step at which rank 1 alone has a NaN gradient entry after the gradients' sync."""
PROBE_EVERY = 7
BATCH = 32

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


def _batches(steps: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The global batches: every rank takes its own slice of each."""
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(size, 8, generator=generator) * 3, torch.randint(0, 3, (size,), generator=generator))
        for _ in range(steps)
    ]


def _record(record: adaptive_lr.StepRecord) -> tuple[Any, ...]:
    """The decision and the signals of a step; NaN as "nan" so that records compare equal."""
    return tuple("nan" if isinstance(x, float) and math.isnan(x) else x for x in _fields(record))


def _fields(record: adaptive_lr.StepRecord) -> tuple[Any, ...]:
    return (
        record.lr_multiplier,
        record.momentum,
        record.event,
        record.clip_coef,
        record.grad_norm,
        record.curvature,
        record.grad_cosine,
        record.loss,
        record.sharpness,
    )


def _spawn(tmp_path: Path, worker: Callable[..., None], *args: Any) -> list[dict[str, Any]]:
    store = tmp_path / "store"
    mp.spawn(_rank_main, args=(str(store), str(tmp_path), worker, *args), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def _rank_main(rank: int, store: str, out: str, worker: Callable[..., None], *args: Any) -> None:
    """Join the group, run the worker, and leave only once its DDP/FSDP objects are gone.

    A DDP module still alive at destroy_process_group() made the process abort at exit
    ("terminate called without an active exception") in about one run in five (with bare
    torch SGD too, so torch's teardown, not the wrapper); freeing it first, cycles
    included, stopped that in 65 of 65 runs.
    """
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    worker(rank, out, *args)
    gc.collect()
    dist.destroy_process_group()


def _counting_all_reduce() -> list[int]:
    """Count the Python-level all_reduce calls (DDP's own reducer runs in C++)."""
    calls = [0]
    original = dist.all_reduce

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    dist.all_reduce = counted  # type: ignore[assignment]
    return calls


# --- DDP ------------------------------------------------------------------------------


def _ddp_worker(rank: int, out: str, probe_solver: str = "power") -> None:
    calls = _counting_all_reduce()
    model = nn.parallel.DistributedDataParallel(_model())
    # The probe runs the closure, whose backward goes through DDP: its products are global.
    opt = adaptive_lr.wrap(
        torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
        curvature_probe_every=PROBE_EVERY,
        probe_solver=probe_solver,
    )
    half = BATCH // WORLD
    records, local_losses, calls_per_step = [], [], []
    for step, (inputs, labels) in enumerate(_batches(STEPS, BATCH)):
        chunk = slice(rank * half, (rank + 1) * half)

        def closure(x: torch.Tensor = inputs[chunk], y: torch.Tensor = labels[chunk]) -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        before = calls[0]
        if step % PROBE_EVERY == 0:
            local_losses.append(opt.step(closure).item())
        else:
            loss = closure()
            if step == NAN_GRAD_STEP and rank == 1:
                next(model.parameters()).grad.view(-1)[0] = math.nan
            local_losses.append(loss.item())
            opt.step(loss=torch.tensor(math.nan) if (step == NAN_STEP and rank == 1) else loss)
        calls_per_step.append(calls[0] - before)
        records.append(_record(opt.history[-1]))
    params = [p.detach().clone() for p in model.parameters()]
    torch.save(
        {"records": records, "losses": local_losses, "params": params, "calls": calls_per_step},
        os.path.join(out, f"rank{rank}.pt"),
    )


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _spawn(tmp_path_factory.mktemp("ddp"), _ddp_worker)


def test_ddp_ranks_make_identical_decisions_at_every_step(ddp: list[dict[str, Any]]) -> None:
    first, second = ddp
    assert len(first["records"]) == STEPS
    assert first["records"] == second["records"]
    events = {record[2] for record in first["records"]}
    assert events & {"spike", "update_cap", "curvature_cap"}, "the run should exercise the controller"


def test_ddp_parameters_stay_bit_identical_across_ranks(ddp: list[dict[str, Any]]) -> None:
    for a, b in zip(ddp[0]["params"], ddp[1]["params"], strict=True):
        assert torch.equal(a, b)


def test_ddp_loss_signal_is_the_mean_of_the_ranks_local_losses(ddp: list[dict[str, Any]]) -> None:
    for step, record in enumerate(ddp[0]["records"]):
        if step in (NAN_STEP, NAN_GRAD_STEP):
            continue
        mean = (ddp[0]["losses"][step] + ddp[1]["losses"][step]) / WORLD
        assert record[7] == pytest.approx(mean, rel=1e-6)
    assert ddp[0]["losses"][0] != ddp[1]["losses"][0]  # the ranks' batches differ


def test_ddp_nonfinite_loss_on_one_rank_makes_every_rank_skip_that_step(ddp: list[dict[str, Any]]) -> None:
    for rank in range(WORLD):
        record = ddp[rank]["records"][NAN_STEP]
        assert record[2] == "skip"
        assert record[7] == "nan"
    skipped = [step for step, record in enumerate(ddp[0]["records"]) if record[2] == "skip"]
    assert skipped == [NAN_STEP, NAN_GRAD_STEP]


def test_ddp_nonfinite_gradient_on_one_rank_makes_every_rank_skip_that_step(
    ddp: list[dict[str, Any]],
) -> None:
    for rank in range(WORLD):
        record = ddp[rank]["records"][NAN_GRAD_STEP]
        assert record[2] == "skip"
        assert record[4] == "nan"  # the reduced gradient norm


def test_ddp_probe_on_local_batches_measures_the_same_sharpness_on_every_rank(
    ddp: list[dict[str, Any]],
) -> None:
    probed = [step for step, record in enumerate(ddp[0]["records"]) if record[8] is not None]
    assert probed == list(range(0, STEPS, PROBE_EVERY))
    assert [record[8] for record in ddp[1]["records"]] == [record[8] for record in ddp[0]["records"]]


def test_ddp_krylov_probe_mixing_in_the_gradient_stays_identical_on_every_rank(
    tmp_path_factory: pytest.TempPathFactory, ddp: list[dict[str, Any]]
) -> None:
    """The Krylov probe's warm start takes in the step's gradient, which DDP has made the
    same on every rank: the ranks read the same sharpness and keep identical parameters."""
    first, second = _spawn(tmp_path_factory.mktemp("ddp_krylov"), _ddp_worker, "krylov")
    probed = [record[8] for record in first["records"] if record[8] is not None]
    assert len(probed) == len(range(0, STEPS, PROBE_EVERY)) and all(math.isfinite(v) for v in probed)
    power = [record[8] for record in ddp[0]["records"] if record[8] is not None]
    assert probed != power  # the solver took effect
    assert first["records"] == second["records"]
    for a, b in zip(first["params"], second["params"], strict=True):
        assert torch.equal(a, b)


def test_ddp_costs_one_all_reduce_per_step_and_one_more_on_the_first(ddp: list[dict[str, Any]]) -> None:
    for rank in range(WORLD):
        calls = ddp[rank]["calls"]
        assert calls[0] == 2  # the signals, and the update guard's first-step check
        assert calls[1:] == [1] * (STEPS - 1)  # the probe needs none: DDP syncs its products


# --- FSDP2 ----------------------------------------------------------------------------


def _fsdp_step_records(model: nn.Module, opt: adaptive_lr.AdaptiveOptimizer, rank: int, world: int) -> list:
    records = []
    part = BATCH // world
    for inputs, labels in _batches(STEPS, BATCH):
        opt.zero_grad()
        chunk = slice(rank * part, (rank + 1) * part)
        F.cross_entropy(model(inputs[chunk]), labels[chunk]).backward()
        opt.step(loss=None)
        records.append(_record(opt.history[-1]))
    return records


def _options() -> dict[str, Any]:
    # Every coordinate: the sampled blocks of local shards are not those of full tensors.
    return {"sample_fraction": 1.0}


def _fsdp_worker(rank: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    calls = _counting_all_reduce()
    model = _model()
    mesh = init_device_mesh("cpu", (WORLD,))
    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), **_options())
    sharded = all(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())
    records = _fsdp_step_records(model, opt, rank, WORLD)
    params = [p.full_tensor().detach().clone() for p in model.parameters()]
    torch.save(
        {"records": records, "params": params, "sharded": sharded, "calls": calls[0]},
        os.path.join(out, f"rank{rank}.pt"),
    )


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _spawn(tmp_path_factory.mktemp("fsdp"), _fsdp_worker)


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    """The same model, data and options in one process on the full batches."""
    model = _model()
    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), **_options())
    records = _fsdp_step_records(model, opt, rank=0, world=1)
    return {"records": records, "params": [p.detach().clone() for p in model.parameters()]}


def test_fsdp2_gradients_are_sharded_dtensors(fsdp: list[dict[str, Any]]) -> None:
    assert all(result["sharded"] for result in fsdp)


def test_fsdp2_ranks_make_identical_decisions_at_every_step(fsdp: list[dict[str, Any]]) -> None:
    assert fsdp[0]["records"] == fsdp[1]["records"]


def test_fsdp2_signals_are_those_of_the_full_model_in_one_process(
    fsdp: list[dict[str, Any]], single: dict[str, Any]
) -> None:
    for step, (mine, reference) in enumerate(zip(fsdp[0]["records"], single["records"], strict=True)):
        assert mine[2] == reference[2], f"event differs at step {step}"
        for index, name in ((0, "lr_multiplier"), (4, "grad_norm"), (5, "curvature"), (6, "grad_cosine")):
            if reference[index] is None:
                assert mine[index] is None
            else:
                assert mine[index] == pytest.approx(reference[index], rel=1e-4, abs=1e-7), (name, step)


def test_fsdp2_parameters_match_the_single_process_run(
    fsdp: list[dict[str, Any]], single: dict[str, Any]
) -> None:
    for sharded, reference in zip(fsdp[0]["params"], single["params"], strict=True):
        torch.testing.assert_close(sharded, reference, rtol=1e-4, atol=1e-5)


def test_fsdp2_costs_one_all_reduce_per_step_and_one_more_on_the_first(fsdp: list[dict[str, Any]]) -> None:
    assert all(result["calls"] == STEPS + 1 for result in fsdp)


# --- DDP checkpoint: save mid-run, resume in new processes ------------------------------

RESUME_AT = 15


def _ddp_train(rank: int, model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    half = BATCH // WORLD
    batches = _batches(STEPS, BATCH)
    for step in steps:
        inputs, labels = batches[step]
        opt.zero_grad()
        loss = F.cross_entropy(
            model(inputs[rank * half : (rank + 1) * half]), labels[rank * half : (rank + 1) * half]
        )
        loss.backward()
        opt.step(loss=loss)


def _ddp_checkpoint_worker(rank: int, out: str, phase: str) -> None:
    model = nn.parallel.DistributedDataParallel(_model())
    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9))
    checkpoint = os.path.join(out, "checkpoint.pt")
    if phase == "straight":
        _ddp_train(rank, model, opt, range(STEPS))
    elif phase == "first":
        _ddp_train(rank, model, opt, range(RESUME_AT))
        if rank == 0:
            torch.save({"model": model.module.state_dict(), "opt": opt.state_dict()}, checkpoint)
        dist.barrier()
    else:
        saved = torch.load(checkpoint, weights_only=True)
        model.module.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        _ddp_train(rank, model, opt, range(RESUME_AT, STEPS))
    params = [p.detach().clone() for p in model.parameters()]
    torch.save({"params": params, "multiplier": opt.lr_multiplier}, os.path.join(out, f"rank{rank}.pt"))


def test_ddp_resume_from_a_checkpoint_in_new_processes_is_bit_identical(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    straight_dir, resumed_dir = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("resumed")
    straight = _spawn(straight_dir, _ddp_checkpoint_worker, "straight")
    _spawn(resumed_dir, _ddp_checkpoint_worker, "first")
    (resumed_dir / "store").unlink(missing_ok=True)
    resumed = _spawn(resumed_dir, _ddp_checkpoint_worker, "second")
    for rank in range(WORLD):
        assert resumed[rank]["multiplier"] == straight[rank]["multiplier"]
        for a, b in zip(straight[rank]["params"], resumed[rank]["params"], strict=True):
            assert torch.equal(a, b)


# --- FSDP2 with the default sampled signals on a wider model ---------------------------


def _fsdp_sampled_worker(rank: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    # The 96 x 96 weight's shards hold 4608 elements each: with min_sample_size=1024 the
    # secant signals read a 1024-element block of each rank's shard.
    model = nn.Sequential(nn.Linear(8, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 3))
    mesh = init_device_mesh("cpu", (WORLD,))
    fully_shard(model, mesh=mesh)
    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), min_sample_size=1024)
    records = _fsdp_step_records(model, opt, rank, WORLD)
    torch.save({"records": records}, os.path.join(out, f"rank{rank}.pt"))


def test_fsdp2_ranks_decide_alike_with_sampled_signals(tmp_path_factory: pytest.TempPathFactory) -> None:
    first, second = _spawn(tmp_path_factory.mktemp("fsdp_sampled"), _fsdp_sampled_worker)
    assert first["records"] == second["records"]
    assert any(record[5] is not None for record in first["records"])  # curvature was measured


def test_the_probe_on_sharded_parameters_is_a_clear_error_and_changes_nothing(monkeypatch) -> None:
    """Without spawning: the reduction is made to report FSDP2 shards on two ranks."""
    from adaptive_lr import distributed

    monkeypatch.setattr(
        distributed.RankReduction,
        "for_tensors",
        classmethod(lambda cls, tensors, *, enabled: cls(world_size=2, sharded=True)),
    )
    model = _model()
    opt = adaptive_lr.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), curvature_probe_every=1)
    inputs, labels = _batches(1, BATCH)[0]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(inputs), labels)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="does not support sharded \\(FSDP2\\) parameters"):
        opt.step(closure)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert not opt.state and not opt.history
