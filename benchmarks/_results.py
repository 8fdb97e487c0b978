"""What every benchmark script does with its results: name the command that made them and
write them, with that command and the machine, to a JSON file."""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """``python benchmarks/<script> <arguments>``, as it was run (argv None: sys.argv)."""
    arguments = sys.argv[1:] if argv is None else argv
    return f"python benchmarks/{script}" + "".join(f" {a}" for a in arguments)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def publish(
    script: str, argv: Sequence[str] | None, output: Path, table: str, threads: int, **fields: Any
) -> None:
    """Print the markdown table and write it to `output` as JSON, with the command that made
    it, the machine (platform, torch, threads) and `fields`."""
    print(table)
    payload = {
        "command": command_line(script, argv),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": threads},
        **fields,
        "markdown": table,
    }
    write_json(output, payload)
