# scripts/packages.sh — sourced by setup.sh and bench.sh (not run on its own):
#   install_missing_packages NEEDS PACKAGE...
# installs the Debian packages among PACKAGE... that are missing, with
# apt-get as root or through sudo otherwise; when all are present, apt is not
# touched. Without dpkg nothing is installed, and NEEDS (what the caller
# requires, in words) is logged instead. The caller defines log().

as_root() {
  if [[ $(id -u) -eq 0 ]]; then
    "$@"
  else
    sudo "$@"
  fi
}

install_missing_packages() {
  local needs="$1"
  shift
  if ! command -v dpkg >/dev/null 2>&1; then
    log "dpkg not found, so not installing anything: this needs $needs"
    return 0
  fi
  local missing=() package
  for package in "$@"; do
    if ! dpkg -s "$package" 2>/dev/null | grep -q '^Status: install ok installed'; then
      missing+=("$package")
    fi
  done
  if ((${#missing[@]} == 0)); then
    return 0
  fi
  log "installing the missing packages: ${missing[*]}"
  as_root apt-get update
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
}
