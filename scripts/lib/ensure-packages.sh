# Sourced by the scripts: installs the Debian packages a build or test needs when they are
# absent, so a fresh machine with only the Rust toolchain gets going with one command.

# Debian packages the workspace's build needs beyond the Rust toolchain and gcc: cmake,
# for pingora's zlib-ng (libz-ng-sys).
BUILD_PACKAGES=(cmake)

# apt-installs each named package whose command or status is missing.
ensure_packages() {
  local missing=()
  local package
  for package in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$package")
    fi
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    return 0
  fi
  echo "installing missing packages: ${missing[*]}" >&2
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

ensure_build_packages() {
  ensure_packages ${BUILD_PACKAGES[@]+"${BUILD_PACKAGES[@]}"}
}
