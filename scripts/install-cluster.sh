#!/usr/bin/env bash
# Installs what `npm run cluster` runs: the Temporal server v1.29.1 and its SQL tool, the Temporal Web UI server
# (all three built from their Go modules into the project's cache, beside the Temporal CLI: none is on npm) and
# Debian's PostgreSQL (for a private database; not used when the cluster is given one). Prints what it found as
# name=value lines on stdout (server, sql, ui, schema, pgbin); everything else goes to stderr.
set -euo pipefail

server_version=v1.29.1 # later versions need a newer Go than Debian's and this machine's
ui_version=v2.42.1
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=lib/apt.sh
source "$root/scripts/lib/apt.sh"

server_dir="$root/.cache/temporal-server/$server_version"
# The UI server's binary is also called `server`: a directory of its own, or it would replace the Temporal server.
ui_dir="$root/.cache/temporal-ui/$ui_version"
mkdir -p "$root/.cache"
exec 9>"$root/.cache/.cluster-install.lock"
flock 9

need_go() {
  if ! command -v go >/dev/null 2>&1; then
    log "error: Go is needed to build the Temporal server $server_version, and 'go' is not on PATH."
    log "       Install Go 1.24 or newer (https://go.dev/doc/install or your distribution's golang package)."
    exit 1
  fi
}

build() { # build DIR VERSION PACKAGE...: go-installs the packages into DIR once; a marker is written last
  local dir=$1 version=$2
  shift 2
  if [ "$(cat "$dir/installed" 2>/dev/null)" = "$version" ]; then return; fi
  need_go
  log "Building $* into $dir (the first build takes a few minutes on two cores)..."
  local start
  start=$(date +%s)
  mkdir -p "$dir"
  GOBIN="$dir" GOFLAGS=-mod=mod go install -ldflags="-s -w" "$@" >&2
  echo "$version" >"$dir/installed"
  log "Built in $(($(date +%s) - start)) s."
}

build "$server_dir" "$server_version" "go.temporal.io/server/cmd/server@$server_version" \
  "go.temporal.io/server/cmd/tools/sql@$server_version"
build "$ui_dir" "$ui_version" "github.com/temporalio/ui-server/v2/cmd/server@$ui_version"

# The SQL schemas ship inside the server's module; go install left it in the module cache.
schema_file="$server_dir/schema-dir"
if [ ! -d "$(cat "$schema_file" 2>/dev/null)" ]; then
  need_go
  module_dir=$(GOFLAGS=-mod=mod go mod download -json "go.temporal.io/server@$server_version" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -d "$module_dir/schema/postgresql/v12" ] || {
    log "error: no schema/postgresql/v12 in the module go.temporal.io/server@$server_version ($module_dir)"
    exit 1
  }
  echo "$module_dir/schema/postgresql/v12" >"$schema_file"
fi

# PostgreSQL's server programs, for a private database (postgresql-common puts them outside PATH).
if [ -z "${PF_CLUSTER_PG_HOST:-}" ]; then
  apt_ensure postgresql
fi
pgbin=$(find /usr/lib/postgresql -maxdepth 3 -path '*/bin/initdb' 2>/dev/null | sort -V | tail -1 || true)

echo "server=$server_dir/server"
echo "sql=$server_dir/sql"
echo "ui=$ui_dir/server"
echo "schema=$(cat "$schema_file")"
echo "pgbin=${pgbin%/initdb}"
