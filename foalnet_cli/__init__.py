"""The `foalnet` command. It only dispatches: every command lives with the package that does the work
(each module has `register(app)`), and only the module of the command asked for is imported, so
`foalnet serve` loads neither torch, the training package nor the harnesses. A command whose
package or extra is not installed (the serving image has neither `model_export` nor `bench`) is
left out of the list, and asking for it says what to install.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

import typer

# command -> the module that registers it, and the extra that brings what that module imports
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("service.cli", "cpu"),
    "predict": ("service.cli", "cpu"),
    "train": ("model_export.train_cli", "train"),
    "eval": ("model_export.evaluate", "train"),
    "export": ("model_export.export", "train"),
    "calibrate": ("model_export.calibrate", "train"),
    "ablate": ("model_export.ablate", "train"),
    "loco": ("model_export.loco", "train"),
    "bench": ("bench.benchmark", "bench,train"),
    "soak": ("bench.soak", "bench"),
}
HELP = "Foal-Net audio-visual emotion recognition."

Register = Callable[[typer.Typer], None]


def _registrars(commands: list[str]) -> tuple[list[Register], dict[str, ModuleNotFoundError]]:
    """Each named command's `register`, and the commands whose module could not be imported."""
    found: dict[str, Register] = {}
    missing: dict[str, ModuleNotFoundError] = {}
    for command in commands:
        module = COMMANDS[command][0]
        if module in found:
            continue
        try:
            found[module] = importlib.import_module(module).register
        except ModuleNotFoundError as exc:
            missing[command] = exc
    return list(found.values()), missing


def _app(registrars: list[Register], missing: dict[str, ModuleNotFoundError]) -> typer.Typer:
    epilog = f"Not installed here: {', '.join(missing)}." if missing else None
    app = typer.Typer(help=HELP, epilog=epilog, no_args_is_help=True, add_completion=False)

    @app.callback()
    def root() -> None:  # a group even when one command is registered: `foalnet bench ...`
        pass

    for register in registrars:
        register(app)
    return app


def build_app(*commands: str) -> typer.Typer:
    """A `foalnet` app with these commands (all by default) and whatever else their modules hold;
    those that cannot be imported here are named in the help's epilog."""
    return _app(*_registrars(list(commands or COMMANDS)))


def main() -> None:
    asked = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    registrars, missing = _registrars([asked] if asked in COMMANDS else list(COMMANDS))
    if asked in missing:
        extra = COMMANDS[asked][1]
        typer.echo(f"foalnet {asked}: {missing[asked]}; install it with pip install '.[{extra}]'", err=True)
        raise SystemExit(2)
    _app(registrars, missing)()
