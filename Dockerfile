# MelanoScreen: one image for every service (watch, worker, beat, flower, web, migrate); the
# compose file's command picks one. Multi-stage: the build tools and pip's caches stay behind;
# the last stage is the base, a virtual environment with the runtime dependencies (TensorFlow
# CPU, no test extras), the package with its shipped model, and an unprivileged user.
#
# BASE_IMAGE: any Python 3.11 image laid out like python:3.11-slim (deploy/local-images.sh
# builds one from Debian packages). A host whose pip needs a private CA passes it as a build
# secret (`--secret id=pip_cert,src=...`); it is mounted for the pip steps only, never stored.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml ./
# Only the dependency list: the layer that installs them is rebuilt when it changes, not when
# the rest of pyproject.toml does.
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY --from=requirements /src/requirements.txt /tmp/requirements.txt
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    /opt/venv/bin/pip install -r /tmp/requirements.txt
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY db ./db
COPY service ./service
COPY worker ./worker
COPY scheduler ./scheduler
COPY web ./web
COPY melanoscreen ./melanoscreen
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    /opt/venv/bin/pip install --no-deps . \
 && /opt/venv/bin/python -c "import model.inference, service.screening, worker.tasks, web.app, scheduler.watcher, scheduler.listener, pydicom, pynetdicom, melanoscreen.cli.app, pathlib, sys; sys.exit(not any(pathlib.Path(model.inference.__file__).parent.glob('shipped/*.keras')))"

FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    PATH=/opt/venv/bin:$PATH \
    MELANOSCREEN_DATA_DIR=/data \
    MELANOSCREEN_INBOX=/inbox
# The data folder (the service keeps it 0700 too) and the inbox, where patients' images arrive,
# are the service user's only. Named volumes copy this ownership and mode when first created.
RUN useradd --create-home --uid 1000 melanoscreen \
 && mkdir -p /data /inbox \
 && chown melanoscreen:melanoscreen /data /inbox \
 && chmod 0700 /data /inbox
COPY --from=build /opt/venv /opt/venv
USER melanoscreen
WORKDIR /home/melanoscreen
# Matplotlib's font list, built once here: otherwise every container (each worker) rebuilds it
# in its own fresh home on its first Grad-CAM overlay.
RUN python -c "import matplotlib.font_manager"
VOLUME ["/data", "/inbox"]
CMD ["melanoscreen", "--help"]
