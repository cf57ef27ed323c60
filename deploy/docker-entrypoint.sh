#!/bin/sh
# Entry point of the Civitas container image.
#
# 1. Secrets from files (Docker/Compose secrets, Kubernetes secret volumes): for every
#    variable CIVITAS_<NAME>_FILE or PGPASSWORD_FILE that is set, export CIVITAS_<NAME>
#    (or PGPASSWORD) with the file's content, and unset the *_FILE variable. The secret
#    never appears in `docker inspect` or in the compose file.
# 2. `civitas serve ...`: first bring the database schema up to date (`civitas db upgrade`),
#    once, before any worker starts. Set CIVITAS_SKIP_DB_UPGRADE=1 to skip this (when
#    migrations run as a separate release step).
# 3. exec the command: it replaces this shell, so it receives the container's signals.
set -eu

for assignment in $(env | sed -n 's/^\(CIVITAS_[A-Z0-9_]*_FILE\)=.*/\1/p; s/^\(PGPASSWORD_FILE\)=.*/\1/p'); do
  name="${assignment%_FILE}"
  eval "file=\${$assignment}"
  # shellcheck disable=SC2154  # assigned by eval above
  if [ ! -r "$file" ]; then
    echo "civitas-entrypoint: $assignment names $file, which cannot be read" >&2
    exit 1
  fi
  eval "already=\${$name:-}"
  # shellcheck disable=SC2154
  if [ -n "$already" ]; then
    echo "civitas-entrypoint: give only one of $name and $assignment" >&2
    exit 1
  fi
  value="$(cat "$file")"
  export "$name=$value"
  unset "$assignment"
done

if [ "${1:-}" = "civitas" ] && [ "${2:-}" = "serve" ] && [ "${CIVITAS_SKIP_DB_UPGRADE:-0}" != "1" ]; then
  civitas db upgrade
fi

exec "$@"
