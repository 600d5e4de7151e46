#!/usr/bin/env bash
# GPU readiness check: one GPU, under 10 minutes, everything that cannot be checked on CPU.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default OUT_DIR: gpu_check/
#
# 1. CUDA test variants: the single-device CLI tests (tests/test_train.py) with
#    training.device=cuda (TITAN_TEST_DEVICE, read by tests/helpers.py): loss falls, same seed
#    same losses, bit-for-bit resume, corrupt checkpoints refused, async saves, W&B files.
# 2. Every precision preset on llama3_1b dims (dim 2048, 32 heads / 8 kv; 8 of its 16 layers,
#    vocab 2048 of the embedded tokenizer so the cells fit side by side): tokens/s, TFLOP/s, MFU,
#    peak memory, measured interleaved by benchmarks/grid.py with bf16 as the reference row.
#    mxfp8 (real kernels) needs Blackwell (SM100+): on Hopper it must be refused with a clear
#    message, which is checked instead.
# 3. compile off/model x bf16/float8_rowwise: the compile speed-up and the float8-vs-bf16 ratio.
# Results: OUT_DIR/*.json and OUT_DIR/gpu_check.log; the tables are printed as they come.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-gpu_check}
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 WANDB_MODE=offline TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/titan-inductor}
failed=()
step() { echo; echo "=== $1 ($(date +%T))"; }
check() { "$@" || failed+=("$*"); }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || rocm-smi || true
python - <<'PY'
import torch, torchao
from titan.train.env import accelerator_runtime
print(f"torch {torch.__version__}, torchao {torchao.__version__}, {accelerator_runtime()}")
print(f"device: {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}")
PY

step "1. CUDA variants of the single-device CLI tests (~2 min)"
check env TITAN_TEST_DEVICE=cuda timeout 300 python -m pytest -q -x -p no:cacheprovider \
  tests/test_train.py

DIMS=(model=llama3_1b model.n_layers=8 training.seq_len=2048 training.global_batch_size=4 optim.fused=true)

step "2a. precision presets, eager (~2 min)"
check timeout 300 python benchmarks/grid.py --steps 10 --warmup 3 --json "$OUT_DIR/precision_a.json" \
  --grid precision=bf16,float8_tensorwise,float8_rowwise,float8_rowwise_gw_hp "${DIMS[@]}"
step "2b. precision presets, eager (~2 min)"
check timeout 300 python benchmarks/grid.py --steps 10 --warmup 3 --json "$OUT_DIR/precision_b.json" \
  --grid precision=bf16,fp32,mxfp8_emulated,bf16_optim_states "${DIMS[@]}"
step "2c. mxfp8 (real kernels): runs on SM100+, a clear refusal (exit 2) on earlier GPUs"
python -m titan.train precision=mxfp8 training.steps=5 training.val_interval=0 "${DIMS[@]}" \
  hydra.run.dir="$OUT_DIR/mxfp8_run" > "$OUT_DIR/mxfp8.log" 2>&1
rc=$?
major=$(python -c "import torch; print(torch.cuda.get_device_capability()[0])")
tail -n 3 "$OUT_DIR/mxfp8.log"
if [ "$major" -ge 10 ]; then [ $rc -eq 0 ] || failed+=("mxfp8 on SM$major: exit $rc");
else [ $rc -eq 2 ] && grep -q "config error" "$OUT_DIR/mxfp8.log" || failed+=("mxfp8 refusal on SM$major: exit $rc"); fi

step "3. compile off/model x bf16/float8_rowwise (~3 min with compilation)"
check timeout 420 python benchmarks/grid.py --steps 10 --warmup 4 --skip-memory --json "$OUT_DIR/compile.json" \
  --grid precision=bf16,float8_rowwise compile=off,model "${DIMS[@]}"

step "summary"
if [ ${#failed[@]} -eq 0 ]; then echo "gpu_check: all checks passed"; exit 0; fi
printf 'gpu_check FAILED: %s\n' "${failed[@]}"
exit 1
