"""slimgpt-deploy: SlimGPT structured pruning and deployment of LLaMA-family models.

Importing the package registers the slim model type with transformers (at once if transformers
is imported, else when it is: _registration.py), so slim checkpoints load with
`AutoModelForCausalLM.from_pretrained(dir)`.
"""

from __future__ import annotations

from ._registration import register_with_transformers
from ._version import __version__
from .config import PruneConfig

register_with_transformers()  # the `slimgpt` model type, once transformers is imported


def __getattr__(name):
    # The API pulls in calibration and model loading; import it on first use.
    if name in ("prune", "prune_to_checkpoint"):
        from . import api

        return getattr(api, name)
    raise AttributeError(name)


__all__ = ["PruneConfig", "prune", "prune_to_checkpoint", "__version__"]
