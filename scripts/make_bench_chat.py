"""Write datasets_cfg/data/bench_chat: the variable-length chat set `finetune bench` trains on (fixed, shipped).

    python scripts/make_bench_chat.py

Each row is one exchange built from a document of datasets_cfg/data/scratch_corpus (CPython docstrings and
reference topics, PSF-2.0; generated stories, Apache-2.0): the user asks for the text that starts with the
document's first line, the assistant answers with the whole document. Documents are chosen by sha256 of their
text (deterministic), spread over four length buckets (~50 to ~1,000 tokens): up to 150 per bucket from the corpus's
training split (416 rows, 138k tokens) and up to 10 from its held-out split (23 rows).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "datasets_cfg" / "data"
BUCKETS = [(200, 600), (600, 1500), (1500, 2800), (2800, 4200)]  # characters (~4 per token)


def rows(split: str, per_bucket: int) -> list[dict]:
    docs = [json.loads(line)["text"] for line in (ROOT / "scratch_corpus" / f"{split}.jsonl").open()]
    docs.sort(key=lambda t: hashlib.sha256(t.encode()).hexdigest())
    out = []
    for low, high in BUCKETS:
        chosen = [t for t in docs if low <= len(t) < high][:per_bucket]
        for text in chosen:
            first = text.strip().split("\n", 1)[0][:120]
            out.append({"messages": [{"role": "user", "content": f"Write the text that begins: {first}"},
                                     {"role": "assistant", "content": text.strip()}]})
    out.sort(key=lambda r: hashlib.sha256(json.dumps(r).encode()).hexdigest())
    return out


def main() -> None:
    folder = ROOT / "bench_chat"
    folder.mkdir(exist_ok=True)
    for split, name, n in [("train", "train", 150), ("heldout", "heldout", 10)]:
        data = rows(split, n)
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
        print(f"{name}: {len(data)} rows")


if __name__ == "__main__":
    main()
