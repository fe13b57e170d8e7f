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
        try:
            return self.request("GET", url + "/health", timeout_s=min(self.http_timeout_s, 10.0)).status_code == 200
        except EngineCallError:
            return False

    def server_info(self, url: str) -> dict[str, Any]:
        r = self._retry.call(lambda: self.request("GET", url + "/get_server_info"), (EngineUnreachable,), f"GET {url}")
        if r.status_code != 200:
            raise EngineCallError(f"GET {url}/get_server_info answered {r.status_code}: {r.text[:300]}")
        info: dict[str, Any] = r.json()
        return info

    def weight_version(self, url: str) -> str:
        """The engine's weight version, from /get_model_info (SGLang 0.5.23 has no /get_weight_version)."""
        r = self._retry.call(lambda: self.request("GET", url + "/get_model_info"), (EngineUnreachable,), f"GET {url}")
        if r.status_code != 200:
            raise EngineCallError(f"GET {url}/get_model_info answered {r.status_code}")
        return str(r.json()["weight_version"])

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
            r = self._retry.call(
                lambda: self.request("POST", url + "/flush_cache"), (EngineUnreachable,), f"flush {url}"
            )
            if r.status_code == 200:
                return
            if r.status_code != 400 or time.monotonic() + interval_s > deadline:
                raise EngineCallError(
                    f"POST {url}/flush_cache answered {r.status_code} for {deadline_s:g}s: {r.text[:300]}"
                )
            time.sleep(interval_s)

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
