"""The ``openai`` engine: chat completions over HTTP from a running ``vllm serve`` (or any OpenAI-compatible server).

    vllm serve llava-hf/llava-1.5-7b-hf --enable-lora --lora-modules sft=runs/x/adapters/llava

A request's images travel as base64 data URLs in ``image_url`` parts; its LoRA adapter is picked
by ``model=<served LoRA name>`` (the adapter folder's name, or the name given for that path in
``cfg.extra["lora_modules"]``, the same ``{name: path}`` mapping as ``--lora-modules``). Requests
run ``cfg.concurrency`` at a time; connection errors, timeouts, 429 and 5xx are retried with
exponential backoff and jitter up to ``cfg.max_retries`` times, then fail naming the URL and the
last status. A server that has answered once and then cannot be reached is taken to be restarting:
connection failures are then retried for up to ``cfg.extra["reconnect_for"]`` seconds (default
600, a vLLM restart), so a run survives it; a wrong URL still fails after ``max_retries``. Uses
``requests``, not the ``openai`` package.
"""

from __future__ import annotations

import base64
import io
import logging
import mimetypes
import queue
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from medcap.config import EngineConfig, GenerationConfig
from medcap.engines.base import Completion, Request, sampling

log = logging.getLogger(__name__)

_RETRY_STATUS = {408, 409, 425, 429}  # plus every 5xx
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}


class OpenAIEngineError(RuntimeError):
    """A request the server did not answer (after retries), or answered with an error."""


# --------------------------------------------------------------------------- payloads


def image_data_url(image: Any) -> str:
    """A ``data:`` URL holding the image: a file's own bytes, or a PIL image as lossless PNG."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        data = path.read_bytes()
    else:
        if image.mode not in _PNG_MODES:
            image = image.convert("RGB")
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        mime, data = "image/png", buf.getvalue()
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def openai_messages(request: Request) -> list[dict[str, Any]]:
    """The request's messages with each ``{"type": "image"}`` part filled by its image as an ``image_url``."""
    images = iter(request.images)
    used = 0
    out = []
    for message in request.messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") == "image":
                    try:
                        image = next(images)
                    except StopIteration:
                        raise ValueError(
                            f"request {request.id}: more image parts than images ({len(request.images)})"
                        ) from None
                    used += 1
                    parts.append({"type": "image_url", "image_url": {"url": image_data_url(image)}})
                else:
                    parts.append(dict(part))
            content = parts
        out.append({**message, "content": content})
    if used != len(request.images):
        raise ValueError(f"request {request.id}: {len(request.images)} images for {used} image parts")
    return out


def sampling_fields(p: GenerationConfig) -> dict[str, Any]:
    """Chat-completions fields for the decoding settings (vLLM's extra fields included)."""
    fields = sampling(p)
    if p.repetition_penalty == 1.0:
        del fields["repetition_penalty"]  # a field plain OpenAI servers do not know
    if p.num_beams > 1:  # vLLM: beam search with n beams, best beam first
        fields.update(use_beam_search=True, n=p.num_beams, temperature=0.0)
    return fields


def served_names(lora_modules: dict[str, str] | None) -> dict[str, str]:
    """``{resolved adapter path: served name}`` from a ``{name: path}`` mapping like ``--lora-modules``."""
    return {str(Path(path).resolve()): name for name, path in (lora_modules or {}).items()}


# --------------------------------------------------------------------------- engine


