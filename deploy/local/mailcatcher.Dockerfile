# An SMTP catcher from Debian's packages (aiosmtpd), standing in for axllent/mailpit: SMTP on
# 1025, and the part of Mailpit's HTTP API the tests read (/livez, /api/v1/messages) on 8025,
# behind basic auth from MP_UI_AUTH ("user:password"), as Mailpit's is.
ARG DEBIAN_IMAGE=melanoscreen-local/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-aiosmtpd \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 1025 mailcatcher
COPY mailcatcher.py /usr/local/bin/mailcatcher
USER mailcatcher
EXPOSE 1025 8025
HEALTHCHECK --interval=5s --timeout=3s --retries=10 \
    CMD ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8025/livez', timeout=2)"]
CMD ["python3", "/usr/local/bin/mailcatcher"]
