"""Names and labels of the objects the operator creates.

A trial's PyTorchJob is named from the study and the trial id, so creating it
again gives the same name and the API server returns 409 Conflict instead of making a
duplicate. Labels link each job to its study, trial and attempt; the owner
reference (see `wxscale_operator.jobs`) links it to the study's uid.
"""

from __future__ import annotations

import hashlib
import re

GROUP = "wxscale.io"
STUDY_LABEL = f"{GROUP}/study"
TRIAL_LABEL = f"{GROUP}/trial"
ATTEMPT_LABEL = f"{GROUP}/attempt"
MANAGED_BY = "wxscale-operator"

# The training operator names each replica's pod and Service `<job>-<type>-<index>`,
# e.g. `<job>-worker-4095`, and a Service name is a DNS-1035 label of at most 63
# characters. 63 - len("-worker-") - 4 digits (up to 9999 replicas) = 51.
MAX_JOB_NAME = 51

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def is_dns_label(name: str, max_length: int = 63) -> bool:
    """True for a DNS-1035 label (RFC 1035): lower-case letters, digits and '-', starting with a letter."""
    return len(name) <= max_length and bool(_DNS_LABEL.match(name))


def job_name(study: str, trial_id: str, attempt: int = 0) -> str:
    """Return the PyTorchJob name of one attempt of a trial: `<study>-<hash>[-r<attempt>]`.

    The trial id is `t-` plus 10 hex digits. A study name too long for the limit
    is cut and followed by 5 hex digits of its SHA-256, so two long study names
    with the same start still give different job names. A name that would start
    with a digit gets the prefix `s`.
    """
    suffix = trial_id.removeprefix("t-") + (f"-r{attempt}" if attempt else "")
    prefix = study if study[:1].isalpha() else f"s{study}"
    room = MAX_JOB_NAME - len(suffix) - 1
    if len(prefix) > room:
        digest = hashlib.sha256(study.encode()).hexdigest()[:5]
        prefix = prefix[: room - len(digest) - 1].rstrip("-") + "-" + digest
    return f"{prefix}-{suffix}"


def job_labels(study: str, trial_id: str, attempt: int) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "wxscale",
        "app.kubernetes.io/component": "trial",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        STUDY_LABEL: study,
        TRIAL_LABEL: trial_id,
        ATTEMPT_LABEL: str(attempt),
    }
