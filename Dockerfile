# The GAS latency service. CPU build by default; for an NVIDIA host build with a CUDA torch:
#   docker compose -f docker-compose.yml -f docker-compose.gpu.yml up --build
# (docker-compose.gpu.yml sets TORCH_INDEX_URL to a CUDA wheel index and reserves the GPU).
FROM python:3.11-slim

# torch goes first, from the index that matches the host: the CPU index by default, so a CPU
# image never pulls the CUDA wheels; pyproject.toml keeps torch>=2.3 open for the GPU build.
ARG TORCH_SPEC="torch>=2.3"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY gas_core gas_core
COPY latency_service latency_service
COPY search_client search_client
COPY migrations migrations
# the wheel carries the Alembic tree as latency_service/migrations
RUN pip install . && rm -rf /app/gas_core /app/latency_service /app/search_client /app/migrations

RUN useradd --create-home gas && mkdir -p /data && chown gas /data
USER gas
# SQLite fallback when GAS_DATABASE_URL is not set (the compose file sets PostgreSQL)
ENV GAS_DATABASE_URL=sqlite:////data/gas.db
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=4 \
  CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"
# start-up waits for the database (GAS_DB_WAIT_S), runs `alembic upgrade head` under a lock, then serves
CMD ["gas-service", "serve", "--host", "0.0.0.0", "--port", "8000"]
