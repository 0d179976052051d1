# One image for every Procfile process; the command picks the process.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md alembic.ini Procfile ./
COPY worker ./worker
COPY migrations ./migrations
RUN pip install -e . && useradd --create-home --uid 10001 app
USER app
EXPOSE 8000
CMD ["uvicorn", "--factory", "worker.web.app:create_app", "--host", "0.0.0.0", "--port", "8000"]
