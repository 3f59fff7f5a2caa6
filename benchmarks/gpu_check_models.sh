#!/usr/bin/env bash
# GPU checks for real model shapes, in one go on a machine with a CUDA GPU and PyTorch (no network):
#   1. PPO-ptx at a random-init Qwen2-0.5B shape, full weights, batch 64, response 128;
#   2. the same at a Qwen2-1.5B shape with LoRA (r = 16);
#   3. the memory planner against torch.cuda.max_memory_allocated at those shapes.
# Wheels for packages the machine lacks go in .whl/ (see benchmarks/RESULTS.md).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh" gpu_check_models
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
echo "== qwen2-0.5b full"; timeout 150 python3 -m benchmarks.gpu_shapes --shape qwen2-0.5b --steps 2 2>&1 | tail -n 1
echo "== qwen2-1.5b lora r16"; timeout 180 python3 -m benchmarks.gpu_shapes --shape qwen2-1.5b --lora-r 16 --steps 2 2>&1 | tail -n 1
echo "== planner vs measured (ppo)"
timeout 150 python3 benchmarks/memory_check.py --device cuda --stages ppo --modes full,lora --batch 64 \
  --prompt-length 64 --response-length 128 --steps 1 --shape qwen2:24:896:14:2:4864:151936 2>&1 | grep "^{" 
