#!/usr/bin/env bash
# The main job, end to end on one machine: build shunt, make a "pod" and a "remote" network
# namespace joined by a veth pair, install the capture rules in the pod, run `shunt proxy` there
# as uid 1337, send real traffic from the app (uid 1000) out to a server on the remote and in from
# the remote to an app server, then show what the proxy and the kernel saw. Needs root; cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) == 0 ]] || { echo "demo: run as root (it creates network namespaces)" >&2; exit 1; }
scripts/install-deps.sh
S=$(scripts/build-release.sh)
pod=shunt-demo-pod-$$ remote=shunt-demo-remote-$$
work=$(mktemp -d)
chmod 755 "$work"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del "$pod" 2>/dev/null || true
  ip netns del "$remote" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
# Bold headings only on a terminal.
if [[ -t 1 ]]; then b=$'\033[1m' n=$'\033[0m'; else b='' n=''; fi
step() { printf '\n%s== %s%s\n' "$b" "$*" "$n"; }
in_pod() { ip netns exec "$pod" "$@"; }
as_app() { in_pod setpriv --reuid 1000 --regid 1000 --clear-groups "$@"; }

step "topology: pod 10.200.0.2 <-veth-> remote 10.200.0.1"
ip netns add "$pod"; ip netns add "$remote"
ip link add "dp$$" type veth peer name "dr$$"
ip link set "dp$$" netns "$pod"; ip link set "dr$$" netns "$remote"
ip -n "$pod" link set "dp$$" name eth0; ip -n "$remote" link set "dr$$" name eth0
for ns in "$pod" "$remote"; do ip -n "$ns" link set lo up; ip -n "$ns" link set eth0 up; done
ip -n "$pod" addr add 10.200.0.2/24 dev eth0
ip -n "$remote" addr add 10.200.0.1/24 dev eth0
ip -n "$pod" route add default via 10.200.0.1
echo "hello from the remote server" > "$work/remote.txt"
echo "hello from the app in the pod" > "$work/app.txt"
# A small static HTTP server (http.server's own CLI looks its address up in DNS, which this
# offline pod cannot reach, and stalls). Started without a shell function so $! is the server.
serve='import functools,http.server as h,socketserver as s,sys
s.TCPServer.allow_reuse_address = True
s.TCPServer((sys.argv[1], int(sys.argv[2])), functools.partial(h.SimpleHTTPRequestHandler, directory=sys.argv[3])).serve_forever()'
ip netns exec "$remote" /usr/bin/python3 -c "$serve" 10.200.0.1 8080 "$work" 2>/dev/null &
pids+=($!)
ip netns exec "$pod" setpriv --reuid 1000 --regid 1000 --clear-groups \
  /usr/bin/python3 -c "$serve" 10.200.0.2 8081 "$work" 2>/dev/null &
pids+=($!)

step "shunt apply --netns /run/netns/$pod   (what an initContainer does; it logs the rules)"
"$S" apply --netns "/run/netns/$pod" --ipv6 off --log-format text

step "shunt proxy --user 1337, in the pod (binds 15001/15006/15000, then drops to uid 1337)"
ip netns exec "$pod" "$S" proxy --user 1337 2> "$work/proxy.log" &
pids+=($!)
for _ in $(seq 1 100); do in_pod curl -fsS -o /dev/null http://127.0.0.1:15000/ready 2>/dev/null && break; sleep 0.05; done
in_pod curl -sS http://127.0.0.1:15000/ready; echo
# Wait (bounded) for both HTTP servers; the app calling its own address is not captured.
for _ in $(seq 1 100); do ip netns exec "$remote" curl -fsS -o /dev/null http://10.200.0.1:8080/remote.txt 2>/dev/null && break; sleep 0.05; done
for _ in $(seq 1 100); do as_app curl -fsS -o /dev/null http://10.200.0.2:8081/app.txt 2>/dev/null && break; sleep 0.05; done

step "outbound: the app (uid 1000) fetches http://10.200.0.1:8080/remote.txt"
as_app curl -sS --max-time 5 http://10.200.0.1:8080/remote.txt

step "inbound: the remote fetches http://10.200.0.2:8081/app.txt from the app"
ip netns exec "$remote" curl -sS --max-time 5 http://10.200.0.2:8081/app.txt

step "the proxy's access log (one line per connection)"
sleep 0.2
grep -E 'outbound|inbound' "$work/proxy.log" | tail -n 4 || cat "$work/proxy.log"

step "admin /clusters: one entry per original destination"
in_pod curl -sS http://127.0.0.1:15000/clusters

step "the kernel's view: packet counters on shunt's rules"
in_pod iptables-nft-save -c -t nat | grep -E '^\[[1-9][0-9]*:.*SHUNT' || true

step "shunt check: installed rules versus the plan"
"$S" check --netns "/run/netns/$pod" --ipv6 off

step "shunt clean, then check again (exit 3 = drift: nothing installed)"
"$S" clean --netns "/run/netns/$pod"
"$S" check --netns "/run/netns/$pod" --ipv6 off >/dev/null && echo "unexpected: still in sync" || echo "check exit $?: rules are gone"
