"""How a target fails to answer, told apart over real loopback sockets (fast layer): refused
(nothing listens: a killed process), unresponsive (the kernel accepts, nobody answers: a
frozen process), and Prometheus' last scrape errors read the same way. The third kind,
unreachable (no route, or the connect times out), needs a cut network: tests/test_multihost_*.
"""

from __future__ import annotations

import socket

import pytest

from instrumented_core.scrape import scrape, scrape_error_kind, to_view


def test_a_closed_port_is_refused_and_the_view_says_down():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sample = scrape(f"127.0.0.1:{port}", timeout=1.0)
    assert not sample.reachable and sample.no_answer == "refused", sample.error
    assert to_view(sample, 3).no_answer == "refused"


def test_a_socket_that_accepts_and_never_answers_is_unresponsive():
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        sample = scrape(f"127.0.0.1:{mute.getsockname()[1]}", timeout=0.3)
    assert not sample.reachable and sample.no_answer == "unresponsive", sample.error


@pytest.mark.parametrize("error, kind", [
    ('Get "http://10.0.0.12:8103/metrics": dial tcp 10.0.0.12:8103: connect: connection '
     'refused', "refused"),
    ('Get "http://10.0.0.12:8103/metrics": dial tcp 10.0.0.12:8103: connect: no route to host',
     "unreachable"),
    ('Get "http://10.0.0.12:8103/metrics": dial tcp 10.0.0.12:8103: i/o timeout',
     "unreachable"),
    ('Get "http://10.0.0.12:8103/metrics": context deadline exceeded', "timeout"),
    ("server returned HTTP status 500", ""),
])
def test_prometheus_last_errors_are_read_as_the_doctor_reads_a_target(error, kind):
    assert scrape_error_kind(error) == kind
