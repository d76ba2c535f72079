#!/usr/bin/env bash
# End to end under a real container runtime: podman builds shunt's image from the Dockerfile,
# runs scripts/k8s/pod.yaml with `podman kube play` (the initContainer path), and calls shunt
# as a CNI plugin for real pods after `shunt cni install` ran from the image the way
# scripts/k8s/cni-daemonset.yaml runs it (the CNI path). As root; scripts/test.sh runs it after
# cargo test. Nothing is pulled: the base image is a Debian bookworm tree from debootstrap,
# the app and destination images are Debian's busybox-static.
#
# The host is never touched: its iptables/ip6tables/nft rules and forwarding sysctls are
# compared before and after (byte for byte, once the timestamp comments and packet counters
# are dropped). podman keeps every state in a temporary directory and runs in a private mount
# namespace, so its mounts (and the caches it would put in /var/lib/containers and
# /var/lib/cni) never reach the host's; the containers talk only to each other on a bridge
# with no address, no gateway and no masquerade (10.89.77.0/24). Everything made is removed
# at the end, on failure too, and the suite checks that nothing is left.
#
#   scripts/e2e-podman.sh                         # uses target/debug/shunt (cargo test built it)
#   SHUNT_E2E_BINARY=$(scripts/build-release.sh) scripts/e2e-podman.sh   # the shipped binary
#   SHUNT_E2E_KEEP_CACHE=0 ...                    # rebuild the cached debootstrap tree
#
# What differs from Kubernetes, and why (podman 4.3):
# - podman runs neither native sidecars (an initContainer with restartPolicy: Always) nor
#   probes of init containers, so the podman copy of pod.yaml is derived from it mechanically:
#   the sidecar moves to `containers` (first, so it starts before the app), with its probes
#   as written; the init container stays an init container (of podman's type `always`, so
#   podman keeps it and `podman logs` reads it, as kubectl logs does); the pod's restartPolicy
#   is OnFailure (under Always podman restarts an init container that exited 0); the images
#   are the local ones. The suite does not count on podman running the probes: it makes their
#   request itself, GET POD_IP:15021/healthz/ready from another container.
# - podman passes no K8S_POD_NAMESPACE in CNI_ARGS and no runtimeConfig (pod annotations) to
#   CNI plugins, so skip_namespaces and shunt.dev/ annotations stay covered by tests/cni.rs.
# - The DaemonSet is run as a pod (its template, hostNetwork, the two hostPath volumes mapped
#   to this run's CNI directories); its preStop hook, which podman does not run, is run by
#   hand with `podman exec` before the pod goes.
#
# Output: "ok - ..." / "FAIL - ..." per check, then "e2e-podman: N passed, M failed".
# SKIPPED: <why> (exit 0) where it cannot run, unless CI=true, where that is a failure.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=/var/cache/shunt-e2e
NET=shunt-e2e          # plain network: the destination container, and path 1's pod
CNINET=shunt-e2e-cni   # same bridge, shunt chained: path 2's pod
BRIDGE=shunt-e2e0
SUBNET=10.89.77.0/24
SHUNT_IMAGE=localhost/shunt:e2e
BOX_IMAGE=localhost/shunt-e2e-busybox:1
# The manifests' image names, replaced by the local ones in the podman copies.
MANIFEST_SHUNT=ghcr.io/example/shunt:0.1.0
MANIFEST_APP=nginx:1.27

say() { printf '%s\n' "$*" >&2; }
skip() {
  if [ "${CI:-}" = true ]; then
    say "e2e-podman: cannot run in CI: $*"
    echo "e2e-podman: 0 passed, 1 failed"
    exit 1
  fi
  echo "SKIPPED: $*"
  exit 0
}

