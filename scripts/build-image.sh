#!/usr/bin/env bash
# Build the wxscale container image with podman, without a container registry.
#
#   scripts/build-image.sh            # builds localhost/wxscale:dev
#
# Step 1 builds a Debian bookworm base image with debootstrap (python3, venv,
# pip, CA certificates) and imports it as localhost/wxscale-base:bookworm. It is
# skipped when that image exists. Step 2 builds the Dockerfile on that base.
# The script is idempotent, and podman's layer cache makes a second run quick.
# Layers of earlier builds stay in podman's store; `podman image prune` removes them.
#
# Environment (all optional):
#   WXSCALE_IMAGE       tag of the built image (default localhost/wxscale:dev)
#   WXSCALE_BASE_IMAGE  base image tag (default localhost/wxscale-base:bookworm)
#   DEBIAN_MIRROR       debootstrap mirror (default http://deb.debian.org/debian)
#   WHEELS_DIR          local wheel folder mounted into RUN steps as /wheels, so
#                       torch==2.13.0 resolves to a local CPU wheel (default /opt/wheels)
#   CA_BUNDLE           host CA bundle mounted (not copied) into RUN steps, for
#                       hosts behind a TLS-intercepting proxy
#                       (default /etc/ssl/certs/ca-certificates.crt)
# Needs root for debootstrap and podman.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

image=${WXSCALE_IMAGE:-localhost/wxscale:dev}
base_image=${WXSCALE_BASE_IMAGE:-localhost/wxscale-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
wheels=${WHEELS_DIR:-/opt/wheels}
ca_bundle=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

# The runc runtime and explicit ulimits, explained in that file.
export CONTAINERS_CONF=${CONTAINERS_CONF:-$repo/scripts/containers.conf}

for program in podman debootstrap; do
    if ! command -v "$program" >/dev/null; then
        echo "build-image.sh: $program not found; install it (scripts/system-tools.sh does, as root)" >&2
        exit 1
    fi
done

# Step 1: the base image -----------------------------------------------------
if podman image exists "$base_image"; then
    echo "base image $base_image exists; skipping debootstrap"
else
    if [[ $(id -u) -ne 0 ]]; then
        echo "build-image.sh: debootstrap needs root to build $base_image" >&2
        exit 1
    fi
    echo "building base image $base_image with debootstrap from $mirror"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
        tail -n 30 "$work/debootstrap.log" >&2
        echo "build-image.sh: debootstrap failed (the last 30 lines of its log are above)" >&2
        exit 1
    }
    # The package cache and lists are only needed to install more packages.
    rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
    tar -C "$work/rootfs" --numeric-owner -cf "$work/base.tar" .
    podman import --change 'CMD ["/bin/bash"]' "$work/base.tar" "$base_image" >/dev/null
fi

# Step 2: the wxscale image --------------------------------------------------
build_args=(--build-arg "BASE_IMAGE=$base_image")
volumes=()
if [[ -d $wheels ]]; then
    volumes+=(-v "$wheels:/wheels:ro")
    build_args+=(--build-arg PIP_FIND_LINKS=/wheels)
fi
if [[ -f $ca_bundle ]]; then
    # Mounted over the image's own bundle for RUN steps only, so the image keeps Debian's bundle.
    volumes+=(-v "$ca_bundle:/etc/ssl/certs/ca-certificates.crt:ro")
    build_args+=(--build-arg PIP_CERT=/etc/ssl/certs/ca-certificates.crt)
fi

echo "building $image from $base_image"
podman build --runtime runc --network=host --layers \
    "${build_args[@]}" "${volumes[@]}" \
    --tag "$image" --file Dockerfile .

size=$(podman image inspect --format '{{.Size}}' "$image")
echo "built $image: $((size / 1000000)) MB"
