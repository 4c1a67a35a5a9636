# Worker container for beam-enrich on Dataflow (or Flink / Spark with DOCKER workers).
#
#   docker build -t REGION-docker.pkg.dev/PROJECT/REPO/beam-enrich:cpu .
#   docker build --build-arg TORCH_INDEX=cu128 -t REGION-docker.pkg.dev/PROJECT/REPO/beam-enrich:gpu .
#
# then run with --sdk_container_image=<tag> (see README, "Running on a cluster"). The
# base image's Beam and Python versions must equal those of the environment that
# launches the job (here apache-beam 2.77.0 on Python 3.11).
ARG BEAM_VERSION=2.77.0
FROM apache/beam_python3.11_sdk:${BEAM_VERSION}

ARG BEAM_VERSION
# Which PyTorch wheel index: `cpu` (small) for CPU workers, a CUDA build the torch
# release publishes (e.g. `cu128`; see download.pytorch.org/whl) for GPU workers.
ARG TORCH_INDEX=cpu
ARG TORCH_VERSION=2.13.0

# HF_HOME: where workers keep downloaded models. Tokenizers' own thread pool would
# compete with Beam's threads and torch's for the same cores.
ENV HF_HOME=/opt/huggingface \
    TOKENIZERS_PARALLELISM=false \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from its own index: a plain `torch` requirement would pull PyPI's
# default (CUDA) build into the CPU image.
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_INDEX}" \
        "torch==${TORCH_VERSION}"

WORKDIR /opt/beam-enrich
COPY pyproject.toml README.md ./
COPY pipelines ./pipelines
COPY transforms ./transforms
# Pinning apache-beam keeps the SDK the base image's boot entrypoint was built for.
RUN pip install ".[gcp,aws]" "apache-beam==${BEAM_VERSION}"

# Workers without hub access: fill a cache first with
#   beam-enrich download --spec job.yaml --cache hf-cache
# and uncomment these two lines (local model directories named in the spec must also
# exist on the workers at the same path: COPY them in the same way).
# COPY hf-cache /opt/huggingface/hub
# ENV HF_HUB_OFFLINE=1

# The base image's ENTRYPOINT (/opt/apache/beam/boot) starts the SDK worker: keep it.