if [ "${1:-}" != --inner ]; then
  # === Outer: preconditions, the host's state before and after, the final count ===
  [ "$(id -u)" = 0 ] || skip "e2e-podman needs root (podman, CNI, namespaces)"
  command -v apt-get >/dev/null || skip "not a Debian machine (podman and friends come from apt)"
  "$ROOT/scripts/install-deps.sh" >&2 || skip "could not install podman, runc, debootstrap, busybox-static"
  for t in podman runc conmon catatonit debootstrap busybox unshare nsenter python3; do
    command -v "$t" >/dev/null || skip "$t is not installed"
  done
  [ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] || skip "no CNI reference plugins in /usr/lib/cni"
  grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || skip "the kernel has no overlayfs"

  bin=${SHUNT_E2E_BINARY:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/shunt}
  if [ -z "${SHUNT_E2E_BINARY:-}" ] && [ ! -x "$bin" ]; then
    say "e2e-podman: building $bin"
    (cd "$ROOT" && cargo build --locked --quiet)
  fi
  [ -x "$bin" ] || skip "no shunt binary at $bin"

  mkdir -p "$CACHE"
  # One run at a time on a machine: the bridge name and the subnet are fixed.
  exec 9>"$CACHE/lock"
  flock -w 900 9 || { say "e2e-podman: another run held $CACHE/lock for 15 minutes"; exit 1; }

  WORK=$(mktemp -d /tmp/shunt-e2e.XXXXXX)
  made_dirs=()
  outer_cleanup() {
    local d
    for d in "${made_dirs[@]}"; do rmdir "$d" 2>/dev/null || say "e2e-podman: $d is not empty"; done
    made_dirs=()
    rm -rf "$WORK"
  }
  trap outer_cleanup EXIT
  trap 'exit 130' INT TERM

  host_rules() {
    local t
    for t in iptables-save ip6tables-save iptables-legacy-save ip6tables-legacy-save iptables-nft-save ip6tables-nft-save; do
      command -v "$t" >/dev/null || continue
      echo "## $t"
      # Timestamps in comments and the packet counters change on their own; nothing else may.
      "$t" 2>&1 | { grep -v '^#' || true; } | sed -E 's/\[[0-9]+:[0-9]+\]$/[0:0]/'
    done
    echo "## nft list ruleset"
    nft list ruleset 2>&1
    echo "## sysctl"
    sysctl net.ipv4.ip_forward net.ipv4.conf.all.forwarding net.ipv6.conf.all.forwarding 2>&1
  }
  host_things() {
    echo "## links"; ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | sort
    # Other tests make and delete namespaces at any time: only podman's names count.
    echo "## /run/netns"; ls /run/netns 2>/dev/null | grep -E '^(netns|cni)-' | sort || true
    echo "## files"
    find /var/lib/containers /var/lib/cni /run/containers /run/libpod /run/cni /etc/cni /opt/cni "$CACHE" \
      -not -path "$CACHE/lock" 2>/dev/null | sort || true
    echo "## mounts"; findmnt -rn -o TARGET | grep -E 'containers|netns/netns-|shunt-e2e|overlay' | sort || true
    # Zombies are left for init to reap, which it does in its own time.
    echo "## processes"
    ps -eo stat=,args= | awk '$1 !~ /^Z/' | grep -E "conmon|catatonit|runc|$WORK" | grep -v grep | sort || true
  }
  host_rules >"$WORK/rules.before"
  host_things >"$WORK/things.before"
  # Mount points for the private namespace's binds; made here only if missing, removed after.
  for d in /var/lib/containers /var/lib/cni; do
    if [ ! -e "$d" ]; then mkdir -p "$d"; made_dirs+=("$d"); fi
  done

  started=$(date +%s)
  set +e
  SHUNT_E2E_WORK=$WORK SHUNT_E2E_BIN=$bin unshare --mount --propagation private bash ${SHUNT_E2E_TRACE:+-x} "$0" --inner
  inner=$?
  set -e

  for d in "${made_dirs[@]}"; do rmdir "$d" 2>/dev/null || say "e2e-podman: $d is not empty"; done
  made_dirs=()
  results=$WORK/results
  touch "$results"
  record() { echo "$*" | tee -a "$results" >&2; }
  host_rules >"$WORK/rules.after"
  if diff -u "$WORK/rules.before" "$WORK/rules.after" >&2; then
    record "ok - host: iptables, ip6tables (legacy and nft), nft ruleset and forwarding unchanged"
  else
    record "FAIL - host: rules or forwarding changed (diff above)"
  fi
  # The cache (debootstrap tree) is meant to stay; it was either there or is new.
  host_things | grep -v "^$CACHE/" >"$WORK/things.after" || true
  grep -v "^$CACHE/" "$WORK/things.before" >"$WORK/things.before.nocache" || true
  if diff -u "$WORK/things.before.nocache" "$WORK/things.after" >&2; then
    record "ok - host: no link, namespace, file, mount or process left behind"
  else
    record "FAIL - host: something was left behind (diff above)"
  fi
  if [ "$inner" != 0 ] && ! grep -q '^FAIL' "$results"; then
    record "FAIL - the suite stopped early (exit $inner)"
  fi
  if grep -q '^FAIL' "$results"; then say "failed:"; grep '^FAIL' "$results" >&2; fi
  passed=$(grep -c '^ok' "$results" || true)
  failed=$(grep -c '^FAIL' "$results" || true)
  say "e2e-podman: $(($(date +%s) - started)) s"
  echo "e2e-podman: $passed passed, $failed failed"
  [ "$failed" = 0 ]
  exit
