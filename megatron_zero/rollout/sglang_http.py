"""A small JSON-over-HTTP client for one SGLang server, with finite timeouts and bounded retries.

Why apart from the engine: the engine maps our contract onto SGLang endpoints; this module only moves
bytes, so its failure modes (server down, 503 while starting, 400 with an error body, a timeout) are in
one place and every error names the server URL and the endpoint.

How: ``SGLangHTTPClient("http://127.0.0.1:30000", max_retries=3, retry_backoff_s=2.0).post("/generate",
payload, timeout_s=60)``. Uses ``requests`` (installed with ray).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import requests

logger = logging.getLogger(__name__)

# 503: SGLang answers it while starting up, shutting down, or when /health_generate finds the scheduler
# stuck; worth a bounded retry. Everything else (400: bad request or failed operation, 500) is final.
_RETRY_STATUS = (503,)


class SGLangHTTPError(RuntimeError):
    """An SGLang endpoint failed; the message names the server URL, the endpoint and SGLang's own message."""

    def __init__(self, url: str, endpoint: str, message: str, status: Optional[int] = None):
        self.url = url
        self.endpoint = endpoint
        self.status = status
        where = f"SGLang server {url} {endpoint}"
        super().__init__(f"{where} failed (HTTP {status}): {message}" if status else f"{where} failed: {message}")


def _error_message(response: requests.Response) -> str:
    """SGLang's error text: {"error": {"message": ...}} (_create_error_response), {"message": ...}
    (ErrorResponse, {"success": false, "message": ...}) or a plain-text body (/flush_cache)."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason
    if isinstance(body, dict):
        if isinstance(body.get("error"), dict) and "message" in body["error"]:
            return str(body["error"]["message"])
        if "message" in body:
            return str(body["message"])
    return str(body)


class SGLangHTTPClient:
    """Posts JSON to one SGLang server; see the module docstring."""

    def __init__(self, url: str, *, max_retries: int, retry_backoff_s: float):
        self.url = url.rstrip("/")
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self._session = requests.Session()

    def request(self, method: str, endpoint: str, *, timeout_s: float, payload: Optional[dict] = None,
                retry: bool = True) -> requests.Response:
        """One call, retried on connection failures and 503 (up to ``max_retries`` times when ``retry``).

        A timeout is not retried: the server may still be doing the work, and a second long wait would
        only hide the problem.
        """
        attempts = 1 + (self.max_retries if retry else 0)
        for attempt in range(1, attempts + 1):
            last_try = attempt == attempts
            try:
                response = self._session.request(method, self.url + endpoint, json=payload, timeout=timeout_s)
            except requests.Timeout as e:
                raise SGLangHTTPError(self.url, endpoint, f"no answer within {timeout_s} s ({e})") from e
            except requests.ConnectionError as e:
                if last_try:
                    raise SGLangHTTPError(self.url, endpoint, f"cannot connect after {attempts} attempt(s): {e}") from e
                logger.warning("SGLang server %s%s: connection failed (attempt %d/%d): %s",
                               self.url, endpoint, attempt, attempts, e)
            else:
                if response.ok:
                    return response
                if response.status_code not in _RETRY_STATUS or last_try:
                    raise SGLangHTTPError(self.url, endpoint, _error_message(response), response.status_code)
                logger.warning("SGLang server %s%s: HTTP %d (attempt %d/%d)",
                               self.url, endpoint, response.status_code, attempt, attempts)
            time.sleep(self.retry_backoff_s * attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def post(self, endpoint: str, payload: dict, *, timeout_s: float, retry: bool = True) -> Any:
        """POST JSON; the decoded JSON answer, or None for an empty or non-JSON body (e.g. /flush_cache)."""
        response = self.request("POST", endpoint, timeout_s=timeout_s, payload=payload, retry=retry)
        try:
            return response.json()
        except ValueError:
            return None

    def close(self) -> None:
        self._session.close()
