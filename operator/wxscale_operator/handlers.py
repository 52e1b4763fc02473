"""kopf handlers: each one turns a trigger into a reconcile request for one study.

Triggers:
  - a ScalingStudy is created, its spec changes, or the operator starts and
    finds it (resume): reconcile that study.
  - every `resync_seconds`, one operator-wide loop reconciles every known study.
    This catches what events miss (a result that appeared, a job that vanished,
    storage that was down).
  - a labelled PyTorchJob is added, changed or deleted: reconcile its study.
  - a ScalingStudy is deleted: forget it. Its jobs are deleted by the garbage
    collector through their owner references.

The handlers return nothing, so kopf writes nothing to the status; the
reconciler writes the whole status itself. kopf keeps its own bookkeeping in
annotations prefixed `wxscale.io/`. No handler needs a finalizer (kopf's
per-object timers would add one), so a study can be deleted while the
operator is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Callable

import kopf

from wxscale.crd import GROUP, PLURAL, VERSION
from wxscale_operator.config import OperatorConfig
from wxscale_operator.kube import KubeClient
from wxscale_operator.naming import STUDY_LABEL
from wxscale_operator.reconcile import Reconciler

logger = logging.getLogger(__name__)

def register(registry: kopf.OperatorRegistry, config: OperatorConfig,
             fit: Callable[[list[dict[str, Any]]], dict[str, Any] | None] | None = None) -> Reconciler:
    """Register every handler in `registry`; return the reconciler they share (`fit` as in Reconciler)."""
    settings_holder: dict[str, kopf.OperatorSettings] = {}

    def login_now() -> kopf.ConnectionInfo | None:
        settings = settings_holder.get("settings") or kopf.OperatorSettings()
        return kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)

    reconciler = Reconciler(KubeClient(login_now), config, fit=fit)
    background: dict[str, asyncio.Task] = {}

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        """Keep kopf's state in annotations, post no log lines as events, start the resync loop."""
        settings_holder["settings"] = settings
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=GROUP, key="last-handled-configuration")
        settings.posting.loggers = False
        # Namespaces are given by name (or all are watched), so kopf needs no namespace scanning.
        settings.scanning.disabled = True
        # Reconnect watches every few minutes: a silently dropped connection cannot stall the operator.
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        background["resync"] = asyncio.create_task(reconciler.resync_forever(), name="wxscale resync")

    @kopf.on.login(registry=registry)
    def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo | None:
        """Use the in-cluster service account, else KUBECONFIG; the reconciler's client does the same."""
        settings_holder["settings"] = settings
        return login_now()

    @kopf.on.cleanup(registry=registry)
    async def stop(**_: Any) -> None:
        """Stop the resync loop, close the API client and stop the storage threads."""
        task = background.pop("resync", None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await reconciler.close()

    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.update(GROUP, VERSION, PLURAL, field="spec", registry=registry)
    async def study_changed(namespace: str, name: str, reason: str, **_: Any) -> None:
        """Reconcile a study that was created, edited or found at start-up."""
        await reconciler.request(namespace, name, f"study {reason}")

    @kopf.on.event("kubeflow.org", "v1", "pytorchjobs", labels={STUDY_LABEL: kopf.PRESENT}, registry=registry)
    async def job_changed(type: str, namespace: str, labels: kopf.Labels, name: str, **_: Any) -> None:
        """Reconcile the study of a PyTorchJob that was added, changed or deleted."""
        if type is None:
            return  # the initial listing; the studies' resume handlers cover it
        await reconciler.request(namespace, labels[STUDY_LABEL], f"job {name} {type.lower()}")

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def study_event(type: str, namespace: str, name: str, uid: str, **_: Any) -> None:
        """Add a study to the resync loop, or forget a deleted one."""
        if type == "DELETED":
            logger.info("study %s/%s deleted; its jobs are garbage-collected by owner reference", namespace, name)
            reconciler.forget(namespace, name, uid)
        else:
            reconciler.track(namespace, name)

    @kopf.on.probe(id="studies", registry=registry)
    def tracked_studies(**_: Any) -> int:
        """Report the number of known studies on the liveness endpoint."""
        return reconciler.tracked

    return reconciler
