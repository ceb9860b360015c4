"""A LLaMA-style decoder layer, named: where its parts live and how pruning cuts them.

Everything that walks a model (the pruning engine, shrink, the exporters, the
checkpoint validator, recovery) names a decoder layer's parts by role and asks a
`Layout` where that role lives in the module tree:

  causal LM: layers, embed, norm, rotary, head
  decoder layer: attention_norm -> attention(q, k, v, o) -> mlp_norm -> mlp(gate, up, down)

`PROJECTIONS` says, for each projection, which pruning unit cuts it and along which
weight axis, and `HESSIAN_OF` which projection's inputs each unit's decision is taken on
(SlimGPT Sec. 3: the heads on o's inputs, the FFN channels on down's). The slim model and
its checkpoint always use `LLAMA` (the tensor names are the checkpoint contract,
docs/DESIGN.md); a dense family whose modules are named otherwise gives its own Layout in
families.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter

from torch import nn


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer's prunable shape (dense or already slim)."""

    q_heads: int
    kv_heads: int
    ffn: int
    head_dim: int
    hidden: int
    qkv_bias: bool = False
    mlp_bias: bool = False
    o_bias: bool = False

    def __post_init__(self):
        assert self.q_heads % self.kv_heads == 0, "query heads must be a multiple of KV heads"

    @property
    def q_per_kv(self) -> int:
        return self.q_heads // self.kv_heads

    def unit_width(self, unit: str) -> int:
        """Rows (or columns) a unit spans in the projections it cuts: heads x head_dim, or FFN channels."""
        return {"q_heads": self.q_heads * self.head_dim, "kv_heads": self.kv_heads * self.head_dim, "ffn": self.ffn}[
            unit
        ]

    def attn_params(self, q: int, kv: int) -> int:
        """q/k/v/o weights (+ q/k/v biases) that depend on the head counts."""
        per_head = self.hidden * self.head_dim + (self.head_dim if self.qkv_bias else 0)
        return (2 * q + 2 * kv) * per_head - (q * self.head_dim if self.qkv_bias else 0)

    def mlp_params(self, f: int) -> int:
        return 3 * self.hidden * f + (2 * f if self.mlp_bias else 0)

    def params(self, q: int | None = None, kv: int | None = None, f: int | None = None) -> int:
        return self.attn_params(self.q_heads if q is None else q, self.kv_heads if kv is None else kv) + (
            self.mlp_params(self.ffn if f is None else f)
        )


def heads_aligned(q: int, kv: int, multiple: int) -> bool:
    """Whether q query and kv KV heads shard over `multiple` ranks (vLLM's tensor-parallel rule).

    Query heads split evenly; KV heads split evenly or, when fewer than the
    ranks, each is replicated on a whole number of ranks.
    """
    kv_ok = kv % multiple == 0 if kv >= multiple else multiple % kv == 0
    return q % multiple == 0 and kv_ok


@dataclass(frozen=True)
class Projection:
    """How pruning cuts one projection ([out, in] weight)."""

    unit: str  # what pruning removes from it: "q_heads", "kv_heads" or "ffn"
    axis: int  # 0: its output rows are cut, its bias with them; 1: its input columns, its bias stays
    bias: str  # the LayerShape flag that says whether it has a bias


PROJECTIONS: dict[str, Projection] = {
    "q": Projection("q_heads", 0, "qkv_bias"),
    "k": Projection("kv_heads", 0, "qkv_bias"),
    "v": Projection("kv_heads", 0, "qkv_bias"),
    "o": Projection("q_heads", 1, "o_bias"),
    "gate": Projection("ffn", 0, "mlp_bias"),
    "up": Projection("ffn", 0, "mlp_bias"),
    "down": Projection("ffn", 1, "mlp_bias"),
}
# The projection whose inputs' Hessian decides each kind of unit (and whose weight the OBS update compensates).
HESSIAN_OF = {"heads": "o", "ffn": "down"}


def _llama_projections() -> dict[str, str]:
    return {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    }


@dataclass(frozen=True)
class Layout:
    """Attribute paths of a model's parts: from the causal LM for the first five, from a decoder layer for the rest.

    The paths are also the state-dict names (`f"{layers}.{i}.{projections['q']}.weight"`).
    """

    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    norm: str = "model.norm"
    rotary: str = "model.rotary_emb"
    head: str = "lm_head"
    attention: str = "self_attn"
    mlp: str = "mlp"
    attention_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    projections: dict[str, str] = field(default_factory=_llama_projections)

    def __post_init__(self):
        assert set(self.projections) == set(PROJECTIONS), f"a layout names every projection: {sorted(PROJECTIONS)}"

    def part(self, module: nn.Module, name: str) -> nn.Module:
        """`module`'s part `name` (a field of this layout: "layers", "attention", "mlp_norm", ...)."""
        return attrgetter(getattr(self, name))(module)

    def proj(self, layer: nn.Module, role: str) -> nn.Linear:
        """Decoder layer `layer`'s projection `role` ("q", "k", "v", "o", "gate", "up", "down")."""
        return attrgetter(self.projections[role])(layer)

    def tensor(self, role: str, kind: str = "weight") -> str:
        """A projection's tensor name inside a decoder layer (`self_attn.q_proj.weight`)."""
        return f"{self.projections[role]}.{kind}"

    def layer_prefix(self, i: int) -> str:
        """Decoder layer i's prefix in the model's state dict (`model.layers.3.`)."""
        return f"{self.layers}.{i}."

    def lora_targets(self) -> tuple[str, ...]:
        """The projections' module names as PEFT matches them (the last path component)."""
        return tuple(path.rsplit(".", 1)[-1] for path in self.projections.values())

    def tensor_shapes(self, shape: LayerShape) -> dict[str, tuple[int, ...]]:
        """Shapes of a decoder layer's tensors of `shape`, keyed by the name inside the layer."""
        h = shape.hidden
        shapes = {f"{self.attention_norm}.weight": (h,), f"{self.mlp_norm}.weight": (h,)}
        for role, p in PROJECTIONS.items():
            n = shape.unit_width(p.unit)
            shapes[self.tensor(role)] = (n, h) if p.axis == 0 else (h, n)
            if getattr(shape, p.bias):
                shapes[self.tensor(role, "bias")] = (n,) if p.axis == 0 else (h,)
        return shapes


LLAMA = Layout()
SLIM = LLAMA  # the slim model (modeling/modeling_slimgpt.py) and its checkpoint
