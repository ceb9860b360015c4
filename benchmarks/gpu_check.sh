#!/usr/bin/env bash
# GPU acceptance check for slimgpt-deploy. NOT YET RUN ON A GPU: written and checked on a CPU-only host.
#
#   bash benchmarks/gpu_check.sh [MODEL_DIR]
#
# On a CUDA host, in order (each step with a timeout, its log in $OUT/logs/STEP.log):
#   1. device-tests   pytest tests/test_device*.py tests/test_distributed*.py (engine device + torch.distributed)
#   2. model          MODEL_DIR (a local Hugging Face directory), or a random-init model with Llama-3.2-1B's
#                     decoder shapes (16 layers, hidden 2048, 32/8 heads, FFN 8192) and SmolLM2's tokenizer
#                     (vocabulary 49,152 instead of 128,256: 1.07B parameters), made by this script
#   3. prune          slimgpt-deploy prune --ratio 0.2 --device cuda --dtype bfloat16 (--tp-size 2 on 2+ GPUs)
#   4. export-vllm    slimgpt-deploy export --format vllm (verified against transformers)
#   5. export-onnx    slimgpt-deploy export --format onnx (CUDA execution provider when onnxruntime-gpu is installed)
#   6. serve          slimgpt-deploy serve (vLLM, tensor parallel 2 on 2+ GPUs) and one completion over HTTP
#   7. bench          slimgpt-deploy bench DENSE PRUNED (torch, ONNX Runtime, vLLM)
# then prints one table (step, status, seconds, what it found) and exits 1 if a step failed.
# On a host without CUDA it refuses at once: one line on stderr, exit 2, nothing written.
#
# Environment: PYTHON (default .venv/bin/python, else python3), OUT (default gpu-check-DATE),
# STEP_TIMEOUT seconds per step (default 3600), CALIB (default self), NSAMPLES (64), SEQLEN (512),
# VLLM_DTYPE (default float32 for the random model, whose near-flat logits tie in bfloat16; bfloat16 otherwise),
# PORT (default 8011).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
fi
if (($# > 1)); then
    echo "gpu_check: too many arguments; usage: bash benchmarks/gpu_check.sh [MODEL_DIR]" >&2
    exit 2
fi
model_arg=${1:-}
if [[ -n $model_arg && ! -f $model_arg/config.json ]]; then
    echo "gpu_check: $model_arg is not a model directory (no config.json); give a local Hugging Face directory or nothing" >&2
    exit 2
fi
PY=${PYTHON:-}
if [[ -z $PY ]]; then
    if [[ -x $here/.venv/bin/python ]]; then PY=$here/.venv/bin/python; else PY=python3; fi
fi
if ! gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null); then
    echo "gpu_check: cannot import torch with $PY; install the package (make install) or set PYTHON" >&2
    exit 2
fi
if [[ $gpus == 0 ]]; then
    echo "gpu_check: no CUDA device visible to torch ($("$PY" -c 'import torch; print(torch.__version__)')); run this on a GPU host with a CUDA build of torch" >&2
    exit 2
fi

out=$(realpath -m "${OUT:-gpu-check-$(date +%Y%m%d-%H%M%S)}")
logs=$out/logs
mkdir -p "$logs"
steps=$out/steps.tsv
: >"$steps"
step_timeout=${STEP_TIMEOUT:-3600}
cli=("$PY" -m slimgpt_deploy.cli)
tp=1
if ((gpus >= 2)); then tp=2; fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "gpu_check: $gpus GPU(s), tensor parallel $tp, output in $out" >&2

failed=0
# step NAME CMD...: run CMD under the timeout with its output in logs/NAME.log; record status and seconds.
step() {
    local name=$1 start rc=0
    shift
    start=$(date +%s)
    echo "gpu_check: $name ..." >&2
    timeout --kill-after=30 "$step_timeout" "$@" >"$logs/$name.log" 2>&1 || rc=$?
    local status=ok
    if ((rc == 124 || rc == 137)); then status="timeout"; elif ((rc != 0)); then status="failed($rc)"; fi
    printf '%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - start))" >>"$steps"
    if [[ $status != ok ]]; then
        failed=1
        echo "gpu_check: $name $status; last lines of $logs/$name.log:" >&2
        tail -n 5 "$logs/$name.log" >&2 || true
        return 1
    fi
}
skip() { printf '%s\tskipped (%s)\t0\n' "$1" "$2" >>"$steps"; }

cd "$here"
# 1. the device and distributed tests (tests/test_device*.py, tests/test_distributed*.py); none found is a failure
shopt -s nullglob
device_tests=(tests/test_device*.py tests/test_distributed*.py)
shopt -u nullglob
if ((${#device_tests[@]})); then
    step device-tests "$PY" -m pytest -q -rs "${device_tests[@]}" || true
else
    printf 'device-tests\tfailed (no tests/test_device*.py or tests/test_distributed*.py)\t0\n' >>"$steps"
    failed=1
fi

# 2. the model
if [[ -n $model_arg ]]; then
    dense=$(realpath "$model_arg")
    vllm_dtype=${VLLM_DTYPE:-bfloat16}
    printf 'model\tok (given: %s)\t0\n' "$dense" >>"$steps"
else
    dense=$out/dense-llama-3.2-1b-shape
    vllm_dtype=${VLLM_DTYPE:-float32}
    step model "$PY" - "$dense" <<'EOF' || true
import sys
from pathlib import Path
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from slimgpt_deploy.sources import embedded_model_dir

out = Path(sys.argv[1])
tok = AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m"))
# Llama-3.2-1B's decoder (meta-llama/Llama-3.2-1B config.json) with SmolLM2's tokenizer and vocabulary.
cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=64, vocab_size=len(tok), tie_word_embeddings=True,
                  max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(out, safe_serialization=True)
tok.save_pretrained(out)
print(f"random-init model, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, in {out}")
EOF
fi

slim=$out/slim
if [[ -f $dense/config.json ]]; then
    prune_args=(prune "$dense" --out "$slim" --ratio 0.2 --device cuda --dtype bfloat16 --calib "${CALIB:-self}"
                --nsamples "${NSAMPLES:-64}" --seqlen "${SEQLEN:-512}" --force --json)
    if ((tp > 1)); then prune_args+=(--tp-size "$tp"); fi
    step prune "${cli[@]}" "${prune_args[@]}" || true
else
    skip prune "no model"
fi

if [[ -f $slim/config.json ]]; then
    step export-vllm "${cli[@]}" export "$slim" --format vllm --out "$out/vllm" --dtype "$vllm_dtype" --force --json || true
    "$PY" -c 'import onnxruntime as o; print("ONNX Runtime providers:", o.get_available_providers())' >"$logs/onnx-providers.log" 2>&1 || true
    step export-onnx "${cli[@]}" export "$slim" --format onnx --out "$out/onnx" --force --json || true
else
    skip export-vllm "no slim checkpoint"
    skip export-onnx "no slim checkpoint"
fi

# 6. serve with vLLM and ask for one completion over HTTP on the loopback.
# serve_check PYTHON VLLM_DIR PORT TP LOG: runs in its own bash under `step`'s timeout; the server gets its own
# process group (setsid), so it and vLLM's workers go with it.
serve_check() {
    local py=$1 model=$2 port=$3 tp=$4 log=$5 pid rc=1
    setsid "$py" -m slimgpt_deploy.cli serve "$model" --host 127.0.0.1 --port "$port" --served-model-name slim \
        -tp "$tp" >"$log" 2>&1 &
    pid=$!
    trap 'kill -- -"$pid" 2>/dev/null || true' EXIT
    for _ in $(seq 1 180); do
        if ! kill -0 "$pid" 2>/dev/null; then echo "the server exited; see $log"; break; fi
        if curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null 2>&1; then
            curl -sf "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
                -d '{"model": "slim", "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}' \
                && rc=0
            echo
            break
        fi
        sleep 5
    done
    return $rc
}
if [[ -f $out/vllm/config.json ]]; then
    step serve bash -c "$(declare -f serve_check); serve_check \"\$@\"" serve_check \
        "$PY" "$out/vllm" "${PORT:-8011}" "$tp" "$logs/serve-server.log" || true
else
    skip serve "no vLLM export"
fi

if [[ -f $slim/config.json ]]; then
    backends=torch,vllm
    if [[ -f $out/onnx/model.onnx ]]; then backends=torch,onnx,vllm; fi
    step bench "${cli[@]}" bench "$dense" "$slim" --backends "$backends" --repeats 5 --work-dir "$out/bench-work" \
        --out "$out/bench.json" || true
else
    skip bench "no slim checkpoint"
fi

# One table: every step, and what it measured.
"$PY" - "$out" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
def load(p):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None
def load_text(t):
    try:
        return json.loads(t)
    except ValueError:
        return None

notes = {}
slim = load(out / "slim" / "slimgpt.json")
if slim:
    s = slim.get("seconds", {})
    notes["prune"] = (f"{100 * slim['ratio_achieved_decoder']:.1f}% of decoder params removed; "
                      f"{slim['params_dense'] / 1e9:.2f}B -> {slim['params_slim'] / 1e9:.2f}B; "
                      f"calibration {s.get('calibration', '?')} s, pruning {s.get('prune', '?')} s")
providers = (out / "logs" / "onnx-providers.log")
if providers.exists():
    notes["export-onnx"] = providers.read_text().strip().splitlines()[-1]
served = out / "logs" / "serve.log"
if served.exists():
    answer = load_text(served.read_text().strip().splitlines()[-1] if served.read_text().strip() else "")
    if answer and answer.get("choices"):
        notes["serve"] = "completion: " + repr(answer["choices"][0].get("text", ""))[:60]
bench = load(out / "bench.json")
if bench:
    parts = []
    for name, e in bench.get("backends", {}).items():
        if e.get("status") != "ok":
            parts.append(f"{name}: {e.get('status')}")
            continue
        r = e["ratios"]
        b = sorted(r["decode_speedup"], key=int)[0]
        parts.append(f"{name}: decode b{b} {r['decode_speedup'][b]:.2f}x (ideal {r['ideal_decode_speedup']:.2f}x)")
    notes["bench"] = "; ".join(parts)
print()
print("| step | status | seconds | result |")
print("|---|---|---|---|")
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, seconds = line.split("\t")
    print(f"| {name} | {status} | {seconds} | {notes.get(name, 'log: ' + str(out / 'logs' / (name + '.log')))} |")
EOF
exit $failed
