"""Test helpers: a Kubernetes API emulator (kmock) on 127.0.0.1 and the operator in a thread.

kmock serves the Kubernetes REST API over real HTTP with watch streams, but it
is not an API server. `ApiEmulator` fills the gaps the operator depends on:
  - create returns 201 and assigns uid, resourceVersion, creationTimestamp and
    generation 1; `generateName` becomes a name (kopf's events use it);
  - a patch bumps resourceVersion, and generation when it touches `spec`
    (a real API server bumps it only if the spec really changed);
  - with a status subresource, a patch of the object ignores `status` and a
    patch of `/status` changes only `status`;
  - a generated name is never one that exists, as kube-apiserver 1.30+ retries it;
  - a request's cost does not grow with the requests served or objects stored
    before it (kmock's request log and linear object search are bypassed).
Still missing: label selectors (clients filter again), owner-reference
garbage collection (`collect_garbage` emulates it), CRD schema validation and
CEL rules, and any controller. PyTorchJobs never get pods, so tests write job
conditions as the training operator would.

`FakeCluster` runs the emulator in its own thread and event loop and offers
synchronous get/list/create/patch/delete over HTTP, like kubectl would;
`ClusterClient` is that client alone, for an emulator in another process.
`OperatorThread` runs `wxscale_operator.main.run_operator` in another thread.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import kmock
from kmock._internal import rendering

logger = logging.getLogger(__name__)

STUDIES = "wxscale.io/v1alpha1/scalingstudies"
JOBS = "kubeflow.org/v1/pytorchjobs"
EVENTS = "v1/events"
NAMESPACES = "v1/namespaces"


def _timestamp() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class ApiEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with the object metadata and status handling of a real API server."""

    _versions = itertools.count(1)

    async def _handle(self, request: rendering.Request):
        resource = request.resource
        data = request.data if isinstance(request.data, dict) else None
        if resource is not None and data is not None:
            info = self.resources[resource] if resource in self.resources else None
            with_status = info is not None and "status" in info.subresources
            metadata = data.setdefault("metadata", {})
            if request.action == kmock.action.CREATE:
                if not metadata.get("name") and metadata.get("generateName"):
                    metadata["name"] = self._generate_name(resource, request.namespace or metadata.get("namespace"),
                                                           metadata["generateName"])
                metadata.update(uid=str(uuid.uuid4()), creationTimestamp=_timestamp(), generation=1,
                                resourceVersion=str(next(self._versions)))
            elif request.action == kmock.action.UPDATE:
                if with_status and request.subresource == "status":
                    for key in list(data):
                        if key != "status":
                            data.pop(key)
                    data["metadata"] = {}
                elif with_status:
                    data.pop("status", None)
                if "spec" in data and request.subresource is None:
                    key = (resource, request.namespace, request.name)
                    if key in self.objects and not self.objects[key].deleted:
                        current = self.objects[key].get("metadata", {}).get("generation", 1)
                        data["metadata"]["generation"] = current + 1
                data["metadata"]["resourceVersion"] = str(next(self._versions))
        try:
            return await super()._handle(request)
        finally:
            self._forget(request)

    def _forget(self, request: rendering.Request) -> None:
        """Drop a served request from kmock's request log.

        kmock 0.8 keeps every request for assertions, and to route a request it
        checks each reaction with `request in reaction_source`, which walks the
        whole log and applies the reaction's filter to every logged request. A
        request then costs O(requests served so far). On a 2-core EPYC VM,
        PyTorchJobs created one after the other took 9 ms each for the first
        100 and 39 ms each for jobs 200 to 300, and 1 ms each with the log
        trimmed. No test asserts on the log, so a request leaves it once
        served (a watch when its stream ends).
        """
        # NOTE: `_requests` is a private attribute of kmock 0.8 (dsl.Root and dsl.Reaction). If an
        # upgrade renames it, this loop finds nothing to drop and request costs grow again.
        logs = [getattr(self, "_requests", [])]
        logs += [getattr(payload, "_requests", []) for payload in getattr(self, "_payloads", [])]
        for log in logs:
            for index in range(len(log) - 1, -1, -1):
                if log[index] is request:
                    del log[index]
                    break

    def _generate_name(self, resource: Any, namespace: str | None, prefix: str) -> str:
        """Return `prefix` plus 5 random characters, unused in the namespace.

        kube-apiserver 1.30 and later retry a generated name that is taken
        instead of returning 409. Events use generateName, and with 1,000
        names taken, one name in about 1,000 drawn from 5 hex digits is taken.
        """
        while True:
            name = prefix + uuid.uuid4().hex[:5]
            key = (resource, namespace, name)
            if key not in self.objects or self.objects[key].deleted:
                return name

    # kmock 0.8 finds the object of a get, create, patch or delete by comparing the request with every stored
    # object, about 0.4 ms per request at 1,000 stored objects on a 2-core EPYC VM. Its store is a dict keyed
    # by (resource, namespace, name), so these handlers look the object up by key instead.
    def _stored(self, request: rendering.Request, namespace: str | None, name: str | None) -> Any:
        key = (request.resource, namespace, name)
        return self.objects[key] if key in self.objects else None

    async def _serve_fetch(self, request: rendering.Request):
        stored = self._stored(request, request.namespace, request.name)
        if stored is None or stored.deleted:
            raise kmock.KubernetesObjectNotFoundError()
        return stored.raw

    async def _serve_create(self, request: rendering.Request):
        # A create names the object in its body; the URL gives only the namespace.
        metadata = request.data.get("metadata", {})
        stored = self._stored(request, request.namespace or metadata.get("namespace"), metadata.get("name"))
        return rendering.Response(status=201, payload=stored.raw)

    async def _serve_update(self, request: rendering.Request):
        return self._stored(request, request.namespace, request.name).last.raw

    async def _serve_delete(self, request: rendering.Request):
        return self._stored(request, request.namespace, request.name).last.raw


