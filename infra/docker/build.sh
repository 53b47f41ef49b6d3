#!/usr/bin/env bash
# Build the images where a docker daemon is available (the tests lint the Dockerfiles where it is not).
#   bash infra/docker/build.sh [gpu|cpu|all] [--push]
# Env: REGISTRY (e.g. ghcr.io/acme; default: local names only), TAG (default: the git commit),
#      TORCH_CPU_INDEX_URL (PyTorch's CPU wheel index for the slim image; empty: PyPI's default torch).
# Images: ${REGISTRY}/rcm-pipeline-gpu:${TAG} and ${REGISTRY}/rcm-pipeline-cpu:${TAG}; put them in the
# overlay's kustomization.yaml (images:) and the execution config ("image").
set -euo pipefail
cd "$(dirname "$0")/../.."
what=${1:-all}
push=${2:-}
TAG=${TAG:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo dev)}
prefix=${REGISTRY:+${REGISTRY%/}/}
if ! command -v docker >/dev/null || ! docker info >/dev/null 2>&1; then
  echo "build.sh: no docker daemon here; lint only: .venv/bin/python -m pytest tests/test_infra_images.py" >&2
  exit 2
fi
export DOCKER_BUILDKIT=1
build() {   # kind
  local img="${prefix}rcm-pipeline-$1:${TAG}"
  local args=(--file "infra/docker/Dockerfile.$1" --tag "$img" --label "org.opencontainers.image.revision=${TAG}")
  if [ "$1" = cpu ] && [ -n "${TORCH_CPU_INDEX_URL:-}" ]; then args+=(--build-arg "TORCH_INDEX_URL=${TORCH_CPU_INDEX_URL}"); fi
  docker build "${args[@]}" .
  # smoke: the package imports and the process is not root
  docker run --rm --entrypoint python "$img" -c \
    "import os, rcm_core, rcm_steps; assert os.getuid() != 0, 'runs as root'; print('ok', os.getuid())"
  if [ "$push" = --push ]; then docker push "$img"; fi
  echo "built $img"
}
case "$what" in
  gpu|cpu) build "$what" ;;
  all) build cpu; build gpu ;;
  *) echo "usage: $0 [gpu|cpu|all] [--push]" >&2; exit 2 ;;
esac
