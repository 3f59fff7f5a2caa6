#!/usr/bin/env bash
# GPU checks in one go, for a machine with a CUDA GPU and PyTorch but no network:
#   1. PPO throughput, ours vs TRL 1.12's PPOTrainer, at the reference shape (3 alternating runs)
#      and at a ~0.46B-parameter GPT-2 shape (24 layers, 1024 wide, vocab 151,936), bf16 autocast;
#      ours also reports the update's model FLOP/s.
#   2. The real PPO stage (`rlhf ppo`) for 10 steps on CUDA: checkpoints, held-out evaluation.
# TRL 1.12 and `datasets` come as wheels in .whl/ (pip download ... -d .whl, see benchmarks/RESULTS.md).
# Every result line is JSON; the log goes to ${OUT:-/tmp}/gpu_check.log.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh" gpu_check
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"

REF=(--layers 4 --embd 128 --heads 4 --vocab 512 --batch 16 --response-length 24 --ppo-epochs 4 --episodes 256
     --num-minibatches 1 --device cuda)
BIG=(--layers 24 --embd 1024 --heads 16 --vocab 151936 --batch 32 --prompt-length 32 --response-length 64
     --ppo-epochs 4 --episodes 160 --num-minibatches 2 --device cuda)
for i in 1 2 3; do
  echo "== reference shape, run $i: TRL"; timeout 120 python3 benchmarks/trl_ppo_reference.py "${REF[@]}" 2>&1 | tail -n 1
  echo "== reference shape, run $i: ours"; timeout 120 python3 -m benchmarks.bench_ppo --json "${REF[@]}" 2>&1 | tail -n 1
done
echo "== 0.46B shape: ours"; timeout 150 python3 -m benchmarks.bench_ppo --json "${BIG[@]}" 2>&1 | tail -n 1
echo "== 0.46B shape: TRL"; timeout 150 python3 benchmarks/trl_ppo_reference.py "${BIG[@]}" 2>&1 | tail -n 3

echo "== the PPO stage on CUDA (rlhf ppo, 10 steps, ptx on, EMA on)"
export RLHF_WORKBENCH_HOME=/tmp/wb
timeout 150 python3 -m core.cli ppo --preset quick --name gpu-ppo --output /tmp/wb/ppo \
  --set sft_model=bundled --set reward_model=bundled --set device=cuda --set total_episodes=640 \
  --set save_every=5 --set ema_decay=0.99 --set eval_prompts=64 2>&1 | grep -v "it/s" | tail -n 8
python3 -c "import json; print(json.dumps(json.load(open('/tmp/wb/ppo/ppo_summary.json'))))"
