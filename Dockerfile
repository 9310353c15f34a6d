# ctcvr image (minimal for now; the deployment issue completes it: serving entrypoint,
# HEALTHCHECK, multi-stage build). Installs with the same script as the README.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

RUN apt-get update && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/ctcvr
# Dependencies before source, so editing code does not invalidate the install layer.
COPY pyproject.toml README.md ./
COPY deploy/install.sh deploy/install.sh
COPY schemas schemas
COPY trainer trainer
COPY serving serving
RUN VENV=/opt/venv EXTRAS= EDITABLE=0 bash deploy/install.sh
RUN useradd --create-home --uid 10001 ctcvr
USER ctcvr
ENV PATH=/opt/venv/bin:$PATH
ENTRYPOINT ["python", "-m", "trainer.train"]
CMD ["--help"]
