#!/usr/bin/env bash
# An N-node Ray cluster of containers on one machine, for trying a cluster config and for
# tests/e2e/test_cluster.py. The nodes share nothing but a Docker network: each has its own IP,
# /dev/shm and /tmp. A Redis with a password runs in a container of its own.
#
#   deploy/local/cluster.sh up [--name N] [--workers K] [--cpus C] [--memory M] [--image IMAGE]
#                              [--sandboxes] [--mount DIR]... [--env KEY=VALUE]...
#   deploy/local/cluster.sh down [--name N]
#   deploy/local/cluster.sh env [--name N]       # prints RAY_ADDRESS, CODEWORLD_REDIS_URL, ...
#   deploy/local/cluster.sh image                # builds the local image if missing (make services-test)
#
# Nodes run from the codeworld node image (--image, deploy/docker/Dockerfile.cpu) or, by default,
# from a small local image (deploy/local/Dockerfile, built on first use) with this checkout, its
# .venv and the Python that venv was made from mounted read-only at the same paths
# (CODEWORLD_CODE, CODEWORLD_VENV override them). Redis runs from that local image too.
# --sandboxes mounts the host's Docker socket into every node, so the sandbox pool on each node
# starts sandbox containers (beside the nodes, on the host's daemon); that gives the nodes root
# on the host: for trying things on a machine of your own, not for sharing. --mount DIR shows a
# host directory to every node read-only at the same path (a model, data: a cluster's shared
# storage).
set -Eeuo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
name=codeworld
workers=1
cpus=2
memory=""
image=""
sandboxes=0
extra_env=()  # -e and -v options for every node
local_image=codeworld-local:bookworm

die() { echo "cluster.sh: $*" >&2; exit 1; }

parse() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --name) name="$2"; shift 2 ;;
      --workers) workers="$2"; shift 2 ;;
      --cpus) cpus="$2"; shift 2 ;;
      --memory) memory="$2"; shift 2 ;;
      --image) image="$2"; shift 2 ;;
      --sandboxes) sandboxes=1; shift ;;
      --env) extra_env+=(-e "$2"); shift 2 ;;
      --mount) [ -d "$2" ] || die "--mount $2 is not a directory."
               extra_env+=(-v "$(cd "$2" && pwd):$(cd "$2" && pwd):ro"); shift 2 ;;
      *) die "unknown option '$1' (see the header of $0)." ;;
    esac
  done
  [[ "$name" =~ ^[a-z0-9][a-z0-9-]*$ ]] || die "--name must be lower-case letters, digits and dashes."
  [[ "$workers" =~ ^[0-9]+$ ]] || die "--workers must be a number."
}

ip_of() { docker inspect -f "{{(index .NetworkSettings.Networks \"$name-net\").IPAddress}}" "$1"; }

node_args() {  # sets `args`: the docker run arguments every node shares, the image last
  local code venv prefix
  args=(--network "$name-net" --label "codeworld.cluster=$name" --shm-size 1g --user 0:0
              -e HOME=/tmp -e RAY_USAGE_STATS_ENABLED=0 -e "CODEWORLD_REDIS_PASSWORD=$password" -w /tmp)
  [ -n "$memory" ] && args+=(--memory "$memory")
  [ "$sandboxes" = 1 ] && args+=(-v /var/run/docker.sock:/var/run/docker.sock)
  if [ -z "$image" ]; then
    code="${CODEWORLD_CODE:-$repo}"
    venv="${CODEWORLD_VENV:-$code/.venv}"
    [ -x "$venv/bin/python" ] || die "no venv at $venv: run 'make setup' or set CODEWORLD_VENV."
    prefix="$(sed -n 's/^home = \(.*\)\/bin$/\1/p' "$venv/pyvenv.cfg")"
    [ -d "$prefix" ] || die "cannot find the Python $venv was made from (pyvenv.cfg home = $prefix)."
    args+=(-v "$prefix:$prefix:ro" -v "$venv:$venv:ro" -v "$code:$code:ro"
           -e "PATH=$venv/bin:/usr/local/bin:/usr/bin:/bin" -e "PYTHONPATH=$code")
    image="$local_image"
  fi
  args+=("${extra_env[@]}" "$image")
}

