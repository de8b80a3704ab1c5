#!/bin/bash
# Redis's side of the Mercure hub against the native publish, in one run: FCALL rates and
# resume lookups (redis-benchmark), and memory per retained update. Figures: BENCHMARKS.md.
# Usage: loadtest/scripts/mercure-redis.sh [sse-gateway binary]; starts its own redis-server on port 17711.
gw=${1:-target/release/sse-gateway}
port=17711
redis-server --port $port --save "" --daemonize yes --logfile /tmp/mredis.log >/dev/null
sleep 0.5
cli() { redis-cli -p $port "$@"; }
$gw script | cli -x FUNCTION LOAD REPLACE >/dev/null
# the log keeps 100,000 updates, the native topic 100,000 events
$gw namespace set ssegw.mercure --max-len 100000 --redis-url redis://127.0.0.1:$port >/dev/null
$gw namespace set bench --max-len 100000 --redis-url redis://127.0.0.1:$port >/dev/null
L='ssegw:s:{ssegw.mercure}'; I0='ssegw:m:{ssegw.mercure}:ids:0'; I1='ssegw:m:{ssegw.mercure}:ids:1'; G='ssegw:m:{ssegw.mercure}:gen'
data=$(printf 'x%.0s' $(seq 1 200))
# an encoded update: id, type, retry, private, 1 topic, data (the id inside is not the indexed one: Redis does not read it)
blob=$'m1\n'"44:urn:uuid:01938c4e-0000-7000-8000-0000000000000:0:1:01:127:https://example.com/books/1"${#data}":$data"
for round in 1 2; do
  echo "round $round"
  redis-benchmark -p $port -n 300000 -c 50 -P 16 -q FCALL ssegw_publish 1 'ssegw:s:{bench}' "$data" | tr '\r' '\n' | tail -1 | sed 's/.*: \([0-9.]* requests per second\)/\1/; s/^/  native ssegw_publish: /'
  redis-benchmark -p $port -n 300000 -c 50 -P 16 -r 100000000 -q FCALL ssegw_m_publish 4 "$L" "$I0" "$I1" "$G" 'urn:uuid:__rand_int__' "$blob" | tr '\r' '\n' | tail -1 | sed 's/.*: \([0-9.]* requests per second\)/\1/; s/^/  mercure ssegw_m_publish: /'
done
id=$(cli HRANDFIELD "$I0")
echo "resume lookup of a retained id ($id):"
redis-benchmark -p $port -n 300000 -c 50 -P 16 -q FCALL ssegw_m_find 4 "$L" "$I0" "$I1" "$G" "$id" | tr '\r' '\n' | tail -1 | sed 's/.*: \([0-9.]* requests per second\)/\1/; s/^/  ssegw_m_find: /'
redis-benchmark -p $port -n 300000 -c 50 -P 16 -q FCALL ssegw_m_find 4 "$L" "$I0" "$I1" "$G" nope | tr '\r' '\n' | tail -1 | sed 's/.*: \([0-9.]* requests per second\)/\1/; s/^/  ssegw_m_find (unknown id): /'
echo "memory with 100,000 retained (200-byte data):"
for k in "$L" "$I0" "$I1" 'ssegw:s:{bench}'; do echo "  $k: $(cli XLEN "$k" 2>/dev/null | grep -v WRONGTYPE) entries / $(cli HLEN "$k" 2>/dev/null | grep -v WRONGTYPE) fields, $(cli MEMORY USAGE "$k" SAMPLES 0) bytes"; done
cli shutdown nosave >/dev/null 2>&1
