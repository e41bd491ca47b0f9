#!/usr/bin/env bash
# A throw-away PostgreSQL server on 127.0.0.1 for shared Optuna studies (tests, or trying it locally).
#
#   scripts/cluster/postgres.sh start DIR   # prints the storage URL (also written to DIR/url)
#   scripts/cluster/postgres.sh stop DIR    # fast shutdown of the server that `start DIR` started, by its pid
#
# initdb into DIR/pgdata, a free port on 127.0.0.1 only, trust authentication (loopback, tests only:
# a real cluster's server has passwords), one database `optuna` owned by role `flashlight`.
# PostgreSQL refuses to run as root: as root it runs as the `postgres` user (or `nobody`), so DIR must be
# reachable by that user (a fresh dir under /tmp is). Needs Debian's `postgresql` package.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
cmd=$1
mkdir -p "$2"
dir=$(cd "$2" && pwd)

# alive PID: running and not a zombie (an exited daemon whose parent has not reaped it yet)
alive() { kill -0 "$1" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }

stop() {
  [ -f "$dir/postgres.pid" ] || return 0
  local pid i
  pid=$(cat "$dir/postgres.pid")
  if alive "$pid"; then
    kill -INT "$pid" 2>/dev/null || true   # SIGINT = fast shutdown (does not wait for clients)
    for i in $(seq 200); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then
      echo "postgres.sh: postgres (pid $pid) did not stop in 20 s: SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$dir/postgres.pid"
}
if [ "$cmd" = stop ]; then stop; echo "postgres.sh: stopped the server in $dir"; exit 0; fi
[ "$cmd" = start ] || usage

bin=$(dirname "$(readlink -f "$(command -v initdb 2>/dev/null || ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1)")")
if [ ! -x "$bin/initdb" ] || [ ! -x "$bin/postgres" ]; then
  echo "postgres.sh: PostgreSQL server binaries not found (initdb, postgres): apt-get install postgresql" >&2
  exit 3
fi
if [ -f "$dir/postgres.pid" ] && alive "$(cat "$dir/postgres.pid")"; then
  echo "postgres.sh: a server is already running in $dir (stop it first: $0 stop $dir)" >&2
  exit 1
fi

as=()
if [ "$(id -u)" -eq 0 ]; then
  user=postgres
  id "$user" >/dev/null 2>&1 || user=nobody
  as=(setpriv --reuid="$user" --regid="$(id -g "$user")" --init-groups)
  chmod 711 "$dir"
  if ! "${as[@]}" test -x "$dir"; then
    echo "postgres.sh: user $user cannot reach $dir (its parents must be searchable); use a fresh dir under /tmp" >&2
    exit 1
  fi
fi
trap 'rc=$?; if [ $rc -ne 0 ]; then echo "postgres.sh: start failed, stopping what was started" >&2; stop; fi' EXIT

port=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
rm -rf "$dir/pgdata" "$dir/sock"
mkdir -p "$dir/pgdata" "$dir/sock"
[ ${#as[@]} -eq 0 ] || chown "$user": "$dir/pgdata" "$dir/sock"
"${as[@]}" "$bin/initdb" -D "$dir/pgdata" -U flashlight --auth=trust -E UTF8 --no-instructions \
  >"$dir/initdb.log" 2>&1 || { echo "postgres.sh: initdb failed:" >&2; tail -n 20 "$dir/initdb.log" >&2; exit 1; }

setsid "${as[@]}" "$bin/postgres" -D "$dir/pgdata" -h 127.0.0.1 -p "$port" -k "$dir/sock" \
  -c max_connections=200 >"$dir/postgres.log" 2>&1 </dev/null &
echo $! > "$dir/postgres.pid"
psql=("$bin/psql" -X -q -h 127.0.0.1 -p "$port" -U flashlight)
for i in $(seq 150); do
  "${psql[@]}" -d postgres -c "select 1" >/dev/null 2>&1 && break
  if ! alive "$(cat "$dir/postgres.pid")" || [ "$i" -eq 150 ]; then
    echo "postgres.sh: server did not come up; its log:" >&2; tail -n 20 "$dir/postgres.log" >&2; exit 1
  fi
  sleep 0.2
done
"${psql[@]}" -d postgres -c "CREATE DATABASE optuna"

url="postgresql+psycopg2://flashlight@127.0.0.1:$port/optuna"
echo "$url" > "$dir/url"
echo "postgres.sh: PostgreSQL on 127.0.0.1:$port, data in $dir/pgdata"
echo "  storage URL: $url"
echo "  stop:        $0 stop $dir"
