"""The slim checkpoint on disk (docs/DESIGN.md, "The slim checkpoint").

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
            zip(
                config.num_attention_heads_per_layer,
                config.num_key_value_heads_per_layer,
                config.intermediate_size_per_layer,
            )
        )
    )
    achieved = record.get("ratio_achieved_decoder", 0.0)
    recovery = _recovery_lines(record.get("recovery"))
    whole = record.get("ratio_achieved_model", 0.0)
    return f"""---
library_name: transformers
tags: [slimgpt, pruning, structured-pruning]
---
# {record.get("source", {}).get("source", "model")} pruned with SlimGPT

Structured pruning (SlimGPT, Ling et al., NeurIPS 2024) by slimgpt-deploy: whole attention heads
and FFN channels removed, every layer physically smaller, no retraining.

- method: `{prune.get("method")}`, schedule `{prune.get("schedule")}`, GQA mode `{prune.get("gqa_mode")}`
- decoder parameters removed: {achieved:.2%} (target {record.get("ratio_target", 0.0):.2%}); whole model: {whole:.2%}
- parameters: {record.get("params_dense", 0):,} dense -> {record.get("params_slim", 0):,}
- calibration: `{calib.get("source")}`, {calib.get("nsamples")} x {calib.get("seqlen")} tokens, seed {calib.get("seed")}
{recovery}
Full record (per-layer kept heads and reconstruction errors, timings, versions): `slimgpt.json`.

