#!/usr/bin/env bash
# What the gateway's functions cost Redis, against the least a publish or a resume read can do,
# side by side in one run on one redis-server: `redis-benchmark` drives, one after the other in
# alternating rounds,
#   - `FCALL ssegw_publish` of this build's library (and of a second build's, when BEFORE names
#     its binary: loaded beside it under other names),
#   - a minimal function doing only `XADD key MAXLEN ~ 1000 * d <data>` and `PUBLISH`,
#   - a raw `XADD`,
# and then a resume page: `FCALL ssegw_read` of 10 events after the 500th of 1,000, against a
# plain `XRANGE` of the same page. Nothing subscribes.
#
#   loadtest/scripts/publish-function-bench.sh
#
# Env: GATEWAY (default target/release/sse-gateway), BEFORE (another sse-gateway binary, to
# compare with), N (requests per run, default 300000), CLIENTS (default 50), PIPELINE (default
# 16), ROUNDS (default 3), PORT (default 17300), SERVER (default redis-server).
set -euo pipefail

GATEWAY=${GATEWAY:-target/release/sse-gateway}
BEFORE=${BEFORE:-}
N=${N:-300000}
CLIENTS=${CLIENTS:-50}
PIPELINE=${PIPELINE:-16}
ROUNDS=${ROUNDS:-3}
PORT=${PORT:-17300}
SERVER=${SERVER:-redis-server}
DIR=$(mktemp -d /tmp/ssegw-function-bench.XXXXXX)
PID=
cleanup() {
    [ -z "$PID" ] || kill -9 "$PID" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT

"$SERVER" --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" \
    --logfile "$DIR/redis.log" &
PID=$!
for _ in $(seq 100); do redis-cli -p "$PORT" PING >/dev/null 2>&1 && break; sleep 0.05; done
cli() { redis-cli -p "$PORT" "$@"; }

"$GATEWAY" script | cli -x FUNCTION LOAD REPLACE >/dev/null
cli -x FUNCTION LOAD REPLACE >/dev/null <<'LUA'
#!lua name=ssegw_minimal
redis.register_function('minimal_publish', function(keys, args)
  local id = redis.call('XADD', keys[1], 'MAXLEN', '~', 1000, '*', 'd', args[1])
  redis.call('PUBLISH', 'ssegw:c:' .. keys[1], 'i' .. id .. '\n\n' .. args[1])
  return id
end)
LUA
if [ -n "$BEFORE" ]; then
    "$BEFORE" script | sed -e 's/^#!lua name=ssegw$/#!lua name=ssegw_before/' \
        -e "s/'ssegw_\([a-z]*\)'/'before_\1'/g" | cli -x FUNCTION LOAD REPLACE >/dev/null
fi

DATA=$(printf 'x%.0s' $(seq 30))
bench() { # label command...: one line, "label  rate/s"
    local label=$1
    shift
    local rate
    rate=$(redis-benchmark -p "$PORT" -n "$N" -c "$CLIENTS" -P "$PIPELINE" --csv "$@" |
        awk -F'","' 'NR == 2 {print $2}')
    printf '%-44s %12.0f /s\n' "$label" "$rate"
}

echo "# publish: $N calls, $CLIENTS connections, pipeline $PIPELINE, 30-byte data, $("$SERVER" --version | cut -d' ' -f1-3)"
for round in $(seq "$ROUNDS"); do
    echo "## round $round"
    cli DEL 'ssegw:s:{bench}' 'ssegw:s:{before}' 'ssegw:s:{minimal}' 'ssegw:s:{raw}' >/dev/null
    [ -z "$BEFORE" ] || bench "FCALL ssegw_publish (before)" FCALL before_publish 1 'ssegw:s:{before}' "$DATA"
    bench "FCALL ssegw_publish" FCALL ssegw_publish 1 'ssegw:s:{bench}' "$DATA"
    bench "minimal function: XADD MAXLEN ~ + PUBLISH" FCALL minimal_publish 1 'ssegw:s:{minimal}' "$DATA"
    bench "raw XADD MAXLEN ~" XADD 'ssegw:s:{raw}' MAXLEN '~' 1000 '*' d "$DATA"
done

echo "# resume read: 10 events after the 500th of a 1,000-event stream"
cli DEL 'ssegw:s:{read}' >/dev/null
for i in $(seq 1000); do echo "FCALL ssegw_publish 1 ssegw:s:{read} payload-$i"; done | cli >"$DIR/ids"
ID=$(sed -n 500p "$DIR/ids")
for round in $(seq "$ROUNDS"); do
    echo "## round $round"
    [ -z "$BEFORE" ] || bench "FCALL ssegw_read (before)" FCALL before_read 1 'ssegw:s:{read}' "$ID" 10
    bench "FCALL ssegw_read" FCALL ssegw_read 1 'ssegw:s:{read}' "$ID" 10
    bench "XRANGE (id + COUNT 10" XRANGE 'ssegw:s:{read}' "($ID" + COUNT 10
done
