# syntax=docker/dockerfile:1
# steerprune server image: ONNX Runtime + BentoML, no torch.
#   GPU (default): docker build -t steerprune .
#   CPU:           docker build -t steerprune:cpu --build-arg VARIANT=cpu --build-arg BASE_IMAGE=ubuntu:24.04 .
#   run:           docker run --gpus all -p 3000:3000 -v "$PWD/bundles/digits:/bundle:ro" steerprune
#   strict GPU:    ... steerprune steerprune serve /bundle --host 0.0.0.0 --device cuda  (unready without CUDA)
#   bake a bundle: FROM steerprune + COPY bundles/digits /bundle   (or keep mounting it read-only)
# onnxruntime-gpu 1.31 needs CUDA 13 + cuDNN 9: the base image provides both. Only one onnxruntime package is
# ever installed (both in one environment silently drop the CUDA provider): serve-gpu XOR serve.
ARG BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ARG VARIANT=gpu
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BENTOML_DO_NOT_TRACK=true \
    BENTOML_HOME=/home/steerprune/bentoml \
    STEERPRUNE_BUNDLE=/bundle \
    PATH=/opt/venv/bin:$PATH

# distro python3 of the base image (its version follows the image tag)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /opt/steerprune
COPY pyproject.toml README.md* ./
COPY steerprune/ steerprune/
COPY training/ training/
COPY steering/ steering/
COPY export/ export/
COPY service/ service/
# the serve extras hold no torch; the check fails the build if a dependency ever pulls it in.
# Versions are pinned in pyproject.toml's extras (bentoml, onnxruntime[-gpu]).
# hadolint ignore=DL3013
RUN if [ "$VARIANT" = "cpu" ]; then extra=serve; else extra=serve-gpu; fi \
    && pip install ".[${extra}]" \
    && python -c "import importlib.util as u, sys; sys.exit(1 if u.find_spec('torch') else 0)" \
    && python -c "import steerprune.service.service"

RUN useradd --create-home --uid 10001 steerprune && mkdir -p /bundle && chown steerprune /bundle
USER 10001
EXPOSE 3000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:3000/readyz', timeout=4).status == 200 else 1)"]
CMD ["steerprune", "serve", "/bundle", "--host", "0.0.0.0", "--port", "3000"]
