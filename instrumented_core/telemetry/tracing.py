"""OpenTelemetry tracing for a rank: provider, exporters, and a processor that never blocks.

The engine thread only ever appends a finished span to a bounded queue; a daemon thread
exports in batches. A full queue or a failing exporter drops spans, counts them (the
``vllm_dp_telemetry_dropped_total{signal="spans"}`` counter) and logs once: an unreachable
collector must not slow the busy loop, let alone stall a rank inside a pause.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from instrumented_core.telemetry import names as n
from instrumented_core.telemetry.config import (
    DEFAULT_SPANS_FILE_MAX_BYTES,
    SPANS_FILE_KEEP,
    TelemetryConfig,
)

log = logging.getLogger(__name__)

_announced: set[str] = set()  # spans files whose path this process has logged

#: Seconds a rank's shutdown may spend exporting its last spans (exporter shutdown included).
SHUTDOWN_TIMEOUT = 3.0


class JsonLinesSpanExporter(SpanExporter):
    """Appends one compact JSON object per span; the run report reads this file.

    Bounded: once the file reaches ``max_bytes`` it becomes ``<name>.1`` (the older ones
    shift to ``.2`` ... ``.<keep>``, the oldest is deleted), so a long-running deployment keeps
    at most ``(keep + 1) * max_bytes`` of spans (``max_bytes=0``: unbounded). Ranks share the
    file: each batch is one ``O_APPEND`` write, and a rotation happens under a lock file, the
    size checked again inside it, so two ranks never rotate the same file twice."""

    def __init__(self, path: str | Path, max_bytes: int = DEFAULT_SPANS_FILE_MAX_BYTES,
                 keep: int = SPANS_FILE_KEEP) -> None:
        self._path = Path(path).absolute()
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._max_bytes = max_bytes
        self._keep = keep
        self._lock = threading.Lock()
        self._rotate_error_logged = False

    @property
    def path(self) -> Path:
        return self._path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(json.loads(s.to_json()), separators=(",", ":")) + "\n"
                        for s in spans)
        data = lines.encode()
        with self._lock:
            if self._max_bytes:
                self._rotate_if_full(len(data))
            # One O_APPEND write per batch: ranks share the file without interleaving lines.
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        return SpanExportResult.SUCCESS

    def _size(self) -> int:
        try:
            return self._path.stat().st_size
        except FileNotFoundError:
            return 0

    def _rotate_if_full(self, adding: int) -> None:
        size = self._size()
        if size == 0 or size + adding <= self._max_bytes:
            return
        import fcntl

        try:
            with open(self._path.with_name(self._path.name + ".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    size = self._size()  # another rank may have rotated meanwhile
                    if size == 0 or size + adding <= self._max_bytes:
                        return
                    for i in range(self._keep, 0, -1):
                        older = self._path.with_name(f"{self._path.name}.{i}")
                        newer = (self._path if i == 1
                                 else self._path.with_name(f"{self._path.name}.{i - 1}"))
                        if newer.exists():
                            os.replace(newer, older)
                    if self._keep == 0:
                        self._path.unlink(missing_ok=True)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        except OSError as e:  # keep appending: a full disk shows in the write that follows
            if not self._rotate_error_logged:
                self._rotate_error_logged = True
                log.error("cannot rotate the spans file %s (logged once): %s", self._path, e)

    def shutdown(self) -> None:
        pass


class BoundedSpanProcessor(SpanProcessor):
    """Batching processor with a bounded queue, counted drops and logged-once errors."""

    def __init__(
        self,
        exporter: SpanExporter,
        on_drop: Callable[[int], None],
        max_queue: int = 2048,
        max_batch: int = 256,
        interval: float = 0.5,
        shutdown_timeout: float = SHUTDOWN_TIMEOUT,
    ) -> None:
        self._exporter = exporter
        self._on_drop = on_drop
        self._queue: queue.Queue[ReadableSpan] = queue.Queue(max_queue)
        self._max_batch = max_batch
        self._interval = interval
        self._shutdown_timeout = shutdown_timeout
        self._stop = threading.Event()
        self._flush_requested = threading.Event()
        self._flushed = threading.Event()
        self._error_logged = False
        self._in_flight = 0  # spans of the batch being exported now
        self._gave_up = False  # shutdown counted what was left: later failures are not new
        self._accounting = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="span-export", daemon=True)
        self._thread.start()

    def on_start(self, span, parent_context=None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        try:
            self._queue.put_nowait(span)
        except queue.Full:
            self._on_drop(1)

    def _drain(self) -> list[ReadableSpan]:
        batch: list[ReadableSpan] = []
        while len(batch) < self._max_batch:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _export(self, batch: list[ReadableSpan]) -> None:
        self._in_flight = len(batch)
        try:
            result = self._exporter.export(batch)
            ok = result is SpanExportResult.SUCCESS
            error = None if ok else "exporter returned FAILURE"
        except Exception as e:  # noqa: BLE001 - telemetry never raises into the engine
            ok, error = False, f"{type(e).__name__}: {e}"
        with self._accounting:  # a batch is counted here or by shutdown, never twice
            self._in_flight = 0
            counted_by_shutdown = self._gave_up
        if not ok and not counted_by_shutdown:
            self._on_drop(len(batch))
            if not self._error_logged:
                self._error_logged = True
                log.error("span export failed, dropping spans (logged once): %s", error)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._flush_requested.wait(self._interval)
            while batch := self._drain():
                self._export(batch)
            if self._flush_requested.is_set():
                self._flush_requested.clear()
                self._flushed.set()
        while not self._gave_up and (batch := self._drain()):
            self._export(batch)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self._flushed.clear()
        self._flush_requested.set()
        return self._flushed.wait(timeout_millis / 1000)

    def shutdown(self) -> None:
        """Export what is queued, for at most ``shutdown_timeout`` seconds in all (the
        exporter's own shutdown included: the OTel gRPC exporter can wait 30 s there, on the
        engine thread). Spans still unsent then are counted as dropped and logged with their
        count; the export thread is a daemon and dies with the process."""
        deadline = time.monotonic() + self._shutdown_timeout
        self._stop.set()
        self._flush_requested.set()
        self._thread.join(timeout=self._shutdown_timeout)
        if self._thread.is_alive():
            with self._accounting:
                self._gave_up = True
                unsent = self._in_flight + len(self._drain_all())
            if unsent:
                self._on_drop(unsent)
                log.warning("span export: %d span(s) unsent at shutdown: the exporter did not "
                            "finish within %.1f s (collector not answering?); counted in %s",
                            unsent, self._shutdown_timeout, n.TELEMETRY_DROPPED_TOTAL)
        closer = threading.Thread(target=self._close_exporter, name="span-export-close",
                                  daemon=True)
        closer.start()
        closer.join(timeout=max(0.1, deadline - time.monotonic()))

    def _drain_all(self) -> list[ReadableSpan]:
        spans: list[ReadableSpan] = []
        while batch := self._drain():
            spans.extend(batch)
        return spans

    def _close_exporter(self) -> None:
        try:
            self._exporter.shutdown()
        except Exception:  # noqa: BLE001 - closing a failed exporter is best effort
            pass


def make_exporter(config: TelemetryConfig) -> SpanExporter | None:
    if config.span_exporter == "none":
        return None
    if config.span_exporter == "file":
        exporter = JsonLinesSpanExporter(config.spans_file, config.spans_file_max_bytes)
        if str(exporter.path) not in _announced:
            _announced.add(str(exporter.path))
            bound = (f"rotated at {config.spans_file_max_bytes / 2**20:g} MiB, "
                     f"{SPANS_FILE_KEEP} older files kept" if config.spans_file_max_bytes
                     else "unbounded")
            log.info("spans go to %s (%s)", exporter.path, bound)
        return exporter
    if config.span_exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    # The OTLP exporters log every failed batch; we log the first failure once ourselves and
    # count the drops, so a down collector does not flood the engine's log.
    for name in ("opentelemetry.exporter.otlp.proto.http.trace_exporter",
                 "opentelemetry.exporter.otlp.proto.grpc.exporter"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if config.otlp_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        # insecure unless https://, as vLLM's own gRPC exporter (a bare host:port included)
        secure = (config.otlp_endpoint or "").startswith("https://")
        return GrpcExporter(endpoint=config.otlp_endpoint, insecure=not secure, timeout=2)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    return HttpExporter(endpoint=config.otlp_endpoint, timeout=2)


def make_tracer_provider(
    config: TelemetryConfig,
    rank: int,
    dp_size: int,
    on_drop: Callable[[int], None],
    instance: str | None = None,
) -> TracerProvider | None:
    """A provider of our own (not the global one): the host process may have its own."""
    exporter = make_exporter(config)
    if exporter is None:
        return None
    resource = Resource.create({
        "service.name": config.service_name,
        "service.instance.id": instance or f"dp-rank-{rank}",
        n.ATTR_RANK: rank,
        n.ATTR_DP_SIZE: dp_size,
        **config.extra_resource,
    })
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BoundedSpanProcessor(exporter, on_drop))
    return provider


def format_traceparent(span: trace.Span) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def parent_context(trace_parent: str | None, group_key: str, pause_ordinal: int):
    """Context all ranks' spans of one pause hang from.

    With a W3C ``traceparent`` from the client, the ranks' spans are its children. Without one
    (vLLM's utility calls carry none) every rank derives the same trace id from what all ranks
    share, the deployment's DP group key and the pause's ordinal, so one pause is one trace.
    """
    if trace_parent:
        try:
            _, trace_id, span_id, flags = trace_parent.split("-")
            ctx = SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True,
                              trace_flags=TraceFlags(int(flags, 16)))
            return trace.set_span_in_context(NonRecordingSpan(ctx))
        except ValueError:
            log.warning("ignoring malformed traceparent %r", trace_parent)
    digest = hashlib.sha256(f"{group_key}/pause/{pause_ordinal}".encode()).digest()
    ctx = SpanContext(int.from_bytes(digest[:16], "big") or 1,
                      int.from_bytes(digest[16:24], "big") or 1, is_remote=True,
                      trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return trace.set_span_in_context(NonRecordingSpan(ctx))
