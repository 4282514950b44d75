#!/usr/bin/env bash
# The checks and timings that need a CUDA GPU, in one call (CI has no GPU; issue 13, item 6):
#   1. DeepSpeed fp16 with dynamic loss scaling at ZeRO 2 and 3: a forced overflow is skipped on every rank
#      with nothing lost (bench/gpu_checks.py fp16-overflow), and the recipe trains end to end in fp16;
#      the activation cache offloaded to pinned host memory equals it kept on the GPU (gpu_checks.py offload);
#   2. QLoRA: the recipe on a bitsandbytes nf4 base under ZeRO-3 (bnb_4bit_quant_storage = the engine dtype);
#   3. timings in bf16: step overhead, the hooks' thin products, the momentum's balancing (QR against Gram route),
#      bench/scale.py on one GPU (the products' buckets overlap only with 2 GPUs or more: not measured on one), the
#      activation-cache policy, and LoRSum vs SVD.
# Every part's output and exit status go to REPORT_DIR/gpu_report.md (a failed part does not stop the rest);
# the script exits 1 if any part failed.
#
#   bash bench/gpu_suite.sh [REPORT_DIR] [all|checks|timings]   # default: $OUT (else ./gpu-report), all
#
# "checks" (parts 1-2, about 5 minutes on an H200 on 2026-12-04) and "timings" (part 3) are sized for one call each
# of a lent machine; "all" runs both (over 10 minutes). The timings run in the order of what is still pending (the
# step overhead and bench/scale.py's step times first, under 7 minutes by their limits; LoRSum vs SVD, measured
# before, last): each part appends to the report as it ends, so a call cut short by its limit still brings back every
# part before. With 15 minutes of device time in all, one call, the wheels fetched here first (bash bench/gpu_wheels.sh):
#   run(command='bash bench/gpu_suite.sh "$OUT" timings', carry=[".whl"], timeout_s=600).
# Needs torch with CUDA and this repository's dependencies. Where the machine lacks some (deepspeed,
# bitsandbytes, datasets), put their wheels in .whl/ (bench/gpu_wheels.sh downloads them here) and the suite
# installs them from there, offline.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-report}}
which=${2:-all}
case $which in all|checks|timings) ;; *) echo "error: bench/gpu_suite.sh: the second argument must be all, checks or timings (got '$which')" >&2; exit 2;; esac
mkdir -p "$out"
report="$out/gpu_report_$which.md"
py=${PYTHON:-python3}

