#!/usr/bin/env bash
# Throwaway PostgreSQL cluster for tests and local runs (no Docker, no system service).
#
#   infra/postgres/pg.sh up       initdb once, start on 127.0.0.1:$PG_PORT, create role + databases
#   infra/postgres/pg.sh down     stop it
#   infra/postgres/pg.sh status   "postgres: up (...)" and exit 0, or "postgres: down" and exit 1
#   infra/postgres/pg.sh url [DB] SQLAlchemy URL, e.g. postgresql+psycopg://gridloop:gridloop@127.0.0.1:5433/gridloop
#   infra/postgres/pg.sh reset    down, then delete the cluster (clean slate)
#
# State lives in $GRIDLOOP_VAR_DIR/postgres (default: var/postgres at the repository root):
#   data/  postgres.log  run/ (unix socket)
# Run as root, the server runs as the unprivileged OS user "postgres" (created if missing);
# run as any other user, it runs as that user.
#
# `up` creates the login role gridloop (password gridloop, superuser: test-only), the database
# gridloop, and the per-service databases of infra/postgres/init.sql (intake, dispatch, ...).
#
# Environment:
#   GRIDLOOP_VAR_DIR  runtime state root (default <repo>/var)
#   PG_PORT       TCP port on 127.0.0.1 (default 5433)
#   PG_BIN        directory with initdb/pg_ctl/psql (default: newest /usr/lib/postgresql/*/bin)
#   PG_USER       OS user for the server when run as root (default postgres)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"

VAR_ROOT="${GRIDLOOP_VAR_DIR:-$ROOT/var}"
case "$VAR_ROOT" in
  /*) ;;
  *) VAR_ROOT="$PWD/$VAR_ROOT" ;;
esac
LINK="$VAR_ROOT/postgres"

HOST=127.0.0.1
PORT="${PG_PORT:-5433}"

# Where the cluster lives: var/postgres, or the directory var/postgres links to (see prepare_dirs).
set_paths() {
  STATE="$1"
  DATA="$STATE/data"
  LOG="$STATE/postgres.log"
  SOCKDIR="$STATE/run"
  # Unix socket paths are limited to 107 bytes: a deep checkout gets a short one under /tmp.
  if ((${#SOCKDIR} + 16 > 100)); then
    SOCKDIR="/tmp/gridloop-pg-$(printf '%s' "$STATE" | cksum | cut -d' ' -f1)"
  fi
}
if [[ -L "$LINK" ]]; then
  set_paths "$(readlink -f "$LINK")"
else
  set_paths "$LINK"
fi
OS_USER="${PG_USER:-postgres}"
DB_USER=gridloop
DB_PASSWORD=gridloop
DB_NAME=gridloop
INIT_SQL="$HERE/init.sql"

die() {
  printf 'postgres: %s\n' "$*" >&2
  exit 1
}

say() {
  printf 'postgres: %s\n' "$*"
}

find_bin() {
  local dir
  if [[ -n "${PG_BIN:-}" ]]; then
    [[ -x "$PG_BIN/pg_ctl" ]] || die "PG_BIN=$PG_BIN has no pg_ctl"
    printf '%s\n' "$PG_BIN"
    return 0
  fi
  dir="$(
    for d in /usr/lib/postgresql/*/bin; do
      [[ -x "$d/initdb" && -x "$d/pg_ctl" ]] && printf '%s\n' "$d"
    done | sort -V | tail -n 1
  )"
  if [[ -z "$dir" ]] && command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1; then
    dir="$(dirname "$(command -v pg_ctl)")"
  fi
  [[ -n "$dir" ]] || die "PostgreSQL server binaries not found (looked in /usr/lib/postgresql/*/bin and PATH); Debian: apt-get install postgresql, or set PG_BIN"
  printf '%s\n' "$dir"
}

is_root() {
  [[ "$(id -u)" == 0 ]]
}

# Run a PostgreSQL binary as the server's OS user, from a directory that user can read.
as_pg() {
  if is_root; then
    (cd / && runuser -u "$OS_USER" -- "$@")
  else
    (cd / && "$@")
  fi
}

ensure_os_user() {
  is_root || return 0
  if ! id -u "$OS_USER" >/dev/null 2>&1; then
    say "creating OS user $OS_USER"
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin "$OS_USER"
  fi
}

prepare_dirs() {
  local real
  mkdir -p "$VAR_ROOT"
  if is_root && [[ ! -L "$LINK" ]] && ! as_pg test -x "$VAR_ROOT"; then
    # The checkout is not reachable by the server's user (e.g. under /root): keep the
    # cluster in /tmp and link it from var/postgres.
    real="/tmp/gridloop-postgres-$(printf '%s' "$VAR_ROOT" | cksum | cut -d' ' -f1)"
    mkdir -p "$real"
    rm -rf "$LINK"
    ln -s "$real" "$LINK"
    say "$OS_USER cannot reach ${VAR_ROOT}; the cluster lives in $real (linked from $LINK)"
    set_paths "$real"
  fi
  mkdir -p "$STATE" "$SOCKDIR"
  if is_root; then
    chown -R "$OS_USER:" "$STATE" "$SOCKDIR"
    as_pg test -w "$STATE" || die "OS user $OS_USER cannot write $STATE"
  fi
  chmod 700 "$SOCKDIR"
}

