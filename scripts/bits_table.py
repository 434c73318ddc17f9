"""Print the README's bits-per-weight tables from the six sweeps that make them (one per text and mode).

Usage:
    for mode in input tied; do for text in bible:test pydoc:test modern:train; do
      embviz sweep smollm2 --methods vq-direction,quant-mixed,quant-int4,svd-freq-int8,gguf-q8_0,gguf-q5_0,gguf-q4_0 \\
        --bits 4,2,1,0.5 --text $text --mode $mode --json > $mode-${text%%:*}.json
    done; done
    .venv/bin/python scripts/bits_table.py FOLDER

Each cell: perplexity (x the original; mean KL divergence in nats per token; top-1 agreement), bold where the
row is on that text's bits-perplexity Pareto frontier (the sweep's ``frontier`` flag).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TEXTS = ("bible", "pydoc", "modern")
SPECS = {"bible": "bible:test", "pydoc": "pydoc:test", "modern": "modern:train"}
NAMES = {
    "vq-direction": "direction VQ",
    "quant-mixed": "mixed 8/4/2-bit rows",
    "quant-int4": "int4 rows",
    "svd-freq-int8": "SVD freq.-weighted, int8 codes",
    "gguf-q8_0": "GGUF Q8_0 (llama.cpp)",
    "gguf-q5_0": "GGUF Q5_0 (llama.cpp)",
    "gguf-q4_0": "GGUF Q4_0 (llama.cpp)",
}


def number(value: float) -> str:
    """Perplexity as the README writes it: thousands separated, 4 significant digits below 10,000."""
    return f"{value:,.1f}" if value >= 100 else f"{value:.2f}"


def cell(row: dict) -> str:
    ratio, kl, top1 = row["vs_original"], row["kl_nats"], row["top1_agreement"]
    text = f"{number(row['perplexity'])} ({ratio:.3f}x; {kl:.3g}, {top1:.0%})"
    return (
        f"**{number(row['perplexity'])}** ({ratio:.3f}x; {kl:.3g}, {top1:.0%})" if row["frontier"] else text
    )


def table(folder: Path, mode: str) -> str:
    sweeps = {text: json.loads((folder / f"{mode}-{text}.json").read_text()) for text in TEXTS}
    originals = ", ".join(f"`{SPECS[t]}` {sweeps[t][0]['perplexity']:.2f}" for t in TEXTS)
    lines = [
        f"**{mode} mode** (uncompressed: {originals})",
        "",
        "| budget | method | bits / weight | x fewer bytes than Q8_0 / bf16 | "
        + " | ".join(f"`{SPECS[t]}`" for t in TEXTS)
        + " | recall@10 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows_of = sweeps["bible"][1:]

    def place(i: int) -> tuple[float, float]:
        """Reference formats first (largest first), then each budget (largest first) by perplexity."""
        row = rows_of[i]
        if row["target_bits"] is None:
            return (-99.0, -row["bits_per_weight"])
        return (-row["target_bits"], row["perplexity"])

    order = sorted(range(len(rows_of)), key=place)
    for index in order:
        rows = [sweeps[t][index + 1] for t in TEXTS]
        first = rows[0]
        budget = f"{first['target_bits']:g}" if first["target_bits"] is not None else "own size"
        ratios = f"{first['bytes_vs_source']:.2f} / {first['bytes_vs_bf16']:.2f}"
        lines.append(
            f"| {budget} | {NAMES.get(first['method'], first['label'])} | {first['bits_per_weight']:.2f} | {ratios} | "
            + " | ".join(cell(row) for row in rows)
            + f" | {first['recall_at_k']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    for mode in ("input", "tied"):
        print(table(args.folder, mode))
        print()


if __name__ == "__main__":
    main()
