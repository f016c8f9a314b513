#!/usr/bin/env bash
# One prepared run of every accelerator check, for a session that is lent a CUDA GPU (the `device`
# tool: `run` with command "bash benchmarks/device_check.sh", timeout_s 540). About 6-8 minutes on
# an H200. Uses the machine's own python3 (PyTorch with CUDA, numpy, scipy, pandas, pytest);
# nothing is installed. Everything it prints also goes to $OUT/device_check.log when OUT is set.
#
#   1. tests/test_device.py: per-example norms and book-keeping vs torch.func with CUDA kernels
#      (TF32 off), the GNS hook under bf16 autocast vs its brute force, the loop with every hook
#   2. benchmarks/gns_overhead.py on CUDA: A/B step time and peak memory, small and gpt2 presets
#   3. benchmarks/loop_throughput.py on CUDA: tokens/s and MFU of the loop (docs/training.md)
#   (tests/test_device.py also runs the loop under FSDP2 + NCCL vs DDP when the machine has 2+ GPUs)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MIDTRAIN_CACHE="${TMPDIR:-/tmp}/midtrain_cache"
log="${OUT:-/tmp}/device_check.log"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  echo "== 1. tests/test_device.py"
  timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_device.py 2>&1 | tail -25
  echo "== 2. gns_overhead on cuda"
  timeout 200 python3 benchmarks/gns_overhead.py --device cuda --presets small,gpt2 \
      --modes microbatch,layernorm,per_example,per_example_bk --steps 12 --rounds 3 --warmup 2
  echo "== 3. loop throughput on cuda"
  timeout 120 python3 benchmarks/loop_throughput.py --preset gpt2 --device cuda --steps 20 --rounds 2 \
      --batch-size 32 --seq-len 1024
} 2>&1 | tee "$log"
