#!/usr/bin/env bash
# Proxy benchmark (SPEC §9): direct vs HAProxy vs `shunt proxy`, interleaved in one run, on the
# same namespaces and the same shunt capture rules. Prints every figure as a ratio to direct.
#
#   scripts/bench-proxy.sh (root)               # ROUNDS=2 DUR=5 by default (about 3.5 minutes)
#   ROUNDS=3 DUR=8 SHUNT_ARGS="--relay copy" scripts/bench-proxy.sh
#   ROUNDS=1 DUR=2 SKIP_BUILD=1 MODES="direct shunt" scripts/bench-proxy.sh   # quick check
#
# Knobs: ROUNDS, DUR (seconds per run), CONNS (wrk connections, 32), PACED_CONNS (8), MODES,
# SHUNT_ARGS (extra `shunt proxy` flags), SHUNT (binary; default: scripts/build-release.sh's),
# SKIP_BUILD=1 (use the last scripts/build-release.sh output without building).
# Run time is about ROUNDS x DUR x 17 seconds plus a few seconds of set-up: each round runs
# 5 measurements x 3 modes, then the mesh phase runs ROUNDS x 2 sidecar modes.
#
# Topology: a pod namespace (capture rules, sidecar, wrk / iperf3 client) and a remote namespace
# (nginx, iperf3 server) joined by a veth pair. Client + sidecar are pinned to CPU 0, the server
# side to CPU 1. "direct" runs the client as uid 1337, which the rules never capture; the
# proxied runs use uid 1000, captured to :15001 where HAProxy or shunt listens (each as uid
# 1337, one at a time). Needs root, nginx, wrk, haproxy, iperf3, curl (apt-get install ...).
#
# What is measured, per mode, best of ROUNDS:
#   - small keep-alive: wrk -c CONNS on a 3-byte response (req/s, p50, p99), and for the
#     sidecars the sidecar's CPU per request over that run: utime+stime of its process (all
#     threads, /proc/PID/stat) divided by the requests wrk made, in microseconds;
#   - paced: wrk -c PACED_CONNS with 1 ms of think time per request per connection (a Lua
#     delay(); Debian's wrk has no -R), a moderate load far from saturation, so p50 / p99 show
#     the latency a sidecar adds rather than queueing;
#   - new connection per request, 1 MiB responses, one iperf3 stream; RSS idle / peak.
# Then the mesh phase: shunt's rules are applied in the remote namespace too (and removed
# after), and each sidecar mode runs an outbound sidecar in the pod plus an inbound one in the
# remote (uid 1337, CPU 1, beside nginx: the inbound leg goes to :15006, and the sidecar reaches
# nginx from 127.0.0.6, which the rules let through), measured with the small keep-alive run.
# The mesh's "direct" is the plain direct figure (no sidecar on either side): once the remote
# has rules, even uid 1337 traffic is captured inbound there. Each mesh run must prove its path:
# requests > 0, no non-2xx, and the inbound sidecar's own counter (shunt's admin
# inbound.downstream_cx_total, HAProxy's stats page) > 0; otherwise the script exits 1.
#
# Report: "x" columns are ratios to direct (for req/s, conn/s, MiB/s, Gbit/s higher is better;
# for latencies lower is better). CPU per request has no direct figure ("-"), lower is better.
# "added" rows are the sidecar's best minus direct's best, in ms (lower is better).
set -euo pipefail

ROUNDS=${ROUNDS:-2}
DUR=${DUR:-5}
CONNS=${CONNS:-32}
PACED_CONNS=${PACED_CONNS:-8}
SHUNT_ARGS=${SHUNT_ARGS:-}
read -r -a SHUNT_ARGV <<<"$SHUNT_ARGS"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHUNT=${SHUNT:-}
POD=bp-pod-$$
REM=bp-rem-$$
D=$(mktemp -d /tmp/bench-proxy.XXXXXX)
PIDS=()

for tool in ip nginx wrk haproxy iperf3 curl taskset setpriv getconf; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install nginx wrk haproxy iperf3 curl)" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "run as root (namespaces)" >&2; exit 2; }
[ "$(nproc)" -ge 2 ] || { echo "needs 2 CPUs for the pinning" >&2; exit 2; }
CLK_TCK=$(getconf CLK_TCK)

cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.2
    ip netns del "$POD" 2>/dev/null || true
    ip netns del "$REM" 2>/dev/null || true
    rm -rf "$D"
}
trap cleanup EXIT INT TERM

# The binary as shipped (static-pie, scripts/build-release.sh) unless SHUNT names another.
if [ -z "$SHUNT" ] && [ -n "${SKIP_BUILD:-}" ]; then
    SHUNT=$ROOT/target/$(rustc -vV | sed -n 's/^host: //p')/release/shunt
elif [ -z "$SHUNT" ]; then
    SHUNT=$("$ROOT/scripts/build-release.sh")
fi

# --- topology ---------------------------------------------------------------------------------
ip netns add "$POD"; ip netns add "$REM"
ip -n "$POD" link set lo up; ip -n "$REM" link set lo up
ip link add "bpp$$" type veth peer name "bpr$$"
ip link set "bpp$$" netns "$POD"; ip link set "bpr$$" netns "$REM"
ip -n "$POD" link set "bpp$$" name eth0; ip -n "$REM" link set "bpr$$" name eth0
ip -n "$POD" link set eth0 up; ip -n "$REM" link set eth0 up
ip -n "$POD" addr add 10.200.0.2/24 dev eth0
ip -n "$REM" addr add 10.200.0.1/24 dev eth0
ip -n "$POD" route add default via 10.200.0.1
for ns in "$POD" "$REM"; do
    # Wide ephemeral range for the connection-per-request run, minus the sidecar ports.
    ip netns exec "$ns" sysctl -qw net.ipv4.ip_local_port_range="1024 65000" \
        net.ipv4.ip_local_reserved_ports=15000-15099 net.ipv4.tcp_tw_reuse=1 net.core.somaxconn=4096
done
"$SHUNT" apply -q --netns "/run/netns/$POD" --ipv6 off

# --- servers (CPU 1) --------------------------------------------------------------------------
mkdir -p "$D/www"; chmod 755 "$D" "$D/www"
head -c $((1 << 20)) /dev/urandom > "$D/www/1m"; chmod 644 "$D/www/1m"
cat > "$D/nginx.conf" <<NGINX
user root;
worker_processes 1;
daemon off;
pid $D/nginx.pid;
error_log $D/nginx.err;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path $D/tmp; proxy_temp_path $D/tmp; fastcgi_temp_path $D/tmp;
    uwsgi_temp_path $D/tmp; scgi_temp_path $D/tmp;
    keepalive_requests 10000000;
    sendfile on; tcp_nodelay on;
    server {
        listen 80 backlog=4096;
        location = /small { return 200 "ok\n"; }
        location / { root $D/www; }
    }
}
NGINX
ip netns exec "$REM" taskset -c 1 nginx -c "$D/nginx.conf" & PIDS+=($!)
ip netns exec "$REM" taskset -c 1 iperf3 -s -p 5201 >/dev/null 2>&1 & PIDS+=($!)

# Both HAProxy sidecars: uid 1337 like shunt's, plain TCP.
haproxy_common() {
    cat <<HAPROXY
global
    uid 1337
    gid 1337
    maxconn 9000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
HAPROXY
}
{ haproxy_common; cat <<HAPROXY; } > "$D/haproxy.cfg"
frontend out
    bind 0.0.0.0:15001
    default_backend orig
backend orig
    server s 0.0.0.0:0
HAPROXY
# The mesh's inbound HAProxy (remote namespace): the redirect sends to :15006; it connects to
# the original destination from 127.0.0.6 so the rules do not capture that leg again. The
# stats page on loopback is how the mesh phase proves the inbound leg went through it.
{ haproxy_common; cat <<HAPROXY; } > "$D/haproxy-in.cfg"
frontend in
    bind 0.0.0.0:15006
    default_backend app
backend app
    server s 0.0.0.0:0 source 127.0.0.6
listen stats
    mode http
    bind 127.0.0.1:15020
    stats enable
    stats uri /stats
