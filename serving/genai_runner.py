"""ONNX Runtime GenAI (`onnxruntime-genai`) as a runtime: load a GenAI folder, decode, generate.

A GenAI folder is what `onnxruntime_genai.Model(DIR)` opens and what the C, C#, Java,
Objective-C and Python APIs of ONNX Runtime GenAI ship in edge apps:

    DIR/genai_config.json    model type, I/O names, sizes, search defaults
    DIR/model.onnx(.data)    the decoder graph (exporters/genai.py writes it)
    DIR/tokenizer files      read by GenAI's own tokenizer

GenAI reads the shape of each layer's `past_key_values.{i}.key` input from the graph for
its KV cache (since 0.15), so a decoder whose layers keep different numbers of KV heads
runs there; `require_genai` refuses an older runtime for such a graph. `check_folder`
refuses a folder whose genai_config.json is missing, unreadable or disagrees with the graph.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimgpt_deploy.errors import BadInputError

CONFIG_FILE = "genai_config.json"
MIN_VERSION = (0, 15)  # per-layer KV-cache shapes read from the graph


def require_genai(per_layer_kv: bool = True):
    """The onnxruntime_genai module; BadInputError when it is missing or too old for per-layer KV shapes."""
    from slimgpt_deploy.extras import major_minor, require

    og = require("onnxruntime_genai")
    if per_layer_kv and major_minor(og.__version__) < MIN_VERSION:
        raise BadInputError(
            f"onnxruntime-genai {og.__version__} sizes every layer's KV cache alike; this model keeps different "
            f"KV-head counts per layer: install onnxruntime-genai >= {'.'.join(map(str, MIN_VERSION))}"
        )
    return og


@dataclass(frozen=True)
class FolderInfo:
    """What genai_config.json and the graph agree on."""

    directory: Path
    config: dict
    kv_heads: list[int]  # per layer, from the graph's past_key_values.{i}.key inputs
    head_size: int
    vocab_size: int
    weights: str  # fp32, fp16 or int8 (MatMulNBits), read from the graph


def check_folder(directory: Path) -> FolderInfo:
    """Read DIR/genai_config.json and the graph's inputs (no weights); one-line BadInputError on any disagreement."""
    import onnx

    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise BadInputError(
            f"{directory} has no {CONFIG_FILE}: not an ONNX Runtime GenAI folder (make one: export --format genai)"
        )
    try:
        config = json.loads(path.read_text())
        decoder = config["model"]["decoder"]
        layers, head_size = int(decoder["num_hidden_layers"]), int(decoder["head_size"])
        vocab, filename = int(config["model"]["vocab_size"]), decoder["filename"]
        key_name = decoder["inputs"]["past_key_names"]
    except (ValueError, KeyError, TypeError) as e:
        raise BadInputError(f"{path} is not a valid GenAI config ({type(e).__name__}: {e}); re-export it") from None
    graph_file = directory / filename
    if not graph_file.is_file():
        raise BadInputError(f"{path} names decoder {filename!r}, which is not in {directory}; re-export the folder")
    graph = onnx.load(str(graph_file), load_external_data=False).graph
    shapes = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    outputs = {o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim] for o in graph.output}
    keys = [shapes.get(key_name % i) for i in range(layers)]
    if any(k is None for k in keys) or key_name % layers in shapes:
        found = sum(1 for name in shapes if name.endswith(".key"))
        raise BadInputError(
            f"{path} says num_hidden_layers={layers} but the graph has {found} {key_name!r} inputs; re-export it"
        )
    if any(k[3] != head_size for k in keys):
        raise BadInputError(f"{path} says head_size={head_size} but the graph's cache has {keys[0][3]}")
    logits = outputs.get(decoder["outputs"]["logits"])
    if logits is None or logits[-1] != vocab:
        raise BadInputError(f"{path} says vocab_size={vocab} but the graph's logits are {logits}")
    elem = graph.output[[o.name for o in graph.output].index(decoder["outputs"]["logits"])].type.tensor_type.elem_type
    weights = "int8" if any(n.op_type == "MatMulNBits" for n in graph.node) else {10: "fp16"}.get(elem, "fp32")
    return FolderInfo(directory, config, [int(k[1]) for k in keys], head_size, vocab, weights)


