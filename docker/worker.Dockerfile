# The GPU worker image: CUDA runtime, torch, the trainer core and the Celery worker.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip build-essential ninja-build \
 && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY alignd ./alignd
COPY api ./api
COPY worker ./worker
COPY migrations ./migrations
COPY trainer_core ./trainer_core
# The CUDA build of the pinned torch (the constraints file pins the version, the index picks CUDA).
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cu128 "torch==$(grep '^torch==' constraints.txt | cut -d= -f3)" \
 && pip install --no-cache-dir -c constraints.txt '.[train]'
RUN useradd --create-home --uid 10001 alignd
USER alignd
CMD ["alignd", "worker"]
