#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what it needs, lints, then runs
# every test (unit tests without root; namespace tests as root, in namespaces they create),
# then the end-to-end suite under podman.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n== %s\n' "$*" >&2; }

step "dependencies"
scripts/install-deps.sh
step "format";  cargo fmt --check
step "clippy";  cargo clippy --locked --all-targets -- -D warnings
step "lint Dockerfile"; hadolint Dockerfile
step "validate Kubernetes manifests"
kubernetes-validate --strict -k 1.30.0 scripts/k8s/*.yaml
step "shell scripts"; bash -n scripts/*.sh .ci/run
step "tests"
cargo test --locked 2>&1 | tee target/test.log
# The image, the pod manifest and the CNI plugin under a real runtime (podman), with the debug
# binary cargo test has just built; about a minute, a minute more on a machine without the
# cached debootstrap tree.
step "end to end under podman"
scripts/e2e-podman.sh
