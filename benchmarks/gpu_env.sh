# Sourced by the benchmarks/gpu_check*.sh scripts: run from the repository root, log to
# ${OUT:-/tmp}/$1.log, and put the carried wheels in .whl/ (packages the GPU machine lacks) on the path.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec > >(tee "${OUT:-/tmp}/$1.log") 2>&1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
