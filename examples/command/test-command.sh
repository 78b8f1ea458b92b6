#!/usr/bin/env bash
# Exercise the command HTTP API against a running server and agent:
# send, query, wait, list, cancel, and the error answers.
#
#   python -m trio_quiccmd.server                      # terminal 1
#   python -m trio_quiccmd.agent --id client-001       # terminal 2, same directory
#   ./examples/command/test-command.sh                 # terminal 3
#
# Settings (environment): BASE_URL (default http://127.0.0.1:8080),
# CLIENT_ID (default client-001), QUICCMD_TOKEN (an API token with role operate,
# for a server that requires one). Needs curl and python3 (to read JSON).
# Exits non-zero if any answer was not what the API promises.

set -euo pipefail

BASE_URL="${BASE_URL:-http://127.0.0.1:8080}"
CLIENT_ID="${CLIENT_ID:-client-001}"
FAILURES=0
STATUS=""
BODY=""

# request METHOD PATH [JSON_BODY]: sets STATUS (HTTP code) and BODY.
request() {
    local method=$1 path=$2 data=${3-} out
    local args=(-sS -X "$method" "$BASE_URL$path" -w $'\n%{http_code}')
    if [[ -n $data ]]; then
        args+=(-H 'Content-Type: application/json' --data-binary "$data")
    fi
    if [[ -n ${QUICCMD_TOKEN-} ]]; then
        args+=(-H "Authorization: Bearer $QUICCMD_TOKEN")
    fi
    if ! out=$(curl "${args[@]}"); then
        echo "Cannot reach $BASE_URL: is the server running? (python -m trio_quiccmd.server)" >&2
        exit 1
    fi
    STATUS=${out##*$'\n'}
    BODY=${out%$'\n'*}
}

# field NAME: a top-level field of BODY ("" if absent or null).
field() {
    python3 -c 'import json, sys
value = json.loads(sys.argv[1]).get(sys.argv[2])
print("" if value is None else value if isinstance(value, str) else json.dumps(value))' "$BODY" "$1"
}

show() {
    echo "HTTP $STATUS"
    python3 -m json.tool <<<"$BODY" 2>/dev/null || echo "$BODY"
}

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# expect HTTP_STATUS [COMMAND_STATUS]
expect() {
    local ok=1
    [[ $STATUS == "$1" ]] || ok=0
    if [[ $# -ge 2 && $(field status) != "$2" ]]; then ok=0; fi
    if ((ok)); then
        echo "ok: HTTP $STATUS${2:+, status $2}"
    else
        echo "FAIL: expected HTTP $1${2:+ and status $2}, got HTTP $STATUS${2:+ and status $(field status)}"
        FAILURES=$((FAILURES + 1))
    fi
}

step "Health and connected agents"
request GET /healthz
show
request GET /api/clients
show
if ! python3 -c 'import json, sys
sys.exit(not any(c["client_id"] == sys.argv[2] for c in json.loads(sys.argv[1])["clients"]))' \
    "$BODY" "$CLIENT_ID"; then
    echo "Agent $CLIENT_ID is not connected. Start it: python -m trio_quiccmd.agent --id $CLIENT_ID" >&2
    exit 1
fi

step "1. Send a command (returns at once, 202)"
request POST /api/command "{\"client_id\": \"$CLIENT_ID\", \"command_type\": \"echo\", \"payload\": {\"message\": \"hello\"}, \"timeout\": 30}"
show
expect 202
COMMAND_ID=$(field command_id)

step "2. Query it, long-polling up to 5 s for the result"
request GET "/api/command/$COMMAND_ID?wait=5"
show
expect 200 completed

step "3. Send and wait for the result in one call (wait: true)"
request POST /api/command "{\"client_id\": \"$CLIENT_ID\", \"command_type\": \"sysinfo\", \"wait\": true}"
show
expect 200 completed

step "4. The seed's restart command (client_example.py knows it; the bare agent answers unknown_command_type)"
request POST /api/command "{\"client_id\": \"$CLIENT_ID\", \"command_type\": \"restart\", \"payload\": {\"delay_seconds\": 1}, \"timeout\": 30, \"wait\": true}"
show
expect 200
echo "status=$(field status) error_code=$(field error_code)"

step "5. A command that fails carries an error_code"
request POST /api/command "{\"client_id\": \"$CLIENT_ID\", \"command_type\": \"fail\", \"payload\": {\"message\": \"disk on fire\"}, \"wait\": true}"
show
expect 200 failed

step "6. A command that outlives its timeout ends 'timeout'"
request POST /api/command "{\"client_id\": \"$CLIENT_ID\", \"command_type\": \"sleep\", \"payload\": {\"seconds\": 10}, \"timeout\": 1, \"wait\": true}"
show
expect 200 timeout

step "7. Cancel a running command"
request POST /api/command "{\"client_id\": \"$CLIENT_ID\", \"command_type\": \"sleep\", \"payload\": {\"seconds\": 30}, \"timeout\": 60}"
expect 202
SLOW_ID=$(field command_id)
request POST "/api/command/$SLOW_ID/cancel" '{"reason": "changed my mind"}'
show
expect 200 cancelled
echo "Cancelling it again is a conflict:"
request POST "/api/command/$SLOW_ID/cancel"
show
expect 409

step "8. List this agent's commands, newest first"
request GET "/api/commands?client_id=$CLIENT_ID&limit=5"
python3 -c 'import json, sys
page = json.loads(sys.argv[1])
for c in page["commands"]:
    print("  %s  %-10s %-10s %s" % (c["command_id"], c["command_type"], c["status"], c["error_code"] or ""))
print("  next_cursor:", page["next_cursor"])' "$BODY"
expect 200
request GET "/api/commands?client_id=$CLIENT_ID&status=cancelled&limit=1"
expect 200

step "9. Errors are JSON with a code"
echo "Unknown command id:"
request GET /api/command/no-such-command
show
expect 404
echo "Agent not connected (connect_timeout 0):"
request POST /api/command '{"client_id": "no-such-agent", "command_type": "echo"}'
show
expect 409 failed
echo "Bad input:"
request POST /api/command '{"client_id": "x", "command_type": "echo", "timeout": -1}'
show
expect 400
request POST /api/command '{not json'
show
expect 400

echo
if ((FAILURES)); then
    echo "$FAILURES check(s) failed."
    exit 1
fi
echo "All checks passed."
