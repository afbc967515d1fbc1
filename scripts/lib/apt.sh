# Sourced by the install scripts: installing Debian packages as root (or through sudo), once, refreshing stale
# package lists when an install fails.

log() { echo "$@" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    log "error: installing packages needs root, and sudo is not available: run this script as root."
    exit 1
  fi
}

apt_install() {
  local cmd=(env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@")
  if ! as_root "${cmd[@]}" >&2; then
    # Most often the package lists are missing (a fresh container) or stale: refresh them once and retry.
    log "Installing $* failed; updating the package lists and retrying..."
    as_root apt-get update >&2
    as_root "${cmd[@]}" >&2
  fi
}

apt_ensure() { # apt_ensure PACKAGE...: installs those that are not installed yet
  local missing=() package
  for package in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("$package")
    fi
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "Installing ${missing[*]}..."
    apt_install "${missing[@]}"
  fi
}
