"""Prometheus metrics: names, labels and buckets in one place (the dashboard and alerts read these).

Base units (seconds), `_total` counters. Each `Metrics` owns its registry so several apps can live
in one test process; each registry also carries the process collector (CPU seconds, RSS, open
file descriptors), as the default registry would.
"""

from __future__ import annotations

from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

# Whole /predict requests: sub-second clips on a warm GPU up to long uploads on a busy CPU.
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# One stage of one request: from a millisecond of inference to a long decode.
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Batch sizes are the engine's buckets (powers of two).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

STAGES = ("upload", "decode_queue", "decode", "faces", "queue", "infer")


class _Decoder(Protocol):
    workers: int  # decode threads
    capacity: int  # workers + decode queue: the admission limit
    pending: int  # uploads decoding or waiting for a worker


class _Batcher(Protocol):
    queue_windows: int
    depth: int  # windows waiting for the engine


class Watched(Protocol):
    """What the load gauges read at scrape time (the app's Service; either part may be absent)."""

    decoder: _Decoder | None
    batcher: _Batcher | None


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram(
            "foalnet_request_duration_seconds",
            "Time to answer POST /predict, by HTTP status.",
            ["status"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "foalnet_requests", "POST /predict requests answered, by HTTP status.", ["status"], registry=r
        )
        self.stage_duration = Histogram(
            "foalnet_stage_duration_seconds",
            "Time spent in one stage of a request (upload, decode_queue, decode, faces, queue, infer).",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "foalnet_batch_size", "Windows per inference batch (before padding).", buckets=BATCH_BUCKETS, registry=r
        )
        self.windows = Counter("foalnet_windows", "Model windows inferred.", registry=r)
        self.queue_depth = Gauge("foalnet_queue_depth", "Windows waiting for the engine.", registry=r)
        self.in_flight = Gauge("foalnet_in_flight_requests", "POST /predict requests being processed.", registry=r)
        self.rejections = Counter(
            "foalnet_rejections", "Requests answered with an error, by error code.", ["reason"], registry=r
        )
        self.model_info = Gauge(
            "foalnet_model_info",
            "The loaded model and the execution provider it runs on (value is always 1).",
            ["name", "version", "provider"],
            registry=r,
        )
        self.ready = Gauge("foalnet_ready", "1 when the service accepts /predict traffic.", registry=r)
        self.decode_in_flight = Gauge(
            "foalnet_decode_in_flight", "Uploads being decoded (at most the decode workers).", registry=r
        )
        self.decode_queue_depth = Gauge(
            "foalnet_decode_queue_depth", "Uploads waiting for a free decode worker.", registry=r
        )
        self.saturation = Gauge(
            "foalnet_saturation",
            "Share of admission capacity in use, the larger of decode (decoding + waiting uploads / "
            "workers + decode queue) and engine (waiting windows / queue windows); at 1 new work gets "
            "429. The autoscaler's metric.",
            registry=r,
        )
        ProcessCollector(registry=r)

    def watch(self, service: Watched) -> None:
        """Read the decode and saturation gauges from `service` whenever /metrics is scraped."""

        def decode() -> tuple[int, int, int]:
            decoder = service.decoder
            if decoder is None:
                return 0, 0, 1
            decoding = min(decoder.pending, decoder.workers)
            return decoding, decoder.pending - decoding, decoder.capacity

        def saturation() -> float:
            decoding, waiting, capacity = decode()
            batcher = service.batcher
            engine = batcher.depth / batcher.queue_windows if batcher else 0.0
            return max((decoding + waiting) / capacity, engine)

        self.decode_in_flight.set_function(lambda: decode()[0])
        self.decode_queue_depth.set_function(lambda: decode()[1])
        self.saturation.set_function(saturation)