class ClusterClient:
    """A synchronous HTTP client of the emulator at `url`, with the verbs kubectl would offer."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def write_kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "kmock", "user": {"token": "test-token"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": "default"}}],
        }
        path.write_text(json.dumps(config))
        return path

    # HTTP client ----------------------------------------------------------------------

    @staticmethod
    def path(resource: str, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        group_version, plural = resource.rsplit("/", 1)
        prefix = f"/apis/{group_version}" if "/" in group_version else f"/api/{group_version}"
        path = f"{prefix}/namespaces/{namespace}/{plural}"
        if name:
            path += f"/{name}"
        if subresource:
            path += f"/{subresource}"
        return path

    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/json") -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": content_type})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"{}")

    def create(self, resource: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", self.path(resource, namespace), body)

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", self.path(resource, namespace, name))
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise

    def list(self, resource: str, namespace: str, labels: dict[str, str] | None = None) -> list[dict[str, Any]]:
        items = self.request("GET", self.path(resource, namespace)).get("items") or []
        labels = labels or {}
        return [item for item in items
                if all((item["metadata"].get("labels") or {}).get(k) == v for k, v in labels.items())]

    def patch(self, resource: str, namespace: str, name: str, patch: dict[str, Any],
              subresource: str | None = None) -> dict[str, Any]:
        return self.request("PATCH", self.path(resource, namespace, name, subresource), patch,
                            content_type="application/merge-patch+json")

    def delete(self, resource: str, namespace: str, name: str) -> None:
        self.request("DELETE", self.path(resource, namespace, name))

    def collect_garbage(self, namespace: str) -> list[str]:
        """Delete the PyTorchJobs whose owning study is gone, as the garbage collector would."""
        studies = {study["metadata"]["uid"] for study in self.list(STUDIES, namespace)}
        deleted = []
        for job in self.list(JOBS, namespace):
            owners = job["metadata"].get("ownerReferences") or []
            if owners and not any(owner["uid"] in studies for owner in owners):
                self.delete(JOBS, namespace, job["metadata"]["name"])
                deleted.append(job["metadata"]["name"])
        return deleted

    def set_job_condition(self, namespace: str, name: str, condition: str, message: str = "") -> None:
        """Write a job's status as the training operator does when the job reaches `condition`."""
        job = self.get(JOBS, namespace, name)
        conditions = [c for c in (job.get("status") or {}).get("conditions") or [] if c["type"] != condition]
        for old in conditions:
            if condition in ("Succeeded", "Failed", "Suspended") and old["type"] == "Running":
                old["status"] = "False"
        conditions.append({"type": condition, "status": "True", "reason": f"PyTorchJob{condition}",
                           "message": message or f"PyTorchJob {name} is {condition.lower()}.",
                           "lastUpdateTime": _timestamp(), "lastTransitionTime": _timestamp()})
        status: dict[str, Any] = {"conditions": conditions}
        if condition == "Running":
            status["startTime"] = _timestamp()
        if condition in ("Succeeded", "Failed"):
            status["completionTime"] = _timestamp()
        self.patch(JOBS, namespace, name, {"status": status}, subresource="status")


