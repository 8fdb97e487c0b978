"""Per-step records of what the controller saw and did, and writers for them (CSV, any
TensorBoard-style ``add_scalar`` writer)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step as it was actually applied.

    ``lr`` and ``momentum`` are the values the base optimizer used during its step (first
    param group), after the controller's multiplier and momentum; ``momentum`` is None
    where the base optimizer has no momentum (then only the learning rate is controlled).
    ``event`` is one of the controller's EVENTS ("skip", "spike", "clip",
    "curvature_cap", "update_cap", "anneal") or None.
    """

    step: int
    lr: float
    lr_multiplier: float
    momentum: float | None
    grad_norm: float
    curvature: float | None
    event: str | None
    loss: float | None = None
    grad_cosine: float | None = None
    successive_grad_cosine: float | None = None
    sharpness: float | None = None
    clip_coef: float = 1.0
    momentum_controlled: bool = False
    group_grad_norms: tuple[float, ...] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


HistoryCallback = Callable[[StepRecord], None]

FIELDS = [f.name for f in dataclasses.fields(StepRecord)]


def write_history_csv(history: Iterable[StepRecord], path: str | os.PathLike) -> None:
    """Write records as CSV, one row per step; group_grad_norms is a JSON list."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        for record in history:
            writer.writerow(_csv_row(record))


def _csv_row(record: StepRecord) -> dict:
    row = record.to_dict()
    row["group_grad_norms"] = json.dumps(list(record.group_grad_norms))
    return {k: "" if v is None else v for k, v in row.items()}


class CSVHistoryWriter:
    """A history callback that streams each record to a CSV file as it happens.

    ``AdaptiveOptimizer(..., callback=CSVHistoryWriter("run.csv"))``; call ``close()``
    (or use it as a context manager) at the end of training.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._handle = open(self.path, "w", newline="")  # noqa: SIM115 - closed in close()
        self._writer = csv.DictWriter(self._handle, fieldnames=FIELDS)
        self._writer.writeheader()

    def __call__(self, record: StepRecord) -> None:
        self._writer.writerow(_csv_row(record))
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> CSVHistoryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        raise TypeError("CSVHistoryWriter holds an open file and cannot be pickled or copied")


SCALARS = ("lr", "lr_multiplier", "momentum", "grad_norm", "curvature", "grad_cosine", "loss", "clip_coef")
"""The record fields a scalar writer logs (those that are None at a step are left out)."""


def scalar_values(record: StepRecord) -> dict[str, float]:
    """The record's `SCALARS` that are not None at this step, as floats."""
    values = ((name, getattr(record, name)) for name in SCALARS)
    return {name: float(value) for name, value in values if value is not None}


class ScalarWriterCallback:
    """A history callback that logs each record through an ``add_scalar`` writer.

    ``adaptive_lr.wrap(opt, callback=ScalarWriterCallback(SummaryWriter("runs/x")))`` with
    torch.utils.tensorboard's ``SummaryWriter`` (which needs the ``tensorboard`` package;
    adaptive_lr itself does not import it), or anything with
    ``add_scalar(tag, value, global_step)``. Tags: ``{prefix}/{field}`` for `SCALARS`, and
    ``{prefix}/event/{name}`` = 1.0 at each step with that event.
    """

    def __init__(self, writer: object, prefix: str = "adaptive_lr") -> None:
        add_scalar = getattr(writer, "add_scalar", None)
        if not callable(add_scalar):
            raise TypeError(
                f"writer must have an add_scalar(tag, value, global_step) method, got {type(writer).__name__}"
            )
        self.writer = writer
        self.prefix = prefix

    def __call__(self, record: StepRecord) -> None:
        for name, value in scalar_values(record).items():
            self.writer.add_scalar(f"{self.prefix}/{name}", value, record.step)  # type: ignore[attr-defined]
        if record.event is not None:
            self.writer.add_scalar(f"{self.prefix}/event/{record.event}", 1.0, record.step)  # type: ignore[attr-defined]
