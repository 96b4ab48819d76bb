# syntax=docker/dockerfile:1
# One image for every gridloop service; docker-compose.yml picks the module with `command:`
# (python -m services.intake, services.dispatch, ...).
FROM python:3.11-slim

ARG UV_VERSION=0.13.9

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    GRIDLOOP_VAR_DIR=/app/var

RUN pip install --no-cache-dir "uv==${UV_VERSION}"

WORKDIR /app

# Dependencies first: this layer is rebuilt only when the lock file changes.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project

COPY schemas/ schemas/
COPY towns/ towns/
COPY services/ services/
RUN uv sync --frozen --no-dev

# Run unprivileged; the working directory stays writable for runtime state (faust data dirs).
RUN useradd --system --uid 10001 --user-group --no-create-home gridloop \
    && mkdir -p /app/var \
    && chown gridloop:gridloop /app /app/var
USER gridloop

EXPOSE 8101 8102 8103 8104 8105
CMD ["python", "-m", "services.admin", "--help"]
