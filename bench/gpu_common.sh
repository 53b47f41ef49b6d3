# Sourced by the device batch scripts: wheels, PYTHONPATH, versions, and `part NAME SECONDS CMD...`
# (each part has its own time limit and writes $OUT/NAME.log; its tail is printed).
set -u
export OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if [ ! -d /tmp/site/diffusers ]; then           # once per machine (a script calling another sources this twice)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  if ls .whl_extra/*.whl > /dev/null 2>&1; then   # mlflow for the pyfunc GPU test only (own folder)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_mlflow .whl_extra/*.whl
  fi
fi
export PYTHONPATH=/tmp/site:$PWD:$PWD/kernels:$PWD/steps
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"
part() {  # part NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  local t0=$(date +%s)
  timeout -k 10 "$secs" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name rc=$rc $(( $(date +%s) - t0 ))s"; grep -v -E "^\s*$|should be kept in float32|Warning|warn\(" "$OUT/$name.log" | tail -n 14
}
