#!/usr/bin/env bash
# Everything a lent GPU is needed for, in as few device calls as possible: the Triton random
# sweep (tests_gpu), the kernel benchmark at every BENCH.md shape and the model throughput.
# Each part is bounded so that any two fit in one 10-minute call; logs and CSVs go to OUT.
#
#   bash benchmarks/gpu_session.sh OUT [tests] [bench] [models] [compiled]
#   (default: tests bench models; compiled = the model throughput under torch.compile)
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT [tests] [bench] [models] [compiled]}
shift
parts=${*:-tests bench models}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$out/device.txt"
for part in $parts; do
  case $part in
    tests)  timeout 290 python3 -m pytest tests_gpu -n 8 -q -p no:cacheprovider 2>&1 | tee "$out/tests_gpu.txt" ;;
    bench)  timeout 290 python3 benchmarks/bench_gpu.py --csv "$out/bench_gpu.csv" 2>&1 | tee "$out/bench_gpu.txt" ;;
    models) timeout 150 python3 benchmarks/bench_models.py --csv "$out/models.csv" 2>&1 | tee "$out/models.txt" ;;
    compiled) timeout 400 python3 benchmarks/bench_models.py --compile --csv "$out/models_compiled.csv" 2>&1 | tee "$out/models_compiled.txt" ;;
    *) echo "unknown part: $part (tests, bench, models, compiled)" >&2; exit 2 ;;
  esac
  echo "== $part: exit ${PIPESTATUS[0]}" | tee -a "$out/device.txt"
done
