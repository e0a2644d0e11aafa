# MelanoScreen: one image for every service (watch, worker, beat, flower); the command picks one.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MELANOSCREEN_DATA_DIR=/data \
    MELANOSCREEN_INBOX=/inbox

RUN useradd --create-home --uid 1000 melanoscreen
WORKDIR /app
COPY pyproject.toml README.md ./
COPY model ./model
COPY db ./db
COPY worker ./worker
COPY scheduler ./scheduler
COPY melanoscreen ./melanoscreen
RUN pip install . && mkdir -p /data /inbox && chown melanoscreen:melanoscreen /data /inbox

USER melanoscreen
VOLUME ["/data", "/inbox"]
CMD ["melanoscreen", "--help"]
