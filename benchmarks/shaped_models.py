"""Checkpoints of a public model's shape with random weights: dense, and pruned to SlimGPT's per-layer shapes.

Decode speed depends on the shapes, not on the values, so the speed benchmarks can ask how the pruned/dense
ratio behaves on models larger than the embedded SmolLM2-135M without downloading one. The dense model is
`scale.SHAPES[name]` built by transformers with its own random initialisation (seed 0) and saved with the
SmolLM2 tokenizer (every shape used here has its 49,152-token vocabulary). The pruned ones come from the real
CLI: `slimgpt-deploy prune DENSE --ratio R --method magnitude` with the default schedule, GQA mode and head
share, calibrated on a few windows of Python's documentation text. The per-layer plan (how many heads and
channels each layer keeps) does not depend on the method or the data, so the shapes are the ones
`--method slimgpt` gives at that ratio; magnitude only chooses which units go, which is all it costs here.

    from shaped_models import dense, pruned    # build/bench/shaped/<name>-dense, <name>-<ratio>
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "bench" / "shaped"
CLI = [sys.executable, "-m", "slimgpt_deploy.cli"]
SMOLLM2_VOCAB = 49152
CALIB_SAMPLES, CALIB_SEQLEN = 8, 128


def dense(name: str) -> Path:
    """The dense checkpoint of shape `name` (scale.SHAPES), random weights, the SmolLM2 tokenizer; made once."""
    from scale import SHAPES, build_model
    from transformers import AutoTokenizer

    from slimgpt_deploy.sources import embedded_model_dir

    out = WORK / f"{name}-dense"
    if (out / "config.json").is_file():
        return out
    shape = SHAPES[name]
    if shape["vocab_size"] != SMOLLM2_VOCAB:
        raise SystemExit(f"{name} has a {shape['vocab_size']}-token vocabulary; only SmolLM2's tokenizer is here")
    tmp = out.with_name(out.name + ".tmp")
    build_model(shape).save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(embedded_model_dir("smollm2-135m"))).save_pretrained(tmp)
    tmp.rename(out)
    return out


def calibration_text() -> Path:
    """Python's documentation topics as one text file (always installed with Python)."""
    from pydoc_data.topics import topics

    path = WORK / "pydoc.txt"
    if not path.is_file():
        WORK.mkdir(parents=True, exist_ok=True)
        path.write_text("\n\n".join(topics[k] for k in sorted(topics)))
    return path


def pruned(name: str, ratio: float) -> Path:
    """`name` pruned to `ratio` by the CLI (magnitude: SlimGPT's per-layer shapes, see the module doc); made once."""
    out = WORK / f"{name}-{ratio}"
    if not (out / "config.json").is_file():
        cmd = [*CLI, "prune", str(dense(name)), "--ratio", str(ratio), "--method", "magnitude"]
        cmd += ["--calib", str(calibration_text()), "--nsamples", str(CALIB_SAMPLES), "--seqlen", str(CALIB_SEQLEN)]
        subprocess.run([*cmd, "--out", str(out), "--force"], check=True)
    return out
