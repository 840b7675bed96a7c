#!/usr/bin/env bash
# The two-GPU measurements of docs/DISTRIBUTED.md on a GPU host, in one command. It needs
# the CIFAR-10 pack beside the project (../shared/data, or a copy in .shared-data) and, where
# the host lacks them, the project's missing packages as wheels (WHEELS).
#
#   PARTS=spread,ddp50 LIMIT=585 OUT=out bash benchmarks/gpu_suite.sh
#
# PARTS (required): a comma list of
#   smi      nvidia-smi topo -m and the core count
#   spread   spread_speed.py: 16 ResNet-20 retrainings (40 epochs) on one GPU, then spread
#   startup  worker_startup.py: where a sweep worker's start-up goes
#   ddp50    ddp_scaling.py, ResNet-50
#   ddp18    ddp_scaling.py, ResNet-18, with a whole round and the mask agreement
# LIMIT: seconds for everything (each part gets what is left; a part with under 30 s left
# is skipped). OUT: where results and the log go (default ./gpu-out). WHEELS: a folder of
# wheels installed first when it exists (default .whl). DATA: where CIFAR-10 is written
# (default /tmp/data). PYC=1: keep Python's bytecode in /tmp/pyc (a host whose Python
# writes none compiles every module in every process: 5 s more a sweep worker on the
# device host). GPUS, SPREAD_DEVICES, SPREAD_JOBS: see the scripts. SPREAD_EXTRA,
# STARTUP_EXTRA, DDP_EXTRA: more options for a script, split at spaces (DDP_EXTRA defaults
# to "--comm --ceiling"; set it empty for none). Exits 1 if any part failed or ran out of
# time, 2 for an unknown part.
set -u -o pipefail
: "${PARTS:?set PARTS, e.g. PARTS=spread,ddp50}"
for part in ${PARTS//,/ }; do
  case $part in smi|spread|startup|ddp50|ddp18) ;;
    *) echo "unknown part $part (smi, spread, startup, ddp50, ddp18)" >&2; exit 2 ;;
  esac
done
T0=$(date +%s); LIMIT=${LIMIT:-560}
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"; LOG=$OUT/log.txt
export PYTHONUNBUFFERED=1
WHEELS=${WHEELS:-.whl}
if [ -d "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
DATA=${DATA:-/tmp/data}
SHARED=$( [ -d .shared-data ] && echo .shared-data || echo ../shared/data )
[ -d "$DATA/cifar-10-batches-py" ] || python3 "$SHARED/make_cifar10.py" "$DATA" >/dev/null \
  || { echo "could not write CIFAR-10 from $SHARED" >&2; exit 1; }
python3 - <<'PY' 2>&1 | tee -a "$LOG"
import glob, os
import torch
d = os.path.dirname(torch.__file__)
print("bytecode: PYTHONDONTWRITEBYTECODE", os.environ.get("PYTHONDONTWRITEBYTECODE"),
      "| .pyc under torch/_inductor:", len(glob.glob(d + "/_inductor/**/*.pyc", recursive=True)),
      "of", len(glob.glob(d + "/_inductor/**/*.py", recursive=True)), "modules")
PY
if [ -n "${PYC:-}" ]; then
  unset PYTHONDONTWRITEBYTECODE; export PYTHONPYCACHEPREFIX=/tmp/pyc
  echo "bytecode kept in $PYTHONPYCACHEPREFIX" | tee -a "$LOG"
fi
echo "set up in $(( $(date +%s) - T0 )) s; $(nvidia-smi -L | tr '\n' ';')" | tee -a "$LOG"
failed=0
for part in ${PARTS//,/ }; do
  budget=$(( $(left) - 5 ))
  if [ "$budget" -lt 30 ]; then
    echo "== $part skipped: $(left) s left" | tee -a "$LOG"; failed=1; continue
  fi
  echo "== $part ($(left) s left) $(date +%T)" | tee -a "$LOG"
  case $part in
    smi) { nvidia-smi topo -m; nproc; } 2>&1 | tee -a "$LOG" ;;
    # shellcheck disable=SC2086  (the *_EXTRA options are split at spaces on purpose)
    spread) timeout "$budget" python3 benchmarks/spread_speed.py --data-dir "$DATA" \
        --devices "${SPREAD_DEVICES:-all}" --jobs "${SPREAD_JOBS:-16}" --epochs 40 \
        ${SPREAD_EXTRA:-} --json-out "$OUT/spread.json" 2>&1 | tee -a "$LOG" ;;
    startup) timeout "$budget" python3 benchmarks/worker_startup.py --data-dir "$DATA" \
        --epochs 5 ${STARTUP_EXTRA:-} --json-out "$OUT/startup.json" 2>&1 | tee -a "$LOG" ;;
    ddp50) timeout "$budget" python3 benchmarks/ddp_scaling.py --gpus "${GPUS:-1,2}" \
        --arch resnet50 --data-dir "$DATA" ${DDP_EXTRA---comm --ceiling} \
        --json-out "$OUT/ddp50.json" 2>&1 | tee -a "$LOG" ;;
    ddp18) timeout "$budget" python3 benchmarks/ddp_scaling.py --gpus "${GPUS:-1,2}" \
        --arch resnet18 --data-dir "$DATA" --round --json-out "$OUT/ddp18.json" 2>&1 \
        | tee -a "$LOG" ;;
  esac
  rc=$?
  if [ "$rc" -ne 0 ]; then echo "== $part failed (exit $rc)" | tee -a "$LOG"; failed=1; fi
done
echo "all done in $(( $(date +%s) - T0 )) s" | tee -a "$LOG"
exit "$failed"
