"""The OpenAI-compatible HTTP provider: OpenRouter, OpenAI, Ollama (`/v1`), vLLM, any compatible server.
It speaks chat completions, embeddings and the Responses API (`gateway.providers.Api`).

It uses one pooled `aiohttp.ClientSession` shared by every model (owned by the app's lifespan).
aiohttp rather than httpx because the client is on the hot path: measured on this 2-core machine,
httpx spent 1.16 ms of CPU per request at concurrency 32 and aiohttp 0.07 ms (README, Performance).
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from gateway.catalogue import ModelSpec
from gateway.providers import CHAT, Api, ProviderError


def error_message(body: Any, fallback: str) -> tuple[str, dict[str, Any] | None]:
    """The message of an OpenAI-shaped (or nearly) error body."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"]), err
        if isinstance(err, str):
            return err, None
        if body.get("message"):
            return str(body["message"]), None
    return fallback, None


_START = {"ollama": "start it (`ollama serve`) or set OLLAMA_BASE_URL", "vllm": "start the vLLM server"}


def refused(spec: ModelSpec) -> str:
    """What a client and /health are told about a local upstream that refuses connections."""
    fix = _START.get(spec.provider, "start it or correct its base_url")
    return f"nothing answers at {spec.base_url} (connection refused): {fix}"


def _retry_after(headers: Any) -> float | None:
    value = headers.get("retry-after") if headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class HTTPProvider:
    def __init__(
        self,
        spec: ModelSpec,
        session: aiohttp.ClientSession,
        *,
        api_key: str | None = None,
        app_name: str = "",
        referer: str = "",
    ) -> None:
        assert spec.base_url is not None
        self.spec = spec
        self.session = session
        self.base_url = spec.base_url.rstrip("/")
        headers = {"content-type": "application/json", "accept": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        if spec.provider == "openrouter":
            headers["http-referer"] = referer
            headers["x-title"] = app_name
        headers.update({k.lower(): v for k, v in spec.extra_headers.items()})
        self.headers = headers
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=spec.connect_timeout_s, sock_read=spec.read_timeout_s
        )

    async def aclose(self) -> None:
        """The shared session is closed by its owner, the app's lifespan."""

    def _map(self, exc: BaseException, url: str) -> ProviderError:
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return ProviderError("connect", f"connect timeout to {url}", retryable=True)
        if isinstance(exc, aiohttp.ClientConnectorError):
            if self.spec.is_local and getattr(exc.os_error, "errno", None) == errno.ECONNREFUSED:
                # Nothing listens there: a local server that is not running. No retry starts it.
                return ProviderError("refused", refused(self.spec))
            return ProviderError("connect", f"cannot connect to {url} ({exc.os_error})", retryable=True)
        if isinstance(exc, TimeoutError):
            return ProviderError("timeout", f"no answer within {self.spec.read_timeout_s:g} s")
        return ProviderError("protocol", f"{type(exc).__name__}: {exc}", retryable=True)

    async def _status_error(self, resp: aiohttp.ClientResponse) -> ProviderError:
        raw = await resp.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        text = raw[:300].decode("utf-8", "replace") if raw else resp.reason or ""
        message, err = error_message(body, text)
        status = resp.status
        return ProviderError(
            "status",
            f"HTTP {status}: {message}",
            status=status,
            retryable=status in (408, 409, 429) or status >= 500,
            retry_after_s=_retry_after(resp.headers),
            body=err,
        )

    async def chat(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await self.send(CHAT, payload)

    def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self.send_stream(CHAT, payload)

    async def send(self, api: Api, payload: dict[str, Any]) -> dict[str, Any]:
        url = self.base_url + api.path
        try:
            async with self.session.post(
                url,
                data=orjson.dumps(payload),
                headers=self.headers,
                timeout=self.timeout,
                allow_redirects=False,  # the API key must not follow a redirect elsewhere
            ) as resp:
                if resp.status != 200:
                    raise await self._status_error(resp)
                raw = await resp.read()
        except ProviderError:
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._map(exc, url) from exc
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ProviderError("protocol", "the response is not JSON", retryable=True) from exc
        if not isinstance(data, dict):
            raise ProviderError("protocol", "the response is not a JSON object", retryable=True)
        if api.failed(data):
            # OpenRouter can answer 200 with an error body.
            message, err = error_message(data, "unknown error")
            code = err.get("code") if err else None
            status = code if isinstance(code, int) else 502
            raise ProviderError("status", message, status=status, retryable=status >= 500, body=err)
        return data

    async def send_stream(self, api: Api, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Yields each SSE `data:` payload as a dict; returns at `[DONE]`, or at the end of the body
        after a terminal event of `api` (the Responses API ends with `response.completed`).

        A stream that ends without either, or carries an error event, raises ProviderError
        (kind "stream" once something was yielded). Closing the generator closes the connection,
        so a client that goes away cancels the upstream request.
        """
        url = self.base_url + api.path
        try:
            resp = await self.session.post(
                url,
                data=orjson.dumps(payload),
                headers=self.headers,
                timeout=self.timeout,
                allow_redirects=False,  # the API key must not follow a redirect elsewhere
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._map(exc, url) from exc
        started = complete = False
        try:
            if resp.status != 200:
                raise await self._status_error(resp)
            data_lines: list[bytes] = []
            async for raw_line in resp.content:
                line = raw_line.rstrip(b"\r\n")
                if line:
                    if line.startswith(b"data:"):
                        data_lines.append(line[5:].lstrip(b" "))
                    continue  # comments (": keep-alive"), event:, id:, retry: lines
                if not data_lines:
                    continue
                data = b"\n".join(data_lines)
                data_lines = []
                if data == b"[DONE]":
                    return
                try:
                    event = orjson.loads(data)
                except orjson.JSONDecodeError as exc:
                    raise ProviderError(
                        "stream" if started else "protocol", "malformed stream event"
                    ) from exc
                if not isinstance(event, dict):
                    raise ProviderError(
                        "stream" if started else "protocol", "a stream event is not a JSON object"
                    )
                if api.failed(event):
                    message, err = error_message(event, "stream error")
                    raise ProviderError(
                        "stream" if started else "status",
                        message,
                        status=502,
                        retryable=not started,
                        body=err,
                    )
                started = True
                complete = event.get("type") in api.terminal
                yield event
            if complete:
                return
            raise ProviderError(
                "stream" if started else "protocol",
                "the stream ended before [DONE]",
                retryable=not started,
            )
        except ProviderError:
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            mapped = self._map(exc, url)
            if started:
                mapped = ProviderError("stream", f"stream interrupted: {mapped.message}")
            raise mapped from exc
        except Exception as exc:  # e.g. a line over the reader's limit: still the upstream's fault
            raise ProviderError(
                "stream" if started else "protocol", f"{type(exc).__name__}: {exc}", retryable=not started
            ) from exc
        finally:
            # Not reading to the end closes the connection instead of returning it to the pool.
            if resp.content.at_eof():
                resp.release()
            else:
                resp.close()