server_pid() {
  [[ -f "$DATA/postmaster.pid" ]] || return 1
  local pid
  pid="$(head -n 1 "$DATA/postmaster.pid" | tr -dc '0-9')"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  [[ "$(ps -o comm= -p "$pid" 2>/dev/null)" == postgres* ]] || return 1
  [[ "$(ps -o stat= -p "$pid" 2>/dev/null)" != Z* ]] || return 1
  printf '%s\n' "$pid"
}

is_ready() {
  "$BIN/pg_isready" -q -h "$HOST" -p "$PORT" -t 2 >/dev/null 2>&1
}

server_version() {
  "$BIN/postgres" --version 2>/dev/null | sed -n 's/^postgres (PostgreSQL) \([^ ]*\).*/\1/p'
}

psql_admin() {
  as_pg "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$SOCKDIR" -p "$PORT" -U postgres "$@"
}

init_cluster() {
  [[ -f "$DATA/PG_VERSION" ]] && return 0
  say "initdb in ${DATA#"$ROOT"/} ($("$BIN/initdb" --version))"
  local out
  if ! out="$(as_pg "$BIN/initdb" -D "$DATA" -U postgres --encoding=UTF8 --locale=C \
    --auth-local=trust --auth-host=scram-sha-256 2>&1)"; then
    printf '%s\n' "$out" >&2
    die "initdb failed"
  fi
  # Throwaway cluster: durability off for speed.
  as_pg tee -a "$DATA/postgresql.conf" >/dev/null <<'EOF'

# ---- added by infra/postgres/pg.sh (throwaway test cluster) ----
listen_addresses = '127.0.0.1'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
log_min_messages = warning
EOF
}

ensure_databases() {
  psql_admin -d postgres <<EOF
SELECT format('CREATE ROLE %I LOGIN SUPERUSER', '$DB_USER')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$DB_USER')
\\gexec
ALTER ROLE $DB_USER WITH LOGIN SUPERUSER PASSWORD '$DB_PASSWORD';
SELECT format('CREATE DATABASE %I OWNER %I', '$DB_NAME', '$DB_USER')
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = '$DB_NAME')
\\gexec
EOF
  if [[ -f "$INIT_SQL" ]]; then
    psql_admin -d postgres <"$INIT_SQL"
  fi
}

cmd_up() {
  local pid deadline
  ensure_os_user
  prepare_dirs
  if pid="$(server_pid)" && is_ready; then
    ensure_databases
    say "already up (pid $pid, PostgreSQL $(server_version), $HOST:$PORT)"
    return 0
  fi
  init_cluster
  if ! server_pid >/dev/null; then
    if "$BIN/pg_isready" -q -h "$HOST" -p "$PORT" -t 2 >/dev/null 2>&1; then
      die "$HOST:$PORT is already served by another PostgreSQL; stop it or set PG_PORT"
    fi
    as_pg "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -s -w -t 60 start \
      -o "-p $PORT -k $SOCKDIR -c listen_addresses=$HOST" \
      || {
        tail -n 40 "$LOG" >&2 || true
        die "pg_ctl start failed (log: $LOG)"
      }
  fi
  deadline=$((SECONDS + 60))
  until is_ready; do
    if ((SECONDS >= deadline)); then
      tail -n 40 "$LOG" >&2 || true
      die "not ready on $HOST:$PORT after 60s"
    fi
    sleep 0.5
  done
  ensure_databases
  pid="$(server_pid)"
  say "up on $HOST:$PORT (PostgreSQL $(server_version), pid $pid)"
}

cmd_down() {
  if server_pid >/dev/null; then
    if ! as_pg "$BIN/pg_ctl" -D "$DATA" -s -m fast -w -t 30 stop; then
      as_pg "$BIN/pg_ctl" -D "$DATA" -s -m immediate -w -t 30 stop || true
    fi
  fi
  say "down"
}

cmd_status() {
  local pid
  if pid="$(server_pid)" && is_ready; then
    say "up (pid $pid, PostgreSQL $(server_version), $HOST:$PORT)"
    return 0
  fi
  say "down"
  return 1
}

cmd_url() {
  local db="${1:-$DB_NAME}"
  printf 'postgresql+psycopg://%s:%s@%s:%s/%s\n' "$DB_USER" "$DB_PASSWORD" "$HOST" "$PORT" "$db"
}

remove_state() {
  rm -rf "$STATE" "$LINK"
  [[ "$SOCKDIR" == /tmp/gridloop-pg-* ]] && rm -rf "$SOCKDIR"
  return 0
}

cmd_reset() {
  cmd_down
  remove_state
  say "state removed (${LINK#"$ROOT"/})"
}

usage() {
  # The comment block at the top of this file.
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}

main() {
  local cmd="${1:-}"
  case "$cmd" in
    url)
      shift
      cmd_url "$@"
      return 0
      ;;
    -h | --help | help)
      usage
      return 0
      ;;
    down | reset)
      # Nothing running: no need for the binaries (they may not even be installed).
      if ! server_pid >/dev/null; then
        [[ "$cmd" == reset ]] && remove_state
        say "down"
        return 0
      fi
      ;;
    status)
      if ! server_pid >/dev/null; then
        say "down"
        return 1
      fi
      ;;
    up) ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
  BIN="$(find_bin)"
  case "$cmd" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    reset) cmd_reset ;;
  esac
}

main "$@"
