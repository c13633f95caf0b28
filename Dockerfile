# One image for both services; the command picks one:
#   docker run IMAGE                                   -> python -m worker_service
#   docker run IMAGE coordinator_service train ...     -> python -m coordinator_service train ...
# Multi-arch: `make image` builds linux/arm64 (Raspberry Pi) and linux/amd64.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ARG TARGETARCH
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/fedpi
# CPU-only torch: PyPI's aarch64 wheels already are; on amd64 the CPU index avoids gigabytes of CUDA libraries.
RUN if [ "$TARGETARCH" = "amd64" ]; then index="--index-url https://download.pytorch.org/whl/cpu"; fi; \
    /opt/fedpi/bin/pip install $index "torch>=2.4,<3" "torchvision>=0.19,<1"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fedpi fedpi
COPY generated generated
COPY worker_service worker_service
COPY coordinator_service coordinator_service
RUN /opt/fedpi/bin/pip install .

FROM python:${PYTHON_VERSION}-slim-bookworm
RUN groupadd --gid 10001 fedpi && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin fedpi
COPY --from=build /opt/fedpi /opt/fedpi
ENV PATH=/opt/fedpi/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    FEDPI_DATA_DIR=/data
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051
ENTRYPOINT ["python", "-m"]
CMD ["worker_service"]
