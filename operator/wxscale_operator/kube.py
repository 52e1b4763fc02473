"""A small asynchronous Kubernetes API client for the operator's own requests.

kopf watches and patches through its own client; the reconciler also needs to
get, list, create, patch and delete objects outside kopf's handler bookkeeping.
This client covers those five verbs over aiohttp (already a kopf dependency),
with the credentials kopf's login helpers find (in-cluster service account,
else KUBECONFIG). Transient failures (429, 5xx, connection errors) are retried
a few times with exponential backoff; what is left raises ApiError.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import quote

import aiohttp
import kopf

logger = logging.getLogger(__name__)

TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})

# Delays before the 2nd, 3rd and 4th try of a request that failed transiently.
RETRY_DELAYS_S = (0.5, 1.0, 2.0)
REQUEST_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Resource:
    """A namespaced API resource: group, version, plural and kind."""

    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        prefix = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        path = f"{prefix}/namespaces/{quote(namespace)}/{self.plural}"
        if name:
            path += f"/{quote(name)}"
        if subresource:
            path += f"/{subresource}"
        return path


SCALINGSTUDIES = Resource("wxscale.io", "v1alpha1", "scalingstudies", "ScalingStudy")
PYTORCHJOBS = Resource("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob")
EVENTS = Resource("", "v1", "events", "Event")


class ApiError(Exception):
    """A failed API request: the HTTP status (0 for a connection error), reason and message."""

    def __init__(self, status: int, reason: str, message: str, method: str = "", path: str = ""):
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(f"{method} {path} failed: HTTP {status} {reason}: {message}".strip())

    @property
    def transient(self) -> bool:
        """True when the same request may succeed later (throttling, server or network errors)."""
        return self.status == 0 or self.status in TRANSIENT_STATUSES

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409


def label_selector(labels: dict[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def has_labels(body: dict[str, Any], labels: dict[str, str]) -> bool:
    own = (body.get("metadata") or {}).get("labels") or {}
    return all(own.get(key) == value for key, value in labels.items())


Login = Callable[[], "kopf.ConnectionInfo | None"]


class KubeClient:
    """Get, list, create, merge-patch and delete namespaced objects.

    `login` returns the connection info (server, CA, token or client
    certificate). It is called on first use and again after a 401, so a
    rotated service-account token is picked up.
    """

    def __init__(self, login: Login):
        self._login = login
        self._info: kopf.ConnectionInfo | None = None
        self._session: aiohttp.ClientSession | None = None

    async def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            info = self._login()
            if info is None:
                raise ApiError(401, "Unauthorized", "no Kubernetes credentials: no service account and no KUBECONFIG")
            self._info = info
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=info.as_ssl_context()),
                headers={**info.as_http_headers(), "User-Agent": "wxscale-operator"},
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
                trust_env=info.trust_env,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, *, body: Any = None, params: dict[str, str] | None = None,
                      content_type: str = "application/json") -> dict[str, Any]:
        """Send one request and return the decoded JSON response; raise ApiError on failure.

        Transient failures are retried after RETRY_DELAYS_S (or the server's Retry-After),
        and a 401 once with fresh credentials.
        """
        relogged = False
        attempt = 0
        while True:
            session = await self._open()
            url = self._info.server.rstrip("/") + path
            try:
                async with session.request(method, url, json=body, params=params,
                                           headers={"Content-Type": content_type}) as response:
                    if response.status < 400:
                        return await response.json(content_type=None) if response.content_length != 0 else {}
                    error = await _error_from(response, method, path)
                    retry_after = response.headers.get("Retry-After")
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as failure:
                error = ApiError(0, type(failure).__name__, str(failure) or "connection failed", method, path)
                retry_after = None

            if error.status == 401 and not relogged:
                logger.info("API request %s %s returned 401; logging in again", method, path)
                await self.close()
                relogged = True
                continue
            if not error.transient or attempt >= len(RETRY_DELAYS_S):
                raise error
            delay = RETRY_DELAYS_S[attempt]
            if retry_after and retry_after.isdigit():
                delay = max(delay, min(float(retry_after), 30.0))
            attempt += 1
            logger.warning("API request %s %s failed (%s); retry %d/%d in %.1f s", method, path, error.reason,
                           attempt, len(RETRY_DELAYS_S), delay)
            await asyncio.sleep(delay)

    # Verbs ---------------------------------------------------------------------

    async def get(self, resource: Resource, namespace: str, name: str) -> dict[str, Any]:
        return await self.request("GET", resource.path(namespace, name))

    async def list(self, resource: Resource, namespace: str, labels: dict[str, str] | None = None) -> list[dict]:
        """List objects; the label filter is sent as a selector and applied again here."""
        params = {"labelSelector": label_selector(labels)} if labels else None
        answer = await self.request("GET", resource.path(namespace), params=params)
        items = answer.get("items") or []
        return [item for item in items if not labels or has_labels(item, labels)]

    async def create(self, resource: Resource, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", resource.path(namespace), body=body)

    async def patch(self, resource: Resource, namespace: str, name: str, patch: dict[str, Any],
                    subresource: str | None = None) -> dict[str, Any]:
        """Apply a JSON merge patch (RFC 7386): null deletes a key, lists are replaced whole."""
        return await self.request("PATCH", resource.path(namespace, name, subresource), body=patch,
                                  content_type="application/merge-patch+json")

    async def delete(self, resource: Resource, namespace: str, name: str) -> bool:
        """Delete an object with background propagation; return False if it was already gone."""
        options = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        try:
            await self.request("DELETE", resource.path(namespace, name), body=options)
        except ApiError as error:
            if error.not_found:
                return False
            raise
        return True


async def _error_from(response: aiohttp.ClientResponse, method: str, path: str) -> ApiError:
    """Build an ApiError from a Kubernetes `Status` response (or any other error body)."""
    try:
        payload = await response.json(content_type=None)
    except (ValueError, aiohttp.ContentTypeError):
        payload = None
    if isinstance(payload, dict):
        reason = str(payload.get("reason") or response.reason or "")
        message = str(payload.get("message") or "")
    else:
        reason, message = str(response.reason or ""), (await response.text())[:200]
    return ApiError(response.status, reason, message, method, path)
