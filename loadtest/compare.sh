#!/usr/bin/env bash
# Runs the same load against the gateway, the two baselines (ssegw-baseline on actix, nginx with
# nchan), the floor (ssegw-floor: one write per socket per event from two threads, as
# ../shared/bench/floor, each socket's queued events in one write once behind) and, if asked,
# the reference (../shared/bench/floor itself, publishing with its own POST /go), one after
# another, each with --spawn 1 and one worker, and writes each JSON report and a markdown table
# of them, with each p99 as a multiple of the floor's and of the reference's.
#
#   loadtest/compare.sh CONNECTIONS RATE DURATION [EXTRA HARNESS ARGS...]
#   loadtest/compare.sh 2000 20 20s --scenario many-topics
#
# Environment: WORKERS (worker threads of the gateway and of actix, default 1; nchan's nginx
# always runs one worker process, the floor two writer threads), OUT (output directory, default
# compare-<time>), TARGETS (default "floor gateway actix nchan"; add "reference" for
# ../shared/bench/floor, built into /tmp/floor unless REFERENCE names its binary), GATEWAY_FLAGS (harness flags
# for the gateway run only, e.g. "--publish-via http": the others are published to over HTTP,
# the gateway by default with FCALL on Redis), HARNESS (default target/release/ssegw-loadtest; build it with
# cargo build --release -p ssegw-loadtest -p sse-gateway).
set -euo pipefail

if [ $# -lt 3 ]; then
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
connections=$1 rate=$2 duration=$3
shift 3
root="$(cd "$(dirname "$0")/.." && pwd)"
harness=${HARNESS:-$root/target/release/ssegw-loadtest}
workers=${WORKERS:-1}
targets=${TARGETS:-floor gateway actix nchan}
out=${OUT:-compare-$(date +%Y%m%d-%H%M%S)}
[ -x "$harness" ] || {
  echo "compare: no $harness; build it: cargo build --release -p ssegw-loadtest -p sse-gateway" >&2
  exit 2
}
mkdir -p "$out"

failed=()
for target in $targets; do
  case $target in
    # shellcheck disable=SC2206 # GATEWAY_FLAGS is split on spaces on purpose.
    gateway) fleet=(--spawn 1 --target gateway "--gateway-arg=--workers=$workers" ${GATEWAY_FLAGS:-}) ;;
    actix) fleet=(--spawn 1 --target actix "--gateway-arg=--workers=$workers") ;;
    nchan) fleet=(--spawn 1 --target nchan) ;;
    floor) fleet=(--spawn 1 --target floor) ;;
    reference)
      reference=${REFERENCE:-/tmp/floor/release/floor}
      if [ ! -x "$reference" ]; then
        cargo build --release --locked --quiet --manifest-path "$root/../shared/bench/floor/Cargo.toml" \
          --target-dir /tmp/floor >&2 || { echo "compare: cannot build ../shared/bench/floor" >&2; exit 2; }
        reference=/tmp/floor/release/floor
      fi
      fleet=(--spawn 1 --target reference --gateway-bin "$reference") ;;
    *) echo "compare: unknown target $target" >&2; exit 2 ;;
  esac
  echo "== $target: $connections connections, $rate events/s, $duration" >&2
  status=0
  "$harness" "${fleet[@]}" -c "$connections" --rate "$rate" --duration "$duration" \
    --report "$out/$target.json" "$@" | tee "$out/$target.txt" || status=$?
  # 1: the run broke an SLO (its report is still written); 2 or 3: no report.
  [ "$status" -eq 0 ] || failed+=("$target (exit $status)")
done

# One row per report, with python3 (or jq, rounding less evenly): replica figures are summed
# (CPU) or averaged (KiB per connection).
row_jq='
  [.processes[] | select(.name | startswith("replica-"))] as $r
  | ($r | map(.kib_per_connection) | if all(. != null) and length > 0
      then (add / length * 10 | round / 10) else "-" end) as $kib
  | def ms: . * 100 | round / 100;
  "| \(.settings.target) | \(.delivery.received)/\(.delivery.expected) | \(.publish.achieved_rate * 10 | round / 10) | \(.latency.p50_ms | ms) | \(.latency.p99_ms | ms) | - | - | \(.latency.max_ms | ms) | \($kib) | \($r | map(.cpu_percent) | add | round)% | \(.delivery.deliveries_per_s | round) |"'
row_py='
import json, os, sys
r = json.load(open(sys.argv[1]))
def p99_of(path):
    return json.load(open(path))["latency"]["p99_ms"] if os.path.isfile(path) else None
floor_p99, reference_p99 = p99_of(sys.argv[2]), p99_of(sys.argv[3])
ratio = lambda base: "%.2f" % (lat["p99_ms"] / base) if base else "-"
reps = [p for p in r["processes"] if p["name"].startswith("replica-")]
kibs = [p["kib_per_connection"] for p in reps]
kib = round(sum(kibs) / len(kibs), 1) if kibs and None not in kibs else "-"
lat, d = r["latency"], r["delivery"]
cells = [r["settings"]["target"], "%d/%d" % (d["received"], d["expected"]),
         "%.1f" % r["publish"]["achieved_rate"], "%.2f" % lat["p50_ms"], "%.2f" % lat["p99_ms"],
         ratio(floor_p99), ratio(reference_p99), "%.2f" % lat["max_ms"], str(kib),
         "%d%%" % round(sum(p["cpu_percent"] for p in reps)), str(round(d["deliveries_per_s"]))]
print("| " + " | ".join(cells) + " |")'
{
  echo "$connections connections, $rate events/s for $duration, $workers worker(s); extra: ${*:-none}"
  echo
  echo "| target | delivered/expected | events/s | p50 ms | p99 ms | p99 / floor's | p99 / reference's | max ms | KiB/conn | server CPU | deliveries/s |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|"
  for target in $targets; do
    report="$out/$target.json"
    [ -f "$report" ] || { echo "| $target | no report | | | | | | | | | |"; continue; }
    if command -v python3 >/dev/null 2>&1; then
      python3 -c "$row_py" "$report" "$out/floor.json" "$out/reference.json"
    else
      jq -r "$row_jq" "$report"
    fi
  done
} > "$out/summary.md"
cat "$out/summary.md"
if [ ${#failed[@]} -gt 0 ]; then
  echo "compare: failed or broke an SLO: ${failed[*]}" >&2
  exit 1
fi
