#!/bin/bash
# p99/p50 at half of saturation, repeated: saturate a fresh server (20 s), then 3 runs of 60 s at half that rate,
# the first on the server just saturated, the others on fresh servers. Server on core 0 with 1 ONNX Runtime
# thread, load generator on core 1 (README's protocol). Writes benchmarks/results/loadtest_digits_{saturated,half}_TAG*.json.
#
#     bash benchmarks/digits_half_runs.sh [BUNDLE [TAG]]      # defaults: runs/qs2/bundle (the quickstart's), r3
set -euo pipefail
cd "$(dirname "$0")/.."
export BENTOML_DO_NOT_TRACK=true
BUNDLE=${1:-runs/qs2/bundle}
TAG=${2:-r3}
S=.venv/bin/steerprune
O=benchmarks/results
LT=(taskset -c 1 "$S" loadtest --inprocess-threads 1 --bundle "$BUNDLE" --users 16)
PID=

start_server() {  # $1 port; waits for /readyz
  local port=$1 t
  taskset -c 0 "$S" serve "$BUNDLE" --port "$port" --threads 1 > "/tmp/steerprune_serve_$port.log" 2>&1 &
  PID=$!
  for t in $(seq 240); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && return 0; sleep 0.5; done
  echo "server on port $port not ready; see /tmp/steerprune_serve_$port.log" >&2; return 1
}
stop_server() { kill -TERM "$PID"; wait "$PID" || true; sleep 2; }

start_server 3311
"${LT[@]}" http://127.0.0.1:3311 --duration 20 --out $O/loadtest_digits_saturated_${TAG}.json
RATE=$(python3 -c "import json; print(round(json.load(open('$O/loadtest_digits_saturated_${TAG}.json'))['throughput_rps'] / 2))")
"${LT[@]}" http://127.0.0.1:3311 --duration 60 --rate "$RATE" --out $O/loadtest_digits_half_${TAG}_1.json
stop_server
for n in 2 3; do
  start_server "331$n"
  "${LT[@]}" "http://127.0.0.1:331$n" --duration 60 --rate "$RATE" --out "$O/loadtest_digits_half_${TAG}_$n.json"
  stop_server
done
