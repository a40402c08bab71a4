#!/usr/bin/env bash
# Every GPU measurement of issue 17 in one run, for a lent GPU machine (about 15 minutes of device time per task,
# machine start included: this script stays under 9 minutes on an H100/H200 and each part has its own time limit,
# so one slow part cannot eat the rest). Prepare here, once:
#     bash ../shared/gpu/fetch-wheels.sh          # deepspeed, zarr, numcodecs, webdataset, monai -> .whl/
# then through the device tool, from the repository root:
#     run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=580)
# The JSON of every part comes back under $OUT/results (copy them to bench/results/ and update BENCHMARKS.md).
#   1. attention kernels at the paper's shapes, 5 x 205 against the zero-padded 5 x 208 (bench/sdpa_backends.py)
#   2. Stage I step: paper shape (padded heads) and 1024 x 8, eager against compiled + fused AdamW, micro 32 and 96,
#      with the host syncs of one step listed (bench/pretrain_step.py --sync-audit)
#   3. the authors' implementation against the project's step (bench/reference.py)
#   4. Stage II and MetaCLIP-CMR steps with their MFU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/cmrfm-gpu}
mkdir -p "$OUT/results"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)"
date -u +"start %F %T UTC"

part() {  # part <seconds> <name> <command...>: run with a time limit, keep its log, go on whatever happens
  local limit=$1 name=$2
  shift 2
  echo "=== $name (limit ${limit}s) $(date -u +%T)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "=== $name rc=$? $(date -u +%T)"
  grep -v "^\[" "$OUT/$name.log" | tail -n 25
}

part 45 sdpa python3 bench/sdpa_backends.py --out bench/results/sdpa_backends_gpu.json
part 200 stage1 python3 bench/pretrain_step.py --stage mae --micro 32 --steps 10 --sync-audit \
  --only "paper 1025x5 bf16" "paper 1025x5 bf16 compiled fused-AdamW" "1024x8 bf16" \
  "1024x8 bf16 compiled fused-AdamW" "1024x8 bf16 compiled fused-AdamW micro 96"
part 120 reference python3 bench/reference.py --micro 32 --steps 10
part 90 stage2 python3 bench/pretrain_step.py --stage tabular_clip --micro 32 --steps 8 \
  --only "paper 1025x5 bf16 act-ckpt" "paper 1025x5 bf16 act-ckpt compiled fused-AdamW" \
  "1024x8 bf16 compiled fused-AdamW"
part 80 metaclip python3 bench/pretrain_step.py --stage metaclip --micro 32 --steps 8
cp bench/results/*.json "$OUT/results/" 2>/dev/null
date -u +"end %F %T UTC"