HAPROXY
# 1 ms of think time per request per connection (wrk starts the latency clock after it).
cat > "$D/paced.lua" <<'LUA'
function delay() return 1 end
LUA
chmod 644 "$D/paced.lua"

wait_port() { # ns port
    for _ in $(seq 100); do
        ip netns exec "$1" ss -Hltn "sport = :$2" | grep -q LISTEN && return 0
        sleep 0.05
    done
    echo "nothing listens on :$2 in $1" >&2; exit 1
}
wait_port "$REM" 80; wait_port "$REM" 5201
# The mesh's inbound redirect keeps the destination address, so nginx must listen on all of them.
ip netns exec "$REM" ss -Hltn "sport = :80" | grep -q '0\.0\.0\.0:80' \
    || { echo "nginx does not listen on 0.0.0.0:80 in $REM" >&2; exit 1; }

# --- measurements -----------------------------------------------------------------------------
client() { # uid cmd...
    local uid=$1; shift
    ip netns exec "$POD" setpriv --reuid "$uid" --regid "$uid" --clear-groups taskset -c 0 "$@"
}
# wrk latency lines look like "50%  123.00us"; print milliseconds.
to_ms() { awk '{v=$1; if (v ~ /us$/) {sub(/us$/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v*=1000}; printf "%.3f", v}'; }
# Figures from wrk's output on stdin.
rps() { awk '/Requests\/sec/ {print $2}'; }
pct() { awk -v p="$1" '$1==p {print $2}' | to_ms; }
requests() { awk '/ requests in / {print $1; n=1} END {if (!n) print 0}'; }
non2xx() { awk '/Non-2xx or 3xx responses:/ {print $NF; n=1} END {if (!n) print 0}'; }
# utime + stime (fields 14, 15) in clock ticks; a process's stat sums all its threads. The
# command name is field 2, in parentheses, so count from the last ")".
cpu_ticks() { awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$1/stat"; }

# Starts a sidecar in ns on a cpu and waits for its port; the pid is in LAUNCHED. Both HAProxy
# (-db: no fork) and shunt run as the pid started, so that pid's stat is the whole sidecar.
LAUNCHED=
launch() { # mode ns cpu port haproxy-config
    case $1 in
        haproxy) ip netns exec "$2" taskset -c "$3" haproxy -f "$5" -db >/dev/null 2>&1 & ;;
        shunt) ip netns exec "$2" taskset -c "$3" "$SHUNT" -q proxy --user 1337 "${SHUNT_ARGV[@]}" & ;;
    esac
    LAUNCHED=$!
    PIDS+=("$LAUNCHED")
    wait_port "$2" "$4"
    sleep 0.2
}
halt() { kill "$1"; wait "$1" 2>/dev/null || true; }

SIDECAR_PID=
start_sidecar() {
    [ "$1" != direct ] || return 0
    launch "$1" "$POD" 0 15001 "$D/haproxy.cfg"
    SIDECAR_PID=$LAUNCHED
    IDLE_RSS[$1]=$(awk '/VmRSS/ {print $2}' "/proc/$SIDECAR_PID/status")
}
stop_sidecar() {
    [ -n "$SIDECAR_PID" ] || return 0
    local hwm
    hwm=$(awk '/VmHWM/ {print $2}' "/proc/$SIDECAR_PID/status")
    [ "${PEAK_RSS[$1]:-0}" -ge "$hwm" ] || PEAK_RSS[$1]=$hwm
    halt "$SIDECAR_PID"
    SIDECAR_PID=
}

declare -A R IDLE_RSS PEAK_RSS
best() { # key value higher|lower
    local cur=${R[$1]:-}
    if [ -z "$cur" ] || awk -v a="$2" -v b="$cur" -v d="$3" 'BEGIN{exit !((d=="higher" && a>b) || (d=="lower" && a<b))}'; then
        R[$1]=$2
    fi
}

