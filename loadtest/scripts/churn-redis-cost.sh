#!/usr/bin/env bash
# What connection churn costs Redis. One redis-server, one gateway replica (one worker) and the
# load tester, one topic per connection, events published with FCALL throughout so that lost
# and duplicated events show. Two runs on the same Redis and replica, one after the other:
#   - control: `--scenario many-topics`, the same connections, topics and event rate, no churn;
#   - churn: `--scenario churn`: every connection closes after a random lifetime (mean
#     CONNS/CHURN s) and resumes at once with Last-Event-ID, CHURN times a second in total.
# A close that leaves a topic without subscribers on the replica starts the topic's linger
# there: it stays subscribed for a second, and a resume within it costs no SUBSCRIBE (only a
# read of the stream's head, then the resume read); the topics whose linger ends go in one
# UNSUBSCRIBE. New topics are subscribed in batches: whatever queued up while the previous
# SUBSCRIBE was in flight.
#
# Every 0.5 s the script samples Redis (INFO commandstats, cpu, stats) and the replica's
# /metrics (streams opened, closed by the client, open). The figures are the differences over
# each run's publishing period less its first second. The Redis CPU of churn is the churn
# run's less the control's, per churned connection (a close and its resume). A stream is
# answered 200 only once its topic is subscribed and read: when that takes longer than a
# session's random lifetime, the load tester closes the session first and counts a connect
# error ("closed before the response"); its join still reached the replica (and counts in the
# replica's streams opened). With MONITOR=1 the churn run also records every SUBSCRIBE and
# UNSUBSCRIBE with `redis-cli MONITOR` and counts the channels each call named (MONITOR costs
# Redis CPU: take the CPU figures from a run without it).
#
#   loadtest/scripts/churn-redis-cost.sh
#   CHURN=1000 MONITOR=1 loadtest/scripts/churn-redis-cost.sh
#
# Env: GATEWAY (default target/release/sse-gateway), LOADTEST (default
# target/release/ssegw-loadtest), PORT (Redis, default 17620; the replica listens on PORT+1),
# CONNS (connections = topics, default 5000), CHURN (connections closed and resumed per second,
# default 5000), DURATION (publishing, per run, default 10s), RATE (events/s in total, default
# 1000), CONNECT_RATE (default 5000), CONNECT_TIMEOUT (longest wait for every connection to
# open before publishing starts, default 5s: under heavy churn they may never all be open at
# once), CONTROL (1: run the control first, default; 0: churn only), THREADS (load tester
# runtime threads, default 1), MONITOR (0 or 1), SERVER (default redis-server), KEEP (1: keep
# the working directory: logs, samples, reports).
set -euo pipefail
export LC_ALL=C

GATEWAY=${GATEWAY:-target/release/sse-gateway}
LOADTEST=${LOADTEST:-target/release/ssegw-loadtest}
PORT=${PORT:-17620}
GW_PORT=$((PORT + 1))
CONNS=${CONNS:-5000}
CHURN=${CHURN:-5000}
DURATION=${DURATION:-10s}
RATE=${RATE:-1000}
CONNECT_RATE=${CONNECT_RATE:-5000}
CONNECT_TIMEOUT=${CONNECT_TIMEOUT:-5s}
CONTROL=${CONTROL:-1}
THREADS=${THREADS:-1}
MONITOR=${MONITOR:-0}
SERVER=${SERVER:-redis-server}
KEEP=${KEEP:-0}
DIR=$(mktemp -d /tmp/ssegw-churn-cost.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    sleep 0.2
    for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    if [ "$KEEP" = 1 ]; then echo "kept $DIR" >&2; else rm -rf "$DIR"; fi
}
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

"$SERVER" --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" \
    --logfile "$DIR/redis.log" &
PIDS+=($!)
disown
for _ in $(seq 100); do redis-cli -p "$PORT" PING >/dev/null 2>&1 && break; sleep 0.05; done

"$GATEWAY" --listen "127.0.0.1:$GW_PORT" --redis-url "redis://127.0.0.1:$PORT" --workers 1 \
    --anonymous-subscribe '*' --anonymous-publish '*' --max-connections 20000 \
    >"$DIR/gateway.log" 2>&1 &
GW_PID=$!
PIDS+=("$GW_PID")
disown
for _ in $(seq 200); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$GW_PORT/readyz")" = 200 ] && break
    sleep 0.05
done

