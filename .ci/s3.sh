# Sourced by .ci/run: an S3-compatible server (moto's standalone server, from the `test`
# extra) on a free loopback port, for the tests marked `s3`. Exports VIDU_TEST_S3_ENDPOINT
# and dummy AWS settings; s3_stop (a trap set here) ends the server when .ci/run exits.
s3_start() {
    local port
    port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    .venv/bin/python -m moto.server -H 127.0.0.1 -p "$port" >"${TMPDIR:-/tmp}/vidu-moto-$port.log" 2>&1 &
    S3_SERVER_PID=$!
    # Keep any EXIT trap already set (e.g. the PostgreSQL server's): stop both.
    local previous
    previous=$(trap -p EXIT | sed -E "s/^trap -- '(.*)' EXIT$/\1/")
    trap "s3_stop; ${previous}" EXIT
    for _ in $(seq 1 100); do
        if .venv/bin/python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/moto-api/')" 2>/dev/null; then
            export VIDU_TEST_S3_ENDPOINT="http://127.0.0.1:$port"
            export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
            echo "S3 test server (moto) on $VIDU_TEST_S3_ENDPOINT"
            return 0
        fi
        sleep 0.2
    done
    echo "the S3 test server did not start; see ${TMPDIR:-/tmp}/vidu-moto-$port.log" >&2
    return 1
}

s3_stop() {
    if [ -n "${S3_SERVER_PID:-}" ]; then
        kill "$S3_SERVER_PID" 2>/dev/null || true
        wait "$S3_SERVER_PID" 2>/dev/null || true
        S3_SERVER_PID=""
    fi
}
