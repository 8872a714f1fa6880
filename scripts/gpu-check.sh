#!/usr/bin/env bash
# The GPU check: run on a machine with one or more NVIDIA GPUs, no network needed.
#   bash scripts/gpu-check.sh            # writes ./gpu-check-out (or $OUT where that is set)
# 1. the CUDA-marked tests (tests/test_cuda.py): float32 identity of every strategy on cuda:0
#    (near-ties allowed: amusd_viz/lossless.py), on cuda:0/cuda:1 with two GPUs, forward spans
#    stamped after synchronisation, drafts verified on one GPU, a few syncs per verify pass;
# 2. scripts/gpu_report.py: forward times per shape (cold, warm), ms/token of ar, sync and amusd
#    on the static KV cache (the GPU default; ar also on the dynamic one), drafts per verify,
#    overlap, load time, host RSS and GPU memory per worker;
# 3. the mission's shapes: per pass size eager and graphed ms and the weights' GB/s;
# 4. amusd on one GPU under an MPS daemon it starts and stops (each model's pass time against
#    the baton's: the cost of sharing the card).
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
# 3. the mission's shapes (TinyLlama-1.1B, Llama-2-7B; random weights built on the card)
"$py" scripts/gpu_report.py --out "$out" --section mission 2>&1 | tee -a "$out/report.log"
mission=${PIPESTATUS[0]}
# 4. amusd on one GPU under MPS: a daemon of our own (pipe and log under /tmp/amusd-mps), in the
#    card's default compute mode, stopped on the way out; where it cannot start, the report says
#    why and the baton stays the one-GPU schedule. Nothing else about the card is changed.
export CUDA_MPS_PIPE_DIRECTORY=/tmp/amusd-mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/amusd-mps/log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
if command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d; then
  trap 'echo quit | nvidia-cuda-mps-control' EXIT
  echo "gpu-check: MPS daemon started" | tee -a "$out/report.log"
else
  echo "gpu-check: no MPS daemon (nvidia-cuda-mps-control missing or refused)" | tee -a "$out/report.log"
fi
"$py" -m pytest -q -ra -m cuda -p no:cacheprovider tests/test_cuda.py -k mps 2>&1 | tee -a "$out/cuda-tests.txt"
"$py" scripts/gpu_report.py --out "$out" --section mps 2>&1 | tee -a "$out/report.log"
mps=${PIPESTATUS[0]}
cp -r /tmp/amusd-mps/log "$out/mps-log" 2>/dev/null
echo "gpu-check: tests exit $tests, report exit $report, mission $mission, mps $mps; files in $out"
exit $(( tests || report || mission || mps ))
