# ctcvr: two images from one file.
#   trainer (the default target): the TorchRec trainer and the scoring service, one image; it
#            serves a model by default and runs the trainer when given another command
#   server:  the scoring service alone: no torchrec, fbgemm, trainer code or plotting libraries
#
#   docker build -t ctcvr .                                       # trainer (CPU torch)
#   docker build --target server -t ctcvr-server .                # server
#   docker build --build-arg TORCH_VARIANT=cu128 -t ctcvr:cu128 . # GPU: CUDA torch + fbgemm-gpu
#   docker run -p 8000:8000 -v "$PWD/runs/demo/model:/models/current:ro" ctcvr-server
#   docker run -v "$PWD/runs:/runs" ctcvr torchrun --standalone --nproc_per_node=2 \
#       -m trainer.train --config configs/demo.yaml output_dir=/runs/demo/run ...
#
# Build arguments:
#   BASE_IMAGE       a Python 3.11 image with venv and pip (default python:3.11-slim)
#   TORCH_VARIANT    cpu, or a CUDA tag of PyTorch's index (cu128): deploy/install.sh's variable
#   TORCH_INDEX_URL  another index for torch (and fbgemm-gpu); default PyTorch's own
#   PIP_FIND_LINKS   a local wheel directory (mounted with -v) searched first, e.g. for torch
#   PIP_CERT         a CA bundle (mounted with -v) for a TLS-intercepting proxy in the build
# deploy/image_test.sh builds and tests both with buildah; README "Container" has the details.
ARG BASE_IMAGE=python:3.11-slim

# ---- build-server: /opt/venv with the serve install set (deploy/install.sh EXTRAS=serve)
FROM ${BASE_IMAGE} AS build-server
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=120 \
    VENV=/opt/venv \
    EXTRAS=serve \
    EDITABLE=0
WORKDIR /src
# A C compiler (and Python's headers where the base image has none) for serving's int8 kernel
# (serving/_int8_rows.c), built by the second install step; only the built module reaches the
# image. Unpinned: the base image's Debian release decides the versions.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && { python3 -c "import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_paths()['include'] + '/Python.h'))" \
         || apt-get install -y --no-install-recommends python3-dev; } \
    && rm -rf /var/lib/apt/lists/*
# The pinned stack first, from the pins alone (an empty README stands in for the real one), so
# that editing the code or the docs does not reinstall torch.
COPY pyproject.toml ./
COPY deploy/install.sh deploy/
RUN touch README.md && bash deploy/install.sh
# Then the service's packages only (the package finds no trainer here); checked from outside
# /src (-I), and checked to hold none of the trainer's stack.
COPY README.md ./
COPY schemas schemas/
COPY serving serving/
RUN bash deploy/install.sh \
    && /opt/venv/bin/python -I -c "import schemas, serving.main, serving._int8_rows" \
    && /opt/venv/bin/python -I -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ('trainer', 'torchrec', 'fbgemm_gpu', 'matplotlib', 'sklearn')))"

# ---- build-trainer: /opt/venv with the train and serve install sets, by the same script
FROM ${BASE_IMAGE} AS build-trainer
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=120 \
    VENV=/opt/venv \
    EXTRAS=train,serve \
    EDITABLE=0
WORKDIR /src
# The C compiler of the int8 kernel, as in build-server.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && { python3 -c "import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_paths()['include'] + '/Python.h'))" \
         || apt-get install -y --no-install-recommends python3-dev; } \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml ./
COPY deploy/install.sh deploy/
RUN touch README.md && bash deploy/install.sh
# Then ctcvr itself; the script's second run finds the stack in place and installs the package.
COPY . .
RUN bash deploy/install.sh \
    && /opt/venv/bin/python -I -c "import schemas, serving.main, serving._int8_rows, trainer.train"

# ---- runtime: what both images share: the base image, an unprivileged user, the entrypoint
FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="ctcvr" \
      org.opencontainers.image.description="Post-click conversion-rate prediction: scoring service and TorchRec trainer" \
      org.opencontainers.image.licenses="Apache-2.0"
# /runs and /models are created owned by the service user, so that fresh named volumes mounted
# there (docker, compose) are writable by it.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/ctcvr --shell /usr/sbin/nologin ctcvr \
    && mkdir -p /runs /models \
    && chown ctcvr:ctcvr /runs /models
# No CTCVR_MODEL_DIR here: it and CTCVR_MODEL_REPOSITORY exclude each other, so the entry point
# serves /models/current only when neither is given.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CTCVR_HOST=0.0.0.0 \
    CTCVR_PORT=8000
WORKDIR /srv/ctcvr
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 CMD ["ctcvr-entrypoint", "healthcheck"]
ENTRYPOINT ["ctcvr-entrypoint"]
CMD ["serve"]
USER 10001:10001
COPY deploy/entrypoint.sh /usr/local/bin/ctcvr-entrypoint

# ---- server: the scoring service (deploy/k8s and compose serve with it)
FROM runtime AS server
LABEL org.opencontainers.image.title="ctcvr-server" \
      org.opencontainers.image.description="Post-click conversion-rate prediction: scoring service"
# The large virtual environment last: with storage drivers that copy whole layers (vfs) every
# step after it would copy it again.
COPY --from=build-server /opt/venv /opt/venv

# ---- trainer (the default target): the trainer and the service, with the training configs
FROM runtime AS trainer
COPY trainer/configs /srv/ctcvr/configs
COPY --from=build-trainer /opt/venv /opt/venv
