# LLM Router: a CPU-only image with the embedding model baked in. It runs the prod profile, which
# refuses to start without client keys (GATEWAY_API_KEYS):
#   docker build -t llm-router .
#   docker run -p 8080:8080 -v llm-router-data:/data -e OPENROUTER_API_KEY=sk-or-... -e GATEWAY_API_KEYS=sk-client-1 llm-router
# Without DATABASE_URL the gateway runs its embedded PostgreSQL in /data (hence the volume). With
# DATABASE_URL=postgresql://... the prod profile requires TLS to that database (DATABASE_SSL_MODE=require);
# another profile: append `--config /app/config.dev.yaml` (or config.cost-optimized.yaml).
ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: a venv with the gateway, and the ONNX export of all-MiniLM-L6-v2 -------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the CPU-only index: PyPI's torch is a multi-GB CUDA build. `pip install .` below
# then finds torch==2.13.0 already satisfied and leaves it alone.
RUN pip install --upgrade pip \
 && pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY migrations ./migrations
# Non-editable: hatchling puts migrations/ into the wheel as gateway/migrations.
RUN pip install .

# Out of /src, so that `import gateway` is the installed package, not the source tree.
WORKDIR /opt
RUN python -c "from gateway.store.factory import migrations_dir; print('migrations:', migrations_dir())" \
 && llm-router --help > /dev/null

# Bake the embedding models into /opt/models, so that a container never builds, exports nor
# downloads one: the packaged all-MiniLM-L6-v2 exported to ONNX (all-MiniLM-L6-v2-onnx,
# EMBEDDER=minilm) and the static routing embedder distilled from that export
# (m2v-minilm-384c-v1, EMBEDDER=static, the default; about 30 s of CPU, logged every 10%).
# Both fall back to PyTorch quietly if the export fails: check that the files are there.
# The export dir also keeps a copy of the PyTorch weights (model.safetensors) that the ONNX
# backend never reads (the PyTorch fallback loads the packaged model): drop it (87 MB).
RUN HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    python -c "import logging; logging.basicConfig(level=logging.INFO); from pathlib import Path; from gateway.embedders.static import load_model; load_model(Path('/opt/models'))" \
 && test -f /opt/models/all-MiniLM-L6-v2-onnx/onnx/model.onnx \
 && test -f /opt/models/all-MiniLM-L6-v2-onnx/tokenizer.json \
 && test -f /opt/models/m2v-minilm-384c-v1/table.npy \
 && test -f /opt/models/m2v-minilm-384c-v1/embedder.json \
 && rm -f /opt/models/all-MiniLM-L6-v2-onnx/model.safetensors

# --- runtime ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

ARG UID=10001
RUN groupadd --system --gid ${UID} app \
 && useradd --system --uid ${UID} --gid app --home-dir /home/app --create-home --shell /usr/sbin/nologin app \
 && mkdir -p /data \
 && chown app:app /data

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/models /opt/models
COPY config.dev.yaml config.prod.yaml config.cost-optimized.yaml /app/

ENV PATH=/opt/venv/bin:$PATH \
    MODELS_DIR=/opt/models \
    DATA_DIR=/data \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    LOG_FORMAT=json

USER app
WORKDIR /app
EXPOSE 8080

# /ready answers 200 once the store, at least one model and the embedder are ready. The start
# period covers migrations and loading the embedding model (and, without DATABASE_URL, the first
# initdb of the embedded PostgreSQL). Slim images have no curl: python's urllib does the probe.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; url = 'http://127.0.0.1:%s/ready' % os.environ.get('PORT', '8080'); sys.exit(0 if urllib.request.urlopen(url, timeout=4).status == 200 else 1)"]

# `serve` applies the Alembic migrations itself on start (`--no-migrate` to skip).
ENTRYPOINT ["llm-router", "serve"]
CMD ["--config", "/app/config.prod.yaml"]
