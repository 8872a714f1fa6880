#!/usr/bin/env bash
# The GPU check: run on a machine with one or more NVIDIA GPUs, no network needed.
#   bash scripts/gpu-check.sh            # writes ./gpu-check-out (or $OUT where that is set)
# 1. the CUDA-marked tests (tests/test_cuda.py): float32 identity of every strategy on cuda:0
#    (near-ties allowed: amusd_viz/lossless.py), on cuda:0/cuda:1 with two GPUs, forward spans
#    stamped after synchronisation, drafts verified on one GPU, a few syncs per verify pass;
# 2. scripts/gpu_report.py: forward times per shape (cold, warm), ms/token of ar, sync and amusd
#    on the static KV cache (the GPU default; ar also on the dynamic one), drafts per verify,
#    overlap, load time, host RSS and GPU memory per worker.
# Packages the GPU image lacks (pydantic, textual, ...) may travel as wheels in ./.whl.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check-out}
mkdir -p "$out"
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/amusd-site .whl/*.whl && export PYTHONPATH=/tmp/amusd-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{ nvidia-smi; "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; } \
  >"$out/versions.txt" 2>&1
cat "$out/versions.txt"
"$py" -m pytest -q -ra -m cuda -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/cuda-tests.txt"
tests=${PIPESTATUS[0]}
"$py" scripts/gpu_report.py --out "$out" 2>&1 | tee "$out/report.log"
report=${PIPESTATUS[0]}
echo "gpu-check: tests exit $tests, report exit $report; files in $out"
exit $(( tests || report ))
