#!/usr/bin/env bash
# The GPU check (issue 35), one run of under 9 minutes on one GPU with PyTorch and no network:
#   (a) PPO at the reference shape, ours against TRL 1.12's PPOTrainer, 3 alternating pairs (a_reference.json);
#   (b) PPO-ptx at the Qwen2.5-0.5B shape, random weights, full and LoRA r = 16: episodes/s, tokens/s, the
#       step split, MFU by NeMo-RL's definitions, peak memory against the planner (`rlhf plan ppo`), the
#       first step's KL with bf16 rollouts (b_full.json, b_lora.json; benchmarks/gpu_shapes.py);
#   (c) SFT and PPO under accelerate with configs/accelerate/fsdp2.yaml on 1 process against the plain run,
#       20 steps, curves side by side (c_fsdp2.json; benchmarks/fsdp_check.py);
#   (d) sampling at batch 64 x 128 new tokens: HF's generate, our loop's default cache, a static cache and
#       the static cache with a compiled decode step (CUDA graphs); tokens/s and the same tokens for the same
#       seed (d_generation.json; benchmarks/generation_speed.py).
# Plus env.json (GPU, versions) and gpu_check.log: 7 files in OUT_DIR, as the lent machines return at most 8.
#
#   benchmarks/gpu_wheels.sh                          # here, once: the wheels the GPU machine lacks, into .whl/
#   bash benchmarks/gpu_check.sh [OUT_DIR]            # there (OUT_DIR: $OUT, else /tmp/gpu_check)
#   bash benchmarks/gpu_check.sh --dry-run [OUT_DIR]  # every part at tiny shapes on the CPU: the script works
#
# Each part runs under its own time limit (seconds below: 510 in all, under 9 minutes with the wheels'
# install and env.json), in the order b, d, c, a, so a part that overruns costs only itself; parts (c) and
# (d) print a JSON line after each stage or path, and a part's file holds its last complete line, or
# {"error": ...} when it printed none.
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT_DIR=$(realpath -m "${1:-${OUT:-/tmp/gpu_check}}")
mkdir -p "$OUT_DIR"
LOG_DIR=$OUT_DIR source "$(dirname "$0")/gpu_env.sh" gpu_check
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

if [ $DRY = 1 ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  DEVICE=cpu; STEPS=4; LIMIT_B=300; LIMIT_C=300; LIMIT_D=300; LIMIT_A=300; PER_RUN_A=120
  SHAPE_B=(--shape tiny --batch 8 --prompt-length 8 --response-length 8 --num-minibatches 2 --ppo-epochs 1 --steps 1)
  SHAPE_D=(--shape tiny --batch 4 --prompt-length 8 --new-tokens 16)
  ACCEL=configs/accelerate/ddp.yaml  # accelerate applies FSDP on GPUs only (core/runs/launch.py refuses it here)
  EPISODES_A=32
else
  DEVICE=cuda; STEPS=20; LIMIT_B=160; LIMIT_C=110; LIMIT_D=140; LIMIT_A=100; PER_RUN_A=40
  SHAPE_B=(--shape qwen2-0.5b --batch 64 --prompt-length 64 --response-length 128 --num-minibatches 4 --steps 2)
  SHAPE_D=(--shape qwen2-0.5b --batch 64 --prompt-length 64 --new-tokens 128)
  ACCEL=configs/accelerate/fsdp2.yaml
  EPISODES_A=256
fi

# part NAME SECONDS COMMAND...: run COMMAND under a time limit, its output into the log, and its last JSON
# line into OUT_DIR/NAME.json (or the failure, as JSON).
part() {
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$TMP/$name.out"
  local rc=${PIPESTATUS[0]}
  if grep '^{' "$TMP/$name.out" | tail -n 1 > "$TMP/$name.json" && [ -s "$TMP/$name.json" ]; then
    mv "$TMP/$name.json" "$OUT_DIR/$name.json"
  else
    python3 -c 'import json, sys; print(json.dumps({"part": sys.argv[1], "error": "no result", "rc": int(sys.argv[2]),
                "tail": open(sys.argv[3]).read()[-3000:]}))' "$name" "$rc" "$TMP/$name.out" > "$OUT_DIR/$name.json"
  fi
  echo "== $name: rc $rc, $((SECONDS - start))s"
}

python3 - "$DEVICE" > "$OUT_DIR/env.json" <<'PYEOF'
import importlib.metadata as md, json, sys, torch
versions = {}
for name in ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "tokenizers", "huggingface_hub"):
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = None
cuda = sys.argv[1] == "cuda"
print(json.dumps({"device": torch.cuda.get_device_name() if cuda else "cpu", "dry_run": not cuda,
                  "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
                  "cuda": torch.version.cuda, "python": sys.version.split()[0], "versions": versions}))
PYEOF
cat "$OUT_DIR/env.json"

part b_full "$((LIMIT_B / 2))" python3 -m benchmarks.gpu_shapes "${SHAPE_B[@]}" --device "$DEVICE"
part b_lora "$((LIMIT_B / 2))" python3 -m benchmarks.gpu_shapes "${SHAPE_B[@]}" --lora-r 16 --device "$DEVICE"
part d_generation "$LIMIT_D" python3 -m benchmarks.generation_speed "${SHAPE_D[@]}" --device "$DEVICE"
part c_fsdp2 "$LIMIT_C" python3 -m benchmarks.fsdp_check --device "$DEVICE" --accelerate-config "$ACCEL" \
  --steps "$STEPS"

# (a): TRL and ours alternate, each run a fresh process, as many pairs of 3 as the part's limit allows.
REF=(--layers 4 --embd 128 --heads 4 --vocab 512 --batch 16 --response-length 24 --ppo-epochs 4
     --episodes "$EPISODES_A" --num-minibatches 1 --device "$DEVICE" --json)
a_end=$((SECONDS + LIMIT_A))
echo "== a_reference (limit ${LIMIT_A}s)"
for i in 1 2 3; do
  for side in benchmarks/trl_ppo_reference.py "-m benchmarks.bench_ppo"; do
    left=$((a_end - SECONDS)); [ $left -gt $PER_RUN_A ] && left=$PER_RUN_A
    if [ $left -lt 5 ]; then echo "== a_reference: out of time after $((i - 1)) pairs"; break 2; fi
    # shellcheck disable=SC2086  # "-m benchmarks.bench_ppo" is two words on purpose
    timeout "$left" python3 $side "${REF[@]}" 2>>"$TMP/a.err" | grep '^{' | tail -n 1 | tee -a "$TMP/a.jsonl"
  done
done
python3 -m benchmarks.paired "$TMP/a.jsonl" --json > "$OUT_DIR/a_reference.json" \
  || python3 -c 'import json, sys; print(json.dumps({"part": "a", "error": open(sys.argv[1]).read()[-3000:]}))' \
       "$TMP/a.err" > "$OUT_DIR/a_reference.json"
tail -c 600 "$OUT_DIR/a_reference.json"; echo
echo "== done in ${SECONDS}s; results in $OUT_DIR"
ls -l "$OUT_DIR"
