#!/bin/bash
# `finetune bench` on a CUDA machine with random-init models of real shapes (benchmarks/random_models.py), as the
# README's GPU figures were made. Run from the repository root with the dependencies importable:
#   bash benchmarks/cuda.sh OUTDIR [TOKDIR]
# TOKDIR: SmolLM2-135M's tokenizer and config files where the embedded model is not at hand (see random_models.py).
# Tables go to OUTDIR/*.md; the models to $MODELS (default: a new temporary folder). The cases run in the order of
# what a short device session most needs measured (the 1B's share of the matmul rate first); CASES="name ..." runs
# only the cases named (llama1b, llama1b-eager, smol-lora, smol-lora-checkpointing, llama1b-32k); AB=1 and PROFILE=1
# add the A/B of the step's parts and the profiles below.
set -u
OUT=${1:-bench-cuda}; TOKDIR=${2:-}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MODELS=${MODELS:-$(mktemp -d)}
python3 benchmarks/random_models.py "$MODELS" --big ${TOKDIR:+--tokdir "$TOKDIR"} || exit 1
bench() { local name=$1; shift; echo "== $name: $*"; timeout "${CASE_TIMEOUT:-600}" python3 -m finetune bench \
  --out "$OUT/$name.md" "$@" 2>&1 | tail -n 40; }
want() { [ -z "${CASES:-}" ] || [[ " $CASES " == *" $1 "* ]]; }  # CASES="llama1b smol-lora": only these
# 1B Llama shape: LoRA and QLoRA, the toolkit's default path
want llama1b && bench llama1b --model "$MODELS/llama1b" --cases sft-lora-chat,sft-qlora-chat --sides finetune \
  --max-steps 15
# The same LoRA step with the eager kernels (train.fused_kernels: false): what the fused ones buy, in the same run
want llama1b-eager && bench llama1b-eager --model "$MODELS/llama1b" --cases sft-lora-chat --sides finetune \
  --max-steps 10 --set train.fused_kernels=false
# SmolLM2-135M LoRA: plain TRL defaults vs the toolkit's default path (16,384 tokens per step on CUDA)
want smol-lora && bench smol-lora --model "$MODELS/smol" --cases sft-lora-chat --sides trl,finetune --max-steps 20
# SmolLM2-135M LoRA with activation checkpointing: its memory at 16,384 tokens per step
want smol-lora-checkpointing && bench smol-lora-checkpointing --model "$MODELS/smol" --cases sft-lora-chat \
  --sides finetune --max-steps 12 --set train.activation_checkpointing=true
# 1B Llama shape at 32,768 tokens per step
want llama1b-32k && bench llama1b-32k --model "$MODELS/llama1b" --cases sft-lora-chat --sides finetune \
  --max-steps 10 --set train.gpu_tokens_per_step=32768
# The step with and without its parts, interleaved in one process (benchmarks/ab_step.py: time, tokens/s, peak memory
# of each variant on the same batches): AB=1, for the models in AB_MODELS, the variants in AB_VARIANTS
if [ "${AB:-0}" = 1 ]; then
  for model in ${AB_MODELS:-smol llama1b}; do
    echo "== ab $model"; timeout 300 python3 benchmarks/ab_step.py recipes/smollm2-135m/sft_lora.yaml \
      "model.name=$MODELS/$model" "data.datasets=[{name: bench_chat, split: train}]" data.max_length=1024 \
      --variants "${AB_VARIANTS:-default,keep-lora-inputs,separate-lora-a}" 2>&1 | tail -n 6 | tee "$OUT/ab-$model.txt"
  done
fi
# Where the step's time goes on the GPU (operators by device time and host time, kernel launches; "GPU busy" is the
# share of the wall time the GPU computed), with one step's trace: PROFILE=1
if [ "${PROFILE:-0}" = 1 ]; then
  for model in ${PROFILE_MODELS:-llama1b smol}; do
    echo "== profile $model"; timeout 300 python3 benchmarks/profile_step.py recipes/smollm2-135m/sft_lora.yaml \
      "model.name=$MODELS/$model" "data.datasets=[{name: bench_chat, split: train}]" data.max_length=1024 --steps 2 \
      --trace "$OUT/trace-$model.json.gz" 2>&1 | tail -n 75 | tee "$OUT/profile-$model.txt"
  done
fi
