# The training node's image, for MLflow projects on GPU nodes: `docker build --build-arg BASE_IMAGE=... -t flywheel-train .`
# The default base is a CUDA runtime; pass a plain python image for CPU nodes. It installs the core
# dependencies and the `train` extra only (pyproject.toml), not the serving, monitor or tracking ones.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip git ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /opt/flywheel
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --extra-index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
 && pip install --no-deps torchvision==0.28.0 \
 && pip install "./[train]"

RUN useradd --create-home --uid 10001 flywheel
USER flywheel
WORKDIR /home/flywheel
ENTRYPOINT ["python", "-m", "flywheel"]
CMD ["--help"]
