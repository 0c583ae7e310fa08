# Superbrain serving image. BASE picks the vendor runtime, e.g.
#   docker build --build-arg BASE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 .
# (accelerator-specific builds are covered by the accelerators issue).
ARG BASE=python:3.11-slim
FROM ${BASE}
WORKDIR /app
RUN python -m pip install --no-cache-dir torch==2.13.0
COPY pyproject.toml README.md ./
COPY serving ./serving
COPY proto ./proto
RUN python -m pip install --no-cache-dir .
EXPOSE 9000
CMD ["superbrain", "serve", "--host", "0.0.0.0"]
