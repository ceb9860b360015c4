"""The slim checkpoint on disk (DESIGN.md, "The slim checkpoint").

A Hugging Face directory: safetensors weights, config.json with per-layer
lists, the modeling code (for trust_remote_code loading without this
package), tokenizer, generation config, slimgpt.json (the record) and a
model card README.md. Written atomically.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from .atomic import atomic_output_dir
from .modeling import AUTO_MAP, REMOTE_CODE_FILES

log = logging.getLogger(__name__)

RECORD_FILE = "slimgpt.json"


def save_checkpoint(model, tokenizer, record: dict, out: Path, *, force: bool = False) -> Path:
    """Write the slim checkpoint to `out` (atomically) and return its path."""
    out = Path(out)
    with atomic_output_dir(out, force=force) as tmp:
        model.config.auto_map = dict(AUTO_MAP)
        model.save_pretrained(tmp)
        for src in REMOTE_CODE_FILES:
            shutil.copyfile(src, tmp / src.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
        (tmp / "README.md").write_text(model_card(model.config, record))
        if not any(tmp.glob("*.safetensors")):
            raise RuntimeError("save_pretrained wrote no safetensors file")
    log.info("slim checkpoint written to %s", out)
    return out


def read_record(path: Path) -> dict:
    return json.loads((Path(path) / RECORD_FILE).read_text())


def model_card(config, record: dict) -> str:
    """A short model card: what this is, how it was made, how to load and serve it."""
    prune = record.get("prune", {})
    calib = record.get("calibration", {})
    rows = "\n".join(
        f"| {i} | {q} | {kv} | {f} |"
        for i, (q, kv, f) in enumerate(
            zip(config.num_attention_heads_per_layer, config.num_key_value_heads_per_layer, config.intermediate_size_per_layer)
        )
    )
    achieved = record.get("ratio_achieved_decoder", 0.0)
    whole = record.get("ratio_achieved_model", 0.0)
    return f"""---
library_name: transformers
tags: [slimgpt, pruning, structured-pruning]
---
# {record.get('source', {}).get('source', 'model')} pruned with SlimGPT

Structured pruning (SlimGPT, Ling et al., NeurIPS 2024) by slimgpt-deploy: whole attention heads
and FFN channels removed, every layer physically smaller, no retraining.

- method: `{prune.get('method')}`, schedule `{prune.get('schedule')}`, GQA mode `{prune.get('gqa_mode')}`
- decoder parameters removed: {achieved:.2%} (target {record.get('ratio_target', 0.0):.2%}); whole model: {whole:.2%}
- parameters: {record.get('params_dense', 0):,} dense -> {record.get('params_slim', 0):,}
- calibration: `{calib.get('source')}`, {calib.get('nsamples')} x {calib.get('seqlen')} tokens, seed {calib.get('seed')}

Full record (per-layer kept heads and reconstruction errors, timings, versions): `slimgpt.json`.

## Load

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)  # without slimgpt-deploy
import slimgpt_deploy  # or: registers the `slimgpt` model type, no remote code needed
model = AutoModelForCausalLM.from_pretrained("PATH")
```

## Per-layer shapes

| layer | query heads | KV heads | FFN width |
|---|---|---|---|
{rows}
"""


# Weight files that torch.load unpickles; refused everywhere (DESIGN.md: safetensors only).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def read_config(path: Path) -> dict:
    """config.json of a checkpoint directory as a dict; CheckpointError if it is missing or not JSON."""
    from .errors import CheckpointError

    path = Path(path)
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory (no config.json); give the --out of `slimgpt-deploy prune`")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON ({e})") from None


def safetensors_files(path: Path, error: type[Exception] | None = None) -> list[Path]:
    """The directory's .safetensors files; `error` (CheckpointError by default) if there are none.

    Pickle weights are named in the message with a conversion hint: unpickling can run code.
    """
    from .errors import CheckpointError

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        what = f"pickle weights ({', '.join(pickles)})" if pickles else "no .safetensors weights"
        raise (error or CheckpointError)(
            f"{path} has {what}; slimgpt-deploy loads safetensors only (pickle files can run code). "
            "Convert once where you trust the file: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir)"
        )
    return files


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


def weight_bytes_per_token(path: Path) -> int:
    """Weight bytes a decode step reads, from the safetensors headers (nothing is loaded).

    Every tensor once, except an untied input embedding (a gather reads one row);
    a tied embedding is read once, as the lm_head. The memory-bound ideal speed-up of
    pruning is the ratio of this for dense and pruned.
    """
    from safetensors import safe_open

    tied = read_config(path).get("tie_word_embeddings", False)
    total = 0
    for file in safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name.endswith("embed_tokens.weight") and not tied:
                    continue
                if name == "lm_head.weight" and tied:
                    continue  # a tied head written out anyway is the embedding, counted already
                t = f.get_slice(name)
                n = 1
                for d in t.get_shape():
                    n *= d
                total += n * _DTYPE_BYTES[t.get_dtype()]
    return total


def validate_checkpoint(path: Path) -> None:
    """Check a slim checkpoint's weights against its config without loading them.

    Reads only the safetensors headers. Raises CheckpointError naming the first
    layer whose tensors disagree with the per-layer lists (or that is missing).
    """
    from safetensors import safe_open

    from .errors import CheckpointError
    from .modeling import SlimGPTConfig
    from .modeling.shapes import layer_weight_shapes, shape_mismatch

    path = Path(path)
    try:
        config = SlimGPTConfig.from_pretrained(path)
    except Exception as e:  # transformers' strict validation wraps the ValueError in its own error type
        reason = str(e).strip().splitlines()[-1].strip().removeprefix("ValueError: ")
        raise CheckpointError(f"{path}/config.json is inconsistent: {reason}") from None
    files = safetensors_files(path)
    seen = set()
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    problem = shape_mismatch(config, name, tuple(f.get_slice(name).get_shape()))
                    if problem:
                        raise CheckpointError(f"{file.name}: {problem}")
                    seen.add(name)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated headers
            raise CheckpointError(f"{file} is not a readable safetensors file ({e})") from None
    for i in range(config.num_hidden_layers):
        missing = [k for k in layer_weight_shapes(config, i) if f"model.layers.{i}.{k}" not in seen]
        if missing:
            raise CheckpointError(f"layer {i}: weights missing from the checkpoint: {', '.join(missing)}")
