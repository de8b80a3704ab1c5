#!/usr/bin/env bash
# Redis memory per idle topic: what a topic's history costs Redis once its events are published
# and nothing else happens. One redis-server, the gateway's function library loaded, and for
# each case an emptied Redis (FLUSHALL; the library stays) into which N topics get the same
# number of events through `FCALL ssegw_publish 1 ssegw:s:{topic-NNNNNN} <data>` (RESP piped
# with `redis-cli --pipe`). For each case: `INFO memory` used_memory before and after (the
# difference over N is the cost of one topic, its share of the key space's hash tables
# included), `MEMORY USAGE` of one topic's stream (the key alone) and its XLEN.
#
# Cases: 64-byte events, 1, 10, 50, 100 and max-len + slack - 1 (the most a stream ever holds)
# events per topic with the library seeded at --history-max-len 100 (slack 12: 111 events),
# a stream that trimming has run on (400 publishes), 1 KiB events (1 and 100 per topic), an
# idempotency record (argument 4 of the publish, window 300 s), and the default max-len 1000
# (1,124 events) on fewer topics. Then the ttl: with the library seeded at --history-ttl 2s,
# 10 events per topic (the last with an idempotency key of window 2 s), and DBSIZE polled
# until every key has expired; used_memory must return to the empty Redis's.
# Prints markdown tables and the per-topic and per-event costs derived from them.
#
#   loadtest/scripts/redis-topic-memory.sh
#   SERVER=~/.cache/ssegw-valkey/bin/valkey-server loadtest/scripts/redis-topic-memory.sh
#
# Env: GATEWAY (sse-gateway binary, default target/release/sse-gateway), PORT (default 17600),
# TOPICS (default 10000), MID_TOPICS (for 50 to 111 events; default TOPICS/4), SMALL_TOPICS
# (for the big cases: 1 KiB x 100, trimmed streams; default TOPICS/10), DEFAULT_TOPICS (for
# max-len 1000; default TOPICS/20), SERVER (default redis-server; valkey-server works too), TTL
# (seconds, default 2). About 1.5 million publishes at the defaults: a minute or two.
set -euo pipefail
export LC_ALL=C

