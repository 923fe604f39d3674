#!/usr/bin/env bash
# What the browser and database tests need from the system, beside the Python packages: Debian's
# headless Chromium and its chromedriver (tests/ui/), and PostgreSQL's server binaries (the
# cluster and compose-stack tests start a real server). `make test` runs this first: it installs
# what is missing where it can (root, or sudo without a password, and apt-get), and otherwise
# stops with the one command to run. A second run changes nothing.
set -euo pipefail
packages=()
command -v chromium >/dev/null || packages+=(chromium)
command -v chromedriver >/dev/null || packages+=(chromium-driver)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || packages+=(postgresql)
[ ${#packages[@]} -eq 0 ] && exit 0
install="apt-get install -y --no-install-recommends ${packages[*]}"
if command -v apt-get >/dev/null; then
    if [ "$(id -u)" -eq 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo"; else sudo="no"; fi
    if [ "$sudo" != "no" ]; then
        echo "installing what the browser and database tests need: ${packages[*]}"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}"
        exit 0
    fi
fi
echo "error: the browser and database tests need ${packages[*]}; install them with: sudo $install" >&2
exit 1
