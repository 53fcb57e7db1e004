"""Engine health that recovers on its own, and liveness for the orchestrator.

A failed inference marks the engine unhealthy and turns readiness to 503, so a load balancer
sends no request that could prove it well again. While it is unhealthy, `EngineWatch` runs a
canary (one all-zeros window, both modalities' paths) with exponential backoff; the first that
succeeds restores readiness without any traffic. When the engine has stayed unhealthy for
`restart_after_s`, `live` turns False and /livez answers 503, so the orchestrator restarts the
process instead of keeping a replica that will never serve again.
"""

from __future__ import annotations

import asyncio
import logging
import time

from service.engine import Engine

log = logging.getLogger(__name__)

POLL_S = 0.25  # how often a healthy engine is looked at
CANARY_FIRST_S = 0.5  # first canary this long after the failure, then doubling...
CANARY_MAX_S = 30.0  # ...up to this


class EngineWatch:
    def __init__(self, engine: Engine, *, restart_after_s: float) -> None:
        self.engine = engine
        self.restart_after_s = restart_after_s
        self.canaries = 0  # canary inferences run (metrics-free record, for /info and tests)
        self._task: asyncio.Task[None] | None = None

    @property
    def unhealthy_s(self) -> float:
        since = self.engine.unhealthy_since
        return 0.0 if since is None else time.monotonic() - since

    @property
    def live(self) -> bool:
        return self.unhealthy_s < self.restart_after_s

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="engine-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        delay = CANARY_FIRST_S
        while True:
            if self.engine.healthy:
                delay = CANARY_FIRST_S
                await asyncio.sleep(POLL_S)
                continue
            await asyncio.sleep(delay)
            if self.engine.healthy:  # a real request succeeded meanwhile
                continue
            self.canaries += 1
            try:
                await asyncio.to_thread(self.engine.infer, self.engine.dummy_feeds(1))
            except Exception as exc:  # noqa: BLE001 - any failure: try again later
                delay = min(CANARY_MAX_S, delay * 2)
                log.error(
                    "engine canary failed (unhealthy for %.0f s, /livez fails at %.0f s): %s; next in %.1f s",
                    self.unhealthy_s,
                    self.restart_after_s,
                    exc,
                    delay,
                )
            else:
                log.warning("engine canary succeeded: the engine is healthy again")