# One line per sample: the counters named in FIELDS.
FIELDS="t sub_calls sub_usec unsub_calls unsub_usec fcall_calls fcall_usec xrange_calls xrange_usec ping_calls cpu_user cpu_sys pubsub_channels commands gw_opened gw_left gw_open"
sample() {
    local t redis metrics
    t=$(date +%s.%N)
    redis=$(redis-cli -p "$PORT" INFO commandstats cpu stats | tr -d '\r')
    metrics=$(curl -s "http://127.0.0.1:$GW_PORT/metrics")
    awk -v t="$t" -v metrics="$metrics" '
        function stat(line, name) {
            return match(line, name "=[0-9]+") ? substr(line, RSTART + length(name) + 1, RLENGTH - length(name) - 1) : 0
        }
        /^cmdstat_subscribe:/   { sc = stat($0, "calls"); su = stat($0, "usec") }
        /^cmdstat_unsubscribe:/ { uc = stat($0, "calls"); uu = stat($0, "usec") }
        /^cmdstat_fcall:/       { fc = stat($0, "calls"); fu = stat($0, "usec") }
        /^cmdstat_xrange:/      { xc = stat($0, "calls"); xu = stat($0, "usec") }
        /^cmdstat_ping:/        { pg = stat($0, "calls") }
        /^used_cpu_user:/  { split($0, a, ":"); cu = a[2] }
        /^used_cpu_sys:/   { split($0, a, ":"); cs = a[2] }
        /^pubsub_channels:/ { split($0, a, ":"); pc = a[2] }
        /^total_commands_processed:/ { split($0, a, ":"); tc = a[2] }
        END {
            n = split(metrics, lines, "\n")
            for (i = 1; i <= n; i++) {
                split(lines[i], f, " ")
                if (f[1] == "ssegw_connections_opened_total") go = f[2]
                if (f[1] == "ssegw_connections_closed_total{reason=\"client_left\"}") gl = f[2]
                if (f[1] == "ssegw_connections_open") gn = f[2]
            }
            printf "%s %d %d %d %d %d %d %d %d %d %s %s %d %d %d %d %d\n",
                t, sc, su, uc, uu, fc, fu, xc, xu, pg, cu, cs, pc, tc, go, gl, gn
        }' <<<"$redis"
}
sampler() { # file
    while :; do sample >>"$1"; sleep 0.5; done
}

