"""Peak memory of one FFN OBS step, measured with the profiler's memory timeline (CPU).

Runs METHODS[SLIMGPT].ffn (damping, inverse, Dynamic Group Size loop) on a random problem of
`--width` FFN channels and `--hidden` rows, and reports the largest sum of live tensors it
allocated, in units of the step's Hessian H ([width, width] float32), beside the guards formula.
The caller's H and W are not counted in "new"; the formula counts them.

Another checkout's engine can be measured with the same script (the APIs it uses are old):
    PYTHONPATH=/path/to/old/checkout python benchmarks/obs_memory.py --label 1aa62bf
Results are merged by label into benchmarks/results/obs_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action, MemoryProfileTimeline

RESULTS = Path(__file__).resolve().parent / "results"


def peak_new_bytes(fn) -> int:
    """Largest sum of bytes of the tensors `fn` allocated and still held, over its run."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = 0
    sizes: dict = {}
    for _t, action, key, size in MemoryProfileTimeline(prof._memory_profile()).timeline:
        if action == Action.CREATE:
            live, sizes[key] = live + size, size
        elif action == Action.DESTROY:
            live -= sizes.pop(key, 0)
        peak = max(peak, live)
    return peak


def measure(hidden: int, width: int) -> dict:
    import slimgpt_deploy
    from slimgpt_deploy.prune.methods import METHODS, SLIMGPT, LayerStats
    from slimgpt_deploy.prune.obs import accumulate_hessian

    g = torch.Generator().manual_seed(0)
    H, _ = accumulate_hessian(torch.zeros(width, width), 0, torch.randn(4 * width, width, generator=g))
    stats = LayerStats(W=torch.randn(hidden, width, generator=g), H=H, percdamp=0.01, unit_norms=torch.zeros(width))
    new = peak_new_bytes(lambda: METHODS[SLIMGPT].ffn(stats, width // 2, 0.25))
    h_bytes, w_bytes = width * width * 4, hidden * width * 4
    row = {
        "engine": str(Path(slimgpt_deploy.__file__).parent),
        "hidden": hidden,
        "width": width,
        "new_bytes": new,
        "new_in_H": round(new / h_bytes, 2),
        "total_in_H": round((new + h_bytes + w_bytes) / h_bytes, 2),
    }
    try:
        from slimgpt_deploy.guards import obs_step_peak

        row["formula_in_H"] = round(obs_step_peak(hidden, width, 4) / h_bytes, 2)
    except ImportError:  # an engine from before the formula
        row["formula_in_H"] = None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--label", default="current")
    args = parser.parse_args()
    row = {
        "label": args.label,
        **measure(args.hidden, args.width),
        "machine": {"cpu": platform.machine(), "torch": torch.__version__, "python": platform.python_version()},
    }
    print(json.dumps(row))
    path = RESULTS / "obs_memory.json"
    rows = [r for r in (json.loads(path.read_text()) if path.exists() else []) if r["label"] != args.label] + [row]
    path.write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        "# Peak memory of one FFN OBS step (`benchmarks/obs_memory.py`)",
        "",
        "Profiler memory timeline on the CPU, torch " + torch.__version__ + "; one FFN step of `width` channels "
        "(half removed) under `hidden` rows. H = one [width, width] float32 Hessian. `new`: tensors the step "
        "allocated beyond the caller's H and W; `total`: with them; `formula`: guards.obs_step_peak (4 H + 4 W).",
        "",
        "| engine | hidden | width | new (H) | total (H) | formula (H) |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['label']} | {r['hidden']} | {r['width']} | {r['new_in_H']} | {r['total_in_H']} | "
            f"{r['formula_in_H'] or '-'} |"
            for r in rows
        ],
        "",
    ]
    (RESULTS / "obs_memory.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
