# Sourced by the benchmarks/gpu_check*.sh scripts: run from the repository root, log to
# ${LOG_DIR:-${OUT:-/tmp}}/$1.log, and put the carried wheels in .whl/ (packages the GPU machine lacks,
# benchmarks/gpu_wheels.sh) on the path: those built for this Python, so a dry run elsewhere takes what fits.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec > >(tee "${LOG_DIR:-${OUT:-/tmp}}/$1.log") 2>&1
export PYTHONPATH=$PWD
PY_TAG=$(python3 -c 'import sys; print("cp%d%d|py%d%d" % (sys.version_info[:2] * 2))')
mapfile -t CARRIED < <(ls .whl/*.whl 2>/dev/null | grep -E -- "-(py3|$PY_TAG)-" || true)
if [ ${#CARRIED[@]} -gt 0 ]; then
  SITE=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${CARRIED[@]}"
  export PYTHONPATH=$SITE:$PWD
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