class GenAIModel:
    """One loaded GenAI folder (CPU unless the config names another provider)."""

    def __init__(self, directory: Path, threads: int | None = None):
        self.info = check_folder(directory)
        self.og = require_genai(per_layer_kv=len(set(self.info.kv_heads)) > 1)
        try:
            config = self.og.Config(str(directory))
            if threads is not None:  # ONNX Runtime's intra-op threads, over what the folder's config says
                options = {"session_options": {"intra_op_num_threads": threads}}
                config.overlay(json.dumps({"model": {"decoder": options}}))
            self.model = self.og.Model(config)
        except Exception as e:  # the runtime's own message: a contrib op it lacks, a bad graph
            raise BadInputError(f"ONNX Runtime GenAI cannot load {directory}: {str(e).splitlines()[0]}") from None
        try:
            self.tokenizer = self.og.Tokenizer(self.model)
        except Exception as e:  # e.g. a tokenizer.json model GenAI's tokenizer does not read
            raise BadInputError(f"ONNX Runtime GenAI cannot read the tokenizer in {directory}: {e}") from None

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(np.asarray(ids, dtype=np.int32))

    def generator(self, batch_size: int, max_length: int, **search):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, batch_size=batch_size, **search)
        return self.og.Generator(self.model, params)

    def greedy(self, prompts: list[list[int]], steps: int) -> list[list[int]]:
        """Greedy continuations of prompts in one batch: up to `steps` tokens each, a row ending at its first EOS.

        GenAI's own search, as an app runs it: it stops a row at EOS (its `min_length` would instead mask
        EOS, which changes the tokens). Shorter prompts are padded on the right with the config's
        pad_token_id, which GenAI masks (GroupQueryAttention then places each row's new tokens after its
        own last real one); measured here: left padding gives wrong tokens for the shorter row, right
        padding the tokens of that prompt run alone.
        """
        width = max(len(p) for p in prompts)
        pad = int(self.info.config["model"]["pad_token_id"])
        rows = [p + [pad] * (width - len(p)) for p in prompts]
        gen = self.generator(len(prompts), width + steps, do_sample=False)
        gen.append_tokens(np.asarray(rows, dtype=np.int32))
        chosen: list[list[int]] = [[] for _ in prompts]
        for _ in range(steps):  # each step's token from get_next_tokens: GenAI leaves the final EOS out of a sequence
            if gen.is_done():
                break
            gen.generate_next_token()
            for row, token in zip(chosen, gen.get_next_tokens()):
                row.append(int(token))
        return [until_eos(row, self.eos) for row in chosen]

    @property
    def eos(self) -> set[int]:
        eos = self.info.config["model"].get("eos_token_id")
        return set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def teacher_forced(self, prompt: list[int], tokens: list[int]) -> np.ndarray:
        """float32 logits [len(tokens), vocab]: after the prompt, then after each of tokens[:-1] (cached steps)."""
        gen = self.generator(1, len(prompt) + len(tokens) + 1, do_sample=False)
        gen.append_tokens(np.asarray([prompt], dtype=np.int32))
        rows = [np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1)[-self.info.vocab_size :]]
        for t in tokens[:-1]:
            gen.append_tokens(np.asarray([[t]], dtype=np.int32))
            rows.append(np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1)[-self.info.vocab_size :])
        return np.stack(rows)


def until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """`tokens` up to and including the first EOS."""
    end = next((i for i, t in enumerate(tokens) if t in eos), None)
    return tokens if end is None else tokens[: end + 1]


def generate(
    model: Path,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    on_text: Callable[[int, str], None] | None = None,
) -> list[str]:
    """The `generate` back-end contract (serving/__init__.py) on a GenAI folder, with GenAI's own tokenizer."""
    runtime = GenAIModel(Path(model))
    context = int(runtime.info.config["model"].get("context_length", 2048))
    search = {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature}
    if temperature and top_p < 1.0:
        search["top_p"] = top_p
    if temperature:
        search["random_seed"] = seed
    completions = []
    for i, prompt in enumerate(prompts):
        ids = runtime.tokenize(prompt)
        if len(ids) + max_new_tokens > context:
            raise BadInputError(f"prompt {i} has {len(ids)} tokens; with --max-new-tokens it exceeds {context}")
        gen = runtime.generator(1, len(ids) + max_new_tokens, **search)
        gen.append_tokens(np.asarray([ids], dtype=np.int32))
        stream, text = runtime.tokenizer.create_stream(), []
        while not gen.is_done():
            gen.generate_next_token()
            piece = stream.decode(int(gen.get_next_tokens()[0]))
            text.append(piece)
            if on_text is not None and piece:
                on_text(i, piece)
        completions.append("".join(text))
    return completions
