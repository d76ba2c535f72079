#!/usr/bin/env bash
# Proxy benchmark (SPEC §9): direct vs HAProxy vs `shunt proxy`, interleaved in one run, on the
# same namespaces and the same shunt capture rules. Prints every figure as a ratio to direct.
#
#   scripts/bench-proxy.sh (root)               # ROUNDS=2 DUR=5 by default (about 3 minutes)
#   ROUNDS=3 DUR=8 SHUNT_ARGS="--relay copy" scripts/bench-proxy.sh
#
# Topology: a pod namespace (capture rules, sidecar, wrk / iperf3 client) and a remote namespace
# (nginx, iperf3 server) joined by a veth pair. Client + sidecar are pinned to CPU 0, the server
# side to CPU 1. "direct" runs the client as uid 1337, which the rules never capture; the
# proxied runs use uid 1000, captured to :15001 where HAProxy or shunt listens (each as uid
# 1337, one at a time). Needs root, nginx, wrk, haproxy, iperf3 (apt-get install ...).
set -euo pipefail

ROUNDS=${ROUNDS:-2}
DUR=${DUR:-5}
CONNS=${CONNS:-32}
SHUNT_ARGS=${SHUNT_ARGS:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHUNT=${SHUNT:-$ROOT/target/release/shunt}
POD=bp-pod-$$
REM=bp-rem-$$
D=$(mktemp -d /tmp/bench-proxy.XXXXXX)
PIDS=()

for tool in ip nginx wrk haproxy iperf3 taskset setpriv; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install nginx wrk haproxy iperf3)" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "run as root (namespaces)" >&2; exit 2; }
[ "$(nproc)" -ge 2 ] || { echo "needs 2 CPUs for the pinning" >&2; exit 2; }

cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.2
    ip netns del "$POD" 2>/dev/null || true
    ip netns del "$REM" 2>/dev/null || true
    rm -rf "$D"
}
trap cleanup EXIT INT TERM

if [ -z "${SKIP_BUILD:-}" ]; then
    (cd "$ROOT" && cargo build --release --quiet)
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

cat > "$D/haproxy.cfg" <<HAPROXY
global
    uid 1337
    gid 1337
    maxconn 9000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend out
    bind 0.0.0.0:15001
    default_backend orig
backend orig
    server s 0.0.0.0:0
HAPROXY

wait_port() { # ns port
    for _ in $(seq 100); do
        ip netns exec "$1" ss -Hltn "sport = :$2" | grep -q LISTEN && return 0
        sleep 0.05
    done
    echo "nothing listens on :$2 in $1" >&2; exit 1
}
wait_port "$REM" 80; wait_port "$REM" 5201

# --- measurements -----------------------------------------------------------------------------
client() { # uid cmd...
    local uid=$1; shift
    ip netns exec "$POD" setpriv --reuid "$uid" --regid "$uid" --clear-groups taskset -c 0 "$@"
}
# wrk latency lines look like "50%  123.00us"; print milliseconds.
to_ms() { awk '{v=$1; if (v ~ /us$/) {sub(/us$/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v*=1000}; printf "%.3f", v}'; }