# Runs the load tester with the arguments given; leaves in $DIR/<name>/ its summary, report and
# samples, and `figures`: name=value lines for the publishing period less its first second.
run() { # name load-tester-args...
    local name=$1 out=$DIR/$1 sampler_pid monitor_pid="" t0 rc start end
    shift
    mkdir -p "$out"
    sample >>"$out/samples"
    sampler "$out/samples" &
    sampler_pid=$!
    PIDS+=("$sampler_pid")
    if [ "$MONITOR" = 1 ] && [ "$name" = churn ]; then
        redis-cli -p "$PORT" MONITOR >"$out/monitor" &
        monitor_pid=$!
        PIDS+=("$monitor_pid")
    fi
    t0=$(date +%s.%N)
    set +e
    "$LOADTEST" --url "http://127.0.0.1:$GW_PORT" --redis-url "redis://127.0.0.1:$PORT" \
        -c "$CONNS" --topics "$CONNS" --rate "$RATE" --duration "$DURATION" \
        --connect-rate "$CONNECT_RATE" --connect-timeout "$CONNECT_TIMEOUT" --threads "$THREADS" \
        --watch-pid "$GW_PID" --report "$out/report.json" "$@" >"$out/harness.out" 2>"$out/harness.err"
    rc=$?
    set -e
    echo "$rc" >"$out/rc"
    sleep 2
    kill "$sampler_pid" 2>/dev/null || true
    wait "$sampler_pid" 2>/dev/null || true
    [ -z "$monitor_pid" ] || kill "$monitor_pid" 2>/dev/null || true
    sample >>"$out/samples"
    start=$(jq '[.intervals[] | select(.phase == "publishing") | .t_s] | min' "$out/report.json")
    end=$(jq '[.intervals[] | select(.phase == "publishing") | .t_s] | max' "$out/report.json")
    start=$(echo "$t0 + $start + 1" | bc)
    end=$(echo "$t0 + $end" | bc)
    echo "start=$start" >"$out/figures"
    echo "end=$end" >>"$out/figures"
    awk -v start="$start" -v end="$end" -v t0="$t0" -v rate="$RATE" -v fields="$FIELDS" '
        BEGIN { nf = split(fields, name, " ") }
        {
            for (i = 1; i <= nf; i++) s[NR, name[i]] = $i
            rows = NR
        }
        function d(k) { return s[b, k] - s[a, k] }
        function per(x, y) { return y ? x / y : 0 }
        END {
            a = 0; b = 0
            for (r = 1; r <= rows; r++) {
                if (!a && s[r, "t"] >= start) a = r
                if (s[r, "t"] <= end) b = r
            }
            if (!a || b <= a) { print "error=no steady window"; exit }
            dt = d("t"); joins = d("gw_opened"); leaves = d("gw_left")
            pairs = (joins + leaves) / 2
            cpu = d("cpu_user") + d("cpu_sys")
            minch = 1e18; maxch = 0; maxopen = 0
            for (r = a; r <= b; r++) {
                if (s[r, "pubsub_channels"] < minch) minch = s[r, "pubsub_channels"]
                if (s[r, "pubsub_channels"] > maxch) maxch = s[r, "pubsub_channels"]
                if (s[r, "gw_open"] > maxopen) maxopen = s[r, "gw_open"]
            }
            printf "window_s=%.1f\nwindow_from=%.1f\n", dt, s[a, "t"] - t0
            printf "joins_s=%.0f\nleaves_s=%.0f\nchurn_s=%.0f\npairs_s=%.0f\n", joins / dt, leaves / dt, (joins + leaves) / dt, pairs / dt
            printf "max_open=%d\nchannels=%d to %d\n", maxopen, minch, maxch
            printf "sub_s=%.0f\nunsub_s=%.0f\n", d("sub_calls") / dt, d("unsub_calls") / dt
            printf "joins_per_sub=%.2f\nleaves_per_unsub=%.2f\n", per(joins, d("sub_calls")), per(leaves, d("unsub_calls"))
            printf "us_sub=%.2f\nus_unsub=%.2f\n", per(d("sub_usec"), d("sub_calls")), per(d("unsub_usec"), d("unsub_calls"))
            printf "fcall_s=%.0f\nreads_per_join=%.2f\nus_fcall=%.2f\n", d("fcall_calls") / dt, per(d("fcall_calls") - rate * dt, joins), per(d("fcall_usec"), d("fcall_calls"))
            printf "xrange_per_join=%.2f\nus_xrange=%.2f\n", per(d("xrange_calls"), joins), per(d("xrange_usec"), d("xrange_calls"))
            printf "ping_s=%.0f\ncommands_s=%.0f\n", d("ping_calls") / dt, d("commands") / dt
            printf "cpu_pct=%.1f\n", 100 * cpu / dt
            printf "cmd_pct=%.1f %% / %.1f %% / %.1f %%\n", 100 * (d("sub_usec") + d("unsub_usec")) / 1e6 / dt, 100 * d("fcall_usec") / 1e6 / dt, 100 * d("xrange_usec") / 1e6 / dt
            printf "cpu_us_per_pair=%.1f\nsubunsub_us_per_pair=%.2f\n", per(cpu * 1e6, pairs), per(d("sub_usec") + d("unsub_usec"), pairs)
            a = 1; b = rows
            printf "all_s=%.1f\nall_joins=%d\nall_leaves=%d\nall_sub=%d\nall_unsub=%d\nall_fcall=%d\nall_cpu=%.2f\n", d("t"), d("gw_opened"), d("gw_left"), d("sub_calls"), d("unsub_calls"), d("fcall_calls"), d("cpu_user") + d("cpu_sys")
        }' "$out/samples" >>"$out/figures"
}
fig() { # name key
    awk -F= -v k="$2" '$1 == k {print substr($0, length(k) + 2)}' "$DIR/$1/figures" 2>/dev/null || true
}

LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
PHASES=()
if [ "$CONTROL" = 1 ]; then
    run control --scenario many-topics
    PHASES+=(control)
fi
run churn --scenario churn --churn-rate "$CHURN"
PHASES+=(churn)

echo "# Churn cost to Redis: $CONNS connections on $CONNS topics (one each), churn $CHURN/s requested, $RATE events/s, $DURATION per run; one replica, one worker; $("$SERVER" --version | cut -d' ' -f1-3); load average before: $LOAD"
echo
for p in "${PHASES[@]}"; do
    echo "## Load tester, $p run (exit status $(cat "$DIR/$p/rc"))"
    echo
    echo '```'
    cat "$DIR/$p/harness.out"
    echo '```'
    echo
