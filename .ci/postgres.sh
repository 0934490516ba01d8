# Sourced by .ci/run: a throwaway PostgreSQL server on loopback for dept-tune's distributed-study test.
# Installs Debian's `postgresql` when it is missing, runs a private cluster in a temporary directory (as the
# postgres user when CI runs as root), and exports DEPT_TEST_POSTGRES_URL. The test skips without that variable.

start_postgres() {
    if ! ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    fi
    local bin
    bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
    PG_DIR="$(mktemp -d /tmp/dept-ci-postgres.XXXXXX)"
    local as=()
    if [[ "$(id -u)" == 0 ]]; then
        chown postgres "${PG_DIR}"
        as=(runuser -u postgres --)
    fi
    local port
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    "${as[@]}" "${bin}/initdb" -D "${PG_DIR}/data" -U postgres -A trust >/dev/null
    "${as[@]}" "${bin}/pg_ctl" -D "${PG_DIR}/data" -l "${PG_DIR}/server.log" -w \
        -o "-c listen_addresses=127.0.0.1 -p ${port} -k ${PG_DIR}" start >/dev/null
    PG_CTL=("${as[@]}" "${bin}/pg_ctl" -D "${PG_DIR}/data")
    "${bin}/psql" -q -h 127.0.0.1 -p "${port}" -U postgres \
        -c "CREATE USER dept PASSWORD 'dept'" -c "CREATE DATABASE dept_optuna OWNER dept"
    export DEPT_TEST_POSTGRES_URL="postgresql://dept:dept@127.0.0.1:${port}/dept_optuna"
    echo "PostgreSQL for the tests: ${DEPT_TEST_POSTGRES_URL}"
}

stop_postgres() {
    if [[ -n "${PG_DIR:-}" ]]; then
        "${PG_CTL[@]}" -m fast stop >/dev/null 2>&1 || true
        rm -rf "${PG_DIR}"
    fi
}
