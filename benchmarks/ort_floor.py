"""Which onnxruntime releases run our ONNX exports: the floors in serving/onnx_runner.MIN_ORT.

    .venv/bin/python benchmarks/ort_floor.py [--versions 1.20.1,1.21.1,...]

Writes four exports of the embedded SmolLM2-135M (dense; fp32 and int8, fused and --no-fuse) with this
checkout, then, in one scratch virtualenv per run (build/bench/ort-floor/venv: numpy + each onnxruntime wheel in
turn, from the package index), loads each export and runs a left-padded 2 x 7 prefill with an empty cache. The
logits are compared with those of this checkout's onnxruntime. A release "runs" an export when the session loads
and the run succeeds; the first line of the error is kept otherwise. The child imports only numpy and
onnxruntime (the scratch venv has nothing else).
Results: benchmarks/results/ort_floor.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "build" / "bench" / "ort-floor"
VERSIONS = ("1.20.1", "1.21.1", "1.22.1", "1.23.2", "1.24.4", "1.26.0")
EXPORTS = {  # name -> (fuse, quantize)
    "fused-fp32": (True, None),
    "nofuse-fp32": (False, None),
    "fused-int8": (True, "int8"),
    "nofuse-int8": (False, "int8"),
}


def write_exports() -> None:
    from slimgpt_deploy.exporters import onnx as onnx_export

    for name, (fuse, quantize) in EXPORTS.items():
        if not (WORK / name / "model.onnx").exists():
            onnx_export.export("smollm2-135m", WORK / name, quantize=quantize, fuse=fuse, verify=False, force=True)


def child(model: str, save: str) -> None:
    """Run in the scratch venv: load `model`, run the prefill, save the logits; print one JSON line. An export whose
    cache is written in place (GroupQueryAttention, `"in_place": true`) also runs the same prefill and one decode step
    through one bound buffer per cache tensor, as the runner does; those 8 positions' logits are saved instead."""
    import numpy as np
    import onnxruntime as ort

    row = {"onnxruntime": ort.__version__}
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49000, size=(2, 7)).astype(np.int64)
    mask = np.ones((2, 7), np.int64)
    mask[1, :2] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.maximum(mask.cumsum(1) - 1, 0)}
    try:
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        for i in session.get_inputs():
            if i.name.startswith("past_key_values."):
                feeds[i.name] = np.zeros((2, i.shape[1], 0, i.shape[3]), np.float32)
        logits = session.run(["logits"], feeds)[0]
        if json.loads((Path(model).parent / "slimgpt_onnx.json").read_text())["cache"].get("in_place"):
            logits = _in_place_run(session, feeds)
            row["in_place"] = True
        np.save(save, logits)
        row["ran"] = True
    except Exception as err:  # onnxruntime's own error types
        row |= {"ran": False, "error": (str(err).strip().splitlines() or [type(err).__name__])[0][-240:]}
    print(json.dumps(row))


def _in_place_run(session, feeds: dict):
    """Prefill + one greedy step, past and present bound to one [2, kv, 8, D] buffer per tensor: logits [2, 8, V]."""
    import numpy as np

    binding, out = session.io_binding(), []
    buffers = {n: np.zeros((2, a.shape[1], 8, a.shape[3]), np.float32) for n, a in feeds.items() if "past" in n}
    for name, buf in buffers.items():
        binding.bind_input(name, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
        present = name.replace("past_key_values", "present")
        binding.bind_output(present, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
    ids, mask, pos = feeds["input_ids"], feeds["attention_mask"], feeds["position_ids"]
    for _ in range(2):
        for name, value in (("input_ids", ids), ("attention_mask", mask), ("position_ids", pos)):
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        out.append(np.empty(ids.shape + (session.get_outputs()[0].shape[-1],), np.float32))  # [2, S, V]
        binding.bind_output("logits", "cpu", 0, np.float32, list(out[-1].shape), out[-1].ctypes.data)
        session.run_with_iobinding(binding)
        ids = out[-1][:, -1].argmax(-1)[:, None].astype(np.int64)
        pos = pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    return np.concatenate(out, 1)


def run_child(python: str, name: str, tag: str) -> dict:
    save = WORK / f"logits-{name}-{tag}.npy"
    out = subprocess.run(
        [python, __file__, "--child", str(WORK / name / "model.onnx"), str(save)],
        capture_output=True,
        text=True,
        check=True,
    )
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["logits"] = str(save) if row["ran"] else None
    return row


def max_diff(a: str, b: str) -> float:
    import numpy as np

    got, want = np.load(a), np.load(b)
    mask = np.ones(want.shape[:2], bool)  # [2, 7] prefill, or [2, 8] prefill + the in-place decode step
    mask[1, :2] = False
    return float(np.abs(got - want)[mask].max())


def markdown(results: dict) -> str:
    names = list(EXPORTS)
    lines = [
        "# Which onnxruntime runs which export (SmolLM2-135M dense)",
        "",
        f"Machine: {results['machine']}. Date: {results['date']}. Reference: onnxruntime {results['reference']}.",
        "Command: `.venv/bin/python benchmarks/ort_floor.py`. Each cell: the max |logit difference| against the "
        "reference on a left-padded 2 x 7 prefill (+ one decode step with the cache written in place, for the fused "
        "exports since 2026-12-06), or the first line of the error.",
        "",
        "| onnxruntime | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for version, row in results["versions"].items():
        cells = [
            f"{r['max_abs_diff']:.2g}" if r["ran"] else f"refused: {r['error'][-110:]}" for r in map(row.get, names)
        ]
        lines.append(f"| {version} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", default=",".join(VERSIONS))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    import onnxruntime

    WORK.mkdir(parents=True, exist_ok=True)
    write_exports()
    reference = {name: run_child(sys.executable, name, "reference") for name in EXPORTS}
    venv = WORK / "venv"
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "numpy"], check=True)
    versions = {}
    for version in args.versions.split(","):
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"onnxruntime=={version}"], check=True)
        row = {}
        for name in EXPORTS:
            r = run_child(str(venv / "bin" / "python"), name, version)
            if r["ran"]:
                r["max_abs_diff"] = max_diff(r["logits"], reference[name]["logits"])
            row[name] = r
        versions[version] = row
        print(version, {n: r.get("max_abs_diff", "refused") for n, r in row.items()}, flush=True)
    results = {
        "machine": f"{platform.platform()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "reference": onnxruntime.__version__,
        "versions": versions,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ort_floor.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "ort_floor.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
