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
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no .safetensors weights; export from a slim checkpoint written by `slimgpt-deploy prune`")
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
