# The worker image: this project and its pinned environment (requirements.lock), Detectron2 from
# its source package, the `uniter` CLI. `docker compose up` builds it for the worker services.
#
# One image for the CPU and the GPU worker, on the Python slim base. The GPU worker needs no
# nvidia/cuda base image: the pinned torch (torch==2.14.1, the PyPI wheel built for CUDA 13.0:
# `torch.version.cuda == "13.0"`) bundles its CUDA runtime, cuBLAS, cuDNN, NCCL… as the nvidia-*
# and cuda-* pip packages pinned next to it in requirements.lock. The one thing the host supplies
# is the NVIDIA driver (libcuda), which the NVIDIA Container Toolkit mounts into the container of
# a service that reserves a GPU (docker-compose.yml, worker-gpu: the device reservation and
# NVIDIA_DRIVER_CAPABILITIES=compute,utility). The host driver must support CUDA 13.0: R580 or newer.
#
# Detectron2 (scripts/install_detectron2.sh) is built with no compiled extension at all, CPU or
# CUDA: the pb1-detectron2 sdist lacks the C++/CUDA sources. Faster R-CNN C4 (extract's `detectron2`
# backend) needs none of them: RoIPool, RoIAlign and NMS come from torchvision, whose wheel has the
# CUDA kernels, so with `extract.device: cuda` it runs on a GPU in this image. What is missing
# (deformable convolution, rotated boxes, the C++ COCO evaluator) is unused here. But `extract` is
# routed to the CPU pool (pipeline/stages.py), whose `worker` container has no GPU: there it runs
# on `device: cpu` (configs/compose.yaml: backend grid, the default device cpu).
#
# Pinned by tag. At release time pin the base by digest: `docker buildx imagetools inspect
# python:3.11.11-slim-bookworm` prints it; build with
# `--build-arg BASE_IMAGE=python:3.11.11-slim-bookworm@sha256:<digest>` (or change the default).
ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    UNITER_CACHE_DIR=/cache UNITER_HOME=/app
RUN apt-get update && apt-get install -y --no-install-recommends build-essential make && rm -rf /var/lib/apt/lists/*
# UNITER_HOME: the project folder, where process workers run the flows from (prefect.yaml's pull step)
WORKDIR /app
# dependencies first (a code change does not reinstall them)
COPY requirements.lock pyproject.toml ./
COPY scripts/install_detectron2.sh scripts/
RUN python -m venv /opt/venv && pip install -qq -r requirements.lock && scripts/install_detectron2.sh /opt/venv
# .dockerignore keeps .env (credentials), the venvs, data/ and .git out of the image
COPY . .
RUN pip install -qq --no-deps --no-build-isolation -e .
CMD ["uniter", "--help"]