done

row() { # label key [bold]
    local line="| $1 |" p v
    for p in "${PHASES[@]}"; do
        v=$(fig "$p" "$2")
        [ -z "${3:-}" ] || v="**$v**"
        line+=" $v |"
    done
    echo "$line"
}
echo "## Redis and the replica over each run's publishing period, less its first second"
echo
header="| figure |" rule="|---|"
for p in "${PHASES[@]}"; do header+=" $p |"; rule+="---:|"; done
echo "$header"
echo "$rule"
row "window: seconds, from (s after the load tester started)" window_s
row "joins (streams opened on the replica) per s" joins_s
row "leaves (streams closed by the client) per s" leaves_s
row "churned connections (joins + leaves) per s" churn_s bold
row "streams open on the replica, most ($CONNS clients: more are closes not yet seen)" max_open
row "channels subscribed in Redis, least to most" channels
row "SUBSCRIBE calls per s" sub_s bold
row "UNSUBSCRIBE calls per s" unsub_s bold
row "joins per SUBSCRIBE call (channels per call, at most)" joins_per_sub
row "leaves per UNSUBSCRIBE call (channels per call, at most)" leaves_per_unsub
row "µs per SUBSCRIBE call (commandstats)" us_sub
row "µs per UNSUBSCRIBE call (commandstats)" us_unsub
row "FCALL calls per s ($RATE/s are publishes; the rest the replica's stream reads)" fcall_s
row "stream-read FCALLs per join (publishes excluded)" reads_per_join
row "µs per FCALL, publishes and reads (commandstats)" us_fcall
row "XRANGE resume reads per join" xrange_per_join
row "µs per XRANGE (commandstats)" us_xrange
row "PING calls per s (a pool checkout: UNWATCH + PING)" ping_s
row "Redis commands per s" commands_s
row "Redis CPU (used_cpu_user + sys), % of a core" cpu_pct bold
row "in SUBSCRIBE + UNSUBSCRIBE / FCALL / XRANGE, % of a core (commandstats)" cmd_pct
row "Redis CPU per churned connection (close + resume), µs, all of it" cpu_us_per_pair
row "of which SUBSCRIBE + UNSUBSCRIBE (commandstats), µs" subunsub_us_per_pair
echo
if [ "$CONTROL" = 1 ]; then
    ctl=$(fig control cpu_pct)
    chu=$(fig churn cpu_pct)
    pairs=$(fig churn pairs_s)
    if [ -n "$ctl" ] && [ -n "$chu" ] && [ -n "$pairs" ] && [ "$pairs" != 0 ]; then
        echo "**Redis CPU per churned connection (close + resume), the control's CPU subtracted: $(echo "scale=1; ($chu - $ctl) * 10000 / $pairs" | bc) µs** ($chu % - $ctl % of a core, over $pairs closes and resumes per s)"
        echo
    fi
fi
echo "## Whole runs (the first connections and the last closes included)"
echo
echo "| run | s | joins | leaves | SUBSCRIBE calls | UNSUBSCRIBE calls | FCALL calls | Redis CPU s |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
for p in "${PHASES[@]}"; do
    echo "| $p | $(fig "$p" all_s) | $(fig "$p" all_joins) | $(fig "$p" all_leaves) | $(fig "$p" all_sub) | $(fig "$p" all_unsub) | $(fig "$p" all_fcall) | $(fig "$p" all_cpu) |"
done
echo

if [ "$MONITOR" = 1 ]; then
    echo "## Channels per call in the churn run, from MONITOR (same window)"
    echo
    echo "| command | calls | channels | channels per call | largest call | calls naming 1 channel |"
    echo "|---|---:|---:|---:|---:|---:|"
    for cmd in SUBSCRIBE UNSUBSCRIBE; do
        awk -v cmd="\"$cmd\"" -v start="$(fig churn start)" -v end="$(fig churn end)" '
            $1 + 0 >= start + 0 && $1 + 0 <= end + 0 && $4 == cmd && $5 ~ /^"ssegw:c:/ {
                n = NF - 4; calls++; channels += n; if (n > most) most = n; if (n == 1) ones++
            }
            END {
                printf "| %s | %d | %d | %.2f | %d | %d |\n", substr(cmd, 2, length(cmd) - 2),
                    calls, channels, calls ? channels / calls : 0, most, ones
            }' "$DIR/churn/monitor"
    done
    echo
fi
