"""What `bench` measures: BenchOptions (validated on construction) and the built-in perplexity text."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import BadInputError
from ..exporters import DTYPES, QUANTIZE

SAMPLE_TEXT = Path(__file__).with_name("sample.txt")
GGUF_TYPES = QUANTIZE["gguf"]
GENAI_WEIGHTS = (*DTYPES["genai"], *QUANTIZE["genai"])  # exporters/genai.WEIGHTS (a test checks)


@dataclass(frozen=True)
class BenchOptions:
    """What to measure; validates itself (BadInputError, one line saying what to change)."""

    prompt_lens: tuple[int, ...] = (128, 512)  # prefill / TTFT lengths (batch 1); the shortest is the decode context
    batch_sizes: tuple[int, ...] = (1, 8)  # decode batch sizes
    decode_tokens: int = 32  # decode steps timed per measurement
    repeats: int = 5  # medians of this many runs, after warm-ups
    warmups: int = 1
    threads: int | None = None  # torch / ORT intra-op threads (None: all cores)
    text: Path | None = None  # perplexity text; None: the built-in sample (SAMPLE_TEXT)
    quality_tokens: int = 4096  # tokens of text used for quality
    quality_seqlen: int = 512  # perplexity / KL window
    gguf_type: str = "f32"  # the GGUF file type the llamacpp back end measures, dense and pruned alike
    genai_weights: str = "fp32"  # the weights the genai back end measures (fp32, fp16 or int8), both models

    def __post_init__(self):
        object.__setattr__(self, "prompt_lens", tuple(int(n) for n in self.prompt_lens))
        object.__setattr__(self, "batch_sizes", tuple(int(b) for b in self.batch_sizes))
        if self.text is not None:
            object.__setattr__(self, "text", Path(self.text).expanduser())
        if not self.prompt_lens or min(self.prompt_lens) < 1:
            raise BadInputError(
                f"prompt lengths {list(self.prompt_lens)} must be one or more positive integers, e.g. 128,512"
            )
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise BadInputError(f"batch sizes {list(self.batch_sizes)} must be one or more positive integers, e.g. 1,8")
        for name, low in (("decode_tokens", 1), ("repeats", 1), ("warmups", 0), ("quality_seqlen", 2)):
            if getattr(self, name) < low:
                raise BadInputError(f"{name} is {getattr(self, name)}; give at least {low}")
        if self.threads is not None and self.threads < 1:
            raise BadInputError(f"threads is {self.threads}; give at least 1 (or leave it unset for all cores)")
        if self.gguf_type not in GGUF_TYPES:
            raise BadInputError(
                f"unknown GGUF type {self.gguf_type!r} to bench; choose one of: {', '.join(GGUF_TYPES)}"
            )
        if self.genai_weights not in GENAI_WEIGHTS:
            raise BadInputError(
                f"unknown GenAI weights {self.genai_weights!r} to bench; choose one of: {', '.join(GENAI_WEIGHTS)}"
            )
        if self.quality_tokens < self.quality_seqlen:
            raise BadInputError(
                f"quality_tokens ({self.quality_tokens}) is shorter than one window of quality_seqlen "
                f"({self.quality_seqlen}); raise the first or lower the second"
            )
        if self.text is not None and not self.text.is_file():
            raise BadInputError(
                f"text file {self.text} does not exist; "
                "give an existing UTF-8 text file (or none for the built-in sample)"
            )

    @property
    def decode_context(self) -> int:
        """Prompt length before the timed decode steps."""
        return min(self.prompt_lens)

    @property
    def text_file(self) -> Path:
        return self.text or SAMPLE_TEXT

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            prompt_lens=list(self.prompt_lens),
            batch_sizes=list(self.batch_sizes),
            text=None if self.text is None else str(self.text),
        )
        return d

    @classmethod
    def from_dict(cls, data: Mapping) -> "BenchOptions":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
