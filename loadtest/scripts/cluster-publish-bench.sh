#!/usr/bin/env bash
# Publish capacity of Redis with the gateway's function library, FCALL ssegw_publish, measured
# with redis-benchmark: one standalone redis-server (classic PUBLISH), then Redis Clusters of
# each size given (sharded library, SPUBLISH), one after the other in one run. For each node:
# the FCALLs it ran (INFO commandstats) and the CPU it used meanwhile (INFO cpu), so the report
# gives ops/s in total, per shard, and Redis CPU per event per shard. Nothing subscribes: this
# is the cost of storing and publishing an event, not of delivering it.
#
#   loadtest/scripts/cluster-publish-bench.sh [PRIMARIES...]      (default: 1 3)
#
# Env: GATEWAY (sse-gateway binary, default target/release/sse-gateway), N (requests per
# node, default 300000), CLIENTS (default 50), PIPELINE (default 16), BASE_PORT (default 17100).
# Servers run on BASE_PORT.. and are killed at the end, whatever happens.
set -euo pipefail

GATEWAY=${GATEWAY:-target/release/sse-gateway}
N=${N:-300000}
CLIENTS=${CLIENTS:-50}
PIPELINE=${PIPELINE:-16}
BASE_PORT=${BASE_PORT:-17100}
SIZES=("$@")
[ ${#SIZES[@]} -gt 0 ] || SIZES=(1 3)
DIR=$(mktemp -d /tmp/ssegw-cluster-bench.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    rm -rf "$DIR"
}
trap cleanup EXIT

start_node() { # port [cluster]
    local port=$1 extra=()
    if [ "${2:-}" = cluster ]; then
        extra=(--cluster-enabled yes --cluster-config-file "$DIR/nodes-$port.conf"
               --cluster-node-timeout 15000)
    fi
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$DIR" --logfile "$DIR/redis-$port.log" "${extra[@]}" &
    PIDS+=($!)
    disown
    for _ in $(seq 100); do redis-cli -p "$port" PING >/dev/null 2>&1 && return; sleep 0.05; done
    echo "redis-server on $port did not start" >&2; exit 1
}

stat() { # port -> "cpu_seconds fcall_calls fcall_failed_calls"
    redis-cli -p "$1" INFO ALL | tr -d '\r' | awk -F'[:,=]' '
        /^used_cpu_sys:/ {cpu += $2} /^used_cpu_user:/ {cpu += $2}
        /^cmdstat_fcall:/ {calls = $3; for (i = 4; i < NF; i++) if ($i == "failed_calls") failed = $(i + 1)}
        END {printf "%.6f %d %d\n", cpu, calls, failed}'
}

topic_on() { # port -> a topic whose slot the node at port owns
    local i=0
    while redis-cli -p "$1" EXISTS "ssegw:s:{t$i}" | grep -q MOVED; do i=$((i + 1)); done
    echo "t$i"
}

measure() { # label port...
    # One redis-benchmark per node, all at once, each publishing to one topic of that node's
    # slots with CLIENTS connections of PIPELINE commands: every shard is driven as the single
    # node is. (redis-benchmark --cluster would route by itself, but it puts a two-character
    # slot tag into "{tag}" as "{xy}}", an invalid topic, and refuses a cluster of one node.)
    local label=$1; shift
    local ports=("$@") before=() after=() bench=()
    for p in "${ports[@]}"; do before+=("$(stat "$p")"); done
    local start end
    start=$(date +%s.%N)
    for p in "${ports[@]}"; do
        redis-benchmark -p "$p" -n "$N" -c "$CLIENTS" -P "$PIPELINE" -q \
            FCALL ssegw_publish 1 "ssegw:s:{$(topic_on "$p")}" \
            payload-of-some-64-bytes-like-a-small-json-event-0123456789abcdef \
            > "$DIR/bench-$p.out" 2>&1 &
        bench+=($!)
    done
    wait "${bench[@]}"
    end=$(date +%s.%N)
    for p in "${ports[@]}"; do after+=("$(stat "$p")"); done
    local wall total_calls=0 total_failed=0
    wall=$(echo "$end - $start" | bc -l)
    echo "### $label (wall ${wall} s)"
    echo "| node | FCALLs | failed | redis-benchmark req/s | FCALL/s over the wall | CPU s | CPU % of a core | µs CPU per event |"
    echo "|---|---|---|---|---|---|---|---|"
    for i in "${!ports[@]}"; do
        read -r c0 n0 f0 <<<"${before[$i]}"; read -r c1 n1 f1 <<<"${after[$i]}"
        local calls=$((n1 - n0)) failed=$((f1 - f0)) cpu
        cpu=$(echo "$c1 - $c0" | bc -l)
        local rps
        rps=$(tr '\r' '\n' < "$DIR/bench-${ports[$i]}.out" | grep -o '[0-9.]* requests per second' | tail -1 | cut -d' ' -f1)
        total_calls=$((total_calls + calls)); total_failed=$((total_failed + failed))
        awk -v p="${ports[$i]}" -v n="$calls" -v f="$failed" -v c="$cpu" -v w="$wall" -v r="$rps" 'BEGIN {
            printf "| %s | %d | %d | %.0f | %.0f | %.2f | %.0f | %.2f |\n", p, n, f, r, n / w, c,
                   100 * c / w, (n > 0 ? c * 1e6 / n : 0) }'
    done
    awk -v n="$total_calls" -v f="$total_failed" -v w="$wall" -v s="${#ports[@]}" 'BEGIN {
        printf "total %d FCALLs (%d failed), %.0f/s, %.0f/s per shard\n\n", n, f, n / w, n / w / s }'
}

port=$BASE_PORT

# Standalone: the classic library (PUBLISH), as with --redis-url.
start_node "$port"
"$GATEWAY" script | redis-cli -p "$port" -x FUNCTION LOAD REPLACE >/dev/null
measure "standalone redis-server" "$port"
port=$((port + 1))

for primaries in "${SIZES[@]}"; do
    ports=()
    for _ in $(seq "$primaries"); do start_node "$port" cluster; ports+=("$port"); port=$((port + 1)); done
    addrs=(); for p in "${ports[@]}"; do addrs+=("127.0.0.1:$p"); done
    if [ "$primaries" -eq 1 ]; then
        redis-cli -p "${ports[0]}" CLUSTER ADDSLOTSRANGE 0 16383 >/dev/null
    else
        redis-cli --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
    fi
    for _ in $(seq 200); do
        ok=1
        for p in "${ports[@]}"; do
            redis-cli -p "$p" CLUSTER INFO | grep -q 'cluster_state:ok' || ok=0
        done
        [ $ok = 1 ] && break; sleep 0.1
    done
    # The sharded library (SPUBLISH), as the gateway loads it on every primary of a cluster.
    for p in "${ports[@]}"; do
        "$GATEWAY" script --sharded | redis-cli -p "$p" -x FUNCTION LOAD REPLACE >/dev/null
    done
    measure "cluster of $primaries primaries" "${ports[@]}"
done
