#!/usr/bin/env bash
# The GPU measurements of docs/performance.md in one go (issue 37, item 4), for a device
# lent for minutes: bench/run's naive-vs-tuned pair for the first grid cell, then the tuned
# run alone for the other cells (worker processes x studies in flight), with the GPU's
# utilisation (nvidia-smi dmon) and the host's CPU (/proc/stat) sampled every second.
#   bench/gpu_session.sh OUTDIR [STUDIES] [GRID...]  GRID cells: WORKERSxTHREADS[:GPU_WAIT]
# e.g. 16x2 16x2:block 8x4:block (GPU_WAIT: processing.gpu_wait for that cell; auto if left out)
# Reading it: each run prints studies/s end to end (model loading in every worker
# included) and from the first study done to the last; cpu.txt's busy share says whether
# the host's cores or something else (the GIL, locks, the GPU) bound the run.
set -uo pipefail
out=${1:?OUTDIR}; studies=${2:-64}; shift 2 || shift $#
grid=("$@"); [ ${#grid[@]} -gt 0 ] || grid=(16x2 8x4 16x4)
python=${PYTHON:-python3}
work=${WORK:-/tmp/cxr-gpu}
mkdir -p "$out" "$work"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
nproc | tee -a "$out/gpu.txt"
nvidia-smi dmon -s um -d 1 >"$out/dmon.txt" 2>&1 &
dmon=$!
while :; do echo "$(date +%T) $(head -1 /proc/stat)"; sleep 1; done >"$out/cpu.txt" &
cpu=$!
stamp() { echo "== $(date +%T) $*" | tee -a "$out/dmon.txt" "$out/cpu.txt"; }
cell_of() { w=${1%%x*}; rest=${1#*x}; t=${rest%%:*}; wait=auto; [[ $1 == *:* ]] && wait=${1##*:}; }
stamp "pair ${grid[0]}"
cell_of "${grid[0]}"
CXRBATCH_PROCESSING__GPU_WAIT=$wait timeout "${PAIR_TIMEOUT:-200}" "$python" -m bench.harness --studies "$studies" --gpu --workers "$w" \
    --study-threads "$t" --workdir "$work" --report "$out/pair.json"
bundles=$("$python" -c "import json,sys; from pathlib import Path; from bench.harness import make_bundles; print(json.dumps(make_bundles(Path(sys.argv[1]))))" "$work/bundles")
for cell in "${grid[@]:1}"; do
    cell_of "$cell"
    stamp "tuned $cell"
    rm -rf "$work/out-$cell"
    CXRBATCH_PROCESSING__GPU_WAIT=$wait timeout "${CELL_TIMEOUT:-90}" "$python" -m bench.harness --mode tuned --gpu --input "$work/in" \
        --out "$work/out-$cell" --bundles "$bundles" --workers "$w" --study-threads "$t" \
        --graph-cache-dir "$work/graph-cache" 2>/dev/null | grep '^RESULT' | tee "$out/tuned-$cell.txt"
done
stamp "end"
kill $dmon $cpu
