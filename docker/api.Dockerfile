# The API image: FastAPI, SQLAlchemy, the Celery producer; the base install, without the
# [train] extra, so no torch (the API never imports it).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY alignd ./alignd
COPY api ./api
COPY migrations ./migrations
# trainer_core's specs and formats are imported by the API (plain pydantic, no torch).
COPY trainer_core ./trainer_core
RUN pip install --no-cache-dir -c constraints.txt .
RUN useradd --create-home --uid 10001 alignd
USER alignd
ENV ALIGND_HOST=0.0.0.0 ALIGND_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import httpx; httpx.get('http://127.0.0.1:8000/healthz').raise_for_status()"
CMD ["alignd", "serve", "--no-worker"]
