# Two images from one file:
#   docker build --target api    -t coreloop-api .     (FastAPI, no torch: small, fast start)
#   docker build --target worker -t coreloop-worker .  (Celery worker with torch + ml/)
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    CORELOOP_DATA_DIR=/data HF_HUB_OFFLINE=1
WORKDIR /srv/coreloop
COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
COPY ml ./ml
COPY migrations ./migrations
COPY coreloop ./coreloop

FROM base AS api
RUN pip install .
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --retries=5 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health').status == 200 else 1)"
CMD ["coreloop", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker"]

FROM base AS worker
RUN pip install '.[ml]'
CMD ["coreloop", "worker", "--queues", "training,default"]
