#!/usr/bin/env bash
# Installs the Temporal CLI (dev server with SQLite persistence and the Web UI) into the project's cache.
# It is not on npm, and the SDK's own server download needs hosts this project cannot reach, so it is
# built from its Go module (the Go module proxy is reachable). Prints the binary's path on its last line.
set -euo pipefail

version=v1.5.1 # later tags carry a replace directive and cannot be go-installed
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin_dir="$root/.cache/temporal-cli/$version"
binary="$bin_dir/temporal"
marker="$bin_dir/installed" # written only after a complete build: go-installed binaries report version 0.0.0-DEV

if [ -x "$binary" ] && [ "$(cat "$marker" 2>/dev/null)" = "$version" ] && "$binary" --version >/dev/null 2>&1; then
  echo "Temporal CLI $version already installed." >&2
  echo "$binary"
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  echo "error: Go is needed to build the Temporal CLI $version, and 'go' is not on PATH." >&2
  echo "       Install Go 1.24 or newer (https://go.dev/doc/install or your distribution's golang package), then run again." >&2
  exit 1
fi

echo "Building the Temporal CLI $version from its Go module into $bin_dir" >&2
echo "(the first build takes about three minutes on two cores; later runs reuse it)..." >&2
mkdir -p "$bin_dir"
start=$(date +%s)
GOBIN="$bin_dir" GOFLAGS=-mod=mod go install -ldflags="-s -w" "github.com/temporalio/cli/cmd/temporal@$version" >&2
"$binary" --version >&2
echo "$version" >"$marker"
echo "Built in $(($(date +%s) - start)) s." >&2
echo "$binary"
