# ctr-ad: one image for the ingest and train jobs and the REST service (see docker-compose.yml).
#
#   docker build -t ctr-ad .                                   # CPU torch (small image)
#   docker build -t ctr-ad --build-arg TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" .
#
# The CUDA wheels carry their own CUDA runtime, so the same slim base serves a GPU host (with the
# NVIDIA container toolkit); the train job asks for the GPU in docker-compose.yml.
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# Optional extras of the image, e.g. EXTRAS="[ray]" for the Ray nodes of docker-compose's ray profile.
ARG EXTRAS=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# torch first, from its own index, so the resolver never swaps in another build.
RUN pip install ${TORCH_SPEC}
# Dependencies before the sources: editing code does not reinstall them.
COPY pyproject.toml README.md ./
COPY ctr_ad ./ctr_ad
COPY service ./service
# A C compiler only while the project installs: it builds the ingest's compiled loops
# (ctr_ad/_kernels.c; without them ingest takes its slower polars path).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && pip install ".${EXTRAS}" "uvicorn[standard]" orjson \
 && apt-get purge -y --auto-remove gcc libc6-dev && rm -rf /var/lib/apt/lists/*
COPY pipelines ./pipelines
COPY data ./data
COPY deploy ./deploy

# Run as an unprivileged user; job outputs go to the /runs volume.
RUN useradd --create-home --uid 10001 ctr && mkdir -p /runs && chown ctr /runs
USER ctr
# One worker's torch threads (the service sets its own with --threads).
ENV OMP_NUM_THREADS=1
EXPOSE 8000
CMD ["ctr-ad", "--help"]
