# Sourced by scripts/test and scripts/demo: makes sure a Postgres server answers and exports
# DATABASE_URL (an admin connection; tests create one database each).
#
# Order: an existing DATABASE_URL; a server on 127.0.0.1:5432 (trust auth, user postgres); else a
# private cluster from the local PostgreSQL binaries in .pg/ (stopped again on exit).

pg_bin_dir() {
  local d
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && { echo "$d"; return 0; }
  done
  return 1
}

ensure_postgres() {
  if [ -n "${DATABASE_URL:-}" ]; then
    echo "postgres: using DATABASE_URL"
    return 0
  fi
  if command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432 -U postgres; then
    export DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres
    echo "postgres: using the server on 127.0.0.1:5432"
    return 0
  fi
  local bin
  if ! bin=$(pg_bin_dir); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "postgres: no server and no PostgreSQL binaries; installing Debian's postgresql package"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    fi
    bin=$(pg_bin_dir) || {
      echo "error: no Postgres server on 127.0.0.1:5432 and no PostgreSQL binaries (initdb, pg_ctl) under /usr/lib/postgresql/*/bin; install Debian's 'postgresql' package or set DATABASE_URL" >&2
      return 1
    }
  fi
  local root="$PWD/.pg" port=5433 run=()
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    run=(runuser -u postgres --)
  fi
  rm -rf "$root"; mkdir -p "$root"
  [ "$(id -u)" = 0 ] && chown postgres: "$root"
  "${run[@]}" "$bin/initdb" -D "$root/data" -U postgres -A trust -E UTF8 --no-sync >"$root/initdb.log" 2>&1 \
    || { cat "$root/initdb.log" >&2; return 1; }
  "${run[@]}" "$bin/pg_ctl" -D "$root/data" -l "$root/log" -w \
    -o "-p $port -k $root -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=400" start >/dev/null \
    || { cat "$root/log" >&2; return 1; }
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
  PRIVATE_PG_STOP=("${run[@]}" "$bin/pg_ctl" -D "$root/data" -m fast -w stop)
  trap 'stop_private_postgres' EXIT
  echo "postgres: started a private cluster in $root on port $port"
}

stop_private_postgres() {
  if [ -n "${PRIVATE_PG_STOP:-}" ]; then
    "${PRIVATE_PG_STOP[@]}" >/dev/null 2>&1 || true
  fi
}
