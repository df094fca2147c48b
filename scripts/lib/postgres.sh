# Sourced by .ci/run (and usable by hand): makes a PostgreSQL server available for the
# store conformance suite and exports QS_TEST_POSTGRES_URL.
#
# 1. QS_TEST_POSTGRES_URL already set: use it.
# 2. A server answering on 127.0.0.1:5432 as `postgres` without a password: use it, with a
#    database `qs_test`.
# 3. Otherwise install Debian's postgresql if missing, start a private cluster in a
#    temporary directory on a free port, and use that.

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

ensure_postgres() {
  if [ -n "${QS_TEST_POSTGRES_URL:-}" ]; then
    echo "postgres: using QS_TEST_POSTGRES_URL from the environment" >&2
    return 0
  fi
  if command -v psql >/dev/null 2>&1 \
    && psql "postgres://postgres@127.0.0.1:5432/postgres" -tAc 'select 1' >/dev/null 2>&1; then
    psql "postgres://postgres@127.0.0.1:5432/postgres" -tAc "select 1 from pg_database where datname = 'qs_test'" | grep -q 1 \
      || psql "postgres://postgres@127.0.0.1:5432/postgres" -qc 'create database qs_test'
    export QS_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:5432/qs_test"
    echo "postgres: using the server on 127.0.0.1:5432" >&2
    return 0
  fi
  ensure_packages postgresql
  local bin
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  local dir port
  dir=$(mktemp -d /tmp/qs-postgres.XXXXXX)
  port=$(free_port)
  chown postgres:postgres "$dir"
  runuser -u postgres -- "$bin/initdb" -D "$dir/data" -U postgres --auth=trust >/dev/null
  runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
  psql "postgres://postgres@127.0.0.1:$port/postgres" -qc 'create database qs_test'
  export QS_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$port/qs_test"
  echo "postgres: started a private cluster on port $port ($dir)" >&2
}
