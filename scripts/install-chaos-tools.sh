#!/usr/bin/env bash
# Builds what the fault suite's KVM rounds (npm run chaos -- --hypervisor kvm) need beyond the KVM packages, into the
# project's cache, from the Go module proxy:
#   - Toxiproxy's server (a TCP proxy with an HTTP API that cuts, stalls and slows connections): between the proxy
#     workers and each KVM host process;
#   - powercut (test/chaos/powercut/, our own code): a FUSE layer whose unflushed writes a simulated power cut drops,
#     under the DR host process's state.
# and makes sure of mkfs.ext4 and losetup (the DR storage's small filesystem of its own, which the suite fills).
# Idempotent: a build is redone only when its version or sources change. Prints the tools' directory on its last
# line; everything else goes to stderr.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
toxiproxy_version=v2.5.0 # the newest the Go module proxy serves under github.com/Shopify/toxiproxy/v2
cache="$root/.cache/chaos-tools"
powercut_src="$root/test/chaos/powercut"

# shellcheck source=lib/apt.sh
source "$root/scripts/lib/apt.sh"
apt_ensure e2fsprogs util-linux

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9 # test files and the suite may call this at the same time

need_go() {
  if ! command -v go >/dev/null 2>&1; then
    log "error: Go is needed to build $1, and 'go' is not on PATH. Install Go 1.24 or newer, then run again."
    exit 1
  fi
}

# Toxiproxy: `go install` names the binary after its package directory (server); kept as toxiproxy-server.
toxiproxy_dir="$cache/toxiproxy-$toxiproxy_version"
if [ ! -x "$toxiproxy_dir/toxiproxy-server" ]; then
  need_go "Toxiproxy $toxiproxy_version"
  log "Building Toxiproxy $toxiproxy_version from its Go module..."
  rm -rf "$toxiproxy_dir.build"
  mkdir -p "$toxiproxy_dir.build"
  GOBIN="$toxiproxy_dir.build" GOFLAGS=-mod=mod go install -ldflags="-s -w" \
    "github.com/Shopify/toxiproxy/v2/cmd/server@$toxiproxy_version" >&2
  mv "$toxiproxy_dir.build/server" "$toxiproxy_dir.build/toxiproxy-server"
  rm -rf "$toxiproxy_dir"
  mv "$toxiproxy_dir.build" "$toxiproxy_dir"
fi
ln -sfn "toxiproxy-$toxiproxy_version/toxiproxy-server" "$cache/toxiproxy-server"

# powercut: rebuilt when its sources change.
recipe=$(cat "$powercut_src/go.mod" "$powercut_src/go.sum" "$powercut_src"/*.go | sha256sum | cut -c1-16)
powercut_dir="$cache/powercut-$recipe"
if [ ! -x "$powercut_dir/powercut" ]; then
  need_go powercut
  log "Building powercut ($powercut_src)..."
  rm -rf "$powercut_dir.build"
  mkdir -p "$powercut_dir.build"
  (cd "$powercut_src" && GOFLAGS=-mod=mod go build -ldflags="-s -w" -o "$powercut_dir.build/powercut" .) >&2
  rm -rf "$powercut_dir"
  mv "$powercut_dir.build" "$powercut_dir"
  find "$cache" -mindepth 1 -maxdepth 1 -type d -name 'powercut-*' ! -name "powercut-$recipe" -exec rm -rf {} +
fi
ln -sfn "powercut-$recipe/powercut" "$cache/powercut"

log "Chaos tools ready."
echo "$cache"
