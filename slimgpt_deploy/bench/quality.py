"""Quality of the pruned model (runs once, in torch, in the bench child).

On the first `quality_tokens` tokens of the text (tokenized once by the dense model's
tokenizer, cut into windows of `quality_seqlen`): perplexity of both models, and
KL(P_dense || P_pruned) with top-1 agreement per token, averaged
(slimgpt_deploy.evaluate.compare: the numbers of perplexity and fidelity, one forward pass of each model per window).
"""

from __future__ import annotations

from pathlib import Path


def measure(dense: Path, pruned: Path, options) -> dict:
    import torch

    from ..evaluate import compare, load_text, text_to_ids
    from ..sources import load_model

    if options.threads:
        torch.set_num_threads(options.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = load_model(str(dense), dtype=torch.float32, device=device)
    ids = text_to_ids(ref.tokenizer, load_text(options.text_file))[: options.quality_tokens]
    seqlen = options.quality_seqlen
    model = load_model(str(pruned), dtype=torch.float32, device=device).model
    both = compare(model, ref.model, ids, seqlen=seqlen)
    return {
        "tokens": both.fidelity.tokens,
        "seqlen": seqlen,
        "dense": {"perplexity": both.reference.ppl},
        "pruned": {"perplexity": both.model.ppl},
        "kl": both.fidelity.kl,
        "top1": both.fidelity.top1,
    }
