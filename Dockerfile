# wxscale: one image for the Kubernetes operator (default command) and the
# trainer that PyTorchJob pods run (`python -m wxscale_trainer --trial URL --output URL`).
#
# Cluster build, on the official Python image (pulls the CUDA build of torch from PyPI):
#   podman build -t wxscale:0.1.0 .
# Build without a registry, on a debootstrap base and a local CPU torch wheel:
#   scripts/build-image.sh
#
# BASE_IMAGE must provide python3 with the venv module; both stages use it, so
# the virtualenv copied into the runtime stage finds the same interpreter.
ARG BASE_IMAGE=docker.io/library/python:3.11.11-slim-bookworm


FROM ${BASE_IMAGE} AS deps

# Set these to use a local wheel folder (mounted for the build) and a CA bundle
# for a TLS-intercepting proxy. Left unset, pip uses PyPI and its own bundle.
ARG PIP_FIND_LINKS
ARG PIP_CERT
ARG TORCH_VERSION=2.13.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python3 -m venv /opt/venv

# torch first with an exact pin: a looser requirement lets pip choose another build.
RUN /opt/venv/bin/pip install "torch==${TORCH_VERSION}"

# The dependencies, read from pyproject.toml and pinned by requirements.lock.
# They change rarely, so this stage stays cached while the sources change.
COPY pyproject.toml requirements.lock /src/
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && /opt/venv/bin/pip install -c /src/requirements.lock -r /tmp/requirements.txt


FROM deps AS wheel

ARG PIP_FIND_LINKS
ARG PIP_CERT

# The wxscale, wxscale_trainer and wxscale_operator packages as one wheel.
COPY . /src/
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /dist /src


FROM ${BASE_IMAGE}

# A fixed, non-root uid, so Kubernetes can check runAsNonRoot without a user name.
RUN groupadd --gid 10001 wxscale \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin wxscale

# The large dependency layer first, so it stays cached across source changes;
# then the project's wheel, installed without network access. The wheel is
# copied rather than bind-mounted because buildah 1.28 reuses a cached RUN
# step even when a mounted stage has changed.
COPY --from=deps /opt/venv /opt/venv
COPY --from=wheel /dist /opt/dist
RUN /opt/venv/bin/pip install --no-deps --no-index --no-cache-dir --disable-pip-version-check /opt/dist/*.whl \
    && rm -rf /opt/dist \
    && /opt/venv/bin/wxscale-train --help >/dev/null

# The root filesystem may be read-only in the cluster: caches go to /tmp, which
# the Helm chart mounts as an emptyDir, and Python writes no bytecode at run time.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 10001:10001
WORKDIR /tmp

# 8080: the operator's liveness probe (/healthz). 9090: its Prometheus metrics.
EXPOSE 8080 9090

CMD ["wxscale-operator"]
