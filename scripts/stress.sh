#!/usr/bin/env bash
# Stress: the faults a flaky cluster makes, rerun for a bounded time, with counts (not a test;
# the suite has one round of each in tests/faults.rs and tests/self_dial.rs).
#   race   8 concurrent `shunt apply` with 8 different plans in one namespace, per backend:
#          rounds that end in exactly one plan, appliers that exited 0 / failed with a reason.
#   kill   `shunt apply` of a large three-table plan (raw, mangle, nat; 1,000 excluded CIDRs)
#          killed with SIGKILL at a random moment: how often `check` then finds it half done,
#          and whether the next apply always repairs it.
#   churn  an app opening connections to a refusing port through `shunt proxy`, with a 32-port
#          ephemeral range: connections the proxy accepted, SYNs that reached the remote
#          (fewer = the proxy dialled itself), upstream resets, connect_failed log lines.
# Usage: scripts/stress.sh [SECONDS_PER_SCENARIO [SCENARIOS]]
#   (default 20 and race,kill,churn; needs root; builds release)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-20}
ONLY=${2:-race,kill,churn}
[[ $(id -u) == 0 ]] || { echo "stress: needs root (network namespaces)" >&2; exit 1; }
scripts/install-deps.sh >/dev/null
SHUNT=$(scripts/build-release.sh)
pod=shunt-stress-pod-$$
remote=shunt-stress-remote-$$
work=$(mktemp -d)
proxy_pid=
drop_ns() {
  [[ -n $proxy_pid ]] && kill "$proxy_pid" 2>/dev/null || true
  ip netns del "$pod" 2>/dev/null || true
  ip netns del "$remote" 2>/dev/null || true
}
trap 'drop_ns; rm -rf "$work"' EXIT
fresh() {
  drop_ns
  ip netns add "$pod"; ip -n "$pod" link set lo up
}

opts() { # the plan of racer $1
  local o="--ipv6 on --exclude-outbound-ports $((1000 + $1))"
  case $(($1 % 4)) in
    1) o+=" --redirect-dns --dns-servers 10.200.0.53,fd00:5::53" ;;
    2) o+=" --drop-invalid" ;;
    3) o+=" --mode tproxy" ;;
  esac
  echo "$o"
}

race() { # $1 = backend
  fresh
  local rounds=0 one=0 ok=0 gave_up=0 bad=0 end=$((SECONDS + SECS))
  while ((SECONDS < end)); do
    local pids=()
    for i in 0 1 2 3 4 5 6 7; do
      # shellcheck disable=SC2046
      "$SHUNT" -q apply --backend "$1" --netns "/run/netns/$pod" $(opts "$i") 2>"$work/err$i" &
      pids+=($!)
    done
    for i in 0 1 2 3 4 5 6 7; do
      if wait "${pids[$i]}"; then ok=$((ok + 1))
      elif grep -q "another shunt" "$work/err$i"; then gave_up=$((gave_up + 1))
      else bad=$((bad + 1)); fi
    done
    local holds=0
    for i in 0 1 2 3 4 5 6 7; do
      # shellcheck disable=SC2046
      "$SHUNT" -q check --backend "$1" --netns "/run/netns/$pod" $(opts "$i") >/dev/null 2>&1 \
        && holds=$((holds + 1))
    done
    rounds=$((rounds + 1)); ((holds == 1)) && one=$((one + 1))
  done
  printf 'race %-8s rounds %4d  ended in exactly one plan %4d  appliers ok %5d  gave up with a reason %d  other failures %d\n' \
    "$1" "$rounds" "$one" "$ok" "$gave_up" "$bad"
}

holds_rules() { # $1 = backend: any of shunt's rules in the pod?
  case $1 in
    nftables) ip netns exec "$pod" nft list table inet shunt >/dev/null 2>&1 ;;
    *) ip netns exec "$pod" "iptables-$1-save" | grep -q SHUNT_ ||
      ip netns exec "$pod" "ip6tables-$1-save" | grep -q SHUNT_ ;;
  esac
}

