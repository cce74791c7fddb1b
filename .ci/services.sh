#!/usr/bin/env bash
# System services the slow tests need: PostgreSQL for tests/test_team_mlflow.py and
# tests/test_cluster.py (a team MLflow server with a PostgreSQL backend store), and
# headless Chromium with its WebDriver for tests/test_browser.py (Debian's `chromium` and
# `chromium-driver`: /usr/bin/chromium, /usr/bin/chromedriver).
#
# The tests start their own throw-away PostgreSQL (initdb in a temporary folder, a free
# loopback port), so all this script has to do is put the server binaries on the machine.
# It does not create or start the distribution's default cluster: nothing listens on 5432
# afterwards. Each check runs; `apt-get update` runs once, only when something is missing.
# Idempotent and fast when everything is there; needs root (or sudo) on Debian/Ubuntu only
# when it has to install something.
set -euo pipefail

have_postgres() {
    local bindir
    for bindir in /usr/lib/postgresql/*/bin; do
        [[ -x "$bindir/initdb" && -x "$bindir/postgres" ]] && return 0
    done
    command -v initdb >/dev/null 2>&1 && command -v postgres >/dev/null 2>&1
}

have_chromium() {
    [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]
}

if have_postgres; then
    echo "services: PostgreSQL server binaries present"
fi
if have_chromium; then
    echo "services: Chromium and chromedriver present"
fi
if have_postgres && have_chromium; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "services: PostgreSQL or Chromium is missing and this is not a Debian/Ubuntu machine;" \
         "install the PostgreSQL server (initdb, postgres) and Chromium with its chromedriver" \
         "with your package manager" >&2
    exit 1
fi

SUDO=()
if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { echo "services: run as root (or install sudo)" >&2; exit 1; }
    SUDO=(sudo)
fi

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq

if ! have_postgres; then
    echo "services: installing PostgreSQL (apt-get)"
    # postgresql-common first, so that the package's default cluster (and its service on
    # port 5432) is never created: the tests run their own instance on a free port.
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends postgresql-common >/dev/null
    if [[ -f /etc/postgresql-common/createcluster.conf ]]; then
        "${SUDO[@]}" sed -i 's/^#\?\s*create_main_cluster\s*=.*/create_main_cluster = false/' \
            /etc/postgresql-common/createcluster.conf
    fi
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends postgresql >/dev/null

    have_postgres || { echo "services: PostgreSQL installed but initdb/postgres not found" >&2; exit 1; }
    # Root cannot run postgres; the package creates the unprivileged `postgres` account the
    # tests switch to when they run as root.
    id postgres >/dev/null 2>&1 || { echo "services: no 'postgres' user after install" >&2; exit 1; }
    echo "services: PostgreSQL ready: $(ls -d /usr/lib/postgresql/*/bin | tail -n1)"
fi

if ! have_chromium; then
    echo "services: installing Chromium and chromedriver (apt-get)"
    # Debian's own builds: no snap wrapper (Ubuntu's chromium package is one), and the
    # driver always matches the browser's version.
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
    have_chromium || { echo "services: chromium installed but /usr/bin/chromium or /usr/bin/chromedriver" \
                            "is missing" >&2; exit 1; }
    echo "services: Chromium ready: $(/usr/bin/chromium --version 2>/dev/null | head -n1)"
fi
