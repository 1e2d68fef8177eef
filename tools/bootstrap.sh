#!/usr/bin/env bash
# Install everything spamflow needs on Debian 12 (as root), then run the demo or the tests.
#
#   bash tools/bootstrap.sh demo [spamflow demo options]
#   bash tools/bootstrap.sh test [pytest options]
set -euo pipefail

usage() {
    echo "usage: bash tools/bootstrap.sh {demo|test} [options passed on]" >&2
    exit 2
}

[ $# -ge 1 ] || usage
action=$1
shift
case "$action" in
    demo|test) ;;
    *) usage ;;
esac

if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: must run as root (network namespaces, NFQUEUE, Postfix)" >&2
    exit 1
fi

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

apt_packages=(
    spamassassin spamd spamc postfix iptables iproute2 procps
    libnetfilter-queue-dev libnfnetlink-dev gcc python3-dev python3-venv
)

# Ask apt only for what is missing, so that a prepared machine starts at once.
missing=()
for package in "${apt_packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "bootstrap: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # "No configuration" keeps the system Postfix unconfigured and stopped: the testbed
    # runs its own private instance.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
    echo "bootstrap: creating the virtualenv .venv"
    python3 -m venv .venv
fi
echo "bootstrap: installing spamflow and its Python dependencies into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,plot]'

case "$action" in
    demo) exec .venv/bin/spamflow demo "$@" ;;
    test) exec .venv/bin/python -m pytest "$@" ;;
esac