if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "error: bench/gpu_suite.sh needs a CUDA GPU (torch.cuda.is_available() is False in $py); CPU runs are covered by the test suite" >&2
  exit 2
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/psilora-site .whl/*.whl \
    || { echo "error: installing the wheels in .whl/ failed" >&2; exit 2; }
  export PYTHONPATH=/tmp/psilora-site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/psilora-site/bin:$PATH  # the deepspeed launcher
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

{
  echo "# GPU suite report"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$py" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| peft', peft.__version__)" 2>&1
  "$py" -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1
  "$py" -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -1
  echo '```'
} > "$report"

failed=0
# part NAME TIMEOUT_S COMMAND...: run one part, its last 60 lines and exit status into the report
part() {
  local name=$1 limit=$2; shift 2
  local log="$out/$(echo "$name" | tr -c 'A-Za-z0-9._-' '_').log"
  echo "== $name" >&2
  local start=$SECONDS
  timeout "$limit" "$@" > "$log" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && failed=1
  { echo; echo "## $name"; echo; echo "\`$*\` -> exit $rc in $((SECONDS - start)) s"; echo; echo '```'
    grep -v -e '^\[20..-..-.. ' -e 'real_accelerator' "$log" | tail -n 60; echo '```'; } >> "$report"
  tail -n 5 "$log" >&2
}

recipe="launch/train.py --max_steps 40 --eval_every 20 --log_every 10"
if [ "$which" != timings ]; then
  part "fp16 overflow, ZeRO-2" 150 torchrun --standalone --nproc_per_node 1 bench/gpu_checks.py fp16-overflow --stage 2
  part "fp16 overflow, ZeRO-3" 150 torchrun --standalone --nproc_per_node 1 bench/gpu_checks.py fp16-overflow --stage 3
  part "cache offload" 120 "$py" bench/gpu_checks.py offload
  part "recipe fp16, ZeRO-2" 120 deepspeed --num_gpus 1 $recipe --ds_config ds_configs/zero2.json --dtype fp16 \
    --output_dir "$out/run-fp16-z2"
  part "recipe fp16, ZeRO-3" 120 deepspeed --num_gpus 1 $recipe --ds_config ds_configs/zero3.json --dtype fp16 \
    --output_dir "$out/run-fp16-z3"
  part "tests that need CUDA" 150 "$py" -m pytest -q -p no:cacheprovider tests/test_cache_free.py \
    tests/test_host_reads.py tests/test_random_probes.py -k cuda
  part "recipe QLoRA nf4, bf16, ZeRO-3" 120 deepspeed --num_gpus 1 $recipe --ds_config ds_configs/zero3.json \
    --dtype bf16 --load_in_4bit true --bnb_4bit_quant_type nf4 --output_dir "$out/run-qlora-z3"
fi
if [ "$which" != checks ]; then
  # the cache-free methods with the products at (A, B) from autograd and (reuse_autograd_grads=False) from the hooks,
  # and with the layers of equal shapes stepped as stacks (the default) against one layer at a time (kernel launches)
  part "step overhead (bf16 base, fp32 adapters)" 120 "$py" bench/step_overhead.py --dtype bf16 --adapter_dtype fp32 \
    --hidden 2048 --layers 4 --tokens 8192 --rounds 10 --methods "preconditioned LoRA" "preconditioned LoRA, products at (A, B) in the hooks" \
    "Scaled PSI-LoRA iters=0 (cache-free, rank-2r momentum), max_grad_norm=1" \
    "Scaled PSI-LoRA iters=0 (cache-free, rank-2r momentum), max_grad_norm=1, products at (A, B) in the hooks" \
    "Scaled PSI-LoRA iters=0 (cache-free, rank-2r momentum), max_grad_norm=1, one layer at a time" \
    "Scaled PSI-LoRA iters=1 (rank-r momentum)" "PSI-LoRA iters=1" "AdamW (foreach), clip_grad_norm_(1)" \
    "PoLAR (B S A adapters, Adam on the landing field)"
  part "thin products in the cache-free hooks, separate vs fused" 20 "$py" bench/thin_products.py --tokens 8192 \
    --hidden 4096 --repeats 10
  part "momentum balancing, QR against Gram route" 15 "$py" bench/balance.py --shapes 0.9b --repeats 5
  # Scaled PSI-LoRA as users get it (a rank-2r momentum, the default since session 20). Step times interleaved (every
  # method's engine built once in one process, then rounds of one step of each: per-round ratios, no process starts
  # per method); then the memory columns from separate processes, AdamW against the cache-free step only
  part "scale, 0.9 B, one GPU (bf16), interleaved step times" 150 "$py" bench/scale.py --shape 0.9b --ranks 1 \
    --dtype bf16 --interleave --steps 8 --warmup 2 --rank_multiplier 2
  # issue 26's step-time targets' configuration (ZeRO-2, 0.09 B, 1024 tokens, rank-r momentum) on one GPU: the hooks'
  # and the step's cost, which no overlap of the products' sums (2 GPUs or more) can hide
  part "scale, 0.09 B, ZeRO-2, 1024 tokens, one GPU (bf16), interleaved step times" 90 "$py" bench/scale.py \
    --shape small --stage 2 --ranks 1 --dtype bf16 --interleave --seq_len 1024 --steps 20 --warmup 3 \
    --methods adamw precond_lora scaled_iters0
  part "activation-cache policy (bf16)" 130 "$py" bench/cache_policy.py --dtype bf16 --hidden 2048 --layers 4 \
    --tokens 4096 16384 --rounds 5
  part "scale, 0.9 B, one GPU (bf16), peak memory" 120 "$py" bench/scale.py --shape 0.9b --ranks 1 --dtype bf16 \
    --steps 3 --warmup 1 --repeats 1 --rank_multiplier 2 --methods adamw scaled_iters0
  # measured on an H200 on 2026-12-04 (docs/BENCHMARKS.md): last, where a call's limit cuts it first
  part "LoRSum vs SVD" 115 "$py" bench/lorsum_vs_svd.py --repeats 2
fi

for run in run-fp16-z2 run-fp16-z3 run-qlora-z3; do  # the recipe runs' first and last eval losses
  [ -f "$out/$run/metrics.jsonl" ] && { echo; echo "$run eval: $(grep -o '"eval_loss": [0-9.]*' "$out/$run/metrics.jsonl" | sed -n '1p;$p' | tr '\n' ' ')"; } >> "$report"
  rm -rf "$out/$run"  # checkpoints do not travel back
done
echo >> "$report"; echo "suite: $([ $failed -eq 0 ] && echo all parts passed || echo SOME PARTS FAILED)" >> "$report"
cat "$report"
exit $failed
