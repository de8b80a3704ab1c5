#!/bin/bash
# Redis's side of the Mercure hub's active subscriptions (--mercure-subscriptions), against a
# Mercure publish of the same update in one run: registering a subscription (FCALL
# ssegw_m_track add: the hash field and its update), a listing (FCALL ssegw_m_subscriptions)
# of 1,000 and 10,000 subscriptions, and memory per registered subscription. Figures:
# BENCHMARKS.md. Usage: loadtest/scripts/mercure-subscriptions-redis.sh [sse-gateway binary];
# starts its own redis-server on port 17712.
gw=${1:-target/release/sse-gateway}
port=17712
redis-server --port $port --save "" --daemonize yes --logfile /tmp/msredis.log >/dev/null
sleep 0.5
cli() { redis-cli -p $port "$@"; }
rate() { tr '\r' '\n' | tail -1 | sed 's/.*: \([0-9.]* requests per second\).*/\1/'; }
$gw script | cli -x FUNCTION LOAD REPLACE >/dev/null
$gw namespace set ssegw.mercure --max-len 100000 --redis-url redis://127.0.0.1:$port >/dev/null
L='ssegw:s:{ssegw.mercure}'; I0='ssegw:m:{ssegw.mercure}:ids:0'; I1='ssegw:m:{ssegw.mercure}:ids:1'; G='ssegw:m:{ssegw.mercure}:gen'
S='ssegw:m:{ssegw.mercure}:subs'; R="$S:r:bench"
# A subscription's document as a replica stores it, and its update as the gateway encodes it
# (a pretty-printed JSON-LD document of about 330 bytes).
doc='{"id":"/.well-known/mercure/subscriptions/https%3A%2F%2Fexample.com%2Fbooks%2F%7Bid%7D/urn%3Auuid%3Abb3de268-05b0-4c65-b44e-8f9acefc29d6","type":"Subscription","subscriber":"urn:uuid:bb3de268-05b0-4c65-b44e-8f9acefc29d6","topic":"https://example.com/books/{id}","active":true}'
data=$(printf 'x%.0s' $(seq 1 330))
topic='/.well-known/mercure/subscriptions/https%3A%2F%2Fexample.com%2Fbooks%2F%7Bid%7D/urn%3Auuid%3Abb3de268-05b0-4c65-b44e-8f9acefc29d6'
blob=$'m1\n'"45:urn:uuid:01938c4e-0000-7000-8000-000000000000:0:1:11:1${#topic}:$topic${#data}:$data"
for round in 1 2; do
  echo "round $round"
  echo "  ssegw_m_publish of the update alone: $(redis-benchmark -p $port -n 200000 -c 50 -P 16 -r 100000000 -q FCALL ssegw_m_publish 4 "$L" "$I0" "$I1" "$G" 'urn:uuid:__rand_int__' "$blob" | rate)"
  cli DEL "$R" >/dev/null
  echo "  ssegw_m_track add (new field + update): $(redis-benchmark -p $port -n 200000 -c 50 -P 16 -r 100000000 -q FCALL ssegw_m_track 6 "$L" "$I0" "$I1" "$G" "$S" "$R" add 'f__rand_int__' "$doc" 'urn:uuid:__rand_int__' "$blob" | rate)"
done
cli ZADD "$S" 99999999999999 bench >/dev/null
for n in 1000 10000; do
  cli DEL "$R" >/dev/null
  # n distinct fields, registered in batches as a replica does
  for ((i = 0; i < n; i += 250)); do
    args=()
    for ((j = i; j < i + 250 && j < n; j++)); do args+=("f$j" "$doc" "urn:uuid:x$j" "$blob"); done
    cli FCALL ssegw_m_track 6 "$L" "$I0" "$I1" "$G" "$S" "$R" add "${args[@]}" >/dev/null
  done
  echo "$n subscriptions: $(cli HLEN "$R") stored, $(( $(cli MEMORY USAGE "$R" SAMPLES 0) / n )) bytes each; listing: $(redis-benchmark -p $port -n $((2000000 / n)) -c 1 -q FCALL ssegw_m_subscriptions 2 "$L" "$S" | rate)"
done
cli shutdown nosave >/dev/null 2>&1
