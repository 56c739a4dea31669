#!/usr/bin/env bash
# On the device machine: join the pieces, install onnxruntime-gpu beside the image's packages, validate the
# teacher in FP32 (CUDA), fp16 (CUDA) and TensorRT int8 (when TensorRT's libraries are present), and write
# the table to $OUT. Everything runs from /tmp; nothing is fetched.
set -euo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
cd /tmp/gpu-parts
cat ortgpu.part.* > "$(cat "$OLDPWD/.gpu/small/ortgpu.name")"
cat model.part.* | tar -xf - -C /tmp
REPO=$OLDPWD
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$REPO"/.gpu/small/*.whl ./onnxruntime_gpu-*.whl
export PYTHONPATH=/tmp/site:$REPO
MODEL=/tmp/$(cat "$REPO/.gpu/small/model.name")
cd "$REPO"
python3 - <<'PY'
import onnxruntime as ort; print("onnxruntime", ort.__version__, ort.get_available_providers())
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
TF="python3 -m trimformer --quiet --json"
COMMON="--data builtin:tweets --limit 2000 --grid 1x128,32x128 --runs 200"
$TF validate "$MODEL" $COMMON --providers cuda --reference "$MODEL" --out /tmp/r-fp32 > "$OUT/fp32.json" || true
$TF optimize "$MODEL" --passes fp16 --out /tmp/fp16 --overwrite && \
  $TF validate /tmp/fp16 $COMMON --providers cuda --reference "$MODEL" --out /tmp/r-fp16 > "$OUT/fp16.json" || true
if python3 -c "import ctypes; ctypes.CDLL('libnvinfer.so.10')" 2>/dev/null; then
  $TF quantize "$MODEL" --calibration builtin:tweets --preset tensorrt --out /tmp/trt-int8 --overwrite && \
    $TF validate /tmp/trt-int8 $COMMON --providers tensorrt --trt-int8 --trt-cache /tmp/trt-cache \
      --reference "$MODEL" --out /tmp/r-trt > "$OUT/trt-int8.json" || true
else
  echo '{"skipped": "TensorRT libraries (libnvinfer.so.10) are not on this machine"}' > "$OUT/trt-int8.json"
fi
python3 "$REPO/scripts/gpu/table.py" "$OUT" > "$OUT/gpu_results.md"
cat "$OUT/gpu_results.md"
