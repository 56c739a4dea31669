#!/usr/bin/env bash
# On the device machine: keep one carried piece in /tmp/gpu-parts (survives while the machine stays warm).
set -euo pipefail
mkdir -p /tmp/gpu-parts
cp "$1" /tmp/gpu-parts/
ls -la /tmp/gpu-parts
