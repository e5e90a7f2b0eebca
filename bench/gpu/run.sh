#!/usr/bin/env bash
# The GPU check, one command on the lent device machine (an H200 here), about 8 minutes:
#   here:  bash bench/gpu/wheels.sh
#   there: device run, carry [".whl"], timeout 600:  bash bench/gpu/run.sh
# 1. the CUDA IPC tests; 2. full-size Wan 2.1 T2V 1.3B and SD3.5 Medium with random weights
# (bench/gpu/full_size.py) in bfloat16, each profiled stage by stage as the services load them,
# writing cost profiles measured on this GPU; 3. the end-to-end comparison, disaggregated vs
# monolithic, with CUDA IPC handoff. Everything it prints and writes lands in $OUT (logs, the
# profiles to copy into deploy/profiles/, the JSON lines); record them in bench/RESULTS.md.
# Each step has its own time limit, so one that runs long leaves the others their time.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
export DF_DEVICE=cuda DF_DTYPE=bfloat16
MODELS=/tmp/models
step() { local name=$1 limit=$2; shift 2; echo "== $name ($(date -u +%T), limit ${limit}s, load: $(cut -d' ' -f1-3 /proc/loadavg))"
         timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; echo "== $name: exit ${PIPESTATUS[0]}"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'; uptime; } | tee "$OUT/machine.txt"
step cuda_ipc_tests 90 python3 -m pytest -q -p no:cacheprovider tests/transport/test_cuda_ipc.py tests/transport/test_transports.py
step full_size 150 python3 bench/gpu/full_size.py --models-dir $MODELS --device cuda
step profile_wan 150 python3 -m disagfusion_cli profile wan2_1-t2v-1_3b-random --models-dir $MODELS \
    --sizes 832x480 --frames 81 --steps 1,2 --guidance 1,5 --prompt-chars 80 --batches 1 --runs 1 \
    -o "$OUT/wan2_1-t2v-1_3b-h200-measured.yaml"
step profile_sd35 90 python3 -m disagfusion_cli profile sd3_5-medium-random --models-dir $MODELS \
    --sizes 1024 --steps 2,4 --guidance 1,5 --prompt-chars 80,300 --batches 1,4 --runs 2 \
    -o "$OUT/sd3_5-medium-h200-measured.yaml"
step e2e 150 env DF_TRANSPORT=cuda_ipc python3 bench/e2e.py --quick --model small
