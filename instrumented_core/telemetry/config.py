"""Telemetry settings, from flags and environment, checked once at start-up.

Every bad value becomes a one-line ``TelemetryConfigError`` naming the setting and the fix, so
a typo fails the launch instead of crashing a rank mid-run. Export follows the standard
OpenTelemetry variables (``OTEL_TRACES_EXPORTER``, ``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL``,
``OTEL_SERVICE_NAME``); with none set, spans go to a local JSON-lines file.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlparse

ENV_ENABLED = "INSTRUMENTED_CORE_TELEMETRY"
ENV_PORT_BASE = "INSTRUMENTED_CORE_METRICS_PORT_BASE"
ENV_HOST = "INSTRUMENTED_CORE_METRICS_HOST"
ENV_DEBUG = "INSTRUMENTED_CORE_DEBUG_ENDPOINT"
#: The second opt-in /debug/stacks needs when the endpoint binds other than loopback.
ENV_DEBUG_REMOTE = "INSTRUMENTED_CORE_DEBUG_ENDPOINT_REMOTE"
ENV_SPANS_FILE = "INSTRUMENTED_CORE_SPANS_FILE"
ENV_SPANS_FILE_MAX_BYTES = "INSTRUMENTED_CORE_SPANS_FILE_MAX_BYTES"
ENV_MODEL_NAME = "INSTRUMENTED_CORE_MODEL_NAME"
#: Where the flight recorder's watchdog writes hang dumps (default: ``flight/`` next to the
#: spans file) and after how many seconds stuck it writes one (unset: derived from the rank's
#: p99 sync wait with a floor; ``off``: no watchdog).
ENV_FLIGHT_DIR = "INSTRUMENTED_CORE_FLIGHT_DIR"
ENV_WATCHDOG = "INSTRUMENTED_CORE_WATCHDOG_SECONDS"

DEFAULT_PORT_BASE = 8100
DEFAULT_HOST = "127.0.0.1"
SPAN_EXPORTERS = ("otlp", "file", "console", "none")
OTLP_PROTOCOLS = ("http/protobuf", "grpc")
#: The spans file is rotated at this size (``<name>.1`` ...), this many older files kept.
DEFAULT_SPANS_FILE_MAX_BYTES = 64 * 2**20
SPANS_FILE_KEEP = 3


class TelemetryConfigError(ValueError):
    """A telemetry setting that cannot work; the message is one line with the fix."""


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise TelemetryConfigError(f"{name}={raw!r} is not a boolean: use 1/0, true/false or on/off")


def _port(raw: str, name: str) -> int:
    try:
        port = int(raw)
    except ValueError:
        raise TelemetryConfigError(f"{name}={raw!r} is not a port number: use an integer "
                                   "0-65535 (0 picks free ports)") from None
    if not 0 <= port <= 65535:
        raise TelemetryConfigError(f"{name}={port} is out of range: use 0-65535 (0 picks "
                                   "free ports)")
    return port


_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)"
                       r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")


def check_host(raw: str, name: str = ENV_HOST) -> str:
    """A host to bind: an IPv4 or IPv6 address (``::1`` or ``[::1]``) or a host name; the
    bare form is returned. Anything else is one error naming the setting and the fix."""
    host = raw.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if _HOSTNAME.match(host) and not host.replace(".", "").isdigit():
        return host
    raise TelemetryConfigError(
        f"{name}={raw!r} is not an IP address or a host name: use 127.0.0.1 (loopback, the "
        "default), ::1, 0.0.0.0 or :: (every interface), or this machine's name")


def is_loopback_host(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def check_endpoint(url: str, name: str, protocol: str = "http/protobuf") -> str:
    """An OTLP endpoint URL; for gRPC also a bare ``host:port`` (as vLLM's
    ``--otlp-traces-endpoint`` takes it: sent without TLS)."""
    bare = protocol == "grpc" and "://" not in url
    parsed = urlparse("http://" + url if bare else url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        example = ("http://127.0.0.1:4317 or 127.0.0.1:4317" if protocol == "grpc"
                   else "http://127.0.0.1:4318")
        raise TelemetryConfigError(
            f"{name}={url!r} is not a valid OTLP endpoint: use http(s)://host:port, e.g. "
            f"{example}")
    try:
        _ = parsed.port  # urlparse checks the port only when it is read
    except ValueError:
        raise TelemetryConfigError(
            f"{name}={url!r} has a bad port: use http(s)://host:port") from None
    return url


@dataclass(frozen=True)
class TelemetryConfig:
    enabled: bool = True
    metrics_host: str = DEFAULT_HOST
    metrics_port_base: int = DEFAULT_PORT_BASE  # rank r serves on base + r; 0 = any free port
    debug_endpoint: bool = False
    #: /debug/stacks on a non-loopback bind needs this too
    debug_remote: bool = False
    model_name: str = "instrumented-core-demo"
    service_name: str = "vllm-dp-engine"
    span_exporter: str = "file"
    spans_file: str = "spans.jsonl"  # relative: to the working directory at start
    spans_file_max_bytes: int = DEFAULT_SPANS_FILE_MAX_BYTES  # 0: never rotated
    otlp_endpoint: str | None = None  # full URL for traces
    otlp_protocol: str = "http/protobuf"
    extra_resource: Mapping[str, str] = field(default_factory=dict)
    flight_dir: str | None = None  # None: flight/ next to the spans file
    watchdog: bool = True
    watchdog_seconds: float | None = None  # None: derived from the measured p99 sync wait

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, vllm: bool = False,
                 vllm_traces_endpoint: str | None = None, **overrides) -> TelemetryConfig:
        """Read our variables and the standard OTEL_* ones; flags passed in ``overrides`` win.

        ``vllm``: inside a vLLM deployment, whose own tracer reads
        ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (its front end sets it from
        ``--otlp-traces-endpoint``, ``vllm_traces_endpoint`` here) and speaks the protocol
        ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` names, gRPC when unset (vllm/tracing/otel.py,
        0.32). Spans sent to that endpoint follow the same rule, so they reach the collector
        vLLM's own spans reach; ``OTEL_EXPORTER_OTLP_ENDPOINT`` (which vLLM ignores) keeps the
        OpenTelemetry default, http/protobuf."""
        env = os.environ if env is None else env
        kw: dict = {}
        kw["enabled"] = _flag(env, ENV_ENABLED, True)
        if env.get(ENV_PORT_BASE):
            kw["metrics_port_base"] = _port(env[ENV_PORT_BASE], ENV_PORT_BASE)
        if env.get(ENV_HOST):
            kw["metrics_host"] = check_host(env[ENV_HOST], ENV_HOST)
        kw["debug_endpoint"] = _flag(env, ENV_DEBUG, False)
        kw["debug_remote"] = _flag(env, ENV_DEBUG_REMOTE, False)
        if env.get(ENV_SPANS_FILE):
            kw["spans_file"] = env[ENV_SPANS_FILE]
        if env.get(ENV_SPANS_FILE_MAX_BYTES):
            raw = env[ENV_SPANS_FILE_MAX_BYTES]
            try:
                kw["spans_file_max_bytes"] = int(raw)
            except ValueError:
                raise TelemetryConfigError(
                    f"{ENV_SPANS_FILE_MAX_BYTES}={raw!r} is not a size: use a number of bytes "
                    "(0 never rotates)") from None
        if env.get(ENV_MODEL_NAME):
            kw["model_name"] = env[ENV_MODEL_NAME]
        if env.get(ENV_FLIGHT_DIR):
            kw["flight_dir"] = env[ENV_FLIGHT_DIR]
        raw = (env.get(ENV_WATCHDOG) or "").strip().lower()
        if raw in ("off", "0", "false", "no"):
            kw["watchdog"] = False
        elif raw:
            try:
                kw["watchdog_seconds"] = float(raw)
            except ValueError:
                raise TelemetryConfigError(
                    f"{ENV_WATCHDOG}={raw!r} is not a number of seconds: use e.g. 30, or off "
                    "(unset: derived from the rank's p99 sync wait)") from None
        if env.get("OTEL_SERVICE_NAME"):
            kw["service_name"] = env["OTEL_SERVICE_NAME"]
        traces_protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        generic_protocol = env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        for name, value in (("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", traces_protocol),
                            ("OTEL_EXPORTER_OTLP_PROTOCOL", generic_protocol)):
            if value and value not in OTLP_PROTOCOLS:
                raise TelemetryConfigError(f"{name}={value!r} is not supported: use "
                                           f"{' or '.join(OTLP_PROTOCOLS)}")
        protocol = traces_protocol or generic_protocol or "http/protobuf"
        traces_endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        base_endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if vllm and (traces_endpoint or (vllm_traces_endpoint and not base_endpoint)):
            protocol = traces_protocol or "grpc"  # vLLM's rule for its endpoint
            traces_endpoint = traces_endpoint or vllm_traces_endpoint or ""
            name = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
                    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                    else "vLLM's --otlp-traces-endpoint")
            kw["otlp_endpoint"] = check_endpoint(traces_endpoint, name, protocol)
        elif traces_endpoint:
            kw["otlp_endpoint"] = check_endpoint(traces_endpoint,
                                                 "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", protocol)
        elif base_endpoint:
            check_endpoint(base_endpoint, "OTEL_EXPORTER_OTLP_ENDPOINT", protocol)
            kw["otlp_endpoint"] = (base_endpoint.rstrip("/") + "/v1/traces"
                                   if protocol == "http/protobuf" else base_endpoint)
        kw["otlp_protocol"] = protocol
        exporter = (env.get("OTEL_TRACES_EXPORTER") or "").strip().lower()
        if not exporter:
            exporter = "otlp" if kw.get("otlp_endpoint") else "file"
        if exporter not in SPAN_EXPORTERS:
            raise TelemetryConfigError(f"OTEL_TRACES_EXPORTER={exporter!r} is not supported: use "
                                       f"one of {', '.join(SPAN_EXPORTERS)}")
        if exporter == "otlp" and not kw.get("otlp_endpoint"):
            kw["otlp_endpoint"] = ("http://localhost:4318/v1/traces"
                                   if protocol == "http/protobuf" else "http://localhost:4317")
        kw["span_exporter"] = exporter
        kw.update({k: v for k, v in overrides.items() if v is not None})
        config = cls(**kw)
        config.validate()
        return config

    def validate(self) -> None:
        check_host(self.metrics_host, "metrics host")
        if self.spans_file_max_bytes < 0:
            raise TelemetryConfigError(f"{ENV_SPANS_FILE_MAX_BYTES}={self.spans_file_max_bytes} "
                                       "is negative: use a number of bytes (0 never rotates)")
        if not 0 <= self.metrics_port_base <= 65535:
            raise TelemetryConfigError(f"metrics port base {self.metrics_port_base} is out of "
                                       "range: use 0-65535")
        if self.span_exporter not in SPAN_EXPORTERS:
            raise TelemetryConfigError(f"span exporter {self.span_exporter!r} is not supported: "
                                       f"use one of {', '.join(SPAN_EXPORTERS)}")
        if self.otlp_protocol not in OTLP_PROTOCOLS:
            raise TelemetryConfigError(f"OTLP protocol {self.otlp_protocol!r} is not supported: "
                                       f"use {' or '.join(OTLP_PROTOCOLS)}")
        if self.otlp_endpoint:
            check_endpoint(self.otlp_endpoint, "OTLP endpoint", self.otlp_protocol)
        if self.watchdog_seconds is not None and not self.watchdog_seconds > 0:
            raise TelemetryConfigError(f"watchdog threshold {self.watchdog_seconds} s must be > "
                                       f"0: use e.g. 30, or {ENV_WATCHDOG}=off")

    @property
    def flight_dump_dir(self) -> Path:
        """The hang dumps' directory: configured, else ``flight/`` beside the spans file."""
        if self.flight_dir:
            return Path(self.flight_dir)
        return Path(self.spans_file).resolve().parent / "flight"

    def port_for(self, rank: int) -> int:
        return 0 if self.metrics_port_base == 0 else self.metrics_port_base + rank

    def with_spans_dir(self, directory: str | Path) -> TelemetryConfig:
        return replace(self, spans_file=str(Path(directory) / Path(self.spans_file).name))

    def check_ports_free(self, ranks: int) -> None:
        """Fail before starting any rank when one of the per-rank ports is taken."""
        if not self.enabled or self.metrics_port_base == 0:
            return
        last = self.metrics_port_base + ranks - 1
        if last > 65535:
            raise TelemetryConfigError(f"metrics ports {self.metrics_port_base}-{last} exceed "
                                       "65535: lower the metrics port base")
        host = check_host(self.metrics_host, ENV_HOST)
        try:
            family = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]
        except (socket.gaierror, UnicodeError) as e:
            raise TelemetryConfigError(
                f"{ENV_HOST}={host!r} does not resolve ({e}): use an address of this machine, "
                "e.g. 127.0.0.1 or ::1") from None
        for rank in range(ranks):
            port = self.port_for(rank)
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((host, port))
                except OSError as e:
                    if e.errno != errno.EADDRINUSE:
                        raise TelemetryConfigError(
                            f"cannot serve metrics on {host} (rank {rank}, port {port}): "
                            f"{e.strerror or e}: set {ENV_HOST} to an address of this machine, "
                            "e.g. 127.0.0.1 or 0.0.0.0") from None
                    raise TelemetryConfigError(
                        f"metrics port {port} on {host} (rank {rank}) is already in "
                        f"use: pick a free range with --metrics-port-base or {ENV_PORT_BASE}"
                    ) from None
