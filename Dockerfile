# Superbrain serving image, one build per accelerator vendor (docs/accelerators.md).
#
# Build arguments:
#   BASE            the runtime image: the vendor's user-space driver libraries and,
#                   for MetaX and Moore Threads, the vendor's own torch build.
#   TORCH_INSTALL   the command that installs torch. ":" keeps the torch BASE ships
#                   (MetaX MACA torch, Moore Threads torch + torch_musa).
#   EXTRAS          superbrain extras, e.g. "cuda" (CuPy for NVIDIA), "rocm", "mthreads".
#   VENDOR_INSTALL  one more command for vendor wheels that are not on PyPI
#                   (MetaX's pymxsml ships inside the MACA SDK); ":" for none.
#
# CPU (the default; torch from PyTorch's CPU index, since plain `torch==2.13.0` from PyPI
# is the CUDA build on Linux):
#   docker build -t superbrain:cpu .
#
# NVIDIA: the CUDA 12 runtime image (it has libnvrtc, which CuPy's kernels compile
# with), torch's CUDA wheel, CuPy:
#   docker build -t superbrain:nvidia \
#     --build-arg BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#     --build-arg TORCH_INSTALL="pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" \
#     --build-arg EXTRAS=cuda .
#
# MetaX (MACA): MetaX's PyTorch image for your MACA SDK version (from MetaX's
# developer registry); it already has MACA torch, so keep it, and install pymxsml
# from the SDK for the accelerator metrics:
#   docker build -t superbrain:metax \
#     --build-arg BASE=<MetaX MACA PyTorch image> \
#     --build-arg TORCH_INSTALL=: \
#     --build-arg VENDOR_INSTALL="pip install --no-cache-dir /opt/maca/share/mxsml/pymxsml-*.whl" .
#
# Moore Threads (MUSA): Moore Threads' MUSA PyTorch image (torch + torch_musa, from
# registry.mthreads.com, tag matching the node's driver); keep its torch:
#   docker build -t superbrain:mthreads \
#     --build-arg BASE=<Moore Threads MUSA PyTorch image> \
#     --build-arg TORCH_INSTALL=: \
#     --build-arg EXTRAS=mthreads .
#
# The vendor's torch must satisfy superbrain's `torch` requirement: the install
# below pins whatever torch is present, so a mismatch fails the build instead of
# pip quietly replacing the vendor build with a stock (CUDA) wheel.
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_INSTALL="pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
ARG EXTRAS=""
ARG VENDOR_INSTALL=":"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /app

# Some bases have no Python (nvidia/cuda); some have the vendor's torch in their own
# Python (MetaX, Moore Threads). A venv on top of whichever Python is there, seeing
# its packages, works for both.
RUN if ! command -v python3 >/dev/null || ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv --system-site-packages /opt/superbrain
ENV PATH=/opt/superbrain/bin:${PATH}

RUN bash -c "${TORCH_INSTALL}" \
    && python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/torch-constraint.txt \
    && cat /tmp/torch-constraint.txt

COPY pyproject.toml README.md ./
COPY serving ./serving
COPY proto ./proto
RUN pip install --no-cache-dir -c /tmp/torch-constraint.txt ".${EXTRAS:+[${EXTRAS}]}" \
    && bash -c "${VENDOR_INSTALL}"

EXPOSE 9000
CMD ["superbrain", "serve", "--host", "0.0.0.0"]
