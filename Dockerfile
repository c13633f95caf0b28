# One image for both services; the command picks one:
#   docker run IMAGE                                   -> python -m worker_service
#   docker run IMAGE coordinator_service train ...     -> python -m coordinator_service train ...
# Multi-arch: `make image` builds linux/arm64 (Raspberry Pi) and linux/amd64. CPU-only torch on both, every
# dependency pinned with hashes in requirements/image-ARCH.txt (`make lock`).
# The locks in requirements/ are made for Python 3.11.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ARG TARGETARCH
# amd64 only: PyPI's x86-64 torch is a CUDA build of several GB, so torch comes from the PyTorch CPU index, the same
# release as on arm64 (where PyPI's wheel is CPU-only and hash-pinned in the lock). TORCH_WHEELS=1 takes the wheels
# named by TORCH_SPEC from the build context's wheels/ folder instead, for machines that cannot reach the index.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC="torch==2.9.1+cpu torchvision==0.24.1+cpu"
ARG TORCH_WHEELS=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/fedpi
COPY requirements/image-${TARGETARCH}.txt /tmp/requirements.txt
RUN /opt/fedpi/bin/pip install --require-hashes --no-deps -r /tmp/requirements.txt
RUN --mount=type=bind,source=wheels,target=/tmp/wheels \
    if [ "$TARGETARCH" = "amd64" ]; then \
      if [ -n "$TORCH_WHEELS" ]; then source="--no-index --find-links /tmp/wheels"; \
      else source="--index-url $TORCH_INDEX"; fi; \
      /opt/fedpi/bin/pip install --no-deps $source $TORCH_SPEC; \
    fi
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fedpi fedpi
COPY generated generated
COPY worker_service worker_service
COPY coordinator_service coordinator_service
COPY fedpi_cli fedpi_cli
# pip is uninstalled (not deleted), so an image built FROM this one can get it back with `python -m ensurepip`
# to install a task (docs/tasks.md).
RUN /opt/fedpi/bin/pip install --no-deps . \
    && /opt/fedpi/bin/python -m pip uninstall --yes --quiet pip \
    && find /opt/fedpi -name '__pycache__' -prune -exec rm -rf {} + \
    && rm -rf /opt/fedpi/lib/python*/site-packages/torch/include

FROM python:${PYTHON_VERSION}-slim-bookworm
RUN groupadd --gid 10001 fedpi && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin fedpi
COPY --from=build /opt/fedpi /opt/fedpi
# FEDPI_PREFLIGHT: before anything else, each service checks in a child process that torch can train on this CPU,
# and says so in one line (exit 3) if it cannot, instead of crash-looping with SIGILL.
ENV PATH=/opt/fedpi/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    FEDPI_DATA_DIR=/data \
    FEDPI_PREFLIGHT=1
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051
ENTRYPOINT ["python", "-m"]
CMD ["worker_service"]