fi

# === Inner: a private mount namespace; everything podman makes lives under $WORK ===
RESULTS=$SHUNT_E2E_WORK/results
WORK=$SHUNT_E2E_WORK/p
BIN=$SHUNT_E2E_BIN
: >"$RESULTS"
mkdir -p "$WORK"/{graph,run,tmp,volumes,net.d,build-net.d,cni-bin,ipam,ctx,box,kube,varlib/containers,varlib/cni}
mount --bind "$WORK/varlib/containers" /var/lib/containers
mount --bind "$WORK/varlib/cni" /var/lib/cni

ok() { echo "ok - $*" | tee -a "$RESULTS" >&2; }
fail() { echo "FAIL - $*" | tee -a "$RESULTS" >&2; }
# check NAME CMD...: a check that may fail without stopping the suite.
check() {
  local name=$1; shift
  if "$@" >"$WORK/check.out" 2>&1; then ok "$name"; else fail "$name"; sed 's/^/    /' "$WORK/check.out" >&2; fi
}
# must NAME CMD...: a step the rest depends on.
must() {
  local name=$1; shift
  if "$@" >"$WORK/check.out" 2>&1; then ok "$name"; else
    fail "$name"; sed 's/^/    /' "$WORK/check.out" >&2; exit 1
  fi
}
step() { say ""; say "== $*"; }

cat >"$WORK/containers.conf" <<EOF
[containers]
# podman's default asks for more open files than the hard limit here.
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=32768:32768"]
[network]
network_backend = "cni"
network_config_dir = "$WORK/net.d"
cni_plugin_dirs = ["$WORK/cni-bin", "/usr/lib/cni"]
default_network = "$NET"
[engine]
# crun refuses this machine's hybrid cgroup layout.
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$WORK/events.log"
tmp_dir = "$WORK/tmp"
volume_path = "$WORK/volumes"
EOF
cat >"$WORK/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$WORK/graph"
runroot = "$WORK/run"
EOF
cat >"$WORK/registries.conf" <<EOF
unqualified-search-registries = []
short-name-mode = "disabled"
EOF
export CONTAINERS_CONF=$WORK/containers.conf CONTAINERS_STORAGE_CONF=$WORK/storage.conf \
  CONTAINERS_REGISTRIES_CONF=$WORK/registries.conf
# Every podman call bounded; the storage named on each, so no call can reach another store.
pm() { timeout 180 podman --root "$WORK/graph" --runroot "$WORK/run" "$@"; }

