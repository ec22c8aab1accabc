#!/usr/bin/env bash
# SAIL's GPU checks and paper-scale benchmarks in one call (<= 5 minutes on one H200).
#
#   On the lent GPU machine (after `bash benchmarks/device/prepare.sh` here; carry
#   benchmarks/device/wheels):            bash benchmarks/device/run.sh
#   CPU rehearsal (CI runs it):           bash benchmarks/device/run.sh --rehearse
#
# Each section runs in its own process under a time cap (`timeout`) and appends its JSON lines to
# $OUT/results.jsonl as it measures them; a section that fails or runs out of time is recorded as
# such and the next one starts. $OUT/run.log holds everything printed. Without $OUT (here) the
# files go to a fresh temporary folder, printed at the end.
#
# --rehearse: tiny sizes on the CPU, with an import blocker that hides every installed package
# the GPU machine lacks (device_packages.txt) except the carried wheels (wheels.txt), so a
# missing dependency or a broken code path shows before a device is spent on it. GPU tests run
# on the CPU there (SAIL_GPU_TESTS_ON_CPU=1). Exits non-zero if any section did not end cleanly.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cd "$repo"

rehearse=0
case "${1:-}" in
  --rehearse) rehearse=1 ;;
  "") ;;
  -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
  *) echo "usage: $0 [--rehearse]" >&2; exit 2 ;;
esac

OUT=${OUT:-$(mktemp -d -t sail-device-XXXXXX)}
mkdir -p "$OUT"
results="$OUT/results.jsonl"
log="$OUT/run.log"
: >"$results"
: >"$log"
py=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
started=$(date +%s)

say() { echo "[run.sh $(date -u +%H:%M:%S)] $*" | tee -a "$log"; }

if (( rehearse )); then
  export SAIL_DEVICE_ALLOW="$here/device_packages.txt:$here/wheels.txt" SAIL_DEVICE_BLOCK_LOG=1
  export SAIL_GPU_TESTS_ON_CPU=1
  export PYTHONPATH="$here/blocker:$repo/src"
  say "rehearsal on the CPU: imports limited to device_packages.txt + wheels.txt"
else
  # The carried wheels, installed without network into a folder first on the path.
  missing=0
  while read -r pin; do
    name=$(echo "${pin%%==*}" | tr 'A-Z-' 'a-z_'); ver=${pin#*==}
    if ! ls "$here/wheels/" 2>/dev/null | tr 'A-Z' 'a-z' | grep -q "^${name}-${ver}-"; then
      say "missing wheel: $pin"
      missing=1
    fi
  done < <(sed 's/#.*//; /^[[:space:]]*$/d' "$here/wheels.txt")
  if (( missing )); then
    say "run benchmarks/device/prepare.sh here and carry benchmarks/device/wheels"
    exit 1
  fi
  site=$(mktemp -d -t sail-site-XXXXXX)
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$here"/wheels/*.whl \
    >>"$log" 2>&1 || { say "installing the carried wheels failed (see run.log)"; exit 1; }
  export PYTHONPATH="$site:$repo/src"
  say "carried wheels installed in $site"
fi

failed=0
# section NAME CAP_SECONDS [extra bench.py arguments]: one process, hard-capped, its status a JSON line.
section() {
  local name=$1 cap=$2
  shift 2
  local t0 rc status
  t0=$(date +%s.%N)
  say "section $name (cap ${cap}s)"
  local flags=(--out "$results" --budget "$cap")
  (( rehearse )) && flags+=(--rehearse)
  timeout -k 5 "$cap" "$py" "$here/bench.py" "$name" "${flags[@]}" "$@" >>"$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  [[ $status == ok ]] || failed=1
  local seconds
  seconds=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
  local line
  line=$(printf '{"section": "%s", "what": "section_status", "status": "%s", "exit_code": %d, "seconds": %s, %s}' \
    "$name" "$status" "$rc" "$seconds" "\"cap_seconds\": $cap")
  echo "$line" >>"$results"
  echo "$line" >>"$log"
  say "section $name: $status in ${seconds}s"
}

# Caps sum to 280 s on the GPU. The rehearsal's only catch hangs: its work is about a minute of
# CPU time, but a loaded 2-core machine can stretch that several times.
if (( rehearse )); then
  caps=(env=60 tests=300 train=180 grid=180 export=120 encoders=180 centring=120)
else
  caps=(env=20 tests=50 train=70 grid=45 export=30 encoders=45 centring=20)
fi
for pair in "${caps[@]}"; do
  section "${pair%%=*}" "${pair#*=}"
done

say "done in $(( $(date +%s) - started ))s: $(grep -c . "$results") JSON lines in $results"
if (( failed )); then
  say "some sections did not end cleanly:"
  grep '"section_status"' "$results" | grep -v '"status": "ok"' | tee -a "$log"
  exit 1
fi
