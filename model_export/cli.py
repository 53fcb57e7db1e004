"""The `foalnet` command: serving commands from `service.cli`, plus the training side's.

Each training-side module exposes `register(app)`. Modules that need torch are only registered when
torch is installed, so a torch-free install (the Docker image) still has `serve`, `predict`, `eval`.
"""

from __future__ import annotations

import importlib.util

from service.cli import app

from model_export import evaluate

evaluate.register(app)

if importlib.util.find_spec("torch") is not None:
    from model_export import ablate, bench, export, train

    for module in (train, export, ablate, bench):
        module.register(app)


def main() -> None:
    app()
