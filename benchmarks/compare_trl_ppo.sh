#!/usr/bin/env bash
# PPO throughput, ours vs TRL's PPOTrainer (trl.experimental.ppo, TRL 1.12), on one shape:
# random-init GPT-2 policy/reference/value/reward, synthetic prompts, 1 minibatch.
#
#   benchmarks/compare_trl_ppo.sh                 # the default shape below
#   THREADS=1 REPEATS=3 benchmarks/compare_trl_ppo.sh --episodes 512
#
# TRL runs in a side venv (.bench-venv, --system-site-packages) so its pinned version never
# touches the project's environment; trl 1.12 is installed with --no-deps and runs on our
# transformers 5.x. With REPEATS > 1 the two alternate and the median of each is reported,
# which matters on a shared machine. Extra arguments go to both sides.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
REPEATS=${REPEATS:-1}
SHAPE=(--layers 4 --embd 128 --heads 4 --vocab 512 --batch 16 --response-length 24 --ppo-epochs 4
       --episodes 256 --num-minibatches 1 "$@")
if [ -n "${THREADS:-}" ]; then SHAPE+=(--threads "$THREADS"); fi

if [ ! -x .bench-venv/bin/python ]; then
  "$PY" -m venv --system-site-packages .bench-venv
fi
if [ "$(.bench-venv/bin/python -c 'import trl; print(trl.__version__)' 2>/dev/null)" != "1.12.0" ]; then
  .bench-venv/bin/pip install -q --disable-pip-version-check trl==1.12.0 --no-deps
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
results=$(mktemp)
trap 'rm -f "$results"' EXIT
for i in $(seq "$REPEATS"); do
  echo "run $i/$REPEATS: TRL ..." >&2
  .bench-venv/bin/python benchmarks/trl_ppo_reference.py "${SHAPE[@]}" 2>/dev/null | tail -n 1 >> "$results"
  echo "run $i/$REPEATS: ours ..." >&2
  "$PY" -m benchmarks.bench_ppo --json "${SHAPE[@]}" 2>/dev/null | tail -n 1 >> "$results"
done

"$PY" -m benchmarks.paired "$results"
