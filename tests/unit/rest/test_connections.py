"""HTTP connection bounds against a live node: slow request heads and too many connections
(a client holding half-sent requests must not take the node's file descriptors)."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.support.serving import LiveNode, live_node, serving_settings

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveNode]:
    data = tmp_path_factory.mktemp("connections") / "data"
    settings = serving_settings(data, models=[], max_connections=4,
                                request_head_timeout_s=1.5)
    with live_node(settings) as ln:
        yield ln


def _port(live: LiveNode) -> int:
    return int(live.base_url.rsplit(":", 1)[1])


def _half_sent(live: LiveNode) -> socket.socket:
    """A connection that sends the start of a request head and never its end."""
    s = socket.create_connection(("127.0.0.1", _port(live)), timeout=30)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    return s


def _closed_by_server(s: socket.socket) -> bool:
    """Blocks until the server closes ``s`` (True) or sends something (False)."""
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def _health(live: LiveNode) -> int:
    with urllib.request.urlopen(live.base_url + "/health", timeout=30) as r:
        return int(r.status)


def test_a_request_head_that_never_ends_is_closed(live: LiveNode) -> None:
    """A slowloris connection keeps sending header lines; it was held for good."""
    s = _half_sent(live)
    try:
        while True:  # a header line now and then, never the blank line ending the head
            time.sleep(0.3)
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except OSError:
                break  # closed by the node
            if s.fileno() < 0:
                break
            s.setblocking(False)
            try:
                if s.recv(1) == b"":
                    break
            except BlockingIOError:
                pass
            except OSError:
                break
            finally:
                s.setblocking(True)
    finally:
        s.close()
    assert _health(live) == 200
    guard = live.node.http_connections
    assert guard is not None and guard.timed_out >= 1


def test_connections_beyond_the_cap_are_closed_and_the_node_still_answers(
        live: LiveNode) -> None:
    held = [_half_sent(live) for _ in range(4)]
    try:
        extra = socket.create_connection(("127.0.0.1", _port(live)), timeout=30)
        try:
            assert _closed_by_server(extra)  # over max_connections: closed at once
        finally:
            extra.close()
        for s in held:  # the held ones go after the head timeout
            assert _closed_by_server(s)
    finally:
        for s in held:
            s.close()
    assert _health(live) == 200  # room again
    guard = live.node.http_connections
    assert guard is not None and guard.refused >= 1


def test_a_slow_request_body_is_not_cut_off(live: LiveNode) -> None:
    """Only the wait for a request head is limited: a body that takes longer than the
    head timeout (a large upload on a slow link) is read to its end and answered."""
    token = live.token()
    body = b'{"not": "a valid request"}'
    s = socket.create_connection(("127.0.0.1", _port(live)), timeout=30)
    try:
        s.sendall(b"POST /api/inference HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nAuthorization: Bearer " + token.encode() + b"\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n")
        for i in range(0, len(body), 4):
            s.sendall(body[i:i + 4])
            time.sleep(0.4)  # ~2.8 s in all: longer than the 1.5 s head timeout
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    finally:
        s.close()
    assert answer.startswith(b"HTTP/1.1 422"), answer[:200]