kill9() { # $1 = backend
  local cidrs big rounds=0 whole=0 none=0 half=0 repaired=0 end=$((SECONDS + SECS))
  cidrs=$(for i in $(seq 0 999); do printf '10.%d.%d.0/24,' $((i / 250 + 100)) $((i % 250)); done)
  big="--backend $1 --ipv6 on --redirect-dns --dns-servers 10.200.0.53 --drop-invalid --exclude-outbound-cidrs ${cidrs%,}"
  while ((SECONDS < end)); do
    fresh
    # shellcheck disable=SC2086
    "$SHUNT" -q apply --netns "/run/netns/$pod" $big 2>/dev/null &
    local pid=$!
    sleep "0.0$((RANDOM % 10))$((RANDOM % 10))"
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    # shellcheck disable=SC2086
    if "$SHUNT" -q check --netns "/run/netns/$pod" $big >/dev/null 2>&1; then
      whole=$((whole + 1))
    elif ! holds_rules "$1"; then
      none=$((none + 1))
    else
      half=$((half + 1))
    fi
    # shellcheck disable=SC2086
    "$SHUNT" -q apply --netns "/run/netns/$pod" $big >/dev/null 2>&1 &&
      "$SHUNT" -q check --netns "/run/netns/$pod" $big >/dev/null 2>&1 && repaired=$((repaired + 1))
    rounds=$((rounds + 1))
  done
  printf 'kill %-8s rounds %4d  after the kill: whole plan %4d, nothing %4d, part of it %4d  repaired by the next apply %4d\n' \
    "$1" "$rounds" "$whole" "$none" "$half" "$repaired"
}

churn() { # $1 = backend
  fresh
  ip netns add "$remote"; ip -n "$remote" link set lo up
  ip -n "$pod" link add eth0 type veth peer name eth0 netns "$remote"
  ip -n "$pod" addr add 10.200.0.2/24 dev eth0; ip -n "$pod" link set eth0 up
  ip -n "$remote" addr add 10.200.0.1/24 dev eth0; ip -n "$remote" link set eth0 up
  ip netns exec "$pod" sysctl -qw net.ipv4.ip_local_port_range="40000 40031"
  ip netns exec "$remote" iptables-nft -A INPUT -p tcp --dport 9 --syn
  "$SHUNT" -q apply --backend "$1" --ipv6 off --netns "/run/netns/$pod"
  ip netns exec "$pod" "$SHUNT" proxy --user 1337 --connect-timeout 2s 2>"$work/proxy.log" &
  proxy_pid=$!
  for _ in $(seq 100); do
    ip netns exec "$pod" curl -fsS -o /dev/null http://127.0.0.1:15000/ready 2>/dev/null && break
    sleep 0.1
  done
  ip netns exec "$pod" setpriv --reuid 1000 --regid 1000 --clear-groups /usr/bin/python3 - "$SECS" <<'EOF'
import socket, sys, time
end = time.time() + float(sys.argv[1])
while time.time() < end:
    try:
        s = socket.create_connection(("10.200.0.1", 9), timeout=3)
        s.settimeout(5)
        s.recv(64)
        s.close()
    except OSError:
        time.sleep(0.001)
EOF
  sleep 3
  local stats accepted syns resets failed
  stats=$(ip netns exec "$pod" curl -fsS http://127.0.0.1:15000/stats)
  accepted=$(awk -F': ' '$1 == "outbound.downstream_cx_total" {print $2}' <<<"$stats")
  resets=$(awk -F': ' '$1 == "outbound.upstream_cx_reset" {print $2}' <<<"$stats")
  syns=$(ip netns exec "$remote" iptables-nft -L INPUT -v -n -x | awk '/dpt:9/ {print $1}')
  failed=$(grep -c 'end="connect_failed"' "$work/proxy.log" || true)
  kill "$proxy_pid"; wait "$proxy_pid" 2>/dev/null || true; proxy_pid=
  printf 'churn %-8s proxy accepted %6d  SYNs at the remote %6d  upstream resets %d  connect_failed lines %6d\n' \
    "$1" "$accepted" "$syns" "$resets" "$failed"
}

for b in nft legacy nftables; do
  [[ ,$ONLY, == *,race,* ]] && race "$b"
done
for b in nft legacy nftables; do
  [[ ,$ONLY, == *,kill,* ]] && kill9 "$b"
done
for b in nft legacy nftables; do
  [[ ,$ONLY, == *,churn,* ]] && churn "$b"
done
exit 0
