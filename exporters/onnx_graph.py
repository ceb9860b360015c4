"""ONNX decoder graphs written node by node (onnx.helper), from each layer's own shapes.

`Graph` collects nodes and initializers; both ONNX exports write through it (`exporters/genai.py` its
GroupQueryAttention graph, `write_decoder` here the graph of `export --format onnx`).

`write_decoder` writes the computation of `exporters/onnx_model.py`'s ExportDecoder with its
inputs and outputs (input_ids, attention_mask, position_ids, past_key_values.{i}.key/value ->
logits, present.{i}.key/value; batch, sequence and past dynamic; each layer's KV-head count static),
in one of two forms:

  fused (default)  opset 23 + com.microsoft. Each layer: ONNX Runtime's SkipSimplifiedLayer-
                   Normalization (the residual add and the RMSNorm after it; SimplifiedLayer-
                   Normalization for the first) -> q/k/v MatMuls -> RotaryEmbedding on q and k
                   (cos/sin [B, S, D/2] from position_ids) -> ONNX Runtime's GroupQueryAttention
                   (num_heads q_i / kv_num_heads kv_i per layer, the additive mask as
                   attention_bias, the cache in and out; past and present may be one buffer of
                   the full length, written in place) -> o MatMul -> SkipSimplifiedLayer-
                   Normalization -> SiLU-gated MLP. Until 2026-12-06 the attention was ONNX's
                   opset-23 Attention, which always concatenates the cache.
  fuse=False       opset 18, standard ops only, for runtimes without ONNX Runtime's contrib ops
                   or opset 23: RMSNorm as Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul, rotate_half
                   RoPE, the cache concatenated, queries reshaped to [B, kv, q_per_kv, S, D]
                   against the [B, kv, 1, T, D] cache (K/V never repeated), Softmax.

Both: the causal + padding mask built in the graph from attention_mask, RoPE angles in float32
(transformers' attention scaling folded into cos/sin), the lm_head a MatMul with the (tied)
embedding transposed at run time, so a tied embedding is stored once. Measured on SmolLM2-135M
(docs/DESIGN.md, "ONNX export"): writing takes seconds where torch.onnx's dynamo exporter took
~50 s. The in-place cache takes 0.83-0.98x the batch-1 decode time of the same graph bound with a
fresh past/present pair per step (benchmarks/onnx_interleaved.py); ad hoc, against the opset-23
Attention graph it replaced, 0.89x (dense) / 0.92x (50% pruned) in fp32 (docs/DESIGN.md, "ONNX
export"). The Attention graph's own gain over standard ops: benchmarks/onnx_attention.py.
"""

from __future__ import annotations

import numpy as np
import torch

from slimgpt_deploy.families import layout_of

NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}
OPSET = 18  # the unfused graph: standard ops of opset 18
FUSED_OPSET = 23  # Attention and RotaryEmbedding are standard ops from opset 23


def opset_of(attention: bool) -> int:
    """The standard opset a graph is written in: 23 with the fused Attention/RotaryEmbedding, else 18."""
    return FUSED_OPSET if attention else OPSET


