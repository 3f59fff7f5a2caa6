#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh carries to a GPU machine that has PyTorch but no network, into .whl/
# (git-ignored; gpu_env.sh installs them with --no-index --no-deps into /tmp/site there). Run once here:
#
#   benchmarks/gpu_wheels.sh
#
# What the lent machines lacked when last read (their image has torch, accelerate 1.15, tokenizers,
# safetensors, pyarrow, xxhash, pandas, pyyaml): the project's transformers (they had 5.17), peft, and for
# part (a) TRL 1.12's PPOTrainer with `datasets` and its two needs; regex as new as transformers 5.23 checks
# for at import (the machine's hub 1.33 and tokenizers 0.23.2 do). About 17 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(transformers==5.23.0 regex==2026.5.9 peft==0.21.2 trl==1.12.0 datasets==5.2.0 dill==0.4.1
        multiprocess==0.70.19)
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${WHEELS[@]}"
ls -l .whl
