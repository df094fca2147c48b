# Sourced by .ci/run (and usable by hand): makes a NATS server with JetStream available
# for the change-feed tests and exports QS_TEST_NATS_URL.
#
# 1. QS_TEST_NATS_URL already set: use it.
# 2. A server answering on 127.0.0.1:4222 with JetStream on: use it.
# 3. Otherwise install Debian's nats-server if missing, start one with JetStream in a
#    temporary directory on a free port, and use that.

nats_has_jetstream() {
  # The server's first line (INFO {...}) says whether JetStream is on.
  timeout 3 bash -c "exec 3<>/dev/tcp/$1/$2 && head -n 1 <&3" 2>/dev/null \
    | grep -q '"jetstream":true'
}

ensure_nats() {
  if [ -n "${QS_TEST_NATS_URL:-}" ]; then
    echo "nats: using QS_TEST_NATS_URL from the environment" >&2
    return 0
  fi
  if nats_has_jetstream 127.0.0.1 4222; then
    export QS_TEST_NATS_URL="nats://127.0.0.1:4222"
    echo "nats: using the server on 127.0.0.1:4222" >&2
    return 0
  fi
  ensure_packages nats-server
  local dir port
  dir=$(mktemp -d /tmp/qs-nats.XXXXXX)
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  nats-server -js -a 127.0.0.1 -p "$port" -sd "$dir/jetstream" >"$dir/log" 2>&1 &
  local tries=0
  until nats_has_jetstream 127.0.0.1 "$port"; do
    tries=$((tries + 1))
    if [ "$tries" -gt 100 ]; then
      echo "nats: the server did not start with JetStream on port $port:" >&2
      cat "$dir/log" >&2
      return 1
    fi
    sleep 0.1
  done
  export QS_TEST_NATS_URL="nats://127.0.0.1:$port"
  echo "nats: started a private server on port $port ($dir)" >&2
}