image_if_missing() {
  docker image inspect "$local_image" >/dev/null 2>&1 || docker build -q -t "$local_image" "$here" >/dev/null
}

ray_start() {  # $1 = node container, then `ray start` options
  local node="$1" out
  shift
  # The object store fits the node's 1 GiB /dev/shm (Ray warns and falls back to /tmp otherwise).
  out="$(docker exec "$node" ray start "$@" --node-ip-address "$(ip_of "$node")" --num-cpus "$cpus" \
    --object-store-memory 400000000 --disable-usage-stats 2>&1)" || die "ray start failed on $node: $out"
}

up() {
  docker network inspect "$name-net" >/dev/null 2>&1 && die "a cluster '$name' exists: run '$0 down --name $name'."
  image_if_missing
  password="$(head -c 18 /dev/urandom | base64 | tr -d '/+=')"
  docker network create --label "codeworld.cluster=$name" "$name-net" >/dev/null
  trap 'echo "cluster.sh: start failed; removing what was started" >&2; down' ERR
  docker run -d --name "$name-redis" --network "$name-net" --label "codeworld.cluster=$name" "$local_image" \
    redis-server --bind 0.0.0.0 --protected-mode no --save "" --requirepass "$password" >/dev/null
  node_args
  docker run -d --name "$name-head" --hostname "$name-head" "${args[@]}" sleep infinity >/dev/null
  head_ip="$(ip_of "$name-head")"
  ray_start "$name-head" --head --port 6379 --dashboard-host 0.0.0.0
  for i in $(seq 1 "$workers"); do
    docker run -d --name "$name-worker-$i" --hostname "$name-worker-$i" "${args[@]}" sleep infinity >/dev/null
    ray_start "$name-worker-$i" --address "$head_ip:6379"
  done
  for _ in $(seq 1 60); do
    alive="$(docker exec "$name-head" python -c 'import ray; ray.init(address="auto", logging_level="error");
print(sum(n["Alive"] for n in ray.nodes()))' 2>/dev/null || echo 0)"
    [ "$alive" = "$((workers + 1))" ] && break
    sleep 1
  done
  [ "$alive" = "$((workers + 1))" ] || die "only $alive of $((workers + 1)) nodes joined."
  trap - ERR
  env_lines
}

env_lines() {  # what a client on this machine needs, as KEY=VALUE lines
  docker inspect "$name-head" >/dev/null 2>&1 || die "no cluster '$name'."
  password="$(docker inspect -f '{{range .Config.Env}}{{println .}}{{end}}' "$name-head" \
    | sed -n 's/^CODEWORLD_REDIS_PASSWORD=//p')"
  echo "RAY_ADDRESS=http://$(ip_of "$name-head"):8265"
  echo "CODEWORLD_REDIS_URL=redis://$(ip_of "$name-redis"):6379/0"
  echo "CODEWORLD_REDIS_PASSWORD=$password"
  echo "CODEWORLD_NODES=$(nodes | tr '\n' ' ' | sed 's/ $//')"
}

nodes() {  # the cluster's node containers, by name
  docker ps -a --filter "label=codeworld.cluster=$name" --format '{{.Names}}' | grep -v -- '-redis$' | sort || true
}

down() {
  for node in $(nodes); do  # sandboxes the node's pools started on the host's daemon
    ids="$(docker ps -aq --filter "label=codeworld.owner.host=$node")"
    [ -z "$ids" ] || docker rm -f $ids >/dev/null
  done
  ids="$(docker ps -aq --filter "label=codeworld.cluster=$name")"
  [ -z "$ids" ] || docker rm -f $ids >/dev/null
  docker network rm "$name-net" >/dev/null 2>&1 || true
}

command="${1:-}"
[ $# -gt 0 ] && shift
parse "$@"
case "$command" in
  up) up ;;
  down) down ;;
  env) env_lines ;;
  image) image_if_missing ;;
  *) die "usage: $0 up|down|env|image [options] (see the header of $0)." ;;
esac
