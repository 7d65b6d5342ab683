# syntax=docker/dockerfile:1
# steerprune server image: ONNX Runtime + BentoML, no torch. See docs/deployment.md.
#   GPU (default): docker build -t steerprune .
#   CPU:           docker build -t steerprune:cpu --build-arg VARIANT=cpu --build-arg BASE_IMAGE=debian:bookworm-slim .
#   run:           docker run -p 3000:3000 -v "$PWD/bundles/digits:/bundle:ro" steerprune:cpu   (GPU: --gpus all)
#   strict GPU:    ... steerprune steerprune serve /bundle --host 0.0.0.0 --device cuda  (unready without CUDA)
#   behind a TLS-intercepting proxy or a private index: --secret id=pip_cert,src=/path/ca-bundle.crt
#                  (and/or --build-arg PIP_INDEX_URL=...); the certificate is mounted for pip only, never stored.
# The base needs python3 + venv, or apt to get them (Debian/Ubuntu). onnxruntime-gpu 1.31 needs CUDA 13 + cuDNN 9:
# the default base provides both. Only one onnxruntime package is ever installed (both in one environment silently
# drop the CUDA provider): serve-gpu XOR serve.
ARG BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS python
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# distro python3 of the base image (its version follows the image tag); skipped when the base already has it.
# DL3008 (pin apt versions): the versions are the base tag's; a pin would break on every base update.
# hadolint ignore=DL3008
RUN if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi

FROM python AS build
ARG VARIANT=gpu
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# the whole context minus .dockerignore: pyproject.toml decides which folders become packages
COPY . .
# The serve extras hold no torch; the check fails the build if a dependency ever pulls it in. The import checks run
# isolated (-I: no working directory on sys.path) so that the source folders in /src cannot shadow the package.
# Versions are pinned in pyproject.toml's extras (bentoml, onnxruntime[-gpu]).
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && case "$VARIANT" in cpu) extra=serve ;; gpu) extra=serve-gpu ;; *) echo "VARIANT must be cpu or gpu" >&2; exit 1 ;; esac \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install ".[${extra}]" \
    && /opt/venv/bin/python -I -c "import importlib.util as u, sys; sys.exit('torch got into the image' if u.find_spec('torch') else 0)" \
    && /opt/venv/bin/python -I -c "import steerprune.service.service"

# The runtime stage holds the venv only: no sources, no build tools, no certificate.
FROM python
ENV BENTOML_DO_NOT_TRACK=true \
    BENTOML_HOME=/home/steerprune/bentoml \
    OTEL_SDK_DISABLED=true \
    STEERPRUNE_BUNDLE=/bundle \
    PATH=/opt/venv/bin:$PATH
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 --user-group steerprune \
    && mkdir -p /bundle /home/steerprune/bentoml \
    && chown steerprune:steerprune /bundle /home/steerprune/bentoml
USER 10001:10001
WORKDIR /home/steerprune
EXPOSE 3000
# HEALTHCHECK is a Docker-format instruction: podman/buildah keep it only with --format docker.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:3000/readyz', timeout=4).status == 200 else 1)"]
# steerprune serve is PID 1: on SIGTERM it stops BentoML's process group (15 s, then SIGKILL).
CMD ["steerprune", "serve", "/bundle", "--host", "0.0.0.0", "--port", "3000"]
