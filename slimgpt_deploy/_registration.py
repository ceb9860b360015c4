"""Register the slim model type with transformers when transformers is imported, not before.

`import slimgpt_deploy` promises that slim checkpoints then load with
`AutoModelForCausalLM.from_pretrained(dir)`. Registering means importing transformers' Auto model
classes (~3 s and ~0.4 GiB: its generation utilities, torch, scikit-learn), which the CLI would pay
on every start, `--help` and a mistyped flag included, though most of its commands never touch
transformers or do so much later. So the package registers at once when transformers is already
imported, and otherwise right after the first `import transformers` finishes, whoever imports it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable

TRANSFORMERS = "transformers"
MODELING = f"{__package__}.modeling"


def _register() -> None:
    # Importing slimgpt_deploy.modeling registers. Found in sys.modules, it has registered, or it is the
    # importer of transformers that brought us here and registers once its own imports are done.
    if MODELING not in sys.modules:
        importlib.import_module(MODELING)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `then()` once, right after module `name` has been executed by its own loader."""

    def __init__(self, name: str, then: Callable[[], None]):
        self.name, self.then = name, then

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        # The spec the other finders give. A lookup alone (importlib.util.find_spec, e.g. to see whether an
        # extra is installed) loads nothing, so this finder stays until the module is really executed.
        spec = next((s for f in sys.meta_path if f is not self for s in [_spec(f, fullname, path, target)] if s), None)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def exec_then(module):
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                exec_module(module)
                self.then()

            spec.loader.exec_module = exec_then  # this spec's own loader object: nothing else sees it
        return spec


def _spec(finder, fullname, path, target):
    find_spec = getattr(finder, "find_spec", None)
    return find_spec(fullname, path, target) if find_spec else None


def register_with_transformers() -> None:
    """Register now if transformers is imported, else when it is; safe to call twice."""
    if TRANSFORMERS in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterImport) and f.name == TRANSFORMERS for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(TRANSFORMERS, _register))