measure() { # mode
    local mode=$1 uid=1000 out t0 n
    [ "$mode" = direct ] && uid=1337
    if [ -n "$SIDECAR_PID" ]; then t0=$(cpu_ticks "$SIDECAR_PID"); fi
    out=$(client $uid wrk -t1 -c"$CONNS" -d"${DUR}s" --latency http://10.200.0.1/small)
    if [ -n "$SIDECAR_PID" ]; then
        n=$(requests <<<"$out")
        [ "$n" -gt 0 ] || { echo "$mode: the small keep-alive run made no requests" >&2; exit 1; }
        best "$mode.cpu" "$(awk -v t=$(($(cpu_ticks "$SIDECAR_PID") - t0)) -v hz="$CLK_TCK" -v n="$n" \
            'BEGIN{printf "%.2f", t / hz * 1e6 / n}')" lower
    fi
    best "$mode.small" "$(rps <<<"$out")" higher
    best "$mode.p50" "$(pct 50% <<<"$out")" lower
    best "$mode.p99" "$(pct 99% <<<"$out")" lower
    out=$(client $uid wrk -t1 -c"$PACED_CONNS" -d"${DUR}s" --latency -s "$D/paced.lua" http://10.200.0.1/small)
    best "$mode.paced" "$(rps <<<"$out")" higher
    best "$mode.pp50" "$(pct 50% <<<"$out")" lower
    best "$mode.pp99" "$(pct 99% <<<"$out")" lower
    out=$(client $uid wrk -t1 -c"$CONNS" -d"${DUR}s" -H 'Connection: close' http://10.200.0.1/small)
    best "$mode.close" "$(rps <<<"$out")" higher
    out=$(client $uid wrk -t1 -c8 -d"${DUR}s" http://10.200.0.1/1m)
    best "$mode.big" "$(rps <<<"$out")" higher
    out=$(client $uid iperf3 -c 10.200.0.1 -p 5201 -t "$DUR" -J)
    best "$mode.stream" "$(/usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)' <<<"$out")" higher
}

# Mesh: inbound sidecar in the remote (CPU 1, beside nginx), outbound one in the pod, client
# uid 1000 captured in the pod and the sidecar's connection captured again in the remote.
measure_mesh() { # mode
    local mode=$1 out rem_pid pod_pid n bad in_cx
    launch "$mode" "$REM" 1 15006 "$D/haproxy-in.cfg"; rem_pid=$LAUNCHED
    launch "$mode" "$POD" 0 15001 "$D/haproxy.cfg"; pod_pid=$LAUNCHED
    out=$(client 1000 wrk -t1 -c"$CONNS" -d"${DUR}s" --latency http://10.200.0.1/small)
    # Connections the inbound sidecar accepted in this run (it started fresh); a stats page
    # that does not answer leaves in_cx empty, which fails the check below.
    case $mode in
        shunt) in_cx=$( { ip netns exec "$REM" curl -sf --max-time 5 http://127.0.0.1:15000/stats || true; } \
                   | awk -F': ' '$1=="inbound.downstream_cx_total" {print $2}') ;;
        haproxy) in_cx=$( { ip netns exec "$REM" curl -sf --max-time 5 'http://127.0.0.1:15020/stats;csv' || true; } \
                   | awk -F, '$1=="in" && $2=="FRONTEND" {print $8}') ;;
    esac
    halt "$pod_pid"; halt "$rem_pid"
    n=$(requests <<<"$out"); bad=$(non2xx <<<"$out")
    if [ "$n" -le "$bad" ] || [ "$bad" -ne 0 ] || [ "${in_cx:-0}" -le 0 ]; then
        printf '%s\n' "$out" >&2
        echo "mesh $mode: $n requests, $bad non-2xx, ${in_cx:-no} connections through the inbound sidecar: the mesh path is broken" >&2
        exit 1
    fi
    echo "mesh $mode: $n requests, ${in_cx} connections through the inbound sidecar" >&2
    best "$mode.mesh_small" "$(rps <<<"$out")" higher
    best "$mode.mesh_p50" "$(pct 50% <<<"$out")" lower
    best "$mode.mesh_p99" "$(pct 99% <<<"$out")" lower
}

# Alternate the order each round so no mode always runs first or last.
ordered() { # round modes...
    local round=$1; shift
    if [ $((round % 2)) = 0 ]; then
        for ((i = $#; i >= 1; i--)); do echo "${!i}"; done
    else
        printf '%s\n' "$@"
    fi
}

read -r -a MODES <<<"${MODES:-direct haproxy shunt}"
for round in $(seq "$ROUNDS"); do
    for mode in $(ordered "$round" "${MODES[@]}"); do
        echo "round $round: $mode" >&2
        start_sidecar "$mode"
        measure "$mode"
        stop_sidecar "$mode"
    done
done

# --- mesh phase -------------------------------------------------------------------------------
MESH_MODES=()
for mode in "${MODES[@]}"; do [ "$mode" = direct ] || MESH_MODES+=("$mode"); done
if [ ${#MESH_MODES[@]} -gt 0 ]; then
    "$SHUNT" apply -q --netns "/run/netns/$REM" --ipv6 off
    for round in $(seq "$ROUNDS"); do
        for mode in $(ordered "$round" "${MESH_MODES[@]}"); do
            echo "mesh round $round: $mode" >&2
            measure_mesh "$mode"
        done
    done
    "$SHUNT" clean -q --netns "/run/netns/$REM"
fi
# The mesh's direct is the plain direct run: no sidecar on either side.
for k in small p50 p99; do
    if [ -n "${R[direct.$k]:-}" ]; then R[direct.mesh_$k]=${R[direct.$k]}; fi
done

# --- report -----------------------------------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b>0) printf "%.2fx", a/b; else print "-" }'; }
row() { # label key
    local d=${R[direct.$2]:-0} h=${R[haproxy.$2]:-0} s=${R[shunt.$2]:-0}
    printf "| %-30s | %10.2f | %10.2f (%s) | %10.2f (%s) |\n" "$1" "$d" "$h" "$(ratio "$h" "$d")" "$s" "$(ratio "$s" "$d")"
}
# Rows whose direct column is "-": "sidecar-only" figures, or a sidecar's best minus direct's.
row_nodirect() { # label haproxy-figure shunt-figure
    printf "| %-30s | %10s | %18s | %18s |\n" "$1" "-" "$2" "$3"
}
fig() { # key
    if [ -n "${R[$1]:-}" ]; then printf "%.2f" "${R[$1]}"; else echo "-"; fi
}
added() { # mode key: the mode's best minus direct's best, ms
    local d=${R[direct.$2]:-} s=${R[$1.$2]:-}
    if [ -n "$d" ] && [ -n "$s" ]; then awk -v s="$s" -v d="$d" 'BEGIN{printf "%+.3f", s - d}'; else echo "-"; fi
}
mib() { awk -v k="$1" 'BEGIN{printf "%.1f", k/1024}'; }
echo
echo "shunt proxy benchmark: $(date -u +%FT%TZ), $(uname -r), ${ROUNDS} rounds x ${DUR}s, best of rounds, wrk -c$CONNS (paced -c$PACED_CONNS), shunt args: ${SHUNT_ARGS:-none}"
echo
echo "| figure                         |     direct |    HAProxy (ratio) |      shunt (ratio) |"
echo "|--------------------------------|-----------:|-------------------:|-------------------:|"
row "small keep-alive, req/s" small
row "small keep-alive, p50 ms" p50
row "small keep-alive, p99 ms" p99
row_nodirect "sidecar CPU per request, us" "$(fig haproxy.cpu)" "$(fig shunt.cpu)"
row "paced (1 ms think), req/s" paced
row "paced, p50 ms" pp50
row "paced, p99 ms" pp99
row_nodirect "paced, p50 added vs direct ms" "$(added haproxy pp50)" "$(added shunt pp50)"
row_nodirect "paced, p99 added vs direct ms" "$(added haproxy pp99)" "$(added shunt pp99)"
row "new connection per req, conn/s" close
row "1 MiB responses, MiB/s" big
row "iperf3 one stream, Gbit/s" stream
row "mesh small keep-alive, req/s" mesh_small
row "mesh small keep-alive, p50 ms" mesh_p50
row "mesh small keep-alive, p99 ms" mesh_p99
row_nodirect "RSS idle / peak, MiB" \
    "$(mib "${IDLE_RSS[haproxy]:-0}") / $(mib "${PEAK_RSS[haproxy]:-0}")" \
    "$(mib "${IDLE_RSS[shunt]:-0}") / $(mib "${PEAK_RSS[shunt]:-0}")"
