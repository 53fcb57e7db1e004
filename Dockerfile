# syntax=docker/dockerfile:1
# Foal-Net inference service. Torch-free: ONNX Runtime + ffmpeg + OpenCV behind FastAPI.
#
#   docker build -t foalnet:gpu .                          # CUDA image (default)
#   docker run --gpus all -p 8000:8000 foalnet:gpu
#   docker build --build-arg DEVICE=cpu -t foalnet:cpu .   # CPU image, no CUDA
#
# CUDA and cuDNN majors follow the pinned onnxruntime-gpu wheel. On PyPI, 1.27 and later are built
# for CUDA 13 + cuDNN 9 (1.31.1's libonnxruntime_providers_cuda.so links libcudart.so.13 and
# libcublas.so.13; its `cuda`/`cudnn` extras want nvidia-cuda-runtime~=13.0, nvidia-cudnn-cu13~=9.0);
# 1.26 and earlier for CUDA 12 + cuDNN 9. CUDA 13 needs an NVIDIA driver >= 580. For an older
# driver, change both together:
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.9.1-cudnn-runtime-ubuntu24.04 \
#   --build-arg ORT_GPU_REQUIREMENT=onnxruntime-gpu==1.26.0
ARG DEVICE=gpu
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# ---- runtime bases: the DEVICE build arg picks one ----
# The tag is pinned in CUDA_IMAGE above (DL3006 does not see through build args).
# hadolint ignore=DL3006
FROM ${CUDA_IMAGE} AS runtime-gpu
# Ubuntu's python3 (3.12) runs the venv; ffmpeg decodes uploads. Distro packages follow the
# pinned base image's release, so they are not pinned one by one (DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ffmpeg \
 && rm -rf /var/lib/apt/lists/*

FROM python:3.11-slim-bookworm AS runtime-cpu
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ffmpeg \
 && rm -rf /var/lib/apt/lists/*

# ---- builders: same Python as their runtime, so the venv copies across ----
FROM runtime-gpu AS builder-gpu
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
ARG ORT_GPU_REQUIREMENT=onnxruntime-gpu==1.31.1
ENV ORT_REQUIREMENT=${ORT_GPU_REQUIREMENT}

FROM runtime-cpu AS builder-cpu
ENV ORT_REQUIREMENT=onnxruntime==1.32.0

# Stage names, not registry images (DL3006 does not see through the build arg).
# hadolint ignore=DL3006
FROM builder-${DEVICE} AS builder
ARG DEVICE
WORKDIR /src
COPY pyproject.toml README.md ./
# Dependencies first, with empty packages standing in for ours, so this layer (ONNX Runtime and
# all) is reused while only our code changes. The device extra picks exactly one ONNX Runtime;
# `otel` exports traces where the standard OTEL_* variables say.
RUN mkdir service foalnet_cli \
 && touch service/__init__.py foalnet_cli/__init__.py \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir ".[${DEVICE},otel]" "${ORT_REQUIREMENT}" \
 && rm -rf service foalnet_cli build ./*.egg-info
# The serving side and the `foalnet` command only: no training package, no harnesses.
COPY foalnet_cli ./foalnet_cli
COPY service ./service
# Then our packages (a non-editable install builds the wheel). The image uses the distro's ffmpeg
# (it has ffprobe), so imageio-ffmpeg's bundled static build (~165 MB, the fallback for hosts
# without ffmpeg) is dropped, and so are pip and setuptools.
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --force-reinstall . \
 && rm -f /opt/venv/lib/python3*/site-packages/imageio_ffmpeg/binaries/ffmpeg-* \
 && /opt/venv/bin/pip uninstall -y pip setuptools \
 && ! /opt/venv/bin/python -c "import torch" 2>/dev/null

# ---- the image ----
# hadolint ignore=DL3006
FROM runtime-${DEVICE}
ARG DEVICE
LABEL org.opencontainers.image.title="foalnet" \
      org.opencontainers.image.description="Foal-Net audio-visual emotion recognition service (${DEVICE})"
COPY --from=builder /opt/venv /opt/venv
COPY weights/foalnet-lite.onnx /opt/foalnet/weights/foalnet-lite.onnx
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin foalnet
# Every setting is an environment variable (FOALNET_*); these are the image's defaults.
# ONNX Runtime >= 1.29 uploads usage telemetry on Linux unless ORT_DISABLE_TELEMETRY is set.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ORT_DISABLE_TELEMETRY=1 \
    FOALNET_HOST=0.0.0.0 \
    FOALNET_PORT=8000 \
    FOALNET_MODEL_PATH=/opt/foalnet/weights/foalnet-lite.onnx \
    FOALNET_DEVICE=auto
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
# Healthy = ready for /predict traffic (model loaded and warmed up); 503 until then.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('FOALNET_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["foalnet", "serve"]
