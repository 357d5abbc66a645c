#!/usr/bin/env bash
# Build the cxrbatch container image with no registry and no package index at build time,
# then smoke-test it: run as root on a Debian 12 host with podman and mmdebstrap
# (apt-get install podman mmdebstrap). Walked on 2026-12-04 (deploy/INSTALL.md, "A
# container"): on that host podman needed PODMAN_RUNTIME=runc (crun refused its hybrid
# cgroups) and /etc/containers/containers.conf with `default_ulimits = []`.
#
#   deploy/container/build.sh            # image cxrbatch:0.1.0, smoke test in a scratch dir
set -euo pipefail
cd "$(dirname "$0")/../.."
podman=(podman ${PODMAN_RUNTIME:+--runtime "$PODMAN_RUNTIME"})
tag=${TAG:-cxrbatch:0.1.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 1. A base image made from Debian's own packages (no registry): Python 3.11 and CAs.
mmdebstrap --quiet --variant=minbase --include=python3.11-venv,ca-certificates bookworm \
    "$work/rootfs.tar" http://deb.debian.org/debian
"${podman[@]}" import "$work/rootfs.tar" localhost/debian-bookworm-python:base

# 2. The wheelhouse: this tree's wheel and every dependency, the versions CI tested.
python3.11 -m venv "$work/venv"
"$work/venv/bin/pip" wheel -q -c constraints.txt -w "$work/wheelhouse" .

# 3. The image, installed from the wheelhouse only.
"${podman[@]}" build -f deploy/container/Containerfile -v "$work/wheelhouse:/wheels:ro" \
    --build-arg BASE=localhost/debian-bookworm-python:base -t "$tag" .

# 4. Smoke test as the image's user: phantoms in, process, results, the web app's health.
mkdir -p "$work/data" && chmod 0777 "$work/data"
run=("${podman[@]}" run --rm -v "$work/data:/data/smoke" "$tag")
"${run[@]}" demo-data /data/smoke/in
"${run[@]}" process /data/smoke/in --out /data/smoke/out
"${run[@]}" results --out /data/smoke/out --format json > "$work/results.json"
python3.11 - "$work/results.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
by_status = {s: sum(r["status"] == s for r in rows) for s in ("processed", "ineligible", "failed")}
print(f"smoke test: {len(rows)} studies recorded: {by_status}")
# demo-data: six phantoms (processed), and pydicom's own CT and MR files (ineligible).
sys.exit(0 if by_status["processed"] >= 6 and not by_status["failed"] else 1)
PY
"${podman[@]}" images "$tag"
