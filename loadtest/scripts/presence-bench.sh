#!/usr/bin/env bash
# What presence costs Redis. One gateway replica holds CONNECTIONS event streams, one topic each
# (ssegw-loadtest --scenario many-topics --rate 0: nothing is published, unless RATE says so),
# once per
# --presence-interval given (0: presence off), one after the other in one run, each on a fresh
# redis-server. Once every stream is open, and SETTLE seconds more, Redis's command counts
# (INFO commandstats) and CPU (INFO cpu: used_cpu_sys + used_cpu_user) are read, and again
# WINDOW seconds later; with presence on, READS requests of `GET /presence` for 100 of the
# topics follow, counted the same way. Prints one table row per run and the command counts.
#
#   loadtest/scripts/presence-bench.sh [INTERVAL...]      (default: 2s 0 2s 0)
#
# Env: GATEWAY and LOADTEST (the binaries, default target/release/sse-gateway and
# target/release/ssegw-loadtest), CONNECTIONS (default 10000), WINDOW (seconds, default 60),
# SETTLE (seconds, default 5), READS (default 100), RATE (events/s over all topics, published
# with FCALL meanwhile; default 0), PORT (redis-server, default 17300),
# HTTP_PORT (the gateway, default 17380). Needs `ulimit -n` of at least CONNECTIONS + 1000 per
# process. Everything started is killed at the end, whatever happens.
set -euo pipefail

GATEWAY=${GATEWAY:-target/release/sse-gateway}
LOADTEST=${LOADTEST:-target/release/ssegw-loadtest}
CONNECTIONS=${CONNECTIONS:-10000}
WINDOW=${WINDOW:-60}
SETTLE=${SETTLE:-5}
READS=${READS:-100}
RATE=${RATE:-0}
PORT=${PORT:-17300}
HTTP_PORT=${HTTP_PORT:-17380}
INTERVALS=("$@")
[ ${#INTERVALS[@]} -gt 0 ] || INTERVALS=(2s 0 2s 0)
DIR=$(mktemp -d /tmp/ssegw-presence-bench.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    rm -rf "$DIR"
}
trap cleanup EXIT

# INFO commandstats and cpu as "name calls usec" lines, with "cpu <seconds>" and
# "memory <used_memory>" lines.
snapshot() {
    redis-cli -p "$PORT" INFO ALL | tr -d '\r' | awk -F'[:,=]' '
        /^used_cpu_sys:/ {cpu += $2} /^used_cpu_user:/ {cpu += $2}
        /^used_memory:/ {print "memory", $2}
        /^cmdstat_/ {sub("cmdstat_", "", $1); print $1, $3, $5}
        END {printf "cpu %.6f\n", cpu}'
}

# The per-command differences between two snapshots: "name calls usec".
delta() {
    awk 'NR == FNR {calls[$1] = $2; usec[$1] = $3; next}
         $1 != "cpu" && $1 != "memory" {
             d = $2 - calls[$1]; if (d > 0) printf "%s %d %d\n", $1, d, $3 - usec[$1]
         }' "$1" "$2" | sort
}

value() { awk -v k="$1" '$1 == k {print $2}' "$2"; }

n=0
echo "| --presence-interval | streams | events/s | keys | Redis CPU | commands/s | SET/s | used_memory |"
echo "|---|---|---|---|---|---|---|---|"
for interval in "${INTERVALS[@]}"; do
    run="$DIR/$interval-$RANDOM"
    mkdir -p "$run"
    redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$run" \
        --logfile "$run/redis.log" &
    redis=$!
    PIDS+=("$redis")
    for _ in $(seq 100); do redis-cli -p "$PORT" PING >/dev/null 2>&1 && break; sleep 0.05; done
    "$GATEWAY" --listen "127.0.0.1:$HTTP_PORT" --redis-url "redis://127.0.0.1:$PORT" \
        --anonymous-subscribe '*' --workers 1 --max-connections $((CONNECTIONS + 1000)) \
        --presence-interval "$interval" > "$run/gateway.log" 2>&1 &
    gateway=$!
    PIDS+=("$gateway")
    until curl -sf "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null; do sleep 0.1; done
    "$LOADTEST" --url "http://127.0.0.1:$HTTP_PORT" --redis-url "redis://127.0.0.1:$PORT" \
        --scenario many-topics -c "$CONNECTIONS" --rate "$RATE" \
        --duration "$((WINDOW + SETTLE + 60))s" --watch-pid "$gateway" \
        > "$run/loadtest.out" 2>&1 &
    loadtest=$!
    PIDS+=("$loadtest")
    until [ "$(curl -sf "http://127.0.0.1:$HTTP_PORT/status" | sed -n 's/.*"connections":\([0-9]*\).*/\1/p')" \
            = "$CONNECTIONS" ]; do
        sleep 0.5
    done
    sleep "$SETTLE"
    snapshot > "$run/before"
    sleep "$WINDOW"
    snapshot > "$run/after"
    delta "$run/before" "$run/after" > "$run/window"
    keys=$(redis-cli -p "$PORT" DBSIZE)
    cpu=$(echo "($(value cpu "$run/after") - $(value cpu "$run/before")) / $WINDOW * 100" | bc -l)
    commands=$(awk -v w="$WINDOW" '{n += $2} END {printf "%.0f", n / w}' "$run/window")
    sets=$(awk -v w="$WINDOW" '$1 == "set" {printf "%.0f", $2 / w}' "$run/window")
    memory=$(value memory "$run/after")
    printf "| %s | %d | %s | %d | %.2f %% of a core | %s | %s | %.1f MB |\n" "$interval" \
        "$CONNECTIONS" "$RATE" "$keys" "$cpu" "$commands" "${sets:-0}" \
        "$(echo "$memory / 1000000" | bc -l)"
    {
        echo "--presence-interval $interval, $RATE events/s, ${WINDOW} s: command calls usec"
        cat "$run/window"
    } > "$run/report"
    if [ "$interval" != 0 ]; then
        redis-cli -p "$PORT" --scan --pattern 'ssegw:p:{*' > "$run/keys"
        query=$(head -100 "$run/keys" | sed 's/^ssegw:p:{\(.*\)}:.*$/topic=\1/' | paste -sd '&')
        snapshot > "$run/before-reads"
        start=$(date +%s.%N)
        for _ in $(seq "$READS"); do
            curl -sf "http://127.0.0.1:$HTTP_PORT/presence?$query" > "$run/presence.json"
        done
        end=$(date +%s.%N)
        snapshot > "$run/after-reads"
        {
            echo "$READS reads of GET /presence, 100 topics each, in $(echo "$end - $start" | bc -l) s (gateway and curl included): command calls usec"
            delta "$run/before-reads" "$run/after-reads"
            echo "one answer: $(head -c 300 "$run/presence.json")..."
        } >> "$run/report"
    fi
    kill "$loadtest" "$gateway" 2>/dev/null || true
    wait "$loadtest" "$gateway" 2>/dev/null || true
    redis-cli -p "$PORT" SHUTDOWN NOSAVE >/dev/null 2>&1 || true
    wait "$redis" 2>/dev/null || true
    n=$((n + 1))
    cp "$run/report" "$DIR/report-$n"
done
echo
cat "$DIR"/report-*
