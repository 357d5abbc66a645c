#!/usr/bin/env bash
# The GPU measurements of docs/performance.md in one go (issue 37, item 4), for a device
# lent for minutes: bench/run's naive-vs-tuned pair for the first grid cell, then the tuned
# run alone for the other cells (worker processes x studies in flight), with the GPU's
# utilisation (nvidia-smi dmon) and the host's CPU (/proc/stat) sampled every second.
#   bench/gpu_session.sh OUTDIR [STUDIES] [GRID...]
#   GRID cells: WORKERSxTHREADS[:GPU_WAIT[:OMP_WAIT]], e.g. 16x2 16x2:block 8x4:block:passive
#   (GPU_WAIT: processing.gpu_wait for that cell, auto if left out; OMP_WAIT: OpenMP's
#   OMP_WAIT_POLICY for torch's CPU threads, active or passive, the runtime's default if
#   left out)
# NAIVE=0 leaves out the pair (the studies are generated, every cell runs tuned alone);
# DISTINCT=K with it draws K phantoms and makes the other studies copies of them under new
# UIDs (drawing 256 took 108 s of a lent machine's minutes).
# PROFILE_STUDIES=N adds a cProfile of the naive run on N studies (profile.txt).
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
nvidia-smi dmon -s um -d 1 >>"$out/dmon.txt" 2>&1 &  # appending: stamp() writes here too
dmon=$!
while :; do echo "$(date +%T) $(head -1 /proc/stat)"; sleep 1; done >>"$out/cpu.txt" &
cpu=$!
stamp() { echo "== $(date +%T) $*" | tee -a "$out/dmon.txt" "$out/cpu.txt"; }
cell_of() {
    IFS=: read -r wt wait omp <<<"$1"
    w=${wt%%x*}; t=${wt#*x}; wait=${wait:-auto}
    if [ -n "$omp" ]; then export OMP_WAIT_POLICY=$omp; else unset OMP_WAIT_POLICY; fi
}
cells=("${grid[@]:1}")
if [ "${NAIVE:-1}" = 0 ]; then  # no pair: the studies generated here, every cell tuned alone
    stamp "generate"
    rm -rf "$work/in"
    "$python" -c "import os, sys; from pathlib import Path; from bench.harness import generate; generate(Path(sys.argv[1]), int(sys.argv[2]), 2000, 3000, 'uncompressed', os.cpu_count(), int(sys.argv[3]) or None)" \
        "$work/in" "$studies" "${DISTINCT:-0}"
    cells=("${grid[@]}")
else
    stamp "pair ${grid[0]}"
    cell_of "${grid[0]}"
    CXRBATCH_PROCESSING__GPU_WAIT=$wait timeout "${PAIR_TIMEOUT:-200}" "$python" -m bench.harness --studies "$studies" --gpu --workers "$w" \
        --study-threads "$t" --workdir "$work" --report "$out/pair.json"
fi
bundles=$("$python" -c "import json,sys; from pathlib import Path; from bench.harness import make_bundles; print(json.dumps(make_bundles(Path(sys.argv[1]))))" "$work/bundles")
for cell in "${cells[@]}"; do
    cell_of "$cell"
    stamp "tuned $cell"
    rm -rf "$work/out-$cell"
    CXRBATCH_PROCESSING__GPU_WAIT=$wait timeout "${CELL_TIMEOUT:-90}" "$python" -m bench.harness --mode tuned --gpu --input "$work/in" \
        --out "$work/out-$cell" --bundles "$bundles" --workers "$w" --study-threads "$t" \
        --graph-cache-dir "$work/graph-cache" 2>/dev/null | grep '^RESULT' | tee "$out/tuned-${cell//:/-}.txt"
done
if [ "${PROFILE_STUDIES:-0}" -gt 0 ]; then
    # Where a study's host CPU goes: the naive run (one process, one study at a time, on
    # the main thread) under cProfile, on the first PROFILE_STUDIES studies, gpu_wait block.
    stamp "profile"
    unset OMP_WAIT_POLICY
    rm -rf "$work/prof-in" "$work/prof-out"
    mkdir -p "$work/prof-in"
    find "$work/in" -mindepth 1 -maxdepth 1 | sort | head -n "$PROFILE_STUDIES" | xargs -I{} cp -r {} "$work/prof-in/"
    CXRBATCH_PROCESSING__GPU_WAIT=block timeout "${PROFILE_TIMEOUT:-150}" "$python" -m cProfile -o "$out/naive.prof" \
        -m bench.harness --mode naive --gpu --input "$work/prof-in" --out "$work/prof-out" \
        --bundles "$bundles" --graph-cache-dir "$work/graph-cache" | grep '^RESULT' | tee "$out/profile-result.txt"
    "$python" -c "import pstats, sys; p = pstats.Stats(sys.argv[1]); p.sort_stats('tottime').print_stats(40); p.sort_stats('cumulative').print_stats(70)" \
        "$out/naive.prof" >"$out/profile.txt" 2>&1
fi
stamp "end"
kill $dmon $cpu
