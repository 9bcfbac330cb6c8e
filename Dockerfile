# syntax=docker/dockerfile:1
# vlsplit images, one multi-target Dockerfile:
#   docker build --target gateway        -t vlsplit-gateway .
#   docker build --target vision-encoder -t vlsplit-encoder .
#   docker build --target llm-decoder    -t vlsplit-decoder .
# CUDA variant of the model images (same Dockerfile, CUDA torch wheels; needs the NVIDIA container toolkit):
#   docker build --target llm-decoder --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#                -t vlsplit-decoder:cuda .
# The model is never baked in: mount a checkpoint directory read-only at /models (VLSPLIT_MODEL).
# The gateway image holds vlsplit[gateway] (no torch), the encoder and decoder images vlsplit[model] (no HTTP
# side); Python dependencies are pinned in docker/requirements/*.txt (regenerate with docker/lock.sh).

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

# ---- build stages: a venv per image, made by docker/install.sh (the tests run the same script)
FROM ${PYTHON_IMAGE} AS source
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY docker/install.sh docker/install.sh
COPY docker/requirements/ docker/requirements/
COPY pyproject.toml README.md ./
COPY vlsplit/ vlsplit/
COPY shared/ shared/
COPY services/ services/

FROM source AS gateway-build
RUN sh docker/install.sh gateway /opt/venv

FROM source AS model-build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
RUN TORCH_INDEX="${TORCH_INDEX}" TORCH_VERSION="${TORCH_VERSION}" sh docker/install.sh model /opt/venv

# ---- runtime: no pip cache, a fixed non-root user; the venv is read-only to it
FROM ${PYTHON_IMAGE} AS runtime-base
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin vlsplit
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VLSPLIT_HOST=0.0.0.0 \
    VLSPLIT_METRICS_PORT=9100 \
    VLSPLIT_LOG_JSON=true
WORKDIR /tmp

FROM runtime-base AS runtime
USER 10001:10001

FROM runtime AS gateway
COPY --from=gateway-build /opt/venv /opt/venv
ENV VLSPLIT_PORT=50051 VLSPLIT_HTTP_PORT=8080
EXPOSE 50051 8080 9100
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 CMD ["vlsplit", "health", "localhost:50051"]
ENTRYPOINT ["vlsplit", "serve", "gateway"]

# The model images carry a C++ compiler: torch.compile builds the decoder's paged decode attention kernel
# at start (VLSPLIT_DECODE_ATTENTION=auto; without a compiler the decoder gathers each row's context instead);
# and tcmalloc, which the services run under (VLSPLIT_ALLOCATOR=auto, shared/allocator.py).
FROM runtime-base AS model-runtime
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends g++ libtcmalloc-minimal4 \
    && rm -rf /var/lib/apt/lists/*
USER 10001:10001
COPY --from=model-build /opt/venv /opt/venv
# auto: bfloat16 on CPUs/GPUs with native bf16, else float32 (the services' default, stated here for `docker inspect`)
ENV VLSPLIT_MODEL=/models VLSPLIT_DTYPE=auto
VOLUME ["/models"]

FROM model-runtime AS vision-encoder
ENV VLSPLIT_PORT=50052
EXPOSE 50052 9100
# start-period covers loading the weights and the warm-up forward
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 CMD ["vlsplit", "health", "localhost:50052"]
ENTRYPOINT ["vlsplit", "serve", "encoder"]

FROM model-runtime AS llm-decoder
ENV VLSPLIT_PORT=50053
EXPOSE 50053 9100
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 CMD ["vlsplit", "health", "localhost:50053"]
ENTRYPOINT ["vlsplit", "serve", "decoder"]
