"""A real `foalnet serve` for end-to-end tests: `service.soak.ServerProcess` with small pools."""

from __future__ import annotations

from pathlib import Path

from service.soak import ServerProcess

# Small pools: two cores are shared by several workers.
E2E_ARGS = ("--device", "auto", "--buckets", "1,2,4", "--decode-workers", "1")


def start_server(model: Path, tmp_dir: Path, *args: str, **kwargs) -> ServerProcess:
    """Started and ready (or RuntimeError with its log); `stop()` sends SIGTERM."""
    return ServerProcess(model, tmp_dir, *E2E_ARGS, *args, **kwargs)