SIDECAR_PID=
start_sidecar() {
    case $1 in
        direct) return ;;
        haproxy) ip netns exec "$POD" taskset -c 0 haproxy -f "$D/haproxy.cfg" -db >/dev/null 2>&1 & ;;
        shunt) ip netns exec "$POD" taskset -c 0 "$SHUNT" -q proxy --user 1337 $SHUNT_ARGS & ;;
    esac
    SIDECAR_PID=$!
    PIDS+=("$SIDECAR_PID")
    wait_port "$POD" 15001
    sleep 0.2
    # HAProxy forks nothing with -db; both run as the pid we started.
    IDLE_RSS[$1]=$(awk '/VmRSS/ {print $2}' "/proc/$SIDECAR_PID/status")
}
stop_sidecar() {
    [ -n "$SIDECAR_PID" ] || return 0
    local hwm
    hwm=$(awk '/VmHWM/ {print $2}' "/proc/$SIDECAR_PID/status")
    [ "${PEAK_RSS[$1]:-0}" -ge "$hwm" ] || PEAK_RSS[$1]=$hwm
    kill "$SIDECAR_PID"; wait "$SIDECAR_PID" 2>/dev/null || true
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
    local mode=$1 uid=1000 out
    [ "$mode" = direct ] && uid=1337
    out=$(client $uid wrk -t1 -c"$CONNS" -d"${DUR}s" --latency http://10.200.0.1/small)
    best "$mode.small" "$(awk '/Requests\/sec/ {print $2}' <<<"$out")" higher
    best "$mode.p50" "$(awk '$1=="50%" {print $2}' <<<"$out" | to_ms)" lower
    best "$mode.p99" "$(awk '$1=="99%" {print $2}' <<<"$out" | to_ms)" lower
    out=$(client $uid wrk -t1 -c"$CONNS" -d"${DUR}s" -H 'Connection: close' http://10.200.0.1/small)
    best "$mode.close" "$(awk '/Requests\/sec/ {print $2}' <<<"$out")" higher
    out=$(client $uid wrk -t1 -c8 -d"${DUR}s" http://10.200.0.1/1m)
    best "$mode.big" "$(awk '/Requests\/sec/ {print $2}' <<<"$out")" higher
    out=$(client $uid iperf3 -c 10.200.0.1 -p 5201 -t "$DUR" -J)
    best "$mode.stream" "$(/usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)' <<<"$out")" higher
}

read -r -a MODES <<<"${MODES:-direct haproxy shunt}"
for round in $(seq "$ROUNDS"); do
    # Alternate the order so no mode always runs first or last.
    order=("${MODES[@]}")
    if [ $((round % 2)) = 0 ]; then for ((i = ${#MODES[@]} - 1; i >= 0; i--)); do order[${#MODES[@]} - 1 - i]=${MODES[i]}; done; fi
    for mode in "${order[@]}"; do
        echo "round $round: $mode" >&2
        start_sidecar "$mode"
        measure "$mode"
        stop_sidecar "$mode"
    done
done

# --- report -----------------------------------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b>0) printf "%.2fx", a/b; else print "-" }'; }
row() { # label key unit
    local d=${R[direct.$2]:-0} h=${R[haproxy.$2]:-0} s=${R[shunt.$2]:-0}
    printf "| %-30s | %10.2f | %10.2f (%s) | %10.2f (%s) |\n" "$1" "$d" "$h" "$(ratio "$h" "$d")" "$s" "$(ratio "$s" "$d")"
}
mib() { awk -v k="$1" 'BEGIN{printf "%.1f", k/1024}'; }
echo
echo "shunt proxy benchmark: $(date -u +%FT%TZ), $(uname -r), ${ROUNDS} rounds x ${DUR}s, best of rounds, wrk -c$CONNS, shunt args: ${SHUNT_ARGS:-none}"
echo
echo "| figure                         |     direct |    HAProxy (ratio) |      shunt (ratio) |"
echo "|--------------------------------|-----------:|-------------------:|-------------------:|"
row "small keep-alive, req/s" small
row "small keep-alive, p50 ms" p50
row "small keep-alive, p99 ms" p99
row "new connection per req, conn/s" close
row "1 MiB responses, MiB/s" big
row "iperf3 one stream, Gbit/s" stream
printf "| %-30s | %10s | %18s | %18s |\n" "RSS idle / peak, MiB" "-" \
    "$(mib "${IDLE_RSS[haproxy]:-0}") / $(mib "${PEAK_RSS[haproxy]:-0}")" \
    "$(mib "${IDLE_RSS[shunt]:-0}") / $(mib "${PEAK_RSS[shunt]:-0}")"
