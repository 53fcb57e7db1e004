"""The `foalnet` command: serving commands from `service.cli`, plus the training side's.

Each training-side module exposes `register(app)`. The modules that need torch are registered only
when torch is installed and the command line asks for one of them (or for the command list):
importing torch costs seconds and hundreds of MB that `foalnet serve` must not pay.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

from model_export import evaluate
from service.cli import app

TORCH_COMMANDS = ("train", "export", "ablate", "bench", "loco", "calibrate")  # each is also its module's name

evaluate.register(app)
_registered = False


def register_training_commands() -> None:
    """Add the torch commands to `app` (once; nothing without torch)."""
    global _registered
    if _registered or importlib.util.find_spec("torch") is None:
        return
    for name in TORCH_COMMANDS:
        importlib.import_module(f"model_export.{name}").register(app)
    _registered = True


def main() -> None:
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    if command is None or command in TORCH_COMMANDS:
        register_training_commands()
    app()
