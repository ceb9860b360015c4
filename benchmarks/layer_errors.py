"""How far each decoder layer's output of the pruned model is from the dense model's, two normalisations.

    .venv/bin/python benchmarks/layer_errors.py     # writes benchmarks/results/layer_errors.{json,md}

The default prune of SmolLM2-135M at 20% (benchmarks/recovery.py's start, made once in build/recovery)
against the dense model on the first 512 tokens of WikiText-2 validation, per layer output l:
  per position   mean_s |h_p(s) - h_d(s)|^2 / |h_d(s)|^2        (what recover.hidden_loss averages)
  per layer      sum_s |h_p(s) - h_d(s)|^2 / sum_s |h_d(s)|^2   (SquareHead's normalisation)
A few positions with massive activations dominate a layer's squared norm, so the per-layer figure
hides the error everywhere else: that is why recover.hidden_loss normalises per position.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from recovery import DATA, MODEL, slim_checkpoint

RESULTS = Path(__file__).resolve().parent / "results"
TOKENS = 512


def main() -> None:
    from slimgpt_deploy.sources import load_model

    slim = load_model(str(slim_checkpoint()))
    dense = load_model(MODEL)
    text = (DATA / "valid.txt").read_text()[:20000]
    ids = slim.tokenizer(text, return_tensors="pt").input_ids[:, :TOKENS]
    with torch.no_grad():
        hp = slim.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        hd = dense.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    rows = []
    for layer, (p, d) in enumerate(zip(hp[1:], hd[1:], strict=True), start=1):
        err, ref = (p - d).pow(2).sum(-1), d.pow(2).sum(-1)  # [1, S]
        rows.append(
            {
                "output_of_layer": layer,
                "per_position": round(float((err / ref).mean()), 4),
                "per_layer": round(float(err.sum() / ref.sum()), 4),
                "largest_position_share_of_norm": round(float(ref.max() / ref.sum()), 3),
            }
        )
    result = {"date": time.strftime("%Y-%m-%d"), "tokens": int(ids.shape[1]), "rows": rows}
    (RESULTS / "layer_errors.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Pruned vs dense layer outputs: per-position and per-layer normalised error",
        "",
        f"{result['date']}; SmolLM2-135M, default prune at 20% vs dense, the first {result['tokens']} tokens of "
        "WikiText-2 validation. `python benchmarks/layer_errors.py`. (The last row is after the final norm.)",
        "",
        "| output of layer | per position | per layer | largest position's share of the layer's squared norm |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['output_of_layer']} | {r['per_position']} | {r['per_layer']} | {r['largest_position_share_of_norm']} |"
        for r in rows
    ]
    (RESULTS / "layer_errors.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
