"""Threaded httpx client of the engines' SGLang control endpoints, with timeouts and bounded retries.

The learner is synchronous, so concurrency comes from a thread pool: `submit` starts a call and returns a
Future, `for_all` runs one call per engine concurrently and collects results or errors per URL. Only
idempotent calls (pause, flush, version, continue, health, info, destroy) retry on connection errors; the
collective-coupled ones (init group, distributed update) never retry: a second request would wait for a
broadcast that never comes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

import httpx

from common.retry import RetryPolicy

logger = logging.getLogger(__name__)
T = TypeVar("T")

LIVENESS_PATHS = ("/model_info", "/get_model_info")
"""Where a caller asks whether an engine is alive, the first path that exists (404: the next one): /model_info,
and /get_model_info on SGLang builds older than 0.5.23 and on sglang-router, which lack it. SGLang answers it from
its HTTP process without the scheduler, so a paused engine answers at once (0.5.23 http_server.py `model_info`).
Not /health: SGLang runs a one-token generation there unless SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0, which a
paused engine answers 503 after 20 s, so every probe during a weight push would call a live engine dead. Not
/get_server_info: it waits for the scheduler, busy for a whole weight update. (SGLang answers /health, not these,
without its --api-key: an engine started with one needs the key on /generate too, which workers do not send.)"""


class EngineCallError(RuntimeError):
    """An engine control call failed: connection error, timeout, or a non-success answer (the message says which)."""


class EngineUnreachable(EngineCallError):
    """The connection failed (refused, reset): the only failure an idempotent call retries. Timeouts are not
    retried, so a call never waits longer than its timeout times its attempts."""


class EngineClient:
    def __init__(
        self,
        http_timeout_s: float,
        retry: RetryPolicy | None = None,
        token_env: str = "LONGTRACE_ENGINE_API_KEY",
        max_workers: int = 32,
    ) -> None:
        """`retry`: how idempotent calls retry a refused connection (default: 3 tries, 0.2 s first backoff, 2 s cap,
        a deadline of 3 x `http_timeout_s`)."""
        token = os.environ.get(token_env, "") if token_env else ""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # trust_env=False: engines are internal addresses, never route them through a proxy from the env.
        self._http = httpx.Client(timeout=http_timeout_s, headers=headers, trust_env=False)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="weight-sync-http")
        self.http_timeout_s = http_timeout_s
        self._retry = retry or RetryPolicy(max_attempts=3, base_s=0.2, max_backoff_s=2.0, deadline_s=3 * http_timeout_s)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    # ------------------------------------------------------------------ raw calls

    def request(
        self, method: str, url: str, body: dict[str, Any] | None = None, timeout_s: float | None = None
    ) -> httpx.Response:
        """One request; transport errors and timeouts become EngineCallError naming the URL."""
        try:
            return self._http.request(method, url, json=body, timeout=timeout_s or self.http_timeout_s)
        except httpx.TimeoutException as e:
            raise EngineCallError(f"{method} {url}: no answer within {timeout_s or self.http_timeout_s:g}s") from e
        except httpx.TransportError as e:
            raise EngineUnreachable(f"{method} {url}: {type(e).__name__}: {e}") from e

    def request_idempotent(self, method: str, url: str, body: dict[str, Any] | None = None) -> httpx.Response:
        """`request`, retried (bounded, with backoff) when the connection fails; any answer is returned as it is."""
        return self._retry.call(lambda: self.request(method, url, body), retry_on=(EngineUnreachable,),
                                what=f"{method} {url}")  # fmt: skip

    def call(self, url: str, path: str, body: dict[str, Any] | None = None, timeout_s: float | None = None) -> Any:
        """POST a control call and return its JSON; raise EngineCallError unless it answered 200 with success."""
        r = self.request("POST", url + path, body, timeout_s)
        return _checked(r, url + path)

    def call_idempotent(
        self, url: str, path: str, body: dict[str, Any] | None = None, timeout_s: float | None = None
    ) -> Any:
        """`call`, retried (bounded, with backoff) when the connection fails; a refusal is not retried."""
        return self._retry.call(
            lambda: self.call(url, path, body, timeout_s), retry_on=(EngineUnreachable,), what=f"POST {url}{path}"
        )

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        return self._pool.submit(fn, *args)

    def for_all(
        self, urls: Iterable[str], fn: Callable[[str], T], timeout_s: float
    ) -> tuple[dict[str, T], dict[str, str]]:
        """Run `fn(url)` for every URL concurrently; return (results, errors) by URL. Never waits past `timeout_s`."""
        futures = {url: self._pool.submit(fn, url) for url in urls}
        return wait_all(futures, timeout_s)

    # ------------------------------------------------------------------ SGLang control endpoints

    def healthy(self, url: str) -> bool:
        """Whether the engine at `url` is alive, paused or not: its liveness path (LIVENESS_PATHS) answers 200
        within min(http_timeout_s, 10 s). No retry: a refused connection means a dead engine."""
        try:
            for path in LIVENESS_PATHS:
                status = self.request("GET", url + path, timeout_s=min(self.http_timeout_s, 10.0)).status_code
                if status != 404:
                    return status == 200
        except EngineCallError:
            pass
        return False

    def server_info(self, url: str) -> dict[str, Any]:
        r = self.request_idempotent("GET", url + "/get_server_info")
        if r.status_code != 200:
            raise EngineCallError(f"GET {url}/get_server_info answered {r.status_code}: {r.text[:300]}")
        info: dict[str, Any] = r.json()
        return info

    def weight_version(self, url: str) -> str:
        """The engine's weight version, from /model_info (SGLang 0.5.23 has no /get_weight_version and deprecates
        /get_model_info, asked only of an older build that has no /model_info)."""
        path = "/model_info"
        r = self.request_idempotent("GET", url + path)
        if r.status_code == 404:
            path = "/get_model_info"
            r = self.request_idempotent("GET", url + path)
        if r.status_code != 200:
            raise EngineCallError(f"GET {url}{path} answered {r.status_code}")
        try:
            return str(r.json()["weight_version"])
        except (ValueError, KeyError, TypeError) as e:
            raise EngineCallError(f"GET {url}{path}: no weight_version in {r.text[:200]!r}") from e

    def pause(self, url: str, mode: str, timeout_s: float) -> None:
        self.call_idempotent(url, "/pause_generation", {"mode": mode}, timeout_s)

    def resume(self, url: str) -> None:
        self.call_idempotent(url, "/continue_generation", {"torch_empty_cache": False})

    def set_version(self, url: str, version: str) -> None:
        # abort_all_requests defaults to True in SGLang: that would kill every in-flight group.
        self.call_idempotent(url, "/update_weight_version", {"new_version": version, "abort_all_requests": False})

    def flush_cache(self, url: str, deadline_s: float, interval_s: float) -> None:
        """`/flush_cache` answers 400 while requests are running or waiting: retry until it answers 200 or time is up."""
        deadline = time.monotonic() + deadline_s
        while True:
            r = self.request_idempotent("POST", url + "/flush_cache")
            if r.status_code == 200:
                return
            if r.status_code != 400 or time.monotonic() + interval_s > deadline:
                raise EngineCallError(
                    f"POST {url}/flush_cache answered {r.status_code} for {deadline_s:g}s: {r.text[:300]}"
                )
            time.sleep(interval_s)

    def begin_update(self, url: str) -> None:
        """Open SGLang's weight-update session (0.5.23 refuses distributed updates outside one). A session left
        open by a push that died is closed and opened again; an engine without the route (older SGLang) needs
        none."""
        r = self.request_idempotent("POST", url + "/begin_weight_update", {"selector": "all"})
        if r.status_code == 400 and "already open" in r.text:
            logger.warning("%s: a weight-update session was left open (a push died): closing it", url)
            self.end_update(url)
            r = self.request_idempotent("POST", url + "/begin_weight_update", {"selector": "all"})
        if r.status_code != 404:
            _checked(r, url + "/begin_weight_update")

    def end_update(self, url: str) -> None:
        """Close the weight-update session; none open (or no such route) is fine."""
        r = self.request_idempotent("POST", url + "/end_weight_update", {})
        if r.status_code == 404 or (r.status_code == 400 and "no weight-update session is open" in r.text):
            return
        _checked(r, url + "/end_weight_update")

    def destroy_group(self, url: str, group_name: str) -> None:
        self.call_idempotent(url, "/destroy_weights_update_group", {"group_name": group_name})


def _checked(r: httpx.Response, where: str) -> Any:
    try:
        data = r.json()
    except ValueError:
        data = {"message": r.text}
    if r.status_code != 200 or (isinstance(data, dict) and data.get("success") is False):
        message = data.get("message", data) if isinstance(data, dict) else data
        raise EngineCallError(f"{where} answered {r.status_code}: {str(message)[:500]}")
    return data


def wait_all(futures: dict[str, Future[T]], timeout_s: float) -> tuple[dict[str, T], dict[str, str]]:
    """Collect each future's result or error message by key, waiting at most `timeout_s` in total."""
    deadline = time.monotonic() + timeout_s
    results: dict[str, T] = {}
    errors: dict[str, str] = {}
    for key, fut in futures.items():
        try:
            results[key] = fut.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            errors[key] = f"no answer within {timeout_s:g}s"
        except EngineCallError as e:
            errors[key] = str(e)
    return results, errors
