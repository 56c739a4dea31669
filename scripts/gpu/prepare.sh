#!/usr/bin/env bash
# Prepare the GPU run (issue: GPU execution providers). Run HERE, on the CPU machine, from the repo root.
#
# The device machine (one H200, CUDA 13, Python 3.12, no network) has onnxruntime without CUDA and no
# pydantic. Each device call carries at most 64 MiB, so the onnxruntime-gpu wheel (~255 MB) and the
# teacher's ONNX model (~90 MB) travel in pieces: this script downloads and splits them into .gpu/
# (git-ignored). Then, with the device tool, for each piece N in .gpu/parts/:
#     run(command="bash scripts/gpu/stash.sh .gpu/parts/<piece>", carry=[".gpu/parts/<piece>"])
# on the same warm machine, and finally
#     run(command="bash scripts/gpu/device_run.sh", carry=[".gpu/small"])
# which joins the pieces in /tmp, installs, validates FP32 / fp16 / TensorRT int8 and writes the table
# to $OUT/gpu_results.md and $OUT/gpu_results.json.
set -euo pipefail
MODEL_DIR=${MODEL_DIR:-work/demo/teacher-onnx}
PIECE=${PIECE:-50M}
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/parts .gpu/small
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
    -d .gpu/wheels onnxruntime-gpu==1.31.1
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
    -d .gpu/small pydantic==2.14.4 'pydantic-core' typing-inspection annotated-types
(cd .gpu/wheels && split -b "$PIECE" -d onnxruntime_gpu-*.whl ../parts/ortgpu.part. && ls onnxruntime_gpu-*.whl > ../small/ortgpu.name)
tar -C "$(dirname "$MODEL_DIR")" --exclude report -cf .gpu/model.tar "$(basename "$MODEL_DIR")"
(cd .gpu && split -b "$PIECE" -d model.tar parts/model.part. && rm model.tar)
echo "$(basename "$MODEL_DIR")" > .gpu/small/model.name
ls -la .gpu/parts .gpu/small
