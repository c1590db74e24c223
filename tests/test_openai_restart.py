"""The openai engine survives its server restarting mid-run: a real local server stopped and started again."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

from medcap.config import EngineConfig, GenerationConfig
from medcap.engines.base import Completion, Request
from medcap.engines.openai import OpenAIEngine, OpenAIEngineError
from medcap.engines.testserver import serve


class SlowEcho:
    """Answers each prompt with its own text, taking a little time, like a model; counts what it served."""

    def __init__(self, delay: float = 0.02) -> None:
        self.delay, self.served = delay, 0

    def generate(self, requests: list[Request]) -> list[Completion]:
        time.sleep(self.delay)
        self.served += len(requests)
        return [Completion(r.id, "echo " + r.messages[0]["content"][0]["text"], n_tokens=2) for r in requests]

    def close(self) -> None:
        pass


def _request(i: int) -> Request:
    return Request(
        f"img{i}",
        ({"role": "user", "content": [{"type": "text", "text": f"caption {i}"}]},),
        params=GenerationConfig(max_new_tokens=4),
    )


def _client(url: str, **extra) -> OpenAIEngine:
    cfg = EngineConfig(
        kind="openai",
        base_url=url,
        concurrency=2,
        max_retries=2,  # 0.05 + 0.1 s of backoff: far less than the time the server is down
        timeout=5.0,
        extra={"backoff": 0.05, "max_backoff": 0.2, **extra},
    )
    return OpenAIEngine("base", cfg)


def _wait_for(condition, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("condition not met")
        time.sleep(0.01)


def test_survives_the_server_restarting_mid_run(caplog):
    first = SlowEcho()
    server, url = serve(first)
    port = server.server_address[1]
    client = _client(url)
    requests = [_request(i) for i in range(40)]
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(out=client.generate(requests)))
    with caplog.at_level(logging.WARNING, logger="medcap.engines.openai"):
        runner.start()
        _wait_for(lambda: first.served >= 10)
        server.stop()  # the port closes and every keep-alive or in-flight connection is cut
        time.sleep(1.0)  # down for longer than max_retries' backoff allows
        second = SlowEcho()
        restarted, _ = serve(second, port=port)
        runner.join(timeout=60)
    restarted.stop()
    client.close()
    assert not runner.is_alive()
    out = result["out"]
    assert [c.id for c in out] == [r.id for r in requests]
    assert [c.text for c in out] == [f"echo caption {i}" for i in range(40)]
    assert first.served >= 10 and second.served >= 1 and first.served + second.served >= 40
    assert "server restarting?" in caplog.text  # the failures while it was down were waited out


def test_a_connection_cut_in_the_middle_of_an_answer_is_retried():
    """The server dies while sending a response (Content-Length says more than arrives), then comes back."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    echo = SlowEcho(delay=0.0)
    servers = []

    def die_mid_answer_then_restart() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n{"choi')
        conn.close()
        listener.close()
        servers.append(serve(echo, port=port)[0])

    threading.Thread(target=die_mid_answer_then_restart, daemon=True).start()
    client = _client(f"http://127.0.0.1:{port}/v1", backoff=0.3)
    (c,) = client.generate([_request(7)])
    client.close()
    _wait_for(lambda: servers)
    servers[0].stop()
    assert c.text == "echo caption 7" and echo.served == 1


def test_a_server_that_stays_down_fails_after_reconnect_for():
    server, url = serve(SlowEcho(delay=0.0))
    client = _client(url, reconnect_for=0.5)
    assert client.generate([_request(0)])[0].text == "echo caption 0"
    server.stop()
    t0 = time.monotonic()
    with pytest.raises(
        OpenAIEngineError, match=r"gave up after \d+ attempt\(s\) \(unreachable for \d+ s\).*connection"
    ):
        client.generate([_request(1)])
    assert time.monotonic() - t0 < 3.0
    client.close()
