"""Closed-loop HTTP load for `foalnet bench`: clients that each send the clip again as soon as it is
answered, with latency percentiles, the service's own stage timings and the batch sizes it ran
(read from /metrics before and after)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

REQUEST_TIMEOUT_S = 120.0


@dataclass
class Load:
    concurrency: int
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    stages_ms: dict[str, list[float]] = field(default_factory=dict)  # the service's own timings_ms
    batch_sizes: dict[str, float] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.ok / self.wall_s if self.wall_s else 0.0

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None

    def summary(self) -> dict:
        data = asdict(self)
        del data["latencies_ms"]
        data.update(
            clips_per_s=self.throughput, p50_ms=self.percentile(50), p95_ms=self.percentile(95),
            p99_ms=self.percentile(99),
            stages_ms={stage: float(np.median(values)) for stage, values in self.stages_ms.items()},
        )
        return data


async def _load(url: str, clip: Path, concurrency: int, max_requests: int, max_s: float) -> Load:
    """Closed-loop load: `concurrency` clients each send the clip again as soon as answered.

    A client told 429 waits the answer's Retry-After first, as a well-behaved client does, so an
    overloaded service is measured at its saturation throughput rather than at rejecting retries."""
    body = clip.read_bytes()
    result = Load(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        t0 = time.perf_counter()
        deadline = t0 + max_s

        async def client_loop() -> None:
            while result.sent < max_requests and time.perf_counter() < deadline:
                result.sent += 1
                start = time.perf_counter()
                try:
                    response = await client.post(f"{url}/predict", files={"file": (clip.name, body, "video/mp4")})
                    outcome = "ok" if response.status_code == 200 else str(response.status_code)
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                if outcome == "ok":
                    result.ok += 1
                    result.latencies_ms.append((time.perf_counter() - start) * 1e3)
                    for stage, ms in response.json().get("timings_ms", {}).items():
                        result.stages_ms.setdefault(stage, []).append(ms)
                else:
                    result.errors[outcome] = result.errors.get(outcome, 0) + 1
                    if outcome == "429":
                        wait = float(response.headers.get("retry-after", 1))
                        await asyncio.sleep(max(0.0, min(wait, deadline - time.perf_counter())))

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        result.wall_s = time.perf_counter() - t0
    return result


def load(url: str, clip: Path, concurrency: int, max_requests: int, max_s: float, metrics: bool) -> Load:
    before = batch_histogram(url) if metrics else {}
    result = asyncio.run(_load(url, clip, concurrency, max_requests, max_s))
    if metrics:
        after = batch_histogram(url)
        result.batch_sizes = {le: after[le] - before.get(le, 0.0) for le in after}
    return result


def batch_histogram(url: str) -> dict[str, float]:
    """Cumulative `foalnet_batch_size` bucket counts (le -> count) and the sum, from /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "foalnet_batch_size":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                counts[sample.labels["le"]] = sample.value
            elif sample.name.endswith("_sum"):
                counts["sum"] = sample.value
    return counts


def batch_counts(histogram: dict[str, float]) -> dict[int, int]:
    """Batches per size bucket (size -> count) from cumulative bucket counts; empty buckets left out."""
    counts, below = {}, 0.0
    for le, cumulative in sorted(((k, v) for k, v in histogram.items() if k not in ("sum", "+Inf")),
                                 key=lambda kv: float(kv[0])):
        if cumulative > below:
            counts[int(float(le))] = int(cumulative - below)
        below = cumulative
    return counts


def mean_batch(histogram: dict[str, float]) -> float | None:
    total = histogram.get("+Inf", 0.0)
    return histogram["sum"] / total if total else None