class FakeCluster(ClusterClient):
    """The emulator on 127.0.0.1 in a background thread, with a synchronous HTTP client.

    `emulator_class` is ApiEmulator or a subclass of it (the operator benchmark counts requests with one).
    """

    def __init__(self, namespaces: tuple[str, ...] = ("default",), emulator_class: type[ApiEmulator] | None = None):
        super().__init__("")
        self.namespaces = namespaces
        self.emulator_class = emulator_class or ApiEmulator
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)
        self._error: BaseException | None = None

    # Lifecycle --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as error:  # surfaced by start()
            self._error = error
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with self.emulator_class() as emulator, kmock.Server(emulator, host="127.0.0.1") as server:
            self._declare(emulator)
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def _declare(self, emulator: ApiEmulator) -> None:
        emulator.resources[STUDIES] = kmock.ResourceInfo(
            kind="ScalingStudy", singular="scalingstudy", namespaced=True, shortnames={"sst"},
            categories={"wxscale"}, subresources={"status"},
            verbs={"get", "list", "watch", "create", "patch", "update", "delete"})
        emulator.resources[JOBS] = kmock.ResourceInfo(
            kind="PyTorchJob", singular="pytorchjob", namespaced=True, subresources={"status"},
            verbs={"get", "list", "watch", "create", "patch", "update", "delete"})
        emulator.resources[EVENTS] = kmock.ResourceInfo(kind="Event", singular="event", namespaced=True,
                                                        verbs={"create", "get", "list"})
        emulator.resources[NAMESPACES] = kmock.ResourceInfo(kind="Namespace", singular="namespace",
                                                            namespaced=False, verbs={"get", "list", "watch"})
        for namespace in self.namespaces:
            emulator.objects[NAMESPACES, None, namespace] = {
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "uid": str(uuid.uuid4())}}

    def start(self) -> FakeCluster:
        self._thread.start()
        self._ready.wait(timeout=30)
        if self._error is not None or not self.url:
            raise RuntimeError(f"the API emulator did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

def wait_for(check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2, what: str = "condition") -> Any:
    """Poll `check` until it returns a truthy value; return it, or fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last value: {last!r}")


class OperatorThread:
    """The operator (`run_operator`) in a thread with its own event loop; `stop` ends it cleanly."""

    def __init__(self, config: Any, fit: Callable[[list[dict[str, Any]]], Any] | None = None):
        self.config = config
        self.fit = fit
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wxscale-operator", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        from wxscale_operator.main import run_operator

        try:
            asyncio.run(run_operator(self.config, stop_flag=self._stop, ready_flag=self._ready, fit=self.fit))
        except BaseException as error:  # reported by stop()
            self.error = error
            self._ready.set()

    def start(self) -> OperatorThread:
        self._thread.start()
        if not self._ready.wait(timeout=60) or self.error is not None:
            raise RuntimeError(f"the operator did not start: {self.error!r}")
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        if self._thread.is_alive():
            raise RuntimeError("the operator did not stop within 60 s")
        if self.error is not None:
            raise RuntimeError(f"the operator failed: {self.error!r}") from self.error