## Load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)  # without slimgpt-deploy
import slimgpt_deploy  # or: registers the `slimgpt` model type, no remote code needed
model = AutoModelForCausalLM.from_pretrained("PATH")
# the tokenizer is plain tokenizer.json: False skips transformers' custom-code question (asked of the config)
tokenizer = AutoTokenizer.from_pretrained("PATH", trust_remote_code=False)
```

## Per-layer shapes

| layer | query heads | KV heads | FFN width |
|---|---|---|---|
{rows}
"""


def _recovery_lines(rec: dict | None) -> str:
    """The model card's recovery section (recover.py), or nothing."""
    if not rec:
        return ""
    lines = [
        "",
        "## Recovery",
        "",
        f"Distilled from the dense model `{rec.get('teacher')}` ({rec.get('trained')}): {rec.get('steps')} steps, "
        f"{rec.get('tokens', 0):,} tokens of `{(rec.get('data') or {}).get('source')}` text, "
        f"{(rec.get('seconds') or {}).get('total', 0):.0f} s.",
    ]
    fid = rec.get("fidelity") or {}
    if fid.get("before") and fid.get("after"):
        lines.append(
            f"Held-out KL to the dense model {fid['before']['kl']:.4f} -> {fid['after']['kl']:.4f} nats/token, "
            f"top-1 agreement {fid['before']['top1']:.2%} -> {fid['after']['top1']:.2%}."
        )
    ppl = rec.get("perplexity")
    if ppl:
        lines.append(
            f"Perplexity on {ppl['text']} ({ppl['seqlen']}-token windows): {ppl['before']:.2f} -> {ppl['after']:.2f}."
        )
    return "\n".join(lines) + "\n"


# Weight files that torch.load unpickles; refused everywhere
# (docs/DESIGN.md, "Resources, resume, safe loading").
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def read_config(path: Path) -> dict:
    """config.json of a checkpoint directory as a dict; CheckpointError if it is missing or not JSON."""
    from .errors import CheckpointError

    path = Path(path)
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(
            f"{path} is not a checkpoint directory (no config.json); give the --out of `slimgpt-deploy prune`"
        )
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


# Bytes per element of every safetensors dtype; the floating ones are what model weights may be.
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


def read_safetensors_header(file: Path, error: type[Exception] | None = None) -> dict[str, dict]:
    """A safetensors file's tensors, {name: {"dtype", "shape", "data_offsets"}}, from its header alone.

    Checks what a reader would trip over later: the 8-byte length, the JSON
    header, every tensor's byte range against its shape and dtype, and that the
    data the header promises is all in the file. Raises `error`
    (CheckpointError by default) naming the file, with what to do.
    """
    from .errors import CheckpointError

    file = Path(file)

    def bad(why: str) -> Exception:
        return (error or CheckpointError)(f"{file} is truncated or corrupt ({why}); re-download or re-export it")

    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > _MAX_HEADER:
            raise bad(f"header length {n} runs past the end of the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    header.pop("__metadata__", None)
    data, end = size - 8 - n, 0
    for name, info in header.items():
        try:
            dtype, shape, (begin, stop) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
            numel = 1
            for d in shape:
                numel *= d
            ok = dtype in _DTYPE_BYTES and 0 <= begin <= stop and stop - begin == numel * _DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise bad(f"tensor {name}'s entry {info!r:.120} is malformed")
        end = max(end, stop)
    if end > data:
        raise bad(f"the header describes {end} bytes of data but the file holds {data}")
    return header


def expected_tensor_shapes(config) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(required, optional) tensor shapes a model config implies, by HF name (unsharded).

    Slim configs use their per-layer lists (modeling/shapes.py); dense llama,
    mistral and qwen2 configs their uniform sizes. Optional: a tied lm_head,
    o_proj's bias on dense models (families differ; the loader decides) and the
    rotary inv_freq buffers older checkpoints carry.
    """
    import dataclasses

    from .families import SLIM_MODEL_TYPE, layer_shapes, layout_of

    layout = layout_of(config)
    h, vocab = config.hidden_size, config.vocab_size
    required = {f"{layout.embed}.weight": (vocab, h), f"{layout.norm}.weight": (h,)}
    optional: dict[str, tuple[int, ...]] = {}
    (optional if config.tie_word_embeddings else required)[f"{layout.head}.weight"] = (vocab, h)
    for i, s in enumerate(layer_shapes(config)):
        prefix = layout.layer_prefix(i)
        if config.model_type != SLIM_MODEL_TYPE:  # dense: o's bias is the loader's business
            optional[prefix + layout.tensor("o", "bias")] = (h,)
            s = dataclasses.replace(s, o_bias=False)
        required |= {prefix + k: v for k, v in layout.tensor_shapes(s).items()}
        optional[f"{prefix}{layout.attention}.rotary_emb.inv_freq"] = (s.head_dim // 2,)
    return required, optional


def check_tensors(path: Path, config, error: type[Exception] | None = None) -> None:
    """Check every tensor's shape and dtype in `path`'s safetensors headers against `config`.

    Reads headers only (no tensor data): a truncated or corrupt shard, a
    tensor the config does not describe or of another shape, a non-floating
    dtype, or a missing tensor raises `error` (CheckpointError by default).
    """
    from .errors import CheckpointError

    err = error or CheckpointError
    required, optional = expected_tensor_shapes(config)
    seen: set[str] = set()
    for file in safetensors_files(path, error=err):
        for name, info in read_safetensors_header(file, error=err).items():
            expected = required.get(name, optional.get(name))
            if expected is None:
                raise err(
                    f"{file.name}: tensor {name} is not part of a {config.model_type} model with this config.json; "
                    "re-export the checkpoint or fix config.json"
                )
            if tuple(info["shape"]) != expected:
                raise err(
                    f"{file.name}: {name} has shape {info['shape']} but config.json implies {list(expected)}; "
                    "re-export the checkpoint or fix config.json"
                )
            if name.endswith("inv_freq"):
                continue
            if info["dtype"] not in FLOAT_DTYPES:
                raise err(
                    f"{file.name}: {name} has dtype {info['dtype']}; slimgpt-deploy needs floating-point weights "
                    f"({', '.join(FLOAT_DTYPES)}), not a quantized checkpoint"
                )
            seen.add(name)
    missing = [n for n in required if n not in seen]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise err(f"{path}: tensor {missing[0]}{more} missing from the safetensors files; re-download or re-export it")


def weight_bytes_per_token(path: Path) -> int:
    """Weight bytes a decode step reads, from the safetensors headers (nothing is loaded).

    Every tensor once, except an untied input embedding (a gather reads one row);
    a tied embedding is read once, as the lm_head. The memory-bound ideal speed-up of
    pruning is the ratio of this for dense and pruned.
    """
    from safetensors import safe_open

    from .families import layout_of

    config = read_config(path)
    layout, tied = layout_of(config), config.get("tie_word_embeddings", False)
    total = 0
    for file in safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name == f"{layout.embed}.weight" and not tied:
                    continue
                if name == f"{layout.head}.weight" and tied:
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
    layer whose tensors disagree with the per-layer lists (or that is missing),
    or the file that is truncated or corrupt.
    """
    from .errors import CheckpointError
    from .layout import SLIM
    from .modeling import SlimGPTConfig
    from .modeling.shapes import layer_weight_shapes, shape_mismatch

    path = Path(path)
    try:
        config = SlimGPTConfig.from_pretrained(path)
    except Exception as e:  # transformers' strict validation wraps the ValueError in its own error type
        reason = str(e).strip().splitlines()[-1].strip().removeprefix("ValueError: ")
        raise CheckpointError(f"{path}/config.json is inconsistent: {reason}") from None
    seen = set()
    for file in safetensors_files(path):
        for name, info in read_safetensors_header(file).items():
            problem = shape_mismatch(config, name, tuple(info["shape"]))
            if problem:
                raise CheckpointError(f"{file.name}: {problem}")
            seen.add(name)
    for i in range(config.num_hidden_layers):
        missing = [k for k in layer_weight_shapes(config, i) if SLIM.layer_prefix(i) + k not in seen]
        if missing:
            raise CheckpointError(f"layer {i}: weights missing from the checkpoint: {', '.join(missing)}")
