"""`slimgpt-deploy build`: model -> slim checkpoint -> vLLM and ONNX exports -> verification -> [eval + gate] ->
benchmark -> report.

    from slimgpt_deploy.build import build_options, run_build
    result = run_build(Path("out"), build_options({}, {"prune.ratio": 0.2}))
    result.exit_code, result.to_dict()

options.py says what a build does (defaults < YAML file < flags), stages.py what each stage
does, runner.py which stages must run (fingerprints, build.json), report.py what the reader gets.
"""

from .options import (
    BENCH_BACKENDS,
    DEFAULT_STAGES,
    STAGES,
    BenchSection,
    BuildOptions,
    build_options,
    parse_backends,
    parse_stages,
    read_config_file,
)
from .runner import STATE_FILE, BuildResult, run_build

__all__ = [
    "BENCH_BACKENDS",
    "DEFAULT_STAGES",
    "STAGES",
    "STATE_FILE",
    "BenchSection",
    "BuildOptions",
    "BuildResult",
    "build_options",
    "parse_backends",
    "parse_stages",
    "read_config_file",
    "run_build",
]