class Graph:
    """Nodes and initializers collected as a graph is written (names are unique by construction)."""

    def __init__(self, dtype: torch.dtype):
        from onnx import TensorProto

        self.nodes, self.inits = [], []
        self.dtype = dtype
        self.np_dtype = NP_DTYPES[dtype]
        self.elem = TensorProto.FLOAT16 if dtype == torch.float16 else TensorProto.FLOAT

    def weight(self, name: str, value, np_dtype=None) -> str:
        """An initializer in the graph's float type (or `np_dtype`)."""
        from onnx import numpy_helper

        array = value.detach().float().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        array = np.ascontiguousarray(array.astype(np_dtype or self.np_dtype))
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def int64(self, name: str, values, scalar: bool = False) -> str:
        from onnx import numpy_helper

        array = np.asarray(values[0] if scalar else values, dtype=np.int64)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], name: str, outputs: int = 1, domain: str = "", **attrs) -> list[str]:
        from onnx import helper

        names = [f"/{name}/output_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=name, domain=domain, **attrs))
        return names

    def op(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        """A one-output node; its output's name."""
        return self.node(op, inputs, name, **attrs)[0]

    def linear(self, x: str, module, name: str) -> str:
        """x @ W^T (+ b) for a torch Linear; W stored as [in, out]: MatMul's layout, what MatMulNBits quantizes."""
        y = self.op("MatMul", [x, self.weight(f"{name}.weight", module.weight.T)], f"{name}/MatMul")
        if module.bias is not None:
            y = self.op("Add", [y, self.weight(f"{name}.bias", module.bias)], f"{name}/Add")
        return y

    def packed_matmul(self, x: str, modules: list, name: str) -> str:
        """`linear` for several torch Linears of the same input in one MatMul over their stacked weights (+ their
        biases stacked, zeros for a Linear without one): the outputs side by side, [..., sum of outs]."""
        weight = torch.cat([m.weight for m in modules]).T  # [in, sum of outs]
        y = self.op("MatMul", [x, self.weight(f"{name}.weight", weight)], f"{name}/MatMul")
        if any(m.bias is not None for m in modules):
            bias = torch.cat([m.weight.new_zeros(m.out_features) if m.bias is None else m.bias for m in modules])
            y = self.op("Add", [y, self.weight(f"{name}.bias", bias)], f"{name}/Add")
        return y

    def packed_linear(self, x: str, modules: list, name: str) -> list[str]:
        """`packed_matmul` split back into one output per Linear. A decode step's MatMul nodes each cost a fixed
        time that a pruned weight does not shrink, most in int8's MatMulNBits: one node for q/k/v and one for
        gate/up instead of five made int8 decode ~10% faster here (benchmarks/results/onnx_pack.md). MatMulNBits
        quantizes each output column on its own, so the int8 weights are the ones the separate MatMuls would get."""
        y = self.packed_matmul(x, modules, name)
        sizes = self.int64(f"{name}.split", [m.out_features for m in modules])
        return self.node("Split", [y, sizes], f"{name}/Split", outputs=len(modules), axis=-1)

    def drop_unused(self) -> None:
        """Remove the initializers no node reads (shared constants one form of the graph does not use)."""
        used = {name for node in self.nodes for name in node.input}
        self.inits = [t for t in self.inits if t.name in used]

    def model(self, name: str, inputs: list, outputs: list, opset: int, contrib: bool):
        """The ModelProto, at the lowest IR version that carries `opset`.

        onnx.helper.make_model stamps the installed onnx package's newest IR version (onnx 1.23: IR 14),
        which onnxruntime 1.20.1-1.26.0 refused to load (measured: "Unsupported model IR version: 14, max
        supported IR version: 13") although the graph needs nothing newer than its opset.
        """
        from onnx import helper

        standard = helper.make_opsetid("", opset)
        opsets = [standard] + ([helper.make_opsetid("com.microsoft", 1)] if contrib else [])
        graph = helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.inits)
        model = helper.make_model(graph, opset_imports=opsets, producer_name="slimgpt-deploy")
        model.ir_version = helper.find_min_ir_version_for([standard])
        return model

    def rename_output(self, old: str, new: str) -> None:
        """Give the node output `old` the graph-output name `new`."""
        for node in self.nodes:
            for k, out in enumerate(node.output):
                if out == old:
                    node.output[k] = new
                    return
        raise KeyError(old)


class _Norms:
    """The decoder's RMSNorms: fused into ONNX Runtime's (Skip)SimplifiedLayerNormalization, or standard ops."""

    def __init__(self, g: Graph, eps: float, fuse: bool):
        self.g, self.eps, self.fuse = g, eps, fuse
        self.counts: dict[str, int] = {}
        self.constants: set[str] = set()

    def first(self, x: str, weight: str, name: str) -> str:
        """RMSNorm(x) * weight."""
        if not self.fuse:
            return self._standard(x, weight, name)
        self._count("SimplifiedLayerNormalization")
        return self.g.op("SimplifiedLayerNormalization", [x, weight], name, axis=-1, epsilon=self.eps)

    def after_add(self, residual: str, delta: str, weight: str, name: str) -> tuple[str, str]:
        """(RMSNorm(residual + delta) * weight, residual + delta)."""
        if not self.fuse:
            summed = self.g.op("Add", [residual, delta], f"{name}/residual")
            return self._standard(summed, weight, name), summed
        self._count("SkipSimplifiedLayerNormalization")
        out, _, _, summed = self.g.node(
            "SkipSimplifiedLayerNormalization",
            [residual, delta, weight],
            name,
            outputs=4,
            domain="com.microsoft",
            epsilon=self.eps,
        )
        return out, summed

    def _standard(self, x: str, weight: str, name: str) -> str:
        """transformers' LlamaRMSNorm: in float32, cast back, then scaled (the pattern ORT's optimizer fuses)."""
        from onnx import TensorProto

        g = self.g
        h = x if g.dtype == torch.float32 else g.op("Cast", [x], f"{name}/Cast", to=TensorProto.FLOAT)
        sq = g.op("Pow", [h, self._constant("const_two", 2.0)], f"{name}/Pow")
        mean = g.op("ReduceMean", [sq, "const_axes_last"], f"{name}/ReduceMean", keepdims=1)
        var = g.op("Add", [mean, self._constant("const_eps", self.eps)], f"{name}/Add")
        inv = g.op("Reciprocal", [g.op("Sqrt", [var], f"{name}/Sqrt")], f"{name}/Reciprocal")
        y = g.op("Mul", [h, inv], f"{name}/Mul")
        if g.dtype != torch.float32:
            y = g.op("Cast", [y], f"{name}/CastBack", to=g.elem)
        return g.op("Mul", [weight, y], f"{name}/Scale")

    def _constant(self, name: str, value: float) -> str:
        """A float32 scalar initializer, written the first time it is used."""
        if name not in self.constants:
            self.constants.add(self.g.weight(name, np.float32(value), np.float32))
        return name

    def _count(self, op: str) -> None:
        self.counts[op] = self.counts.get(op, 0) + 1


def write_decoder(model, dtype: torch.dtype, *, fuse: bool, attention: bool | None = None, untie_lm_head: bool = False):
    """The ONNX ModelProto of `model`'s decoder (weights in `dtype`) and the count of each fused op (None unfused)."""

    config = model.config
    layout = layout_of(config)
    g = Graph(dtype)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    layers = layout.part(model, "layers")
    heads = [
        (layout.proj(la, "q").out_features // head_dim, layout.proj(la, "k").out_features // head_dim) for la in layers
    ]
    inputs, outputs = _signature(g, heads, head_dim, int(config.vocab_size))
    _constants(g, head_dim)
    attention = fuse if attention is None else attention
    rope = _rope(g, layout.part(model, "rotary"), fused=attention)
    mask = _mask(g, fused=attention)
    if attention:
        mask = (mask, *_gqa_lengths(g))  # GroupQueryAttention's bias and lengths, shared by every layer
    norms = _Norms(g, float(config.rms_norm_eps), fuse)
    attend = _fused_attention if attention else _attention
    embed = model.get_input_embeddings().weight
    embed_name = g.weight(f"{layout.embed}.weight", embed)
    x, pending = g.op("Gather", [embed_name, "input_ids"], "embed"), None
    for i, (layer, (q_heads, kv)) in enumerate(zip(layers, heads)):
        p = f"{layout.layers}.{i}"
        w_in = g.weight(f"{p}.{layout.attention_norm}.weight", layout.part(layer, "attention_norm").weight)
        if pending is None:
            h = norms.first(x, w_in, f"{p}/{layout.attention_norm}")
        else:
            h, x = norms.after_add(x, pending, w_in, f"{p}/{layout.attention_norm}")
        qkv = g.packed_linear(h, [layout.proj(layer, role) for role in "qkv"], f"{p}.{layout.attention}.qkv_proj")
        projected = dict(zip("qkv", qkv))
        ctx = attend(g, projected, rope, mask, i, (q_heads, kv, head_dim), p)
        o = g.linear(ctx, layout.proj(layer, "o"), f"{p}.{layout.projections['o']}")
        w_post = g.weight(f"{p}.{layout.mlp_norm}.weight", layout.part(layer, "mlp_norm").weight)
        h, x = norms.after_add(x, o, w_post, f"{p}/{layout.mlp_norm}")
        pending = _mlp(g, layout, layer, h, p)
    w_final = g.weight(f"{layout.norm}.weight", layout.part(model, "norm").weight)
    final, _ = norms.after_add(x, pending, w_final, "model/norm")
    lm_head = model.get_output_embeddings().weight  # [V, H]
    if lm_head is embed and not untie_lm_head:
        head = g.op("Transpose", [embed_name], "lm_head/Transpose", perm=[1, 0])  # one stored copy
    else:
        head = g.weight("lm_head.weight.T", lm_head.T)  # [H, V]
    g.rename_output(g.op("MatMul", [final, head], "lm_head/MatMul"), "logits")
    g.drop_unused()
    model_proto = g.model("slimgpt_decoder", inputs, outputs, opset_of(attention), contrib=fuse)
    fused = norms.counts | ({"GroupQueryAttention": len(heads), "RotaryEmbedding": 2 * len(heads)} if attention else {})
    return model_proto, (fused or None)


def _signature(g: Graph, heads: list[tuple[int, int]], head_dim: int, vocab: int):
    """The graph's inputs and outputs (value infos): ids, mask, positions and each layer's cache in; logits out."""
    from onnx import TensorProto, helper

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", g.elem, ["batch", "sequence", vocab])]
    for i, (_, kv) in enumerate(heads):
        for kind in ("key", "value"):
            past, present = ["batch", kv, "past_sequence", head_dim], ["batch", kv, "total_sequence", head_dim]
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", g.elem, past))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", g.elem, present))
    return inputs, outputs


