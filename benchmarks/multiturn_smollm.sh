#!/usr/bin/env bash
# Every stage on a multi-turn dataset (40 HH-RLHF-shaped pairs + 40 ShareGPT conversations) with a real
# chat model loaded from its GGUF file: seconds and peak RSS per stage (benchmarks/RESULTS.md).
#   benchmarks/multiturn_smollm.sh path/to/SmolLM2-135M-Instruct.Q4_1.gguf OUT_DIR
#   LORA=16 benchmarks/multiturn_smollm.sh ...   # PPO, GRPO and RLOO train LoRA adapters of rank 16
# A stage whose output directory already holds a model is skipped, so a run killed part-way goes on.
set -euo pipefail
GGUF=$1; OUT=$2
export HF_HUB_OFFLINE=1 RLHF_WORKBENCH_HOME=$OUT/home
python -m benchmarks.multiturn_data "$OUT/data"
run() {  # stage, then --set arguments
  local stage=$1; shift
  if [ -f "$OUT/$stage/config.json" ]; then echo "$stage: done before, skipped"; return; fi
  /usr/bin/time -v -o "$OUT/$stage.time" python -m core.cli "$stage" --output "$OUT/$stage" --name "mt-$stage" \
    "$@" > "$OUT/$stage.log" 2>&1
  echo "$stage: $(grep 'Elapsed (wall' "$OUT/$stage.time" | awk '{print $NF}') wall," \
       "$(grep 'Maximum resident' "$OUT/$stage.time" | awk '{print $NF}') KB peak RSS"
}
D=$OUT/data
ADAPTER=(${LORA:+--set lora_r=$LORA})
run sft --set model="$GGUF" --set data="$D/sharegpt.jsonl" --set epochs=1 --set batch_size=8 --set max_length=192 \
  --set eval_prompts=0 --set learning_rate=2e-5 --set device=cpu
run rm --set sft_model="$OUT/sft" --set data="$D/hh.jsonl" --set epochs=1 --set batch_size=8 --set max_length=160 \
  --set learning_rate=2e-5 --set device=cpu
run ppo "${ADAPTER[@]}" --set sft_model="$OUT/sft" --set reward_model="$OUT/rm" --set prompts="$D/prompts.jsonl" \
  --set total_episodes=16 --set batch_size=8 --set response_length=24 --set ptx_data="$D/ptx.txt" \
  --set ptx_batch_size=2 --set eval_prompts=4 --set learning_rate=1e-6 --set device=cpu
run dpo --set sft_model="$OUT/sft" --set data="$D/hh.jsonl" --set max_steps=4 --set batch_size=8 \
  --set max_length=160 --set eval_prompts=0 --set learning_rate=1e-6 --set device=cpu
run grpo "${ADAPTER[@]}" --set sft_model="$OUT/sft" --set reward_model="$OUT/rm" --set prompts="$D/prompts.jsonl" \
  --set total_episodes=16 --set batch_size=8 --set num_generations=4 --set max_completion_length=24 \
  --set eval_prompts=0 --set learning_rate=1e-6 --set device=cpu
run rloo "${ADAPTER[@]}" --set sft_model="$OUT/sft" --set reward_model="$OUT/rm" --set prompts="$D/prompts.jsonl" \
  --set total_episodes=16 --set batch_size=8 --set num_generations=4 --set max_completion_length=24 \
  --set eval_prompts=0 --set learning_rate=1e-6 --set device=cpu
