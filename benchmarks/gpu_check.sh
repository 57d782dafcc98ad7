#!/usr/bin/env bash
# The GPU checks of extraction, in one short run (about 6-8 minutes on one H100/H200 with 16 cores).
#
#   bash benchmarks/gpu_check.sh            # from the repository root or anywhere
#
# Installs nothing: it needs a Python with torch (CUDA build), torchvision and the project's
# dependencies (PYTHON=..., else .venv/bin/python, else python3); the repository itself is put on
# PYTHONPATH. Steps, each with its own time limit so a slow step cannot eat the others:
#   1. what the machine is (GPU, versions) and one nvJPEG decode;
#   2. the CUDA-only tests: tests/test_gpu_decode.py (nvJPEG features vs CPU-decoded: linear CKA
#      >= 0.999, per-row cosine >= 0.99) and the CUDA-graph training tests;
#   3. benchmarks/bench_extract.py --device cuda: pipeline vs bare forward, decode cpu vs gpu in the
#      same run (ResNet-18, MobileNetV2, DINOv2-small/base, GPT-2, MiniLM sizes; random weights;
#      IMAGES=2048 generated 500x375 JPEGs with 5 captions each; batch 256; fp32 and bf16).
# Everything is written to $OUT (default ./gpu_check_out): summary.txt, env.txt, tests_*.txt,
# bench_cuda.txt (the table for the README; rows are printed as they are measured) and
# bench_cuda.stderr (progress bars, warnings).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${OUT:-gpu_check_out}
IMAGES=${IMAGES:-2048}
REPEAT=${REPEAT:-2}
BENCH_LIMIT=${BENCH_LIMIT:-330}  # seconds
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
started=$(date +%s)
note() { echo "== [$(( $(date +%s) - started ))s] $*" | tee -a "$OUT/summary.txt"; }

note "1/3 machine"
timeout 120 "$PY" - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import io, os, platform, warnings
import torch, torchvision
from PIL import Image
print("python", platform.python_version(), "torch", torch.__version__, "torchvision", torchvision.__version__,
      "cores", len(os.sched_getaffinity(0)))
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
buf = io.BytesIO()
Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, "JPEG")
warnings.simplefilter("ignore", DeprecationWarning)
out = torchvision.io.decode_jpeg([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], device="cuda")
print("nvJPEG decode ok:", tuple(out[0].shape), out[0].device, out[0].float().mean((1, 2)).tolist())
EOF
note "machine: exit ${PIPESTATUS[0]}"

note "2/3 CUDA-only tests"
timeout 200 "$PY" -m pytest -q -rsP -p no:cacheprovider tests/test_gpu_decode.py 2>&1 | tee "$OUT/tests_gpu_decode.txt"
note "tests/test_gpu_decode.py: exit ${PIPESTATUS[0]}: $(tail -n 1 "$OUT/tests_gpu_decode.txt")"
timeout 120 "$PY" -m pytest -q -rs -p no:cacheprovider -m "not slow" -k cuda tests/test_train.py \
  tests/test_train_scale.py 2>&1 | tee "$OUT/tests_cuda_train.txt"
note "CUDA training tests: exit ${PIPESTATUS[0]}: $(tail -n 1 "$OUT/tests_cuda_train.txt")"

note "3/3 bench_extract --device cuda --images $IMAGES --repeat $REPEAT (limit ${BENCH_LIMIT}s)"
timeout "$BENCH_LIMIT" "$PY" benchmarks/bench_extract.py --device cuda --images "$IMAGES" --repeat "$REPEAT" \
  2> "$OUT/bench_cuda.stderr" | tee "$OUT/bench_cuda.txt"
note "bench: exit ${PIPESTATUS[0]} (124 = time limit: the 'measured' rows above are complete)"
tail -n 5 "$OUT/bench_cuda.stderr" >> "$OUT/summary.txt"
note "done; outputs in $OUT"
