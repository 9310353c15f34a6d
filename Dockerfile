# ctcvr: the scoring service (default command) and the trainer (override the command), one image.
#
#   docker build -t ctcvr .                                     # CPU: torch from PyTorch's CPU index
#   docker build --build-arg TORCH_VARIANT=cu128 -t ctcvr:cu128 .   # GPU: CUDA torch + fbgemm-gpu
#   docker run -p 8000:8000 -v "$PWD/runs/demo/model:/models/current:ro" ctcvr
#   docker run -v "$PWD/runs:/runs" ctcvr torchrun --standalone --nproc_per_node=2 \
#       -m trainer.train --config configs/demo.yaml output_dir=/runs/demo/run ...
#
# Build arguments:
#   BASE_IMAGE       a Python 3.11 image with venv and pip (default python:3.11-slim)
#   TORCH_VARIANT    cpu, or a CUDA tag of PyTorch's index (cu128): deploy/install.sh's variable
#   TORCH_INDEX_URL  another index for torch (and fbgemm-gpu); default PyTorch's own
#   PIP_FIND_LINKS   a local wheel directory (mounted with -v) searched first, e.g. for torch
#   PIP_CERT         a CA bundle (mounted with -v) for a TLS-intercepting proxy in the build
# deploy/image_test.sh builds and tests it with buildah; README "Container" has the details.
ARG BASE_IMAGE=python:3.11-slim

# ---- build: /opt/venv, made by the same script (and so the same pins) as a developer's .venv
FROM ${BASE_IMAGE} AS build
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=120 \
    VENV=/opt/venv \
    EXTRAS= \
    EDITABLE=0
WORKDIR /src
# The pinned stack first, from the pins alone (an empty README stands in for the real one), so
# that editing the code or the docs does not reinstall torch.
COPY pyproject.toml ./
COPY deploy/install.sh deploy/
RUN touch README.md && bash deploy/install.sh
# Then ctcvr itself; the script's second run finds the stack in place and installs the package
# (checked from outside /src, -I, so that the installed copy is what gets imported).
COPY . .
RUN bash deploy/install.sh \
    && /opt/venv/bin/python -I -c "import schemas, serving.main, trainer.train"

# ---- runtime: the base image, the virtual environment and an unprivileged user
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
# The files last, the large virtual environment at the very end: with storage drivers that copy
# whole layers (vfs) every step after it would copy it again.
COPY deploy/entrypoint.sh /usr/local/bin/ctcvr-entrypoint
COPY trainer/configs /srv/ctcvr/configs
COPY --from=build /opt/venv /opt/venv
