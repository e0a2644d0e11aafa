# Redis from Debian's redis-server package, used like the redis:7 image: `redis-server` on PATH,
# data in /data, running as the unprivileged `redis` user.
ARG DEBIAN_IMAGE=melanoscreen-local/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown redis:redis /data && chmod 0700 /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server", "--protected-mode", "no"]
