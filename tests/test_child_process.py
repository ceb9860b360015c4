"""slimgpt_deploy/child_process.py: children get the package without its __init__ (no torch, no transformers).

A module child that loads slim checkpoints (the torch bench back end, vLLM) imports slimgpt_deploy.modeling
itself: test_bench.py and test_vllm.py run those for real.
"""

from __future__ import annotations

import json
import subprocess

from slimgpt_deploy.child_process import python_command

PROBE = """
import json, sys
from slimgpt_deploy.errors import BadInputError  # a submodule imports as usual
print(json.dumps({"argv": sys.argv[1:], "name": __name__, "error": BadInputError.exit_code,
                  "heavy": sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers"})}))
"""


def test_a_script_runs_as_main_with_its_arguments_and_without_torch(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    out = subprocess.run(python_command(str(script), "a", "b c"), capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {"argv": ["a", "b c"], "name": "__main__", "error": 2, "heavy": []}
