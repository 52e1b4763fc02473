#!/usr/bin/env bash
# Install the Debian packages some tests use: prometheus (and promtool), the pushgateway,
# podman and buildah for the image test. Needs root; without root it only reports what
# is missing, and the tests that need those programs skip with the reason.
set -uo pipefail
packages=(prometheus prometheus-pushgateway podman buildah runc debootstrap fuse-overlayfs uidmap
          slirp4netns netavark aardvark-dns containernetworking-plugins iptables unzip)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
if [[ $(id -u) -ne 0 ]]; then
    echo "not root: skipping apt-get install of ${missing[*]}; tests that need them will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
