"""A checkpoint written by one process and resumed by another continues bit for bit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    from torch.nn import functional as F
    import adaptive_lr

    phase, path, base = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    inner = (
        torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
        if base == "sgd"
        else torch.optim.Adam(model.parameters(), lr=3e-3)
    )
    opt = adaptive_lr.wrap(inner)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)
    generator = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 8, generator=generator) * 2, torch.randint(0, 3, (32,), generator=generator))
            for _ in range(40)]
    steps = {"straight": range(40), "first": range(20), "second": range(20, 40)}[phase]
    if phase == "second":
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        scheduler.load_state_dict(saved["scheduler"])
    for step in steps:
        x, y = data[step]
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss=loss)
        scheduler.step()
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "scheduler": scheduler.state_dict()}
    torch.save(state, path)
    """
)


def _run(tmp_path: Path, phase: str, path: Path, base: str) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    subprocess.run([sys.executable, str(script), phase, str(path), base], check=True, timeout=300)


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_resume_in_a_new_process_continues_bit_for_bit(tmp_path: Path, base: str) -> None:
    straight, resumed = tmp_path / "straight.pt", tmp_path / "resumed.pt"
    _run(tmp_path, "straight", straight, base)
    _run(tmp_path, "first", resumed, base)
    _run(tmp_path, "second", resumed, base)
    a, b = torch.load(straight, weights_only=True), torch.load(resumed, weights_only=True)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    controller_a = a["opt"]["param_groups"][0]["adaptive_lr"]["controller"]
    controller_b = b["opt"]["param_groups"][0]["adaptive_lr"]["controller"]
    assert controller_a == controller_b
    assert controller_a["step"] == 40