def _constants(g: Graph, head_dim: int) -> None:
    """The constants the layers share (write_decoder drops those its form does not use)."""
    for name, values in (
        ("axes_last", [-1]),
        ("axis0", [0]),
        ("axis1", [1]),
        ("axis2", [2]),
        ("axes12", [1, 2]),
        ("zero_1d", [0]),
        ("half", [head_dim // 2]),
        ("head_dim", [head_dim]),
    ):
        g.int64(f"const_{name}", values)
    g.weight("const_scale", np.asarray(head_dim**-0.5))
    g.int64("const_zero", [0], scalar=True)
    g.int64("const_one", [1], scalar=True)
    g.weight("const_mask_zero", np.asarray(0.0), g.np_dtype)
    g.weight("const_mask_min", np.asarray(np.finfo(g.np_dtype).min), g.np_dtype)


def _rope(g: Graph, rotary, *, fused: bool) -> tuple[str, str]:
    """cos, sin of position x inv_freq (float32 angles, transformers' attention scaling folded in), in the graph's
    dtype: [B, S, D/2] for RotaryEmbedding (fused), else [B, 1, S, D] (halves repeated) for the primitive form."""
    from onnx import TensorProto

    inv_freq = g.weight("rope.inv_freq", rotary.inv_freq.detach().float(), np.float32)
    position = g.op("Cast", ["position_ids"], "rope/Cast", to=TensorProto.FLOAT)
    angles = g.op("Mul", [g.op("Unsqueeze", [position, "const_axes_last"], "rope/Unsqueeze"), inv_freq], "rope/freqs")
    if not fused:
        angles = g.op("Concat", [angles, angles], "rope/emb", axis=-1)  # [B, S, D]
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    tables = []
    for fn in ("Cos", "Sin"):
        t = g.op(fn, [angles], f"rope/{fn}")
        if scaling != 1.0:
            t = g.op("Mul", [t, g.weight(f"rope.scaling_{fn}", np.float32(scaling), np.float32)], f"rope/{fn}/scale")
        if g.dtype != torch.float32:
            t = g.op("Cast", [t], f"rope/{fn}/Cast", to=g.elem)
        tables.append(t if fused else g.op("Unsqueeze", [t, "const_axis1"], f"rope/{fn}/Unsqueeze"))
    return tables[0], tables[1]


def _mask(g: Graph, *, fused: bool) -> str:
    """The additive mask: query s at cache position T - S + s sees keys k <= it that are not padding; masked
    entries get the dtype's most negative finite value. [B, 1, S, T] for Attention (fused), else [B, 1, 1, S, T]."""
    from onnx import TensorProto

    seq = g.op("Gather", [g.op("Shape", ["input_ids"], "mask/ShapeS"), "const_one"], "mask/S", axis=0)
    total = g.op("Gather", [g.op("Shape", ["attention_mask"], "mask/ShapeT"), "const_one"], "mask/T", axis=0)
    q_pos = g.op("Range", [g.op("Sub", [total, seq], "mask/P"), total, "const_one"], "mask/q_pos")  # [S]
    k_pos = g.op("Range", ["const_zero", total, "const_one"], "mask/k_pos")  # [T]
    k_row = g.op("Unsqueeze", [k_pos, "const_axis0"], "mask/k_row")
    causal = g.op("LessOrEqual", [k_row, g.op("Unsqueeze", [q_pos, "const_axes_last"], "mask/q_col")], "mask/causal")
    real = g.op("Cast", ["attention_mask"], "mask/Cast", to=TensorProto.BOOL)
    padding = g.op("Unsqueeze", [real, "const_axis1"], "mask/pad")  # [B, 1, T]
    allowed = g.op("And", [g.op("Unsqueeze", [causal, "const_axis0"], "mask/causal3"), padding], "mask/allowed")
    additive = g.op("Where", [allowed, "const_mask_zero", "const_mask_min"], "mask/Where")  # [B, S, T]
    return g.op("Unsqueeze", [additive, "const_axis1" if fused else "const_axes12"], "mask/additive")


def _fused_attention(g: Graph, projected: dict, rope, mask: tuple[str, str, str], i: int, shape, p: str) -> str:
    """RotaryEmbedding on q and k (from position_ids), then ONNX Runtime's GroupQueryAttention: per-layer
    num_heads / kv_num_heads, the additive mask as attention_bias (left padding), the cache in and out; when
    the caller binds past and present to one buffer of max length, the new keys are written in place."""
    q_heads, kv, head_dim = shape
    cos, sin = rope
    bias, seqlens, total = mask
    q = g.op("RotaryEmbedding", [projected["q"], cos, sin], f"{p}/q/RotaryEmbedding", num_heads=q_heads)
    k = g.op("RotaryEmbedding", [projected["k"], cos, sin], f"{p}/k/RotaryEmbedding", num_heads=kv)
    past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    ctx, key, value = g.node(
        "GroupQueryAttention",
        [q, k, projected["v"], *past, seqlens, total, "", "", "", bias],
        f"{p}/GroupQueryAttention",
        outputs=3,
        domain="com.microsoft",
        num_heads=q_heads,
        kv_num_heads=kv,
        scale=float(head_dim**-0.5),
    )
    g.rename_output(key, f"present.{i}.key")
    g.rename_output(value, f"present.{i}.value")
    return ctx  # [B, S, q_heads * D]


def _gqa_lengths(g: Graph) -> tuple[str, str]:
    """GroupQueryAttention's seqlens_k [B] and total_sequence_length (scalar), int32. Every row holds the same
    T = attention_mask's width of cache positions (left padding is masked by the attention bias), so seqlens_k
    is T - 1 in each row."""
    from onnx import TensorProto

    shape = g.op("Shape", ["attention_mask"], "gqa/Shape")  # [B, T]
    width = g.op("Gather", [shape, "const_one"], "gqa/T", axis=0)
    total = g.op("Cast", [width], "gqa/total_sequence_length", to=TensorProto.INT32)
    last = g.op("Sub", [total, g.weight("const_one_i32", np.int32(1), np.int32)], "gqa/last")
    seqlens = g.op("Expand", [last, g.op("Slice", [shape, "const_zero_1d", "const_axis1"], "gqa/B")], "gqa/seqlens_k")
    return seqlens, total


def _attention(g: Graph, projected: dict, rope, mask: str, i: int, shape, p: str) -> str:
    """Attention in standard opset-18 ops: rotate_half RoPE, the cache concatenated, queries grouped by KV head."""
    from onnx import TensorProto

    q_heads, kv, head_dim = shape
    cos, sin = rope
    heads = {}
    for role, n in (("q", q_heads), ("k", kv), ("v", kv)):
        y = g.op("Reshape", [projected[role], g.int64(f"{p}/{role}/shape", [0, 0, n, head_dim])], f"{p}/{role}/Reshape")
        heads[role] = g.op("Transpose", [y], f"{p}/{role}/Transpose", perm=[0, 2, 1, 3])  # [B, n, S, D]
    for role in ("q", "k"):
        t = heads[role]
        lo = g.op("Slice", [t, "const_zero_1d", "const_half", "const_axes_last"], f"{p}/{role}/rope/lo")
        hi = g.op("Slice", [t, "const_half", "const_head_dim", "const_axes_last"], f"{p}/{role}/rope/hi")
        rotated = g.op("Concat", [g.op("Neg", [hi], f"{p}/{role}/rope/Neg"), lo], f"{p}/{role}/rope/rot", axis=-1)
        cos_part = g.op("Mul", [t, cos], f"{p}/{role}/rope/cos")
        heads[role] = g.op("Add", [cos_part, g.op("Mul", [rotated, sin], f"{p}/{role}/rope/sin")], f"{p}/{role}/rope")
    keys = g.op("Concat", [f"past_key_values.{i}.key", heads["k"]], f"{p}/present_key", axis=2)  # [B, kv, T, D]
    values = g.op("Concat", [f"past_key_values.{i}.value", heads["v"]], f"{p}/present_value", axis=2)
    g.rename_output(keys, f"present.{i}.key")
    g.rename_output(values, f"present.{i}.value")
    keys, values = f"present.{i}.key", f"present.{i}.value"
    group = q_heads // kv
    q5 = g.op("Reshape", [heads["q"], g.int64(f"{p}/q5/shape", [0, kv, group, -1, head_dim])], f"{p}/q5")
    k5 = g.op("Unsqueeze", [keys, "const_axis2"], f"{p}/k5")
    k_t = g.op("Transpose", [k5], f"{p}/k5/T", perm=[0, 1, 2, 4, 3])  # [B, kv, 1, D, T]
    scores = g.op("Mul", [g.op("MatMul", [q5, k_t], f"{p}/scores/MatMul"), "const_scale"], f"{p}/scores/scale")
    scores = g.op("Add", [scores, mask], f"{p}/scores/mask")  # [B, kv, g, S, T]
    if g.dtype != torch.float32:
        scores = g.op("Cast", [scores], f"{p}/scores/Cast", to=TensorProto.FLOAT)
    probs = g.op("Softmax", [scores], f"{p}/Softmax", axis=-1)
    if g.dtype != torch.float32:
        probs = g.op("Cast", [probs], f"{p}/probs/Cast", to=g.elem)
    ctx = g.op("MatMul", [probs, g.op("Unsqueeze", [values, "const_axis2"], f"{p}/v5")], f"{p}/context")
    ctx = g.op("Reshape", [ctx, g.int64(f"{p}/ctx/shape4", [0, q_heads, -1, head_dim])], f"{p}/ctx/heads")
    ctx = g.op("Transpose", [ctx], f"{p}/ctx/Transpose", perm=[0, 2, 1, 3])  # [B, S, H, D]
    return g.op("Reshape", [ctx, g.int64(f"{p}/ctx/shape3", [0, 0, q_heads * head_dim])], f"{p}/ctx/flat")


def _mlp(g: Graph, layout, layer, h: str, p: str) -> str:
    """down(silu(gate(h)) * up(h)), gate and up in one MatMul."""
    gate, up = g.packed_linear(h, [layout.proj(layer, "gate"), layout.proj(layer, "up")], f"{p}.{layout.mlp}.gate_up")
    silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{p}/mlp/Sigmoid")], f"{p}/mlp/SiLU")
    return g.linear(
        g.op("Mul", [silu, up], f"{p}/mlp/Mul"), layout.proj(layer, "down"), f"{p}.{layout.projections['down']}"
    )
