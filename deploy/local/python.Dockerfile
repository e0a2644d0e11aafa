# Python 3.11 from Debian's packages, laid out like python:3.11-slim (python on PATH in
# /usr/local/bin, venv available), for hosts that reach Debian's archive but no image registry.
ARG DEBIAN_IMAGE=melanoscreen-local/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s /usr/bin/python3.11 /usr/local/bin/python \
 && ln -s /usr/bin/python3.11 /usr/local/bin/python3
ENV LANG=C.UTF-8
CMD ["python3"]
