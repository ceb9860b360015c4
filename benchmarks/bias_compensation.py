"""OBS with a bias column: does a constant input (a bias on o_proj and down_proj) help SlimGPT at 20%?

    .venv/bin/python benchmarks/bias_compensation.py                 # both calibrations, with and without
    .venv/bin/python benchmarks/bias_compensation.py --markdown      # rewrite the .md from the .json

FLAP (An et al., 2024) restores a pruned channel's mean output as a bias. In OBS terms that is one more input column
of the output projection, the constant 1, which is never pruned: H gains a row and column ([2/n sum x; 2]) and the
OBS updates of the kept columns then move the bias too, so for any kept set the result is the least-squares optimum
of [W_K, b] (obs.py's chain argument, with the constant among the kept columns). Without it, SlimGPT's H = 2/n X X^T
is uncentred and the mean is compensated only through the kept channels.

This is a prototype measured from the outside: the engine's InputHessian, the slimgpt method's two decisions,
shrink_layer (which then sets the biases on the new layer) and the layer checks are replaced in this process
(the shipped code is unchanged). Each run: benchmarks/self_calibration.py's `one` (SmolLM2-135M, 20%, 64 x 512
calibration, WikiText-2 and Python-docs perplexity at 2048-token windows) for one of its variants, in its own
subprocess. Results: benchmarks/results/bias_compensation.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = ("nospecial-heads0", "wikitext-valid-heads0")  # self calibration (the default prune) and real data


def _install_bias_column() -> None:
    import torch

    import slimgpt_deploy.prune.engine as eng
    import slimgpt_deploy.prune.methods as meth
    from slimgpt_deploy.prune.obs import (
        accumulate_hessian,
        batched_greedy_pruning,
        dgs_group_size,
        inverse_hessian,
        obs_remove_,
    )

    biases: dict[int, torch.Tensor] = {}  # id(the decision's weight) -> its bias

    def accumulate(H, n, X):  # obs.accumulate_hessian over [x, 1]
        return accumulate_hessian(H, n, torch.cat([X, torch.ones_like(X[..., :1])], dim=-1))

    class WithConstant(eng.InputHessian):
        def __init__(self, projection, width, dtype, device):
            super().__init__(projection, width + 1, dtype, device)

        def _grab(self, _module, args):
            self.H, self.n = accumulate(self.H, self.n, args[0])
            raise eng._Captured

    def augmented(stats):
        Hinv, dead, damp = inverse_hessian(stats.H, stats.percdamp)
        W = torch.cat([stats.W, torch.zeros(stats.W.shape[0], 1, dtype=stats.W.dtype, device=stats.W.device)], 1)
        W[:, dead] = 0.0
        return W, Hinv, damp

    def split(W):
        w = W[:, :-1].contiguous()
        biases[id(w)] = W[:, -1].clone()
        return w

    def heads(stats, units, steps):
        W, Hinv, damp = augmented(stats)
        out = batched_greedy_pruning(W, Hinv, units.columns, units.buckets, steps, inplace=True)
        return meth.Decision(out.removed, split(out.W), damp)

    def ffn(stats, n_remove, group_fraction):  # obs.dynamic_group_pruning, the constant column never a candidate
        W, Hinv, damp = augmented(stats)
        alive = torch.ones(W.shape[1], dtype=torch.bool)
        alive[-1] = False
        removed, remaining, tiny = [], n_remove, torch.finfo(W.dtype).tiny
        while remaining > 0:
            g = dgs_group_size(remaining, group_fraction)
            score = torch.linalg.vector_norm(W, dim=0).square_() / Hinv.diagonal().clamp_min(tiny)
            S = torch.sort(score.masked_fill_(~alive, math.inf), stable=True).indices[:g]
            obs_remove_(W, Hinv, S)
            alive[S] = False
            removed.extend(S.tolist())
            remaining -= g
        W[:, removed] = 0.0
        return meth.Decision(removed, split(W), damp)

    shrink = eng.shrink_layer

    def shrink_with_bias(layer, cut, config, i, layout):
        new = shrink(layer, cut, config, i, layout)
        for w, module in ((cut.o_proj, new.self_attn.o_proj), (cut.down_proj, new.mlp.down_proj)):
            if id(w) in biases:
                module.bias = torch.nn.Parameter(biases[id(w)].to(module.weight.dtype), requires_grad=False)
        return new

    def reconstruction(W, W_new, H):  # the layer-output error with the bias
        if H.shape[0] == W.shape[1] + 1:
            W = torch.cat([W, torch.zeros(W.shape[0], 1, dtype=W.dtype)], dim=1)
            W_new = torch.cat([W_new, biases[id(W_new)][:, None]], dim=1)
        dW = W_new - W
        err, ref = float(((dW @ H) * dW).sum()), float(((W @ H) * W).sum())
        return err, err / ref

    eng.InputHessian = WithConstant
    eng.shrink_layer = shrink_with_bias
    eng._reconstruction = reconstruction
    eng.check_shapes = lambda model: None  # the biases are not in the config's shapes
    method = meth.METHODS[meth.SLIMGPT]
    meth.METHODS[meth.SLIMGPT] = meth.Method(heads, ffn, weighs_outputs=method.weighs_outputs)


def one(variant: str, bias: bool) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import self_calibration as sc

    if bias:
        _install_bias_column()
    t0 = time.perf_counter()
    row = sc.one(variant, 64)
    return {
        "variant": variant,
        "bias": bias,
        "ppl_wikitext2": row["ppl_wikitext2"],
        "ppl_pydoc": row["ppl_pydoc"],
        "prune_s": row.get("prune_s"),
        "seconds": round(time.perf_counter() - t0),
    }


def markdown(result: dict) -> str:
    rows = {(r["variant"], r["bias"]): r for r in result["runs"]}
    lines = [
        "# OBS with a bias column (FLAP's bias compensation inside SlimGPT), SmolLM2-135M at 20%",
        "",
        f"{result['date']}, {result['machine']}. `.venv/bin/python benchmarks/bias_compensation.py`. Calibration 64 x "
        "512 (self: the default sampler; real: WikiText-2 valid windows), heads kept (the default split), damping "
        "0.01; perplexity at 2048-token windows over the first 40,960 tokens (dense 18.51 / 11.77).",
        "",
        "| calibration | WikiText-2 PPL without | with the bias column | Python docs PPL without | with |",
        "|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        a, b = rows.get((variant, False)), rows.get((variant, True))
        if a and b:
            lines.append(
                f"| {variant} | {a['ppl_wikitext2']:.2f} | {b['ppl_wikitext2']:.2f} | {a['ppl_pydoc']:.2f} | "
                f"{b['ppl_pydoc']:.2f} |"
            )
    return "\n".join(lines + ["", result.get("reading", ""), ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="only rewrite the .md from the .json")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    path = RESULTS / "bias_compensation.json"
    if args.one:
        print("RESULT " + json.dumps(one(args.one[0], args.one[1] == "bias")), flush=True)
        return
    if not args.markdown:
        runs = []
        for variant in VARIANTS:
            for bias in (False, True):
                proc = subprocess.run(
                    [sys.executable, __file__, "--one", variant, "bias" if bias else "plain"],
                    capture_output=True,
                    text=True,
                    env=os.environ,
                )
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"{variant} (bias {bias}) failed:\n{proc.stderr[-3000:]}")
                runs.append(json.loads(line[len("RESULT ") :]))
        previous = json.loads(path.read_text()) if path.exists() else {}
        from slimgpt_deploy.bench.environment import machine

        m = machine()
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{m['cpu']}, {m['cores']} cores",
            "runs": runs,
            "reading": previous.get("reading", ""),
        }
        path.write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "bias_compensation.md").write_text(markdown(json.loads(path.read_text())))
    print((RESULTS / "bias_compensation.md").read_text())


if __name__ == "__main__":
    main()