class OpenAIEngine:
    """Chat completions from an OpenAI-compatible server, ``cfg.concurrency`` requests in flight."""

    def __init__(self, model: str, cfg: EngineConfig):
        import requests

        self.model = model
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.lora_modules: dict[str, str] = dict(cfg.extra.get("lora_modules") or {})
        self._names = served_names(self.lora_modules)
        self.backoff = float(cfg.extra.get("backoff", 0.5))  # seconds before the first retry; doubles each time
        self.max_backoff = float(cfg.extra.get("max_backoff", 30.0))
        # seconds a server that has answered may stay unreachable (restarting) before a request gives up
        self.reconnect_for = float(cfg.extra.get("reconnect_for", 600.0))
        self._answered = threading.Event()  # the server has answered once: a lost connection is a restart
        self._sessions: queue.SimpleQueue = queue.SimpleQueue()
        self._all_sessions = []
        for _ in range(max(1, cfg.concurrency)):
            s = requests.Session()
            s.headers["Authorization"] = f"Bearer {cfg.api_key}"
            self._sessions.put(s)
            self._all_sessions.append(s)

    def served_model(self, adapter: str | None) -> str:
        """The ``model`` field that selects ``adapter`` on the server (the base model for None)."""
        if adapter is None:
            return self.model
        if adapter in self.lora_modules:  # already a served name
            return adapter
        return self._names.get(str(Path(adapter).resolve()), Path(adapter).name)

    def payload(self, request: Request) -> dict[str, Any]:
        return {
            "model": self.served_model(request.adapter),
            "messages": openai_messages(request),
            **sampling_fields(request.params),
        }

    def generate(self, requests: list[Request]) -> list[Completion]:
        if not requests:
            return []
        payloads = [self.payload(r) for r in requests]  # bad requests fail here, before any traffic
        workers = min(max(1, self.cfg.concurrency), len(requests))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medcap-openai") as pool:
            futures = [pool.submit(self._complete, r.id, p) for r, p in zip(requests, payloads, strict=True)]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    def _complete(self, rid: str, payload: dict[str, Any]) -> Completion:
        body = self._post(payload, rid)
        try:
            text = (body["choices"][0]["message"]["content"] or "").strip()  # as the hf and vllm engines do
        except (KeyError, IndexError, TypeError) as e:
            raise OpenAIEngineError(f"POST {self.url} (request {rid}): unexpected response {str(body)[:300]}") from e
        usage = body.get("usage") or {}
        return Completion(rid, text, int(usage.get("completion_tokens") or 0))

    def _post(self, payload: dict[str, Any], rid: str) -> dict[str, Any]:
        import requests

        tries = failures = 0  # every attempt; the failures that count against max_retries
        down_since: float | None = None  # when the server, after answering before, became unreachable
        last = ""
        session = self._sessions.get()
        try:
            while True:
                tries += 1
                wait, restarting = None, False
                try:
                    resp = session.post(self.url, json=payload, timeout=self.cfg.timeout)
                except requests.Timeout:
                    last = f"no answer within {self.cfg.timeout:g} s"
                except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
                    # ChunkedEncodingError: the connection broke in the middle of the answer (a server going down)
                    last = f"connection failed ({type(e).__name__}: {_short(e)})"
                    if self._answered.is_set():
                        down_since = down_since if down_since is not None else time.monotonic()
                        restarting = time.monotonic() - down_since < self.reconnect_for
                else:
                    if resp.status_code == 200:
                        try:
                            body = resp.json()
                        except ValueError:
                            raise OpenAIEngineError(
                                f"POST {self.url} (request {rid}): HTTP 200 with a body that is not JSON: "
                                f"{resp.text[:300]!r}"
                            ) from None
                        self._answered.set()
                        return body
                    last = f"HTTP {resp.status_code}: {_error_text(resp)}"
                    if resp.status_code not in _RETRY_STATUS and resp.status_code < 500:
                        hint = ""
                        if resp.status_code == 404 and payload["model"] != self.model:
                            hint = f" (is the adapter served as '{payload['model']}'? `vllm serve ... --lora-modules`)"
                        raise OpenAIEngineError(
                            f"POST {self.url} (request {rid}, model {payload['model']}): {last}{hint}"
                        )
                    wait = _retry_after(resp)
                if not restarting:
                    failures += 1
                    if failures > self.cfg.max_retries:
                        break
                delay = self._delay(tries - 1, wait)
                budget = "server restarting?" if restarting else f"retry {failures}/{self.cfg.max_retries}"
                log.warning("POST %s (request %s): %s; %s, again in %.2f s", self.url, rid, last, budget, delay)
                time.sleep(delay)
        finally:
            self._sessions.put(session)
        down = f" (unreachable for {time.monotonic() - down_since:.0f} s)" if down_since is not None else ""
        raise OpenAIEngineError(
            f"POST {self.url} (request {rid}): gave up after {tries} attempt(s){down}; last: {last}"
        )

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with full jitter in its upper half; a server's Retry-After wins, capped."""
        base = min(self.max_backoff, self.backoff * 2**attempt)
        delay = base * (0.5 + random.random() / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_backoff))
        return delay

    def served_models(self) -> list[str]:
        """The model names the server lists (``GET /models``): the base model and its LoRA modules."""
        session = self._sessions.get()
        try:
            resp = session.get(self.cfg.base_url.rstrip("/") + "/models", timeout=self.cfg.timeout)
        finally:
            self._sessions.put(session)
        if resp.status_code != 200:
            raise OpenAIEngineError(f"GET {resp.url}: HTTP {resp.status_code}: {_error_text(resp)}")
        return [m["id"] for m in resp.json().get("data", [])]

    def close(self) -> None:
        for s in self._all_sessions:
            s.close()


def _retry_after(resp: Any) -> float | None:
    try:
        return float(resp.headers.get("Retry-After"))
    except (TypeError, ValueError):
        return None


def _error_text(resp: Any) -> str:
    try:
        err = resp.json().get("error")
        msg = err.get("message") if isinstance(err, dict) else err
        if msg:
            return str(msg)[:300]
    except (ValueError, AttributeError):
        pass
    return resp.text[:300] or resp.reason or ""


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else ""
