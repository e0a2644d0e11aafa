#!/usr/bin/env bash
# Build the images the compose deployment needs from Debian packages alone, for a host that
# reaches Debian's archive and the Python package index but no image registry:
#
#   melanoscreen-local/debian:bookworm    debootstrap --variant=minbase, loaded with docker import
#   melanoscreen-local/python:3.11        Debian's python3.11 + python3.11-venv (BASE_IMAGE)
#   melanoscreen-local/redis:7            Debian's redis-server (REDIS_IMAGE)
#   melanoscreen-local/postgres:15        Debian's postgresql (POSTGRES_IMAGE)
#   melanoscreen-local/mailcatcher:1      Debian's python3-aiosmtpd (MAILCATCHER_IMAGE)
#   melanoscreen:latest                   the service, from ../Dockerfile on the local Python
#
# Each is built once and reused (Docker's layer cache); --rebuild-base makes the Debian base
# again. The service image is built with BuildKit and the host's network, pip trusting the
# host's CA bundle (PIP_CERT, else the `cert` that `pip config list` shows, else none), handed
# over as a build secret: it is never part of an image. Prints the variables for compose (.env).
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=melanoscreen-local
DEBIAN=$PREFIX/debian:bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
APP_IMAGE=${MELANOSCREEN_IMAGE:-melanoscreen:latest}

say() { echo "local-images: $*" >&2; }

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

if ! docker info >/dev/null 2>&1; then
  say "no Docker daemon answers (docker info); start dockerd first"
  exit 1
fi

if [ "${1:-}" = "--rebuild-base" ] || ! have_image "$DEBIAN"; then
  command -v debootstrap >/dev/null || { say "debootstrap is missing: apt-get install debootstrap"; exit 1; }
  rootfs=$(mktemp -d /tmp/melanoscreen-rootfs.XXXXXX)
  trap 'rm -rf "$rootfs"' EXIT
  say "debootstrap bookworm (minbase) from $MIRROR"
  debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >/dev/null
  tar -C "$rootfs" -c . | docker import -c 'CMD ["bash"]' - "$DEBIAN" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
fi

# The helper images: apt inside the build reaches Debian's archive through the default bridge.
for spec in python:3.11 redis:7 postgres:15 mailcatcher:1; do
  name=${spec%%:*}
  say "building $PREFIX/$spec"
  docker build -q --build-arg DEBIAN_IMAGE="$DEBIAN" -t "$PREFIX/$spec" \
    -f "deploy/local/$name.Dockerfile" deploy/local >/dev/null
done

# The service image needs BuildKit (a build secret): buildx where installed, else the CLI's own
# BuildKit (Docker before 23, e.g. Debian's docker.io 20.10), else Debian's /usr/bin/docker.
buildkit() {
  if docker buildx version >/dev/null 2>&1; then
    docker buildx build --load "$@"
  elif [ "$(docker version --format '{{.Client.Version}}' | cut -d. -f1)" -lt 23 ]; then
    DOCKER_BUILDKIT=1 docker build "$@"
  elif [ -x /usr/bin/docker ] && [ "$(/usr/bin/docker version --format '{{.Client.Version}}' | cut -d. -f1)" -lt 23 ]; then
    DOCKER_BUILDKIT=1 /usr/bin/docker build "$@"
  else
    say "no BuildKit: install docker-buildx (or Docker's buildx plugin)"
    exit 1
  fi
}

cert=${PIP_CERT:-$(pip config list 2>/dev/null | sed -n "s/^[^=]*\.cert='\(.*\)'\$/\1/p" | head -n 1)}
secret=()
if [ -n "$cert" ] && [ -f "$cert" ]; then
  secret=(--secret "id=pip_cert,src=$cert")
fi
say "building $APP_IMAGE on $PREFIX/python:3.11"
buildkit --progress=plain --network host "${secret[@]}" \
  --build-arg BASE_IMAGE="$PREFIX/python:3.11" -t "$APP_IMAGE" . >&2

cat <<VARS
BASE_IMAGE=$PREFIX/python:3.11
REDIS_IMAGE=$PREFIX/redis:7
POSTGRES_IMAGE=$PREFIX/postgres:15
MAILCATCHER_IMAGE=$PREFIX/mailcatcher:1
MELANOSCREEN_IMAGE=$APP_IMAGE
VARS
