#!/bin/sh
# Start the MLflow tracking server (basic-auth, Postgres backend, proxied GCS artifacts).
# Used by the container image and by the systemd unit. Secrets come from files (docker secrets,
# systemd credentials) or the environment; there is no default password anywhere.
set -eu

# read_secret VAR FILE_VAR: VAR from the environment, else from the file named by FILE_VAR.
read_secret() {
  eval "val=\${$1:-}"
  eval "file=\${$2:-}"
  if [ -z "$val" ] && [ -n "$file" ]; then
    [ -r "$file" ] || { echo "entrypoint: $2=$file is not readable" >&2; exit 2; }
    val=$(cat "$file")
  fi
  [ -n "$val" ] || { echo "entrypoint: set $1 or $2 (no default is provided)" >&2; exit 2; }
  printf '%s' "$val"
}

PGPASSWORD=$(read_secret POSTGRES_PASSWORD POSTGRES_PASSWORD_FILE)
MLFLOW_AUTH_ADMIN_PASSWORD=$(read_secret MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_AUTH_ADMIN_PASSWORD_FILE)
MLFLOW_FLASK_SERVER_SECRET_KEY=$(read_secret MLFLOW_FLASK_SERVER_SECRET_KEY MLFLOW_FLASK_SERVER_SECRET_KEY_FILE)
if [ "${#MLFLOW_AUTH_ADMIN_PASSWORD}" -lt 12 ]; then
  echo "entrypoint: the admin password must have at least 12 characters" >&2; exit 2
fi
export MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY

: "${POSTGRES_HOST:?set POSTGRES_HOST}" "${ARTIFACTS_DESTINATION:?set ARTIFACTS_DESTINATION (gs://BUCKET/PREFIX)}"
PGUSER=${POSTGRES_USER:-mlflow}
PGPORT=${POSTGRES_PORT:-5432}
BACKEND="postgresql+psycopg2://${PGUSER}@${POSTGRES_HOST}:${PGPORT}/${POSTGRES_DB:-mlflow}"
AUTH_DB="postgresql+psycopg2://${PGUSER}@${POSTGRES_HOST}:${PGPORT}/${POSTGRES_AUTH_DB:-mlflow_auth}"

# The DB password goes into a libpq password file in a private runtime dir: never into the command
# line (visible in `ps`) or the auth ini.
RUNTIME=${RUNTIME_DIRECTORY:-/tmp/mlflow-runtime}
mkdir -p "$RUNTIME" && chmod 700 "$RUNTIME"
umask 077
# Values reach python through its environment: argv would show the password in `ps`.
PGPASS_HOST="$POSTGRES_HOST" PGPASS_PORT="$PGPORT" PGPASS_USER="$PGUSER" PGPASS_PW="$PGPASSWORD" python -c '
import os
e = lambda s: s.replace("\\", "\\\\").replace(":", "\\:")
print(":".join([e(os.environ["PGPASS_HOST"]), os.environ["PGPASS_PORT"], "*",
                e(os.environ["PGPASS_USER"]), e(os.environ["PGPASS_PW"])]))' > "$RUNTIME/pgpass"
export PGPASSFILE="$RUNTIME/pgpass"
unset PGPASSWORD
sed "s|@AUTH_DATABASE_URI@|${AUTH_DB}|" "${AUTH_INI_TEMPLATE:-/etc/mlflow/basic_auth.ini}" > "$RUNTIME/basic_auth.ini"
export MLFLOW_AUTH_CONFIG_PATH="$RUNTIME/basic_auth.ini"
# GenAI evaluation jobs are not used by Flywheel; the job runner would add ~9 processes.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}

# Host-header check (DNS rebinding): MLflow's default allows localhost and private IPs on any port.
# A name you expose it under must be listed, with its port if clients send one ("host:*").
if [ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]; then
  set -- "$@" --allowed-hosts "$MLFLOW_ALLOWED_HOSTS"
fi

exec mlflow server \
  --backend-store-uri "$BACKEND" \
  --artifacts-destination "$ARTIFACTS_DESTINATION" --serve-artifacts \
  --app-name basic-auth \
  --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-4}" "$@"
