#!/usr/bin/env bash
# A throw-away PostgreSQL cluster for the test suite; safe to run again (it reuses a running one).
#   tools/postgres.sh           install PostgreSQL if missing (apt-get), start the cluster and print
#                               its URL on stdout, e.g. postgresql://fleetlite:fleetlite@127.0.0.1:54321/fleetlite
#   tools/postgres.sh --export  print `export FLEETLITE_TEST_PG_URL=...` instead (for eval)
#   tools/postgres.sh --stop    stop the cluster (its data directory stays for the next start)
# Typical use: export FLEETLITE_TEST_PG_URL="$(bash tools/postgres.sh)"
#
# The cluster is our own (initdb), not the distribution's `main` cluster: it lives in
# $FLEETLITE_PG_DIR (default /tmp/fleetlite-pg-$USER), listens on 127.0.0.1 on a free port and on a
# unix socket in that directory, and runs with fsync off -- test data only. initdb refuses to run as
# root, so as root the server runs as the `postgres` user. Progress goes to stderr.
set -euo pipefail

MODE=url
for arg in "$@"; do
  case "$arg" in
    --export) MODE=export ;;
    --stop) MODE=stop ;;
    *) echo "postgres.sh: unknown option $arg (use --export or --stop)" >&2; exit 2 ;;
  esac
done

DIR="${FLEETLITE_PG_DIR:-${TMPDIR:-/tmp}/fleetlite-pg-$(id -un)}"
USER_NAME=fleetlite
PASSWORD=fleetlite
DB_NAME=fleetlite
say() { echo "postgres.sh: $*" >&2; }

find_bindir() {
  local dir
  dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
  if [ -n "$dir" ] && [ -x "$dir/initdb" ]; then echo "$dir"; return; fi
  if command -v initdb >/dev/null; then dirname "$(command -v initdb)"; fi
}

BINDIR="$(find_bindir)"
if [ -z "$BINDIR" ]; then
  if [ "$MODE" = stop ]; then exit 0; fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    say "PostgreSQL is not installed: run 'sudo apt-get install postgresql' (or your system's" \
        "equivalent) and try again"
    exit 1
  fi
  say "installing PostgreSQL (apt-get install postgresql)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  BINDIR="$(find_bindir)"
  [ -n "$BINDIR" ] || { say "apt-get installed postgresql but no initdb was found"; exit 1; }
fi

# Run the server's programs as `postgres` when we are root (initdb and postgres refuse root).
AS=()
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || { say "as root, a 'postgres' system user is needed"; exit 1; }
  AS=(runuser -u postgres --)
fi
pg_ctl() { "${AS[@]}" "$BINDIR/pg_ctl" -D "$DIR" "$@"; }
running() { [ -f "$DIR/PG_VERSION" ] && pg_ctl status >/dev/null 2>&1; }

if [ "$MODE" = stop ]; then
  if running; then pg_ctl -m fast -w stop >/dev/null; say "stopped the cluster in $DIR"; fi
  exit 0
fi

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
  local port=$((20000 + RANDOM % 30000)) tries=0
  while port_in_use "$port"; do
    port=$((20000 + RANDOM % 30000)); tries=$((tries + 1))
    [ "$tries" -lt 100 ] || { say "found no free TCP port"; exit 1; }
  done
  echo "$port"
}
write_settings() {  # $1 = port
  "${AS[@]}" tee "$DIR/conf.d/fleetlite.conf" >/dev/null <<EOF
# Written by tools/postgres.sh: a disposable test cluster (durability off for speed).
port = $1
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
}

SERVER_MAJOR="$(basename "$(dirname "$BINDIR")")"
if [ -f "$DIR/PG_VERSION" ] && [ "$(cat "$DIR/PG_VERSION")" != "$SERVER_MAJOR" ] \
    && [[ "$SERVER_MAJOR" =~ ^[0-9]+$ ]] && ! running; then
  say "the cluster in $DIR is from PostgreSQL $(cat "$DIR/PG_VERSION"); recreating it"
  rm -rf "$DIR"
fi
if [ ! -f "$DIR/PG_VERSION" ]; then
  say "creating a cluster in $DIR ($("$BINDIR/postgres" --version))"
  rm -rf "$DIR"
  mkdir -p "$DIR"
  chmod 700 "$DIR"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$DIR"; fi
  "${AS[@]}" "$BINDIR/initdb" -D "$DIR" -U postgres -E UTF8 --no-locale \
    --auth-local=trust --auth-host=scram-sha-256 >"$DIR.initdb.log" 2>&1 \
    || { cat "$DIR.initdb.log" >&2; exit 1; }
  rm -f "$DIR.initdb.log"
  "${AS[@]}" mkdir -p "$DIR/conf.d"
  echo "include_dir = 'conf.d'" | "${AS[@]}" tee -a "$DIR/postgresql.conf" >/dev/null
  write_settings "$(free_port)"
fi

PORT="$(sed -n 's/^port = \([0-9]*\)$/\1/p' "$DIR/conf.d/fleetlite.conf")"
if ! running; then
  if port_in_use "$PORT"; then
    PORT="$(free_port)"
    write_settings "$PORT"
  fi
  say "starting PostgreSQL on 127.0.0.1:$PORT (log: $DIR/server.log)"
  pg_ctl -l "$DIR/server.log" -w -t 60 start >/dev/null \
    || { tail -n 20 "$DIR/server.log" >&2; exit 1; }
fi

# The test role may create databases: the tests make a fresh one per test.
"${AS[@]}" "$BINDIR/psql" -h "$DIR" -p "$PORT" -U postgres -d postgres -q -v ON_ERROR_STOP=1 \
  >/dev/null <<EOF
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$USER_NAME') THEN
    CREATE ROLE $USER_NAME LOGIN CREATEDB PASSWORD '$PASSWORD';
  END IF;
END \$\$;
SELECT 'CREATE DATABASE $DB_NAME OWNER $USER_NAME'
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$DB_NAME') \gexec
EOF

URL="postgresql://$USER_NAME:$PASSWORD@127.0.0.1:$PORT/$DB_NAME"
if [ "$MODE" = export ]; then echo "export FLEETLITE_TEST_PG_URL='$URL'"; else echo "$URL"; fi
