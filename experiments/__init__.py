"""The ablation and peer-comparison framework of adaptive_lr (issue 3).

    python -m experiments run --preset quick

Layout: `tasks` (what is trained) x `methods` (which optimizer) -> `runner` (how a grid of
runs is executed, in parallel and resumably, one JSON line per run); `config` reads the
TOML presets in ``experiments/configs/``; `cli` is the command line.
"""
