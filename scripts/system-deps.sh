#!/usr/bin/env bash
# Installs the Debian packages named on the command line whose commands are missing.
# Without root or apt-get it only says what is missing: the service then uses the ffmpeg
# binary from the imageio-ffmpeg wheel, and tests that need a missing program skip with a reason.
set -euo pipefail
declare -A cmd_of=([ffmpeg]=ffmpeg [espeak-ng]=espeak-ng [sox]=sox [chromium]=chromium [prometheus]=promtool)
missing=()
for pkg in "$@"; do
  command -v "${cmd_of[$pkg]:-$pkg}" >/dev/null 2>&1 || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "warning: missing ${missing[*]} (no root/apt-get); install them for the full test suite" >&2
fi
