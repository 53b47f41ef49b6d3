#!/usr/bin/env bash
# Write an overlay's Secret inputs (git-ignored env files) with fresh random values:
#   bash infra/k8s/make-secrets.sh overlays/local        (existing files are kept; --force overwrites)
# The flows' pods read MLFLOW_TRACKING_USERNAME/PASSWORD from rcm-mlflow-client: here the admin user;
# on a shared server create a user for them with MLflow's auth API and put its password there.
set -euo pipefail
cd "$(dirname "$0")"
dir=${1:?usage: make-secrets.sh overlays/<name> [--force]}/secrets
force=${2:-}
mkdir -p "$dir"
rnd() { python3 -c 'import secrets; print(secrets.token_hex(20))'; }
write() {   # file, content
  if [ -e "$dir/$1" ] && [ "$force" != --force ]; then echo "keep $dir/$1"; return; fi
  umask 077; printf '%s\n' "$2" > "$dir/$1"; echo "wrote $dir/$1"
}
admin=$(rnd)
write postgres.env "POSTGRES_USER=rcm
POSTGRES_PASSWORD=$(rnd)"
write s3.env "AWS_ACCESS_KEY_ID=rcm$(rnd | cut -c1-17)
AWS_SECRET_ACCESS_KEY=$(rnd)"
write mlflow-admin.env "MLFLOW_AUTH_ADMIN_PASSWORD=$admin
MLFLOW_FLASK_SERVER_SECRET_KEY=$(rnd)"
write mlflow-client.env "MLFLOW_TRACKING_USERNAME=admin
MLFLOW_TRACKING_PASSWORD=$admin"
