#!/usr/bin/env bash
# Benchmark: `shunt apply` versus a bare iptables-restore + ip6tables-restore of the same rules,
# each into a fresh network namespace made before the timing (SPEC §9: at most 1.25x).
# Interleaved runs, medians.
# Also: 1,000 excluded CIDRs, and the number of processes each apply starts (strace); the
# nftables engine against a bare `nft -f` of the same script (1,000 and 10,000 CIDRs); and the
# new-connection rate through 10,000 excluded CIDRs, iptables-nft rules against nftables sets.
# Usage: scripts/bench-apply.sh [RUNS]   (default 15; needs root; builds release)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-15}
[[ $(id -u) == 0 ]] || { echo "bench-apply: needs root (network namespaces)" >&2; exit 1; }
need=()
command -v iptables-nft-restore >/dev/null || need+=(iptables)
command -v ip >/dev/null || need+=(iproute2)
command -v strace >/dev/null || need+=(strace)
if ((${#need[@]})); then apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null; fi
SHUNT=$(scripts/build-release.sh)
work=$(mktemp -d)
ns=shunt-bench-$$
cleanup() {
  ip netns del "$ns" 2>/dev/null || true
  drop_pool
  rm -rf "$work"
}
trap cleanup EXIT

now() { date +%s%N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# Splits `shunt render` output into the IPv4 and IPv6 restore inputs.
split_rules() { # $1 = extra shunt flags
  # shellcheck disable=SC2086
  "$SHUNT" render --ipv6 on $1 > "$work/all"
  awk '/^# IPv6 rules/{v6=1} !/^#/{print > (v6 ? "'"$work"'/v6" : "'"$work"'/v4")}' "$work/all"
}

fresh_ns() { ip netns del "$ns" 2>/dev/null || true; ip netns add "$ns"; ip -n "$ns" link set lo up; }

# Every timed run gets a namespace of its own, made before the timing starts and deleted after
# it ends: a deleted namespace is torn down by a kernel worker after `ip netns del` returns,
# and on 2 cores that teardown, landing in whichever run came next, moved a ratio by 0.25.
pool() { # $1 = how many
  local i
  for ((i = 0; i < $1; i++)); do
    ip netns add "$ns-p$i"
    ip -n "$ns-p$i" link set lo up
  done
  quiet
}

# Waits (at most 20 s) until the CPUs were at least 90% idle over half a second: the kernel's
# teardown of the last pool's namespaces runs in the background for seconds, and on 2 cores
# it moved the 10,000-CIDR ratio from 1.13x to 1.36x between two runs of the same section.
quiet() {
  local end=$((SECONDS + 20)) a b
  while ((SECONDS < end)); do
    a=($(head -1 /proc/stat)); sleep 0.5; b=($(head -1 /proc/stat))
    # user nice system idle iowait irq softirq (steal is the host's, not ours)
    local busy=$(( (b[1]+b[2]+b[3]+b[6]+b[7]) - (a[1]+a[2]+a[3]+a[6]+a[7]) ))
    local idle=$(( (b[4]+b[5]) - (a[4]+a[5]) ))
    (( busy * 10 <= busy + idle )) && return
  done
  echo "bench-apply: the machine did not go quiet within 20 s; timing anyway" >&2
}
drop_pool() {
  local n
  for n in $(ip netns list 2>/dev/null | awk -v p="$ns-p" 'index($1, p) == 1 {print $1}'); do
    ip netns del "$n"
  done
}

# Times RUNS pairs, each run in a namespace of the pool: `$1 NAMESPACE` (the bare restore)
# against `shunt apply --netns ... --ipv6 on $2`. Sets b and o, the medians (ns).
paired() {
  local bare=() ours=() i t0
  pool $((2 * RUNS))
  for ((i = 0; i < RUNS; i++)); do
    t0=$(now)
    "$1" "$ns-p$((2 * i))"
    bare+=($(( $(now) - t0 )))
    t0=$(now)
    # shellcheck disable=SC2086
    "$SHUNT" -q apply --netns "/run/netns/$ns-p$((2 * i + 1))" --ipv6 on $2
    ours+=($(( $(now) - t0 )))
  done
  drop_pool
  b=$(printf '%s\n' "${bare[@]}" | median)
  o=$(printf '%s\n' "${ours[@]}" | median)
}

bare_restore() {
  ip netns exec "$1" iptables-nft-restore --noflush -w 10 < "$work/v4"
  ip netns exec "$1" ip6tables-nft-restore --noflush -w 10 < "$work/v6"
}
bare_nft() { ip netns exec "$1" nft -f "$work/nft"; }

bench() { # $1 = label, $2 = extra shunt flags (also given to render), $3 = apply-only flags
  split_rules "$2"
  paired bare_restore "$2 ${3:---backend nft}"
  # shellcheck disable=SC2086
  procs=$(count_procs $2 ${3:---backend nft})
  rules=$(grep -c '^-A' "$work/all")
  printf '%-28s %6d rules  bare %7.2f ms  shunt %7.2f ms  ratio %.2fx  processes started by shunt: %d\n' \
    "$1" "$rules" "$(echo "$b/1000000" | bc -l)" "$(echo "$o/1000000" | bc -l)" "$(echo "$o/$b" | bc -l)" "$procs"
}

# The processes one `shunt apply --ipv6 on "$@"` into a fresh namespace starts (strace), shunt
# itself not counted. An exec on one thread while another runs is logged in two lines
# (unfinished, resumed).
count_procs() {
  fresh_ns
  strace -f -qq -e trace=execve -o "$work/strace" "$SHUNT" -q apply --netns "/run/netns/$ns" --ipv6 on "$@"
  echo $(($(grep -cE '(execve\(|<\.\.\. execve resumed>).* = 0$' "$work/strace") - 1))
}

command -v bc >/dev/null || { apt-get install -y -qq bc >/dev/null; }
cidrs=$(for i in $(seq 0 999); do printf '10.%d.%d.0/24,' $((i / 256 + 100)) $((i % 256)); done)
echo "shunt apply vs bare restore, nft backend, fresh namespace each run, median of $RUNS"
bench "default plan (v4+v6)" ""
bench "default plan, --backend auto" "" "--backend auto"
bench "1,000 excluded CIDRs" "--exclude-outbound-cidrs ${cidrs%,}"

# The nftables engine: `shunt apply --backend nftables` against a bare `nft -f` of the script
# `shunt render --backend nftables` prints (the same transaction).
bench_nft() { # $1 = label, $2 = extra shunt flags
  # shellcheck disable=SC2086
  "$SHUNT" render --backend nftables --ipv6 on $2 > "$work/nft"
  paired bare_nft "--backend nftables $2"
  # shellcheck disable=SC2086
  procs=$(count_procs --backend nftables $2)
  printf '%-28s nftables  bare nft -f %7.2f ms  shunt %7.2f ms  ratio %.2fx  processes started by shunt: %d\n' \
    "$1" "$(echo "$b/1000000" | bc -l)" "$(echo "$o/1000000" | bc -l)" "$(echo "$o/$b" | bc -l)" "$procs"
}
# 10,000 CIDRs do not fit in one argument (128 KiB): they go in a config file.
many=$(for i in $(seq 0 9999); do printf '10.%d.%d.0/24,' $((i / 250 + 100)) $((i % 250)); done)
printf 'exclude_outbound_cidrs = "%s"\n' "${many%,}" > "$work/many.toml"
echo "shunt apply vs bare nft -f, nftables engine, fresh namespace each run, median of $RUNS"
bench_nft "default plan (v4+v6)" ""
bench_nft "1,000 excluded CIDRs" "--exclude-outbound-cidrs ${cidrs%,}"
bench_nft "10,000 excluded CIDRs" "--config $work/many.toml"

# New connections per second through 10,000 excluded CIDRs: the app dials a remote address
# that is in none of them, so every SYN walks the whole list (iptables-nft: 10,000 rules;
# nftables: one set lookup) before the redirect to 15001, where a listener accepts.
conn_rate() { # $1 = engine
  local remote=shunt-bench-r-$$
  fresh_ns
  ip netns del "$remote" 2>/dev/null || true
  ip netns add "$remote"
  ip -n "$ns" link add eth0 type veth peer name eth0 netns "$remote"
  ip -n "$ns" addr add 10.77.0.2/24 dev eth0; ip -n "$ns" link set eth0 up
  ip -n "$remote" addr add 10.77.0.1/24 dev eth0; ip -n "$remote" link set eth0 up
  "$SHUNT" -q apply --netns "/run/netns/$ns" --ipv6 off --backend "$1" --config "$work/many.toml"
  ip netns exec "$ns" setpriv --reuid 1000 --regid 1000 --clear-groups /usr/bin/python3 - <<'PY'
import socket, threading, time
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", 15001)); l.listen(4096)
def serve():
    while True:
        c, _ = l.accept(); c.close()
threading.Thread(target=serve, daemon=True).start()
n, end = 0, time.time() + 3
while time.time() < end:
    s = socket.create_connection(("10.77.0.1", 8080), timeout=2)
    s.close(); n += 1
print(n // 3)
PY
  ip netns del "$remote"
}
ipt=$(conn_rate nft); nftr=$(conn_rate nftables)
printf 'new connections per second through 10,000 excluded CIDRs: iptables-nft %d, nftables %d (%.1fx)\n' \
  "$ipt" "$nftr" "$(echo "$nftr/$ipt" | bc -l)"

# render: process start to exit, against /bin/true started the same way (SPEC §9: a few ms).
loop() { local t0; t0=$(now); for ((i = 0; i < 200; i++)); do "$@" >/dev/null; done; echo $(( ($(now) - t0) / 200 )); }
r=$(loop "$SHUNT" render); t=$(loop /bin/true)
printf 'shunt render (default plan)   %.2f ms per process (start to exit); /bin/true %.2f ms\n' \
  "$(echo "$r/1000000" | bc -l)" "$(echo "$t/1000000" | bc -l)"