GATEWAY=${GATEWAY:-target/release/sse-gateway}
PORT=${PORT:-17600}
TOPICS=${TOPICS:-10000}
MID_TOPICS=${MID_TOPICS:-$((TOPICS / 4))}
SMALL_TOPICS=${SMALL_TOPICS:-$((TOPICS / 10))}
DEFAULT_TOPICS=${DEFAULT_TOPICS:-$((TOPICS / 20))}
SERVER=${SERVER:-redis-server}
TTL=${TTL:-2}
DIR=$(mktemp -d /tmp/ssegw-topic-memory.XXXXXX)
PID=
cleanup() {
    [ -z "$PID" ] || kill -9 "$PID" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT

"$SERVER" --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" \
    --logfile "$DIR/redis.log" &
PID=$!
disown
for _ in $(seq 100); do redis-cli -p "$PORT" PING >/dev/null 2>&1 && break; sleep 0.05; done
cli() { redis-cli -p "$PORT" "$@"; }
info() { # section field
    cli INFO "$1" | tr -d '\r' | awk -F: -v f="$2" '$1 == f {print $2}'
}
used() { info memory used_memory; }
load() { # script flags...
    "$GATEWAY" script "$@" | cli -x FUNCTION LOAD REPLACE >/dev/null
}
key() { printf 'ssegw:s:{topic-%06d}' "$1"; }
IDEM_KEY_FMT='%08x-0000-4000-8000-%012x' # a UUID's shape: 36 bytes

# RESP for EVENTS publishes to each of TOPICS topics, round-robin (event j of every topic, then
# event j + 1); with IDEM_EVERY=k every k-th event carries an idempotency key (window WINDOW).
gen() { # topics events payload_bytes idem_every window
    awk -v n="$1" -v e="$2" -v size="$3" -v every="$4" -v window="$5" -v fmt="$IDEM_KEY_FMT" '
    function bulk(s) { return "$" length(s) "\r\n" s "\r\n" }
    BEGIN {
        data = sprintf("%" size "s", ""); gsub(/ /, "x", data)
        for (j = 1; j <= e; j++) for (i = 0; i < n; i++) {
            key = sprintf("ssegw:s:{topic-%06d}", i)
            if (every > 0 && j % every == 0) {
                # data, event "", traceparent "", idempotency key, window
                printf "%s", "*9\r\n" bulk("FCALL") bulk("ssegw_publish") bulk("1") bulk(key) \
                    bulk(data) bulk("") bulk("") bulk(sprintf(fmt, i, j)) bulk(window)
            } else {
                printf "%s", "*5\r\n" bulk("FCALL") bulk("ssegw_publish") bulk("1") bulk(key) \
                    bulk(data)
            }
        }
    }'
}

publish() { # topics events payload_bytes [idem_every [window]]
    gen "$1" "$2" "$3" "${4:-0}" "${5:-300}" >"$DIR/cmds"
    local out
    out=$(redis-cli -p "$PORT" --pipe <"$DIR/cmds" 2>&1)
    rm -f "$DIR/cmds"
    if ! grep -q 'errors: 0, replies: '"$(($1 * $2))"'$' <<<"$out"; then
        echo "publishing failed: $out" >&2
        cli FCALL ssegw_publish 1 "$(key 0)" probe >&2 || true
        exit 1
    fi
}

declare -A PER_TOPIC KEPT
row() { # label topics events payload idem_every
    local label=$1 n=$2 events=$3 size=$4 every=${5:-0}
    cli FLUSHALL SYNC >/dev/null
    local before after usage kept nodes idem_usage="" t0 t1
    before=$(used)
    t0=$(date +%s.%N)
    publish "$n" "$events" "$size" "$every"
    t1=$(date +%s.%N)
    after=$(used)
    usage=$(cli MEMORY USAGE "$(key 0)" SAMPLES 0)
    kept=$(cli XLEN "$(key 0)")
    nodes=$(cli XINFO STREAM "$(key 0)" | awk 'prev == "radix-tree-keys" {print; exit} {prev = $0}')
    if [ "$every" -gt 0 ]; then
        # shellcheck disable=SC2059
        idem_usage=$(cli MEMORY USAGE "ssegw:i:{topic-000000}:$(printf "$IDEM_KEY_FMT" 0 "$every")" SAMPLES 0)
    fi
    local per=$(((after - before) / n))
    PER_TOPIC[$label]=$per
    KEPT[$label]=$kept
    printf '| %s | %d | %d | %d | %d | %s | %d | %d | **%d** | %s%s | %.1f |\n' "$label" "$n" \
        "$events" "$kept" "$nodes" "$size" "$before" "$after" "$per" "$usage" \
        "${idem_usage:+ (record: $idem_usage)}" "$(echo "$t1 - $t0" | bc)"
}

header() {
    echo "| case | topics | published per topic | kept (XLEN) | listpack nodes | data bytes | used_memory before | after | **bytes per topic** | MEMORY USAGE of one stream | publish time s |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
}

echo "# Redis memory per idle topic"
echo
echo "$("$SERVER" --version | cut -d' ' -f1-3), $(cli CONFIG GET stream-node-max-bytes | paste -sd' '), $(cli CONFIG GET stream-node-max-entries | paste -sd' '); topic names topic-NNNNNN (stream key ssegw:s:{topic-NNNNNN}, 22 bytes); idempotency keys 36 bytes"
echo
echo "## Library seeded with --history-max-len 100 (slack 12: a stream holds at most 111 events)"
echo
load --history-max-len 100
# Redis allocates some things once, on first use (each command's latency histogram, say):
# every path of the publish runs once before anything is measured.
publish 3 130 64 1
for c in "XINFO STREAM $(key 0)" "XLEN $(key 0)" "MEMORY USAGE $(key 0) SAMPLES 0" "PTTL $(key 0)" \
    DBSIZE "INFO stats" "INFO memory" "FLUSHALL SYNC"; do
    # shellcheck disable=SC2086
    cli $c >/dev/null
done
header
row "64 B x 1" "$TOPICS" 1 64
row "64 B x 10" "$TOPICS" 10 64
row "64 B x 50" "$MID_TOPICS" 50 64
row "64 B x 100" "$MID_TOPICS" 100 64
row "64 B x 111 (max-len + slack - 1)" "$MID_TOPICS" 111 64
row "64 B x 400 (trimmed, steady state)" "$SMALL_TOPICS" 400 64
row "1 KiB x 1" "$TOPICS" 1 1024
row "1 KiB x 100" "$SMALL_TOPICS" 100 1024
row "64 B x 1 + idempotency record" "$TOPICS" 1 64 1
echo
echo "## Library seeded with the default --history-max-len 1000 (slack 125: at most 1,124 events)"
echo
load
header
row "64 B x 1 (max-len 1000)" "$DEFAULT_TOPICS" 1 64
row "64 B x 1124 (max-len 1000 + slack - 1)" "$DEFAULT_TOPICS" 1124 64
echo

# Derived costs. A stream's newest listpack node is allocated at 4 KiB from its first event
# (Redis 7 preallocates it), so a short stream costs the same whatever it holds: the marginal
# cost of an event shows only over several nodes (the 1,124-event row for 64 B data).
one=${PER_TOPIC["64 B x 1"]}
e64=$(( (PER_TOPIC["64 B x 1124 (max-len 1000 + slack - 1)"] - PER_TOPIC["64 B x 1 (max-len 1000)"]) / 1123 ))
e64short=$(( (PER_TOPIC["64 B x 100"] - PER_TOPIC["64 B x 1"]) / 99 ))
e1k=$(( (PER_TOPIC["1 KiB x 100"] - PER_TOPIC["1 KiB x 1"]) / 99 ))
idem=$(( PER_TOPIC["64 B x 1 + idempotency record"] - PER_TOPIC["64 B x 1"] ))
echo "## Derived"
echo
echo "| figure | bytes |"
echo "|---|---:|"
echo "| a topic holding 1 event of 64 B (B1) | $one |"
echo "| ... of which outside its first, preallocated 4,096-byte node | $((one - 4096)) |"
echo "| a topic holding 10 / 50 events of 64 B | ${PER_TOPIC["64 B x 10"]} / ${PER_TOPIC["64 B x 50"]} |"
echo "| per event kept, 64 B data, over 1 to 1,124 events (e) | $e64 (data + $((e64 - 64))) |"
echo "| per event kept, 64 B data, over 1 to 100 events only (1 node to 2) | $e64short |"
echo "| per event kept, 1 KiB data, over 1 to 100 events | $e1k (data + $((e1k - 1024))) |"
echo "| idempotency record (36-byte key, with its expiry) | $idem |"
echo
echo "Redis memory ~ topics x (B1 + (events kept - 1) x (data bytes + $((e64 - 64))))"
echo "  + idempotency records x $idem, with B1 = $one and events kept = min(published, max-len + slack - 1)"
echo "  for topics published to within the ttl; a topic costs B1 whatever it holds until its first"
echo "  node fills (4 KiB of entries: about 50 events of 64 B), the formula overestimates between."
echo

# The ttl: streams and idempotency records expire, used_memory returns to the empty Redis's.
echo "## ttl: library seeded with --history-max-len 100 --history-ttl ${TTL}s; $TOPICS topics x 10 events of 64 B, the 10th with an idempotency key of window ${TTL} s"
echo
load --history-max-len 100 --history-ttl "${TTL}s"
cli FLUSHALL SYNC >/dev/null
sleep 0.5
empty=$(used)
publish "$TOPICS" 10 64 10 "$TTL"
done_at=$(date +%s.%N)
full=$(used)
keys=$(cli DBSIZE)
pttl=$(cli PTTL "$(key 0)")
gone=
while :; do
    left=$(cli DBSIZE)
    now=$(date +%s.%N)
    if [ "$left" -eq 0 ]; then gone=$(echo "$now - $done_at" | bc); break; fi
    if [ "$(echo "$now - $done_at > $TTL + 30" | bc)" -eq 1 ]; then gone="not within $((TTL + 30)) s ($left keys left)"; break; fi
    sleep 0.1
done
at_zero=$(used)
sleep 1
later=$(used)
sleep 2
later3=$(used)
echo "| | value |"
echo "|---|---:|"
echo "| used_memory, empty | $empty |"
echo "| used_memory after publishing ($keys keys; PTTL of one stream then: $pttl ms) | $full |"
echo "| seconds from the last publish until DBSIZE = 0 | $gone |"
echo "| used_memory when DBSIZE reached 0 | $at_zero ($((at_zero - empty)) over empty) |"
echo "| used_memory 1 s later | $later ($((later - empty)) over empty) |"
echo "| used_memory 3 s later | $later3 ($((later3 - empty)) over empty) |"
echo "| expired_keys (INFO stats) | $(info stats expired_keys) |"