HOLDER=
cleanup() {
  set +e
  # Debugging: SHUNT_E2E_PAUSE=FILE keeps everything up (at most 10 minutes) until FILE goes.
  if [ -n "${SHUNT_E2E_PAUSE:-}" ]; then
    touch "$SHUNT_E2E_PAUSE"
    say "e2e-podman: paused; CONTAINERS_CONF=$CONTAINERS_CONF nsenter -t $$ -m; rm $SHUNT_E2E_PAUSE to go on"
    local end=$((SECONDS + 600))
    while [ -e "$SHUNT_E2E_PAUSE" ] && [ $SECONDS -lt $end ]; do sleep 1; done
  fi
  [ -n "$HOLDER" ] && kill "$HOLDER" 2>/dev/null
  pm pod rm --all --force --time 0 >/dev/null 2>&1
  pm rm --all --force --time 0 >/dev/null 2>&1
  pm rmi --all --force >/dev/null 2>&1
  ip link del "$BRIDGE" 2>/dev/null
  findmnt -rn -o TARGET | grep -F "$WORK/" | sort -r | xargs -r umount -l 2>/dev/null
  umount /var/lib/containers /var/lib/cni 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A pod's network namespace path, from its infra container.
sandbox() { pm inspect "$(pm pod inspect "$1" --format '{{.InfraContainerID}}')" --format '{{.NetworkSettings.SandboxKey}}'; }
# A container's (or a pod's infra container's) address on a network.
addr_of() { pm inspect "$1" --format "{{(index .NetworkSettings.Networks \"$2\").IPAddress}}"; }
pod_addr() { addr_of "$(pm pod inspect "$1" --format '{{.InfraContainerID}}')" "$2"; }
# GET from a throwaway container on the plain network: prints the status line and body.
http_from_outside() { pm run --rm --network "$NET" "$BOX_IMAGE" timeout 10 wget -S -qO- "$1" 2>&1; }
wait_for() { # wait_for SECONDS CMD...: bounded
  local end=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || return 1
    sleep 0.2
  done
}

# The rules in a namespace, tables and chains in a fixed order, against `shunt render`.
normalize() {
  python3 -c '
import sys
tables, cur = {}, None
for line in sys.stdin.read().splitlines():
    if not line.strip() or line.startswith("#") or line == "COMMIT":
        continue
    if line.startswith("*"):
        cur = tables.setdefault(line[1:], ({}, set()))
    elif line.startswith(":"):
        name = line[1:].split()[0]
        if name.startswith("SHUNT_"):
            cur[1].add(name)
    elif line.startswith("-A "):
        cur[0].setdefault(line.split()[1], []).append(line)
for t in sorted(tables):
    rules, chains = tables[t]
    print("*" + t)
    print("\n".join(":" + c for c in sorted(chains)))
    for c in sorted(rules):
        print("\n".join(rules[c]))
'
}
# rules_equal_render NETNS RENDER-ARGS...: both families, nft backend (the image's default).
rules_equal_render() {
  local ns=$1; shift
  "$BIN" render "$@" >"$WORK/render.txt"
  sed -n '/^# IPv4/,/^# IPv6/p' "$WORK/render.txt" | normalize >"$WORK/want4"
  sed -n '/^# IPv6 rules/,$p' "$WORK/render.txt" | normalize >"$WORK/want6"
  nsenter --net="$ns" iptables-nft-save | normalize >"$WORK/got4"
  nsenter --net="$ns" ip6tables-nft-save | normalize >"$WORK/got6"
  grep -q SHUNT_ "$WORK/want4" && grep -q SHUNT_ "$WORK/want6" || { echo "render printed no rules"; return 1; }
  diff -u "$WORK/want4" "$WORK/got4" && diff -u "$WORK/want6" "$WORK/got6" &&
    nsenter --net="$ns" "$BIN" check "$@" --backend nft
}
no_shunt_rules() { # in a namespace
  ! nsenter --net="$1" iptables-nft-save | grep SHUNT_ && ! nsenter --net="$1" ip6tables-nft-save | grep SHUNT_
}

# === Images ===
step "images: a Debian bookworm base from debootstrap, busybox-static, shunt from the Dockerfile"
base_tar=$CACHE/bookworm-slim.tar
if [ "${SHUNT_E2E_KEEP_CACHE:-1}" = 0 ] || [ ! -s "$base_tar" ]; then
  # The mirror apt uses here; debootstrap needs one too.
  mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
  mirror=${mirror:-$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null)}
  mirror=${mirror:-http://deb.debian.org/debian}
  tree=$WORK/rootfs
  must "debootstrap --variant=minbase bookworm from $mirror" timeout 600 debootstrap --variant=minbase bookworm "$tree" "$mirror"
  # What makes Debian's image slim: no docs, man pages or locales, now or after apt runs.
  rm -rf "$tree"/var/cache/apt/* "$tree"/var/lib/apt/lists/* "$tree"/usr/share/{doc,man,info,locale}/* "$tree"/var/log/*.log
  cat >"$tree/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
  cat >"$tree/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  echo 'Acquire::Languages "none";' >"$tree/etc/apt/apt.conf.d/docker-no-languages"
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    rm -f "$tree/etc/apt/sources.list"
    cp /etc/apt/sources.list.d/debian.sources "$tree/etc/apt/sources.list.d/"
  fi
  tar --numeric-owner -C "$tree" -cf "$base_tar.tmp" . && mv "$base_tar.tmp" "$base_tar"
  rm -rf "$tree"
fi
must "import the tree as docker.io/library/debian:bookworm-slim" \
  pm import --change 'CMD ["bash"]' "$base_tar" docker.io/library/debian:bookworm-slim

mkdir -p "$WORK/box/rootfs/bin" "$WORK/box/rootfs/www" "$WORK/box/rootfs/tmp"
cp /bin/busybox "$WORK/box/rootfs/bin/busybox"
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "$WORK/box/rootfs/bin/$a"; done
echo "hello from the app" >"$WORK/box/rootfs/www/index.html"
cat >"$WORK/box/Containerfile" <<'EOF'
FROM scratch
COPY rootfs/ /
# The app (nginx in the manifest) and the destination: an HTTP server on port 80.
CMD ["httpd", "-f", "-v", "-p", "80", "-h", "/www"]
EOF
# --cni-config-dir: else the builder writes its default network to /etc/cni/net.d.
must "build the app and destination image (busybox-static)" pm build --pull=never --network=none \
  --cni-config-dir "$WORK/build-net.d" -t "$BOX_IMAGE" "$WORK/box"

# The build stage replaced by the binary already built (the Dockerfile's prebuilt route);
# stripped, as the release profile strips.
strip -o "$WORK/ctx/shunt" "$BIN"
must "build $SHUNT_IMAGE from the Dockerfile (SHUNT_BINARY=prebuilt, --pull=never)" \
  pm build --pull=never --network=host --cni-config-dir "$WORK/build-net.d" --build-arg SHUNT_BINARY=prebuilt -f "$ROOT/Dockerfile" -t "$SHUNT_IMAGE" "$WORK/ctx"
size=$(pm image inspect "$SHUNT_IMAGE" --format '{{.Size}}')
say "image $SHUNT_IMAGE: $size bytes ($((size / 1000000)) MB), binary $(stat -c %s "$WORK/ctx/shunt") bytes"
version() { pm run --rm --network=none "$SHUNT_IMAGE" --version | grep -x 'shunt [0-9.]*'; }
check "podman run $SHUNT_IMAGE --version" version

# === Networks: hand-written, so podman adds no rule to the host and leaves forwarding off ===
step "networks: one bridge without address, gateway or masquerade; $CNINET chains shunt"
conflist() { # NAME FIRST LAST
  cat <<EOF
{
  "cniVersion": "1.0.0",
  "name": "$1",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": false,
      "ipMasq": false,
      "ipam": {
        "type": "host-local",
        "dataDir": "$WORK/ipam",
        "ranges": [[{"subnet": "$SUBNET", "rangeStart": "$2", "rangeEnd": "$3"}]]
      }
    }
  ]
}
EOF
}
# The primary conflist (first in name order) is the one `shunt cni install` extends.
conflist "$CNINET" 10.89.77.100 10.89.77.199 >"$WORK/net.d/10-$CNINET.conflist"
conflist "$NET" 10.89.77.10 10.89.77.99 >"$WORK/net.d/20-$NET.conflist"
cp "$WORK/net.d/10-$CNINET.conflist" "$WORK/conflist.orig"

pm run -d --name dest --network "$NET" "$BOX_IMAGE" >/dev/null
DEST=$(addr_of dest "$NET")
must "the destination container serves on $DEST:80" wait_for 10 pm exec dest wget -qO- http://127.0.0.1/

# === Path 1: the initContainer, scripts/k8s/pod.yaml under podman kube play ===
step "path 1: scripts/k8s/pod.yaml with podman kube play"
# derive MODE MANIFEST > podman copy (init: as it is; cni: without shunt-init). The header
# says what changes and why.
derive() {
  python3 - "$1" "$2" "$MANIFEST_SHUNT=$SHUNT_IMAGE" "$MANIFEST_APP=$BOX_IMAGE" <<'EOF'
import sys, yaml
mode, src, images = sys.argv[1], sys.argv[2], dict(a.split("=", 1) for a in sys.argv[3:])
pod = yaml.safe_load(open(src))
assert pod["kind"] == "Pod", pod["kind"]
spec = pod["spec"]
inits, sidecars = [], []
for c in spec.get("initContainers", []):
    if c.get("restartPolicy") == "Always":      # a native sidecar
        c = {k: v for k, v in c.items() if k != "restartPolicy"}
        sidecars.append(c)
    elif mode == "init":
        inits.append(c)
    # mode "cni": the CNI plugin replaces the init container
spec["initContainers"] = inits
spec["containers"] = sidecars + spec["containers"]
spec["restartPolicy"] = "OnFailure"
for c in inits + spec["containers"]:
    c["image"] = images[c["image"]]
if mode == "cni":
    pod["metadata"]["name"] += "-cni"
# podman 4.3: keep init containers (type "always") so that podman logs can read them.
pod["metadata"].setdefault("annotations", {})["io.podman.annotations.init.container.type"] = "always"
yaml.safe_dump(pod, sys.stdout, sort_keys=False)
EOF
}
derive init "$ROOT/scripts/k8s/pod.yaml" >"$WORK/kube/pod.yaml"
POD=$(python3 -c 'import sys, yaml; print(yaml.safe_load(sys.stdin)["metadata"]["name"])' <"$WORK/kube/pod.yaml")
# The init container's options, straight from the manifest (its args after "apply").
mapfile -t INIT_ARGS < <(python3 -c '
import sys, yaml
c = [c for c in yaml.safe_load(sys.stdin)["spec"]["initContainers"] if c["name"] == "shunt-init"][0]
assert c["args"][0] == "apply", c["args"]
print("\n".join(c["args"][1:]))' <"$ROOT/scripts/k8s/pod.yaml")
must "podman kube play pod.yaml (network $NET)" pm kube play --network "$NET" "$WORK/kube/pod.yaml"
INIT=$POD-shunt-init PROXY=$POD-shunt-proxy APP=$POD-app
exited_zero() { [ "$(pm inspect "$1" --format '{{.State.Status}} {{.State.ExitCode}}')" = "exited 0" ]; }
must "the init container exits 0" wait_for 30 exited_zero "$INIT"
check "the init container ran as root with only NET_ADMIN and NET_RAW, read-only root, no new privileges" \
  test "$(pm inspect "$INIT" --format '{{.Config.User}} {{.EffectiveCaps}} {{.HostConfig.ReadonlyRootfs}} {{.HostConfig.SecurityOpt}}')" \
  = "0 [CAP_NET_ADMIN CAP_NET_RAW] true [no-new-privileges]"
pm logs "$INIT" >"$WORK/init.log" 2>&1
check "podman logs $INIT shows the applied rules (both families)" \
  eval "grep 'applied IPv4 rules' '$WORK/init.log' && grep 'applied IPv6 rules' '$WORK/init.log' && grep 'REDIRECT --to-ports 15001' '$WORK/init.log'"
NS1=$(sandbox "$POD")
POD_IP=$(pod_addr "$POD" "$NET")
check "the rules in the pod's namespace equal shunt render ${INIT_ARGS[*]}" rules_equal_render "$NS1" "${INIT_ARGS[@]}" --ipv6 on
proxy_ready() { pm exec "$APP" wget -qO- http://127.0.0.1:15000/ready | grep -qx LIVE; }
must "the proxy answers /ready on 127.0.0.1:15000" wait_for 20 proxy_ready
proxy_pid=$(pm inspect "$PROXY" --format '{{.State.Pid}}')
unprivileged() {
  local f st=/proc/$1/status
  cat "$st" &&
    grep -Eq '^Uid:\s+1337\s+1337\s+1337\s+1337$' "$st" &&
    grep -Eq '^Gid:\s+1337\s+1337\s+1337\s+1337$' "$st" || return 1
  for f in CapInh CapPrm CapEff CapBnd CapAmb; do grep -Eq "^$f:\s+0+$" "$st" || return 1; done
}
check "the proxy runs as uid/gid 1337 with no capabilities" unprivileged "$proxy_pid"

# traffic POD APP-CONTAINER PROXY-CONTAINER POD-IP: both directions through the proxy.
# get CONTAINER URL: the body, from inside that container.
get() { pm exec "$1" timeout 10 wget -qO- "$2"; }
# through_proxy PROXY APP DIRECTION DST: the access log line and the /clusters entry.
through_proxy() {
  pm logs "$1" 2>&1 | grep "direction=\"$3\"" | grep "dst=$4" &&
    get "$2" http://127.0.0.1:15000/clusters | grep -x "$3|$4::cx_total::1"
}
traffic() {
  local pod=$1 app=$2 proxy=$3 ip=$4
  check "$pod: the app's GET http://$DEST/ gets the destination's page" \
    eval "get '$app' http://$DEST/ | grep -x 'hello from the app'"
  check "$pod: through the proxy (access log direction=outbound, /clusters outbound|$DEST:80)" \
    through_proxy "$proxy" "$app" outbound "$DEST:80"
  check "$pod: the destination's GET http://$ip/ gets the app's page" \
    eval "get dest http://$ip/ | grep -x 'hello from the app'"
  check "$pod: it arrived through 15006 (access log direction=inbound, /clusters inbound|$ip:80)" \
    through_proxy "$proxy" "$app" inbound "$ip:80"
}
traffic "$POD" "$APP" "$PROXY" "$POD_IP"

step "path 1: the health port from another container; the admin port stays on loopback"
# health URL WANT-STATUS: from another container, the status line and the body.
health() {
  local out
  out=$(http_from_outside "$1")
  echo "$out"
  echo "$out" | grep -q "HTTP/1.1 $2"
}
check "GET $POD_IP:15021/healthz/ready from another container: 200 LIVE" \
  eval "health http://$POD_IP:15021/healthz/ready 200 | grep -x LIVE"
# admin_closed IP: the same raw request gets an HTTP answer from the health port (a 404:
# /ready is the admin's) and none from the admin port.
admin_closed() {
  local req="printf 'GET /ready HTTP/1.0\r\n\r\n' | nc -w 3 $1"
  pm run --rm --network "$NET" "$BOX_IMAGE" sh -c "
    echo health: \$($req 15021 | head -1); echo admin: \$($req 15000 | head -1)" >"$WORK/admin.out" 2>&1
  cat "$WORK/admin.out"
  grep -q '^health: HTTP/1.[01] 404' "$WORK/admin.out" && grep -qx 'admin:' "$WORK/admin.out"
}
# Retried: on a loaded machine a new container's first request can miss its 3 s; the health
# port answering in the same attempt is what makes the admin port's silence mean something.
check "$POD_IP:15000 (admin) gives no answer from another container; 15021 does" \
  wait_for 20 admin_closed "$POD_IP"
# A connection held open through the proxy keeps the drain going.
pm exec -d "$APP" sh -c "sleep 60 | nc $DEST 80" >/dev/null
held() { pm exec "$APP" wget -qO- http://127.0.0.1:15000/connections | grep -q "$DEST:80"; }
must "a connection held open through the proxy" wait_for 10 held
pm kill --signal TERM "$PROXY" >/dev/null
check "after SIGTERM (draining) GET $POD_IP:15021/healthz/ready answers 503" \
  wait_for 10 health "http://$POD_IP:15021/healthz/ready" 503
pm exec "$APP" killall nc >/dev/null 2>&1 || true
check "the proxy drains and exits 0" wait_for 30 exited_zero "$PROXY"
check "its log says it drained" eval "pm logs '$PROXY' 2>&1 | grep drained"
must "podman kube down pod.yaml" pm kube down "$WORK/kube/pod.yaml"

# === Path 2: the CNI plugin, installed by the DaemonSet's container ===
step "path 2: shunt cni install as scripts/k8s/cni-daemonset.yaml runs it, then podman calls the plugin"
# The DaemonSet's pod template as a Pod, its hostPaths mapped to this run's CNI directories;
# the one addition is log_file, so the plugin's own words are there to read.
python3 - "$ROOT/scripts/k8s/cni-daemonset.yaml" "$WORK" "$MANIFEST_SHUNT=$SHUNT_IMAGE" >"$WORK/kube/cni-install.yaml" <<'EOF'
import json, sys, yaml
src, work, image = sys.argv[1], sys.argv[2], sys.argv[3].split("=", 1)
ds = yaml.safe_load(open(src))
assert ds["kind"] == "DaemonSet", ds["kind"]
tpl = ds["spec"]["template"]
paths = {"/opt/cni/bin": work + "/cni-bin", "/etc/cni/net.d": work + "/net.d"}
for v in tpl["spec"]["volumes"]:
    v["hostPath"]["path"] = paths[v["hostPath"]["path"]]
for c in tpl["spec"]["containers"]:
    assert c["image"] == image[0], c["image"]
    c["image"] = image[1]
    for e in c.get("env", []):
        if e["name"] == "SHUNT_CNI_OPTIONS":
            opts = json.loads(e["value"])
            opts["log_file"] = work + "/cni-plugin.log"
            e["value"] = json.dumps(opts)
pod = {"apiVersion": "v1", "kind": "Pod",
       "metadata": {"name": ds["metadata"]["name"], "labels": tpl["metadata"]["labels"]},
       "spec": dict(tpl["spec"], restartPolicy="OnFailure")}
pod["spec"].pop("priorityClassName", None)
yaml.safe_dump(pod, sys.stdout, sort_keys=False)
EOF
# The capture options the DaemonSet gives the plugin, as render flags.
mapfile -t CNI_ARGS < <(python3 -c '
import json, sys, yaml
c = yaml.safe_load(sys.stdin)["spec"]["template"]["spec"]["containers"][0]
opts = json.loads([e["value"] for e in c["env"] if e["name"] == "SHUNT_CNI_OPTIONS"][0])
for k, v in opts.items():
    if k in ("skip_namespaces", "log_file", "log_level"):
        continue
    print("--" + k.replace("_", "-"))
    print(",".join(v) if isinstance(v, list) else v)' <"$ROOT/scripts/k8s/cni-daemonset.yaml")
DS=$(python3 -c 'import sys, yaml; d = yaml.safe_load(sys.stdin); print(d["metadata"]["name"] + "-" + d["spec"]["containers"][0]["name"])' <"$WORK/kube/cni-install.yaml")
must "podman kube play of the DaemonSet's pod (hostNetwork, the CNI dirs mounted)" pm kube play "$WORK/kube/cni-install.yaml"
installed() { [ -x "$WORK/cni-bin/shunt" ] && grep -q '"type": *"shunt"' "$WORK/net.d/10-$CNINET.conflist"; }
must "shunt cni install put the binary in the bin dir and shunt in the primary conflist" wait_for 30 installed
check "the other conflist is untouched" grep -vq shunt "$WORK/net.d/20-$NET.conflist"

derive cni "$ROOT/scripts/k8s/pod.yaml" >"$WORK/kube/pod-cni.yaml"
CPOD=$POD-cni
must "podman kube play pod.yaml without its init container (network $CNINET)" pm kube play --network "$CNINET" "$WORK/kube/pod-cni.yaml"
CAPP=$CPOD-app CPROXY=$CPOD-shunt-proxy
NS2=$(sandbox "$CPOD")
CPOD_IP=$(pod_addr "$CPOD" "$CNINET")
check "podman's CNI ADD installed the rules: they equal shunt render ${CNI_ARGS[*]}" rules_equal_render "$NS2" "${CNI_ARGS[@]}" --ipv6 on
check "the plugin logged ADD" grep -q 'ADD: applied IPv4 rules' "$WORK/cni-plugin.log"
cproxy_ready() { pm exec "$CAPP" wget -qO- http://127.0.0.1:15000/ready | grep -qx LIVE; }
must "the CNI pod's proxy is ready" wait_for 20 cproxy_ready
traffic "$CPOD" "$CAPP" "$CPROXY" "$CPOD_IP"
check "GET $CPOD_IP:15021/healthz/ready from another container: 200" health "http://$CPOD_IP:15021/healthz/ready" 200
check "$CPOD_IP:15000 (admin) gives no answer from another container; 15021 does" \
  wait_for 20 admin_closed "$CPOD_IP"

# hold NETNS: keeps a namespace alive past podman's teardown, to look inside after DEL.
hold() {
  nsenter --net="$1" sleep 120 &
  HOLDER=$!
  wait_for 5 test -e "/proc/$HOLDER/ns/net"
}
release() { kill "$HOLDER" 2>/dev/null; wait "$HOLDER" 2>/dev/null || true; HOLDER=; }
hold "$NS2"
must "podman pod stop (CNI DEL)" pm pod stop --time 10 "$CPOD"
check "after DEL the namespace had no shunt rules left (DEL ran while it existed)" no_shunt_rules "/proc/$HOLDER/ns/net"
check "the netns file is gone after teardown" test ! -e "$NS2"
check "the plugin logged that DEL removed the rules (both families)" \
  eval "grep -F 'DEL: removed shunt'\''s IPv4 (nft) and IPv6 (nft) rules in $NS2' '$WORK/cni-plugin.log'"
release

must "podman pod start: a second ADD" pm pod start "$CPOD"
NS3=$(sandbox "$CPOD")
check "second ADD: a new namespace" test "$NS3" != "$NS2"
check "second ADD: the rules equal shunt render again" rules_equal_render "$NS3" "${CNI_ARGS[@]}" --ipv6 on
must "the CNI pod's proxy is ready again" wait_for 20 cproxy_ready
check "second ADD: the app's request goes through the (restarted) proxy" \
  eval "get '$CAPP' http://$DEST/ | grep -x 'hello from the app' && through_proxy '$CPROXY' '$CAPP' outbound '$DEST:80'"
hold "$NS3"
must "podman kube down (the second DEL)" pm kube down "$WORK/kube/pod-cni.yaml"
check "after the second DEL no shunt rules are left in the namespace" no_shunt_rules "/proc/$HOLDER/ns/net"
check "the plugin logged two ADDs and two DELs that removed rules, none that found the namespace gone" \
  eval "cat '$WORK/cni-plugin.log'; [ \$(grep -c 'ADD: applied IPv4' '$WORK/cni-plugin.log') = 2 ] &&
    [ \$(grep -c 'DEL: removed' '$WORK/cni-plugin.log') = 2 ] && ! grep 'already gone' '$WORK/cni-plugin.log'"
release

# The DaemonSet's preStop hook, which podman does not run.
mapfile -t PRESTOP < <(python3 -c '
import sys, yaml
c = yaml.safe_load(sys.stdin)["spec"]["template"]["spec"]["containers"][0]
print("\n".join(c["lifecycle"]["preStop"]["exec"]["command"]))' <"$ROOT/scripts/k8s/cni-daemonset.yaml")
must "the DaemonSet's preStop: ${PRESTOP[*]}" pm exec "$DS" "${PRESTOP[@]}"
check "shunt cni uninstall gives the conflist back byte for byte" cmp "$WORK/conflist.orig" "$WORK/net.d/10-$CNINET.conflist"
check "and removes the binary from the bin dir" test ! -e "$WORK/cni-bin/shunt"
must "podman kube down of the DaemonSet's pod" pm kube down "$WORK/kube/cni-install.yaml"
pm rm --force --time 0 dest >/dev/null
