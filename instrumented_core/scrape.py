"""Reading ranks' ``/metrics`` (or a Prometheus server) into per-rank views.

Used by the doctor, the demo's live view and the tests, so they read the same series the same
way Prometheus would, over HTTP, never from Python objects inside the ranks.

Every read is bounded (:func:`http_get`): one deadline for connecting, the headers and the
body together, a cap on the bytes read, and never through ``http_proxy`` for a loopback target.
An answer that is not an exposition of our series is a finding (``RankSample.problem``), never
a healthy rank and never an exception.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import math
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeGuard

from prometheus_client.parser import text_string_to_metric_families

from instrumented_core.diagnosis import RankView
from instrumented_core.telemetry import names as n

PHASE_NAMES = {code: name for name, code in n.PHASE_CODES.items()}
WAIT_COLLECTIVES = ("step", n.COLLECTIVE_SYNC)
#: Where each one's seconds-waited counter is (sync_dp_state's is the sync histogram's sum).
_WAITED = {c: (n.COLLECTIVE_WAIT_TOTAL, {n.LABEL_COLLECTIVE: c}) for c in WAIT_COLLECTIVES}
_WAITED[n.COLLECTIVE_SYNC] = (n.SYNC_WAIT_SUM, {})

#: The series :func:`to_view` reads (and ``RankSample.engine``): what the doctor scrapes.
#: About a sixth of a rank's exposition; the rest (histogram buckets, ``_created``) is skipped
#: before parsing, which is most of a scrape's client-side cost at 64+ ranks.
DIAGNOSIS_SERIES = frozenset({
    n.PHASE, n.ENGINES_RUNNING, n.STEPS_UNTIL_SYNC, n.DP_SIZE, n.COLLECTIVE_INSIDE,
    n.LAST_PROGRESS, n.COLLECTIVE_WAIT_TOTAL, n.REQUESTS_RUNNING, n.REQUESTS_WAITING,
    n.WORKER_MODEL_COLLECTIVE_INSIDE, n.WORKER_HEARTBEAT_AGE,
    n.WORKER_MODEL_COLLECTIVES_TOTAL, n.WORKER_MODEL_COLLECTIVE_SECONDS_TOTAL,
    n.WORKER_POSITION_INFO, n.PAUSE_PENDING_SINCE, n.SYNC_WAIT_COUNT, n.SYNC_WAIT_SUM, n.INFO_SERIES,
    n.PLUGIN_ACTIVE,
})
#: What every rank of ours exports; an answer without one of them is not a vLLM DP endpoint
#: with our plugin (or was cut short).
REQUIRED_SERIES = frozenset({n.PHASE, n.DP_SIZE, n.ENGINES_RUNNING, n.COLLECTIVE_INSIDE,
                             n.LAST_PROGRESS})
#: The collectives every rank reports being inside (or not), from the first version on.
REQUIRED_COLLECTIVES = (n.COLLECTIVE_SYNC, n.COLLECTIVE_STEP, n.COLLECTIVE_BARRIER,
                        n.COLLECTIVE_RPC)
#: A rank's whole exposition is tens of kilobytes; far more is not one of ours.
MAX_BODY_BYTES = 8 * 1024 * 1024


class FetchError(Exception):
    """An HTTP read that did not give a complete answer in time; the message is one line.
    ``kind`` is how it failed, a key of ``diagnosis.NO_ANSWER``: ``unreachable`` (no
    connection: no route, or the connect timed out), ``unresponsive`` (connected, no
    complete answer in time), ``refused``, or "" (anything else, or through a proxy)."""

    def __init__(self, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.kind = kind


class AnswerTooLarge(FetchError):
    """The server answered, with more than the byte cap."""


@dataclass
class RankSample:
    target: str
    reachable: bool
    error: str = ""
    fetched_at: float = 0.0
    values: dict[tuple[str, frozenset], float] = field(default_factory=dict)
    #: why an answer is not a vLLM DP endpoint's exposition ("" when it is one)
    problem: str = ""
    #: how an unreachable target failed (``FetchError.kind``; "" when not known)
    no_answer: str = ""

    def get(self, name: str, default: float | None = None, **labels: str) -> float | None:
        """The one series ``name`` whose labels include ``labels`` (engine/model ignored)."""
        want = set(labels.items())
        for (series, label_set), value in self.values.items():
            if series == name and want <= label_set:
                return value
        return default

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """``{label value: value}`` of every series ``name`` (e.g. per worker)."""
        out: dict[str, float] = {}
        for (series, label_set), value in self.values.items():
            if series == name:
                key = dict(label_set).get(label)
                if key is not None:
                    out[key] = value
        return out

    def labels_of(self, name: str, label: str) -> dict[str, dict[str, str]]:
        """``{label value: all labels}`` of every series ``name`` (info metrics)."""
        out: dict[str, dict[str, str]] = {}
        for (series, label_set) in self.values:
            if series == name:
                labels = dict(label_set)
                if label in labels:
                    out[labels[label]] = labels
        return out

    def sum(self, name: str, **labels: str) -> float:
        want = set(labels.items())
        return sum(v for (s, ls), v in self.values.items() if s == name and want <= ls)

    @property
    def engine(self) -> int | None:
        """The ``engine`` label of its ``vllm_dp_size`` (None when absent or not a number)."""
        for (series, label_set) in self.values:
            if series == n.DP_SIZE:
                return _engine_number(dict(label_set).get(n.LABEL_ENGINE))
        return None

    @property
    def model_name(self) -> str | None:
        for (series, label_set) in self.values:
            if series == n.DP_SIZE:
                return dict(label_set).get(n.LABEL_MODEL_NAME)
        return None


def _engine_number(raw: str | None) -> int | None:
    if raw is None or not raw.isdigit() or len(raw) > 9:
        return None
    return int(raw)


def endpoint_problem(sample: RankSample) -> str:
    """Why an answering target is not a vLLM DP endpoint of ours ("" when it is one)."""
    if sample.problem:
        return sample.problem
    off = plugin_off(sample)
    if off:  # a status-only endpoint: the plugin could not observe this rank, and says why
        return (f"the instrumented_core plugin does not observe this rank "
                f"(vllm_dp_plugin_active 0, reason {off[1]}); see that rank's log")
    names = {series for series, _ in sample.values}
    missing = sorted(REQUIRED_SERIES - names)
    if len(missing) == len(REQUIRED_SERIES):
        return "no vllm_dp_ series in its answer"
    inside = sample.by_label(n.COLLECTIVE_INSIDE, n.LABEL_COLLECTIVE)
    missing += [f"{n.COLLECTIVE_INSIDE}{{collective=\"{c}\"}}" for c in REQUIRED_COLLECTIVES
                if c not in inside and n.COLLECTIVE_INSIDE not in missing]
    if missing:
        return f"its answer lacks {', '.join(missing)} (cut short, or not our plugin)"
    sizes = [(dict(ls).get(n.LABEL_ENGINE), v) for s, ls in sample.values if s == n.DP_SIZE
             for v in (sample.values[(s, ls)],)]
    if len(sizes) != 1:
        return f"{len(sizes)} engines on one endpoint (vllm_dp_size has {len(sizes)} series)"
    (engine, size), = sizes
    if _engine_number(engine) is None:
        return f"engine label {engine!r} is not a DP rank number"
    if not _finite(size) or size < 1 or size != int(size):
        return (f"vllm_dp_size is {size:g}: its telemetry serves defaults (never initialised, "
                "or failed to start)")
    phase = sample.get(n.PHASE)
    if phase is None or not _finite(phase) or int(phase) not in PHASE_NAMES:
        return f"vllm_dp_pause_phase is {phase!r}, not a phase code"
    return ""


def plugin_off(sample: RankSample) -> tuple[int | None, str] | None:
    """A rank's status-only endpoint (``vllm_dp_plugin_active`` 0): its engine number and why
    the plugin is off, e.g. ``contract_mismatch (vLLM 0.20.2)``; None when the plugin is on."""
    for (series, label_set), value in sample.values.items():
        if series == n.PLUGIN_ACTIVE and value == 0:
            labels = dict(label_set)
            version = labels.get(n.LABEL_VLLM_VERSION)
            reason = labels.get(n.LABEL_REASON) or "no reason given"
            return (_engine_number(labels.get(n.LABEL_ENGINE)),
                    reason + (f" (vLLM {version})" if version else ""))
    return None


def _finite(value: float | None) -> TypeGuard[float]:
    return value is not None and math.isfinite(value)


def _num(value: float | None, default: float = 0.0) -> float:
    """A finite number, or ``default`` for a missing, NaN or infinite value."""
    return value if value is not None and math.isfinite(value) else default


def metrics_url(target: str) -> str:
    if target.startswith("http://") or target.startswith("https://"):
        return target if target.rstrip("/").endswith("/metrics") else target.rstrip("/") + "/metrics"
    return f"http://{target}/metrics"


def _only_series(text: str, names: Collection[str]) -> str:
    """The sample lines of ``text`` whose series name is in ``names`` (comments dropped)."""
    keep = [line for line in text.splitlines()
            if line and line[0] != "#" and line.split("{", 1)[0].split(" ", 1)[0] in names]
    return "\n".join(keep) + "\n"


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(
            ".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _proxy_for(scheme: str, host: str) -> urllib.parse.SplitResult | None:
    """The proxy ``http_proxy``/``https_proxy`` name for ``host``: none for loopback targets
    (a proxy cannot reach the caller's own 127.0.0.1) or hosts ``no_proxy`` exempts."""
    if _is_loopback(host):
        return None
    proxy = urllib.request.getproxies().get(scheme)
    if not proxy or urllib.request.proxy_bypass(host):
        return None
    parts = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
    return parts if parts.hostname else None


def http_get(url: str, timeout: float, max_bytes: int = MAX_BODY_BYTES) -> tuple[int, bytes]:
    """``(status, body)`` of a GET, all of it within ``timeout`` seconds (connecting, the
    headers and the body: a slow-dripping server cannot hold the caller) and at most
    ``max_bytes`` of body. Raises :class:`FetchError` with a one-line reason."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError(f"not an http(s) URL: {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise FetchError(f"bad port in {url!r}") from None
    host = parts.hostname
    path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    proxy = _proxy_for(parts.scheme, host)
    conn: http.client.HTTPConnection
    if proxy is not None and parts.scheme == "https":
        conn = http.client.HTTPSConnection(proxy.hostname or "", proxy.port or 80,
                                           timeout=timeout)
        conn.set_tunnel(host, port)
    elif proxy is not None:
        conn = http.client.HTTPConnection(proxy.hostname or "", proxy.port or 80,
                                          timeout=timeout)
        path = url  # a plain-HTTP proxy takes the absolute URL
    elif parts.scheme == "https":
        conn = http.client.HTTPSConnection(host, port, timeout=timeout)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    expired = threading.Event()

    def expire() -> None:  # wakes a recv blocked past the deadline
        expired.set()
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    try:
        if proxy is None and parts.scheme == "http":  # alone: a failure here is the path
            try:
                conn.connect()
            except ConnectionRefusedError:
                raise FetchError("connection refused", "refused") from None
            except OSError as e:
                reason = (f"no connection within {timeout:g} s" if expired.is_set()
                          or isinstance(e, TimeoutError) else
                          f"{type(e).__name__}: {e.strerror or e}")
                raise FetchError(reason, "unreachable") from None
        conn.request("GET", path, headers={"Accept": "text/plain, application/json, */*"})
        response = conn.getresponse()
        chunks: list[bytes] = []
        size = 0
        while not expired.is_set():
            chunk = response.read1(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise AnswerTooLarge(f"its answer is larger than {max_bytes} bytes")
            chunks.append(chunk)
        if expired.is_set():
            raise FetchError(f"no complete answer within {timeout:g} s", "unresponsive")
        return response.status, b"".join(chunks)
    except FetchError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure of the read is one line
        if expired.is_set():
            raise FetchError(f"no complete answer within {timeout:g} s",
                             "unresponsive" if proxy is None else "") from None
        reason = str(e).splitlines()[0] if str(e) else ""
        raise FetchError(f"{type(e).__name__}: {reason}" if reason else type(e).__name__) \
            from None
    finally:
        timer.cancel()
        conn.close()


def parse_exposition(sample: RankSample, text: str, only: Collection[str] | None) -> None:
    """Fill ``sample.values`` from a text exposition; a malformed one sets ``problem``."""
    if text and not text.endswith("\n"):
        sample.problem = "its answer is cut short (no final newline)"
        return
    if only is not None:
        text = _only_series(text, only)
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                sample.values[(s.name, frozenset(s.labels.items()))] = float(s.value)
    except Exception as e:  # noqa: BLE001 - the parser raises several kinds on garbage
        sample.values.clear()
        sample.problem = f"not a Prometheus text exposition ({type(e).__name__})"


def scrape(target: str, timeout: float = 1.0,
           only: Collection[str] | None = None, max_bytes: int = MAX_BODY_BYTES) -> RankSample:
    """One rank's ``/metrics``; ``only`` keeps just those series (e.g. ``DIAGNOSIS_SERIES``).

    Never raises: no answer is ``reachable=False``; an answer that is not an exposition of our
    series is ``reachable=True`` with ``problem`` set (see :func:`endpoint_problem`)."""
    url = metrics_url(target)
    try:
        status, body = http_get(url, timeout, max_bytes)
    except AnswerTooLarge as e:
        return RankSample(target, True, str(e), time.time(), problem=str(e))
    except FetchError as e:
        return RankSample(target, False, str(e), time.time(), no_answer=e.kind)
    return sample_of_answer(target, status, body, only)


def sample_of_answer(target: str, status: int, body: bytes,
                     only: Collection[str] | None = None) -> RankSample:
    """The sample a target's HTTP answer makes (pure: what :func:`scrape` does once read)."""
    sample = RankSample(target, True, fetched_at=time.time())
    if status != 200:
        busy = " (busy: more concurrent scrapes than it serves; retry)" if status == 503 else ""
        sample.problem = f"it answered HTTP {status}{busy}"
        return sample
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        sample.problem = "its answer is not UTF-8 text"
        return sample
    parse_exposition(sample, text, only)
    return sample


def scrape_all(targets: list[str], timeout: float = 1.0,
               only: Collection[str] | None = None) -> list[RankSample]:
    if not targets:
        return []
    with ThreadPoolExecutor(max_workers=min(32, len(targets))) as pool:
        return list(pool.map(lambda t: scrape(t, timeout, only), targets))


def to_view(sample: RankSample, rank: int, previous: RankSample | None = None) -> RankView:
    """One rank's diagnosis input; with ``previous`` it also gets its collective wait share.

    Never raises: an answer that is not our exposition, or holds values no rank of ours can
    export (NaN, infinities), is a view with ``not_endpoint`` set, never a healthy rank."""
    if not sample.reachable:
        return RankView(rank=rank, reachable=False, source=sample.target,
                        no_answer=sample.no_answer)
    off = plugin_off(sample)
    if off is not None:
        engine, reason = off
        return RankView(rank=rank if engine is None else engine, source=sample.target,
                        not_endpoint=f"the plugin is off there ({reason})", plugin_off=reason)
    problem = endpoint_problem(sample)
    if not problem:
        try:
            return _to_view(sample, rank, previous)
        except (ValueError, OverflowError, TypeError) as e:
            problem = f"values no rank exports ({type(e).__name__}: {e})"
    return RankView(rank=rank, source=sample.target, not_endpoint=problem)


def _to_view(sample: RankSample, rank: int, previous: RankSample | None) -> RankView:
    inside = {c: _num(sample.get(n.COLLECTIVE_INSIDE, 0.0, collective=c)) for c in n.COLLECTIVES}
    collective, seconds = max(inside.items(), key=lambda kv: kv[1])
    last_progress = _num(sample.get(n.LAST_PROGRESS, 0.0))
    if previous is not None and (not previous.reachable or endpoint_problem(previous)):
        previous = None
    wait_fraction = None
    if previous is not None:
        elapsed = sample.fetched_at - previous.fetched_at
        waited = sum(_num(sample.get(name, 0.0, **labels)) -
                     _num(previous.get(name, 0.0, **labels))
                     for name, labels in _WAITED.values())
        # a rank sitting inside a collective right now has not banked that wait yet
        waited += min(seconds, elapsed) if collective in WAIT_COLLECTIVES else 0.0
        if elapsed > 0:
            wait_fraction = max(0.0, min(1.0, waited / elapsed))
    until = sample.get(n.STEPS_UNTIL_SYNC)
    running, waiting = sample.get(n.REQUESTS_RUNNING), sample.get(n.REQUESTS_WAITING)
    requests = (int(running + waiting) if _finite(running) and _finite(waiting)
                else None)  # NaN: unknown
    phase = PHASE_NAMES[int(_num(sample.get(n.PHASE)))]
    info = next(iter(sample.labels_of(n.INFO_SERIES, "protocol").values()), {})
    return RankView(
        rank=rank,
        reachable=True,
        phase=phase,
        collective=collective if seconds > 0 else None,
        inside_seconds=seconds,
        progress_age=max(0.0, sample.fetched_at - last_progress) if last_progress else 0.0,
        engines_running=bool(_num(sample.get(n.ENGINES_RUNNING, 0))),
        wait_fraction=wait_fraction,
        steps_until_sync=int(until) if _finite(until) else None,
        requests=requests,
        source=sample.target,
        dp_size=int(_num(sample.get(n.DP_SIZE))),
        deployment=sample.model_name,
        protocol=info.get("protocol"),
        **_pending_fields(sample, phase, previous),
        **_worker_fields(sample, previous),
    )


def _pending_fields(sample: RankSample, phase: str, previous: RankSample | None) -> dict:
    """How long the rank's pause has been pending and, when both samples show the same pending
    pause, how many sync rounds it completed in between (each one a vote without consensus)."""
    since = sample.get(n.PAUSE_PENDING_SINCE)
    if phase != "pending_pause" or not _finite(since) or not since:
        return {}
    fields: dict = {"pending_seconds": max(0.0, sample.fetched_at - since)}
    rounds = sample.get(n.SYNC_WAIT_COUNT)  # one observation per completed round
    if previous is not None and previous.get(n.PAUSE_PENDING_SINCE) == since:
        before = previous.get(n.SYNC_WAIT_COUNT)
        if _finite(rounds) and _finite(before):
            fields["pending_sync_rounds"] = max(0, int(rounds - before))
    return fields


def _worker_fields(sample: RankSample, previous: RankSample | None) -> dict:
    """The rank's workers, from the worker-board series of its endpoint (none: no fields).

    Per worker it serves only the heartbeat age and the position; the model-collective
    series are already the rank's (over its workers, as ``diagnosis.worker_fields`` takes
    them), and how long the workers have been inside their call is how long their engine
    has been inside ``step`` or ``collective_rpc``."""
    heartbeat = sample.by_label(n.WORKER_HEARTBEAT_AGE, n.LABEL_WORKER)
    if not heartbeat:
        return {}
    position = sample.labels_of(n.WORKER_POSITION_INFO, n.LABEL_WORKER)
    workers = sorted(heartbeat)

    def named(label: str) -> list[str]:
        found = (position.get(w, {}).get(label, "none") for w in workers)
        return [v for v in found if v != "none"]

    calls = named(n.LABEL_CALL)
    call_seconds = max((_num(sample.get(n.COLLECTIVE_INSIDE, 0.0, collective=c))
                        for c in n.ENGINE_TO_WORKER_CALLS), default=0.0)
    inside = _num(sample.get(n.WORKER_MODEL_COLLECTIVE_INSIDE, 0.0))
    seq = sample.get(n.WORKER_MODEL_COLLECTIVES_TOTAL)
    fields: dict = {
        "workers": len(workers),
        "worker_call": calls[0] if calls and call_seconds > 0 else None,
        "worker_call_seconds": call_seconds if calls else 0.0,
        "worker_heartbeat_age": max(_num(v) for v in heartbeat.values()),
        "model_collective_seq": int(_num(seq)) if seq is not None else 0,
    }
    if inside > 0:
        # inside with no position info (a scrape cut short): still inside, name unknown
        fields["model_collective"] = (named(n.LABEL_COLLECTIVE) or ["?"])[0]
        fields["model_collective_seconds"] = inside
    if previous is not None:
        before_seq = previous.get(n.WORKER_MODEL_COLLECTIVES_TOTAL)
        if before_seq is not None and seq is not None:
            fields["model_collectives_advanced"] = int(_num(seq) - _num(before_seq))
        elapsed = sample.fetched_at - previous.fetched_at
        name = n.WORKER_MODEL_COLLECTIVE_SECONDS_TOTAL
        now, before = sample.get(name), previous.get(name)
        if elapsed > 0 and now is not None and before is not None:
            # waiting right now has not been banked yet
            waited = _num(now) - _num(before) + min(inside, elapsed)
            fields["model_wait_fraction"] = max(0.0, min(1.0, waited / elapsed))
    return fields


class PrometheusError(Exception):
    """Prometheus cannot answer what the doctor asks; the message is one line with the fix.
    ``unreachable`` tells "nothing answered" apart from a refused or unreadable answer."""

    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def prometheus_query(base_url: str, expr: str, timeout: float) -> list[dict]:
    """The result vector of one instant query; every failure is a :class:`PrometheusError`."""
    url = base_url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        status, body = http_get(url, timeout)
    except AnswerTooLarge as e:
        raise PrometheusError(f"Prometheus at {base_url}: {e}: narrow it with --selector") \
            from None
    except FetchError as e:
        raise PrometheusError(f"cannot reach Prometheus at {base_url} ({e}): check --prometheus "
                              "(its base URL, e.g. http://127.0.0.1:9090)", True) from None
    try:
        answer = json.loads(body)
        if not isinstance(answer, dict):
            raise ValueError(type(answer).__name__)
    except ValueError:
        raise PrometheusError(f"{base_url} answered HTTP {status} with something that is not "
                              "Prometheus' JSON API: check --prometheus (the server's base URL, "
                              "not a page or a /metrics endpoint)") from None
    if answer.get("status") != "success":
        error = " ".join(str(answer.get("error") or f"HTTP {status}").split())[:300]
        raise PrometheusError(f"Prometheus refused the query ({answer.get('errorType', 'error')}"
                              f": {error}): check --selector (label matchers such as "
                              f'model_name="my-model")')
    try:
        data = answer["data"]
        result = data["result"]
        if data.get("resultType") != "vector" or not isinstance(result, list):
            raise TypeError(data.get("resultType"))
        for item in result:
            item["metric"] = {str(k): str(v) for k, v in dict(item["metric"]).items()}
            float(item["value"][1])
    except (KeyError, TypeError, ValueError, IndexError):
        raise PrometheusError(f"{base_url} answered an instant query with no vector of samples: "
                              "is it a Prometheus server?") from None
    return result


def prometheus_samples(base_url: str, timeout: float = 2.0,
                       selector: str = "") -> list[RankSample]:
    """Per-rank samples of ONE deployment from a Prometheus server's latest values.

    A deployment is one ``job`` and ``model_name``; more than one in what ``selector`` matches
    is refused (never merged by engine number). ``up == 0`` targets that last exported this
    deployment's series become unreachable ranks, so a dead rank is still named: ``up`` has no
    ``model_name``, so the selector is applied to the ranks' own series, not to ``up``."""
    now = time.time()
    selector = selector.strip().strip("{}").strip()
    expr = "{__name__=~\"vllm_dp_.*\"" + (f",{selector}" if selector else "") + "}"
    by_instance: dict[str, RankSample] = {}
    deployments: dict[tuple[str, str], set[str]] = {}
    for item in prometheus_query(base_url, expr, timeout):
        labels = dict(item["metric"])
        name = labels.pop("__name__", "")
        instance = labels.pop("instance", "")
        job = labels.pop("job", "")
        if n.LABEL_ENGINE not in labels or not instance:  # a rank's series come from a target
            continue
        deployments.setdefault((job, labels.get(n.LABEL_MODEL_NAME, "")), set()).add(instance)
        sample = by_instance.setdefault(instance, RankSample(instance, True, fetched_at=now))
        sample.values[(name, frozenset(labels.items()))] = float(item["value"][1])
    last = prometheus_query(base_url, f"last_over_time({n.DP_SIZE}{{{selector}}}[1h])", timeout)
    for item in last:
        labels = dict(item["metric"])
        deployments.setdefault((labels.get("job", ""), labels.get(n.LABEL_MODEL_NAME, "")),
                               set()).add(labels.get("instance", ""))
    if len(deployments) > 1:
        names = "; ".join(f"job={j!r} model_name={m!r}" for j, m in sorted(deployments))
        raise PrometheusError(f"{'--selector matches' if selector else 'Prometheus holds'} "
                              f"{len(deployments)} deployments ({names}): pick one with "
                              f"--selector, e.g. --selector 'model_name=\"{sorted(deployments)[0][1]}\"'")
    if not deployments:
        return []
    (job, model), = deployments
    # a dead rank has no fresh series: name it from the engine its target last exported
    last_of = {item["metric"].get("instance", ""): item for item in last
               if item["metric"].get("job", "") == job}
    down = prometheus_query(base_url, f'up{{job="{_escape(job)}"}} == 0', timeout)
    errors = prometheus_scrape_errors(base_url, timeout) if down else {}
    for item in down:
        instance = item["metric"].get("instance", "")
        if instance not in last_of:
            continue
        labels = dict(last_of[instance]["metric"])
        for drop in ("__name__", "instance", "job"):
            labels.pop(drop, None)
        error = errors.get(instance, "")
        dead = RankSample(instance, False, "target down (up == 0)" + (
            f": {error}" if error else ""), now, no_answer=scrape_error_kind(error))
        dead.values[(n.DP_SIZE, frozenset(labels.items()))] = float(last_of[instance]["value"][1])
        by_instance[instance] = dead
    return sorted(by_instance.values(), key=lambda s: (s.engine is None, s.engine or 0,
                                                        s.target))


def scrape_error_kind(error: str) -> str:
    """How a scrape failed, from Prometheus' ``lastError`` (a key of ``diagnosis.NO_ANSWER``):
    Go's dialer names a refusal and a missing route; a deadline alone cannot tell a frozen
    process from a host whose packets vanish, so it is ``timeout``."""
    text = error.lower()
    if "connection refused" in text:
        return "refused"
    if any(w in text for w in ("no route to host", "network is unreachable",
                               "host is unreachable", "dial tcp")):
        return "unreachable"
    if "deadline exceeded" in text or "timeout" in text:
        return "timeout"
    return ""


def prometheus_scrape_errors(base_url: str, timeout: float) -> dict[str, str]:
    """``instance`` -> the last scrape error of each active target that has one (empty when
    Prometheus' targets API cannot be read: the verdict then just says "no answer")."""
    try:
        status, body = http_get(base_url.rstrip("/") + "/api/v1/targets?state=active", timeout)
        active = json.loads(body)["data"]["activeTargets"] if status == 200 else []
        return {str(t["labels"]["instance"]): str(t.get("lastError") or "")
                for t in active if t.get("lastError")}
    except (FetchError, ValueError, KeyError, TypeError):
        return {}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')
