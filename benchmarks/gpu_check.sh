#!/usr/bin/env bash
# The GPU checks of extraction and training, in one run that fits a short device loan.
#
#   bash benchmarks/gpu_check.sh             # on a CUDA machine, from the repository root or anywhere
#   bash benchmarks/gpu_check.sh --dry-run   # the same sequence on CPU at tiny sizes (about 1 CPU-minute;
#                                            # tests/test_benchmarks.py runs it in CI)
#
# Time on one H100/H200 (16 cores): about 6 minutes expected (an estimate from the H100 figures in
# docs/performance.md: step 1 under 0.5, step 2 about 1, step 3 about 3-4, step 4 about 1; this
# sequence has not run on a GPU yet), never more than TOTAL_LIMIT (default 480 s = 8 minutes: inside
# a 10-minute per-command limit and a 15-minute device budget with the machine's start-up). Each
# step has its own limit, cut to the time left, so a slow step cannot eat the others; a failing step
# is reported and the next one runs; exit status 1 when any step failed.
#
# Installs nothing: it needs a Python with torch (CUDA build), torchvision and the project's
# dependencies (PYTHON=..., else .venv/bin/python, else python3); the repository itself is put on
# PYTHONPATH. Steps:
#   1. what the machine is (GPU, versions) and one nvJPEG decode;
#   2. the CUDA-only tests: tests/test_gpu_decode.py (nvJPEG features vs CPU-decoded: linear CKA
#      >= 0.999, per-row cosine >= 0.99) and the CUDA-graph training tests (-k cuda);
#   3. benchmarks/bench_extract.py --device cuda: pipeline vs bare forward, decode cpu vs gpu in the
#      same run (ResNet-18, MobileNetV2, DINOv2-small/base, GPT-2, MiniLM sizes; random weights;
#      IMAGES=2048 generated 500x375 JPEGs with 5 captions each; batch 256; fp32 and bf16; REPEAT=1
#      run each, REPEAT=2 adds about 3 minutes);
#   4. benchmarks/bench_train.py --device cuda --epochs 10: the training step (CUDA graph and eager)
#      against a naive HDF5 DataLoader loop, on 29,000 synthetic pairs.
# --dry-run differs only where a CPU must: device cpu (decode cpu, the nvJPEG decode of step 1 on
# CPU), the tests of step 2 collected but not run (`make test` runs them on CPU; collecting checks
# that the files and the -k selection exist), and steps 3-4 run with --quick --device cpu.
#
# Written to $OUT (default ./gpu_check_out), each file as its step goes, so a cut-off run keeps what
# it measured: summary.txt (one line per step with its exit status; also on stdout), env.txt,
# tests_gpu_decode.txt, tests_cuda_train.txt, bench_cuda.txt (the extraction table for
# docs/performance.md; rows are printed as they are measured, the full table at the end),
# bench_train_cuda.txt, and a .stderr file per step (progress bars, warnings). Everything also goes
# to stdout.
set -euo pipefail

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd); fi  # before cd: a relative $OUT
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
IMAGES=${IMAGES:-2048}
REPEAT=${REPEAT:-1}
TOTAL_LIMIT=${TOTAL_LIMIT:-480}  # seconds for the whole script
if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  COLLECT=(--collect-only)
  BENCH=(benchmarks/bench_extract.py --quick --device cpu)
  TRAIN=(benchmarks/bench_train.py --quick --device cpu)
else
  DEVICE=cuda
  COLLECT=()
  BENCH=(benchmarks/bench_extract.py --device cuda --images "$IMAGES" --repeat "$REPEAT")
  TRAIN=(benchmarks/bench_train.py --device cuda --epochs 10)
fi
mkdir -p "$OUT"
: > "$OUT/summary.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 DEVICE
started=$(date +%s)
failed=()
elapsed() { echo $(( $(date +%s) - started )); }
note() { echo "== [$(elapsed)s] $*" | tee -a "$OUT/summary.txt"; }

# step NAME LIMIT_S FILE COMMAND...: COMMAND under the smaller of LIMIT_S and the time left; stdout to
# $OUT/FILE and the terminal, stderr to $OUT/FILE's .stderr; a failure is noted, never fatal.
step() {
  local name=$1 limit=$2 file=$3 left rc=0
  shift 3
  left=$(( TOTAL_LIMIT - $(elapsed) ))
  if (( limit > left )); then limit=$left; fi
  if (( limit < 10 )); then
    note "$name: SKIPPED (no time left of TOTAL_LIMIT=${TOTAL_LIMIT}s)"
    failed+=("$name")
    return 0
  fi
  note "$name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" 2> "$OUT/${file%.txt}.stderr" | tee "$OUT/$file" || rc=$?
  if (( rc == 124 || rc == 137 )); then
    note "$name: TIME LIMIT (${limit}s); what it printed is in $OUT/$file"
  else
    note "$name: exit $rc: $(tail -n 1 "$OUT/$file" 2>/dev/null || true)"
  fi
  if (( rc != 0 )); then failed+=("$name"); fi
}

note "gpu_check $([ "$DRY" = 1 ] && echo '--dry-run (CPU, tiny sizes)' || echo 'on CUDA'): python $PY, out $OUT"

step "1/4 machine" 60 env.txt "$PY" - <<'EOF'
import io, os, platform, shutil, subprocess, warnings
import torch, torchvision
from PIL import Image
device = os.environ["DEVICE"]
print("python", platform.python_version(), "torch", torch.__version__, "torchvision", torchvision.__version__,
      "cores", len(os.sched_getaffinity(0)))
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
if shutil.which("nvidia-smi"):
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"],
                         capture_output=True, text=True, timeout=20).stdout.strip())
buf = io.BytesIO()
Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, "JPEG")
warnings.simplefilter("ignore", DeprecationWarning)
out = torchvision.io.decode_jpeg([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], device=device)
print(f"JPEG decode on {device} ok:", tuple(out[0].shape), out[0].device, out[0].float().mean((1, 2)).tolist())
EOF

step "2/4 tests/test_gpu_decode.py" 150 tests_gpu_decode.txt \
  "$PY" -m pytest -q -rsP -p no:cacheprovider "${COLLECT[@]}" tests/test_gpu_decode.py
step "2/4 CUDA training tests" 90 tests_cuda_train.txt \
  "$PY" -m pytest -q -rs -p no:cacheprovider "${COLLECT[@]}" -m "not slow" -k cuda tests/test_train.py \
  tests/test_train_scale.py

step "3/4 ${BENCH[*]}" 330 bench_cuda.txt "$PY" "${BENCH[@]}"
step "4/4 ${TRAIN[*]}" 120 bench_train_cuda.txt "$PY" "${TRAIN[@]}"

if (( ${#failed[@]} )); then
  note "done in $(elapsed)s; FAILED: ${failed[*]}; outputs in $OUT"
  exit 1
fi
note "done in $(elapsed)s, every step passed; outputs in $OUT"
