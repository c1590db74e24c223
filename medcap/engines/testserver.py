"""A small OpenAI-compatible HTTP server over any Engine, for tests and local use (loopback only).

    server, url = serve(HFEngine(...), adapters={"sft": "runs/x/adapters/llava"})
    OpenAIEngine("base", EngineConfig(kind="openai", base_url=url))  # talks to it like to `vllm serve`
    server.stop()  # like a process exit: the port closes and so does every open connection

``POST /v1/chat/completions`` decodes ``image_url`` data URLs to PIL images, maps ``model`` to a
LoRA adapter path (the ``adapters`` mapping, like ``--lora-modules name=path``; any other name is
the base model unless ``base_model`` is given) and calls the wrapped engine, one request at a
time. ``GET /v1/models`` lists the names. ``before(path, body)`` may return an HTTP status to fail
a call with (tests use it to inject 503s and delays). ``server.stop()`` then ``serve(..., port=same)``
is a server restart as a client sees it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import ipaddress
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from medcap.config import GenerationConfig
from medcap.engines.base import Engine, Request

log = logging.getLogger(__name__)

Hook = Callable[[str, dict[str, Any]], int | None]


class BadRequest(ValueError):
    """A request body the server cannot serve (answered with HTTP 400)."""


def decode_data_url(url: str) -> Any:
    """A PIL image from a ``data:image/...;base64,`` URL."""
    from PIL import Image

    head, sep, data = url.partition(",")
    if not (head.startswith("data:") and head.endswith(";base64") and sep):
        raise BadRequest(f"only base64 data URLs are served, got {url[:40]!r}")
    try:
        im = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        im.load()
    except (binascii.Error, OSError) as e:
        raise BadRequest(f"image data URL does not decode: {e}") from e
    return im


def engine_messages(messages: list[dict[str, Any]]) -> tuple[tuple[dict[str, Any], ...], tuple[Any, ...]]:
    """OpenAI chat messages -> the engine contract's messages (``{"type": "image"}`` parts) and images."""
    out, images = [], []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") == "image_url":
                    url = part.get("image_url")
                    images.append(decode_data_url(url.get("url", "") if isinstance(url, dict) else str(url)))
                    parts.append({"type": "image"})
                elif part.get("type") == "text":
                    parts.append({"type": "text", "text": part.get("text", "")})
                else:
                    raise BadRequest(f"unsupported content part type {part.get('type')!r}")
            content = parts
        out.append({**m, "content": content})
    return tuple(out), tuple(images)


def generation_config(body: dict[str, Any]) -> GenerationConfig:
    """The decoding settings of a chat-completions body (temperature 0 is greedy)."""
    p = GenerationConfig()
    temperature = float(body.get("temperature", 1.0))
    return GenerationConfig(
        max_new_tokens=int(body.get("max_tokens") or body.get("max_completion_tokens") or p.max_new_tokens),
        num_beams=int(body.get("n", 1)) if body.get("use_beam_search") else 1,
        do_sample=temperature > 0 and not body.get("use_beam_search"),
        temperature=temperature if temperature > 0 else p.temperature,
        top_p=float(body.get("top_p", 1.0)),
        repetition_penalty=float(body.get("repetition_penalty", 1.0)),
        seed=int(body.get("seed") or 0),
    )


class Server(ThreadingHTTPServer):
    """A threading HTTP server that knows its open connections, so that ``stop`` can close them like a process exit."""

    daemon_threads = True  # a client that gave up must not block shutdown

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def track(self, conn: socket.socket, open_: bool) -> None:
        with self._connections_lock:
            (self._connections.add if open_ else self._connections.discard)(conn)

    def stop(self) -> None:
        """Stop serving, close the port, and cut every open connection (keep-alive or mid-request)."""
        self.shutdown()
        self.server_close()
        with self._connections_lock:
            conns = list(self._connections)
        for conn in conns:
            with contextlib.suppress(OSError):  # already closed by its handler
                conn.shutdown(socket.SHUT_RDWR)


def serve(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    adapters: dict[str, str] | None = None,
    base_model: str | None = None,
    before: Hook | None = None,
) -> tuple[Server, str]:
    """Start serving ``engine`` on a daemon thread; returns the server and its base URL (``.../v1``)."""
    try:
        addr = ipaddress.ip_address(socket.gethostbyname(host))
    except (OSError, ValueError) as e:
        raise ValueError(f"serve: cannot resolve host {host!r}: {e}") from e
    if not addr.is_loopback:
        raise ValueError(f"serve: {host!r} is not a loopback address; this server is for tests and local use only")
    handler = _handler(engine, dict(adapters or {}), base_model, before, threading.Lock())
    server = Server((host, port), handler)
    threading.Thread(target=server.serve_forever, name="medcap-testserver", daemon=True).start()
    url = f"http://{host}:{server.server_address[1]}/v1"
    log.info("serving %s at %s", type(engine).__name__, url)
    return server, url


def _handler(
    engine: Engine, adapters: dict[str, str], base_model: str | None, before: Hook | None, lock: threading.Lock
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            self.server.track(self.connection, True)

        def finish(self) -> None:
            try:
                super().finish()
            except OSError:  # the connection was cut by Server.stop
                pass
            finally:
                self.server.track(self.connection, False)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
            log.debug("%s " + format, self.address_string(), *args)

        def do_GET(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/v1/models":
                return self._error(404, f"no route GET {self.path}")
            names = ([base_model] if base_model else []) + list(adapters)
            self._json(200, {"object": "list", "data": [{"id": n, "object": "model"} for n in names]})

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._error(404, f"no route POST {self.path}")
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            except ValueError as e:
                return self._error(400, f"body is not JSON: {e}")
            if before is not None and (status := before(self.path, body)):
                return self._error(status, f"failed by the server's hook with {status}")
            model = body.get("model")
            if base_model is not None and model != base_model and model not in adapters:
                return self._error(404, f"the model `{model}` does not exist")
            try:
                messages, images = engine_messages(body.get("messages") or [])
                req = Request(
                    id=uuid.uuid4().hex, messages=messages, images=images,
                    adapter=adapters.get(model), params=generation_config(body),
                )  # fmt: skip
            except (BadRequest, TypeError, ValueError, AttributeError) as e:
                return self._error(400, str(e))
            try:
                with lock:  # engines are not thread-safe: one generate at a time
                    (done,) = engine.generate([req])
            except Exception as e:  # noqa: BLE001 (reported to the client as a 500)
                log.exception("engine failed")
                return self._error(500, f"{type(e).__name__}: {e}")
            self._json(200, {
                "id": f"chatcmpl-{req.id}", "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 0, "completion_tokens": done.n_tokens, "total_tokens": done.n_tokens},
            })  # fmt: skip

        def _error(self, status: int, message: str) -> None:
            self._json(status, {"error": {"message": message, "type": "error", "code": status}})

        def _json(self, status: int, obj: dict[str, Any]) -> None:
            data = json.dumps(obj).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the client timed out and left, or Server.stop cut the connection
                pass

    return Handler
