# The worker image: this project and its pinned environment (requirements.lock), Detectron2 from
# its source package, the `uniter` CLI. `docker compose up` builds it for the worker services.
FROM python:3.11.11-slim-bookworm

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    UNITER_CACHE_DIR=/cache
RUN apt-get update && apt-get install -y --no-install-recommends build-essential make && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# dependencies first (a code change does not reinstall them)
COPY requirements.lock pyproject.toml ./
COPY scripts/install_detectron2.sh scripts/
RUN python -m venv /opt/venv && pip install -qq -r requirements.lock && scripts/install_detectron2.sh /opt/venv
COPY . .
RUN pip install -qq --no-deps --no-build-isolation -e .
CMD ["uniter", "--help"]
