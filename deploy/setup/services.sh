#!/usr/bin/env bash
# Makes sure the services codeworld needs are installed (and, for Docker, running).
# Usage: services.sh redis | docker | chromium | registry
set -euo pipefail

need_root_or_say() {  # $1 = what is missing, $2 = the Debian package
  if [ "$(id -u)" -ne 0 ]; then
    echo "codeworld: $1 is missing and installing it needs root: run 'sudo apt-get install -y $2'." >&2
    exit 1
  fi
  command -v apt-get >/dev/null || { echo "codeworld: $1 is missing; install the '$2' package." >&2; exit 1; }
}

apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1 || {
    apt-get update -q >/dev/null 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
  }
}

ensure_redis() {
  command -v redis-server >/dev/null && return 0
  need_root_or_say "redis-server" "redis-server"
  echo "codeworld: installing redis-server ..."
  apt_install redis-server
}

ensure_docker() {
  if ! command -v dockerd >/dev/null; then
    need_root_or_say "the Docker engine (dockerd)" "docker.io"
    echo "codeworld: installing the Docker engine ..."
    apt_install docker.io
  fi
  command -v debootstrap >/dev/null || { need_root_or_say "debootstrap" "debootstrap"; apt_install debootstrap; }
  command -v bwrap >/dev/null || { [ "$(id -u)" -ne 0 ] || apt_install bubblewrap; }
  docker info >/dev/null 2>&1 && return 0
  [ "$(id -u)" -eq 0 ] || { echo "codeworld: the Docker daemon is not running: start it with 'sudo dockerd &'." >&2; exit 1; }
  echo "codeworld: starting dockerd ..."
  mkdir -p /var/log
  nohup setsid dockerd >/var/log/codeworld-dockerd.log 2>&1 &
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && return 0; sleep 1; done
  echo "codeworld: dockerd did not start within 60 s; see /var/log/codeworld-dockerd.log." >&2
  exit 1
}

# A real headless browser for the dashboard's end-to-end test (driven over the DevTools protocol,
# so no chromedriver is needed).
ensure_chromium() {
  command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null \
    && return 0
  need_root_or_say "Chromium (for the dashboard test)" "chromium"
  echo "codeworld: installing Chromium ..."
  apt_install chromium
}

# A Docker registry the image tests run on a loopback port (tests/workers/sandbox/test_sandbox_images.py);
# installed only: the tests start and stop their own.
ensure_registry() {
  command -v docker-registry >/dev/null && return 0
  need_root_or_say "docker-registry (for the image tests)" "docker-registry"
  echo "codeworld: installing docker-registry ..."
  apt_install docker-registry
}

case "${1:-}" in
  redis) ensure_redis ;;
  docker) ensure_docker ;;
  chromium) ensure_chromium ;;
  registry) ensure_registry ;;
  *) echo "usage: $0 redis|docker|chromium|registry" >&2; exit 2 ;;
esac
