#!/usr/bin/env bash
# Instruction-count profile of the ostp server and client moving bytes (callgrind, repeatable:
# no hardware counters needed).
#
#   bash benches/profile.sh            # profiles the server, then the client
#   SIDE=client bash benches/profile.sh
#
# Builds the release binary with line tables and no strip into its own target directory (the
# release profile's optimisation and LTO stay as they are, so the profile is of what ships),
# starts the bulk_http example as origin, an ostp server and client on loopback, and runs ONE of
# them under `valgrind --tool=callgrind`. Counters are zeroed just before a SIZE_MB download
# through the client's SOCKS5 port and dumped just after it, so start-up and handshake are not
# in the figures. Prints instructions per MB and the top TOP functions by inclusive and by self
# cost. With fat LTO most of the data plane is inlined into a few loop functions, so a second
# table ranks source files (the inlined code keeps its own file in the line tables).
#
# Tunables (environment): SIDE (server | client | both, default both), SIZE_MB (50), TOP (20),
# CARRIER (udp | uot: the client uses the TCP carrier; default udp),
# NO_BUILD=1 (reuse the last profiling build), OSTP_BIN (profile this binary instead; it needs
# symbols), KEEP=1 (keep the work directory with the callgrind.out files). Requires curl.

set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PROF_TARGET=${PROF_TARGET:-$ROOT/target/profiling}
SIDE=${SIDE:-both}
CARRIER=${CARRIER:-udp}
SIZE_MB=${SIZE_MB:-50}
TOP=${TOP:-20}
OSTP=${OSTP_BIN:-$PROF_TARGET/release/ostp}
BULK="$PROF_TARGET/release/examples/bulk_http"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ostp-profile.XXXXXX")
PIDS=()

log() { echo "[profile] $*" >&2; }

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null
    done
    if [[ -n ${KEEP:-} ]]; then
        log "kept $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    local p hex
    while :; do
        p=$((20000 + RANDOM % 40000))
        hex=$(printf ':%04X ' "$p")
        grep -q "$hex" /proc/net/tcp /proc/net/tcp6 /proc/net/udp /proc/net/udp6 2>/dev/null || break
    done
    echo "$p"
}

wait_tcp() {
    local port=$1 deadline=$((SECONDS + ${2:-10}))
    while ((SECONDS < deadline)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.2
    done
    return 1
}

start() {
    local name=$1
    shift
    "$@" >"$WORK/$name.out" 2>"$WORK/$name.log" &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
}

hex16() { od -An -tx1 -N16 /dev/urandom | tr -d ' \n'; }

# ---------------------------------------------------------------------------------------------
# tools and build

if ! command -v valgrind >/dev/null || ! command -v callgrind_annotate >/dev/null; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        log "installing valgrind (apt-get)"
        timeout 300 apt-get install -y -qq valgrind >/dev/null 2>&1 ||
            { timeout 120 apt-get update -qq >/dev/null 2>&1 &&
                timeout 300 apt-get install -y -qq valgrind >/dev/null 2>&1; }
    fi
    command -v valgrind >/dev/null || { echo "valgrind is required" >&2; exit 1; }
fi

if [[ -z ${NO_BUILD:-} ]]; then
    log "building release with line tables into $PROF_TARGET"
    # Two builds, as in tunnel.sh: built together, the example's dev-dependency would switch the
    # test-util feature on in the profiled binary too.
    for what in "--example bulk_http" "--bin ostp"; do
        # shellcheck disable=SC2086
        (cd "$ROOT" && CARGO_TARGET_DIR=$PROF_TARGET CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
            CARGO_PROFILE_RELEASE_STRIP=false cargo build --release $what) >&2 ||
            { echo "build failed" >&2; exit 1; }
    done
fi
[[ -x $OSTP && -x $BULK ]] || { echo "missing $OSTP or $BULK (run without NO_BUILD)" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# one profiled run

# selfcost FILE MODE: self cost per function (MODE fn) or per source file (MODE file) from a
# callgrind.out file, largest first. callgrind_annotate's own self view mixes inlined code into
# the thread entry points in LTO builds, so the format is read directly: each cost line belongs
# to the current fn= (function) and fl=/fi=/fe= (source file); the line after calls= is the
# callee's inclusive cost and is skipped.
selfcost() {
    awk -v mode="$2" '
        function nm(kind, v,   id, rest) {
            id = v; sub(/\).*/, "", id); sub(/^\(/, "", id)
            rest = v; if (sub(/^\([0-9]+\) /, "", rest)) names[kind, id] = rest
            return names[kind, id]
        }
        /^[0-9+*-]/ {
            if (skip) { skip = 0; next }
            n = split($0, f, " "); c = f[n] + 0
            if (mode == "fn") cost[fn] += c; else cost[cur] += c
            total += c
            next
        }
        /^fn=/ { fn = nm("fn", substr($0, 4)); cur = fl; next }
        /^fl=/ { fl = nm("fl", substr($0, 4)); cur = fl; next }
        /^f[ie]=/ { cur = nm("fl", substr($0, 4)); next }
        /^cf[il]=/ { nm("fl", substr($0, 5)); next }
        /^cfn=/ { nm("fn", substr($0, 5)); next }
        /^calls=/ { skip = 1; next }
        END {
            for (k in cost) {
                name = k; sub(/^.*\/(src|library)\//, "", name)
                printf "%14d %5.1f%%  %s\n", cost[k], 100 * cost[k] / total, substr(name, 1, 140)
            }
        }' "$1" | sort -rn
}

# callers FILE REGEX: inclusive cost of calls into functions matching REGEX, per caller.
callers() {
    awk -v pat="$2" '
        function nm(kind, v,   id, rest) {
            id = v; sub(/\).*/, "", id); sub(/^\(/, "", id)
            rest = v; if (sub(/^\([0-9]+\) /, "", rest)) names[kind, id] = rest
            return names[kind, id]
        }
        /^[0-9+*-]/ {
            if (skip) { skip = 0; if (callee ~ pat) cost[fn " -> " callee] += $NF }
            next
        }
        /^fn=/ { fn = nm("fn", substr($0, 4)); next }
        /^cfn=/ { callee = nm("fn", substr($0, 5)); next }
        /^calls=/ { skip = 1; next }
        /^summary:/ { total = $2 }
        END {
            for (k in cost)
                printf "%14d %5.1f%%  %s\n", cost[k], 100 * cost[k] / total, substr(k, 1, 140)
        }' "$1" | sort -rn
}

# report NAME FILE: instructions per MB and the top functions and files.
report() {
    local name=$1 file=$2 total
    total=$(awk '/^(summary|totals):/ {print $2; exit}' "$file")
    echo
    echo "## $name: $(awk -v t="$total" -v m="$SIZE_MB" 'BEGIN {printf "%.1f M instructions per MB", t / m / 1e6}') ($total for $SIZE_MB MB)"
    echo
    echo "### top $TOP functions by inclusive cost"
    callgrind_annotate --inclusive=yes --threshold=100 "$file" 2>/dev/null |
        awk '/^-+$/ {n++; next} n >= 3 && NF' | grep -v -e 'PROGRAM TOTALS' -e 'file:function' \
            -e ':clone ' -e ':start_thread ' -e 'thread_start' -e 'vtable.shim' -e '__rust_begin_short_backtrace' |
        head -n "$TOP"
    echo
    echo "### top $TOP functions by self cost"
    selfcost "$file" fn | head -n "$TOP"
    echo
    echo "### top $TOP source files by self cost (inlined code counted where it was written)"
    selfcost "$file" file | head -n "$TOP"
    echo
    echo "### copying and allocation by caller"
    callers "$file" '^(__mem(cpy|move|set)|malloc|calloc|realloc|free)' | head -n 10
}

# profile_side SIDE: origin, server, client (SIDE under callgrind), one download.
profile_side() {
    local side=$1 key port socks bytes scmd ccmd spid cpid vpid out dump
    key=$(hex16)
    port=$(free_port)
    socks=$(free_port)
    bytes=$((SIZE_MB * 1000 * 1000))
    cat >"$WORK/server.json" <<EOF
{"mode":"server","listen":"127.0.0.1:$port","listen_tcp":"127.0.0.1:$port","access_keys":["$key"],"allow_private_destinations":true}
EOF
    cat >"$WORK/client.json" <<EOF
{"mode":"client","server":"127.0.0.1:$port","access_key":"$key","socks5_bind":"127.0.0.1:$socks","transport":{"mode":"$CARRIER"},"tun":{"enable":false,"dns":"1.1.1.1"},"turn":{"enabled":false},"mux":{"enabled":false,"sessions":1},"debug":false}
EOF
    local vg=(valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind.$side.%p")
    scmd=("$OSTP" --config "$WORK/server.json")
    ccmd=("$OSTP" --config "$WORK/client.json")
    [[ $side == server ]] && scmd=("${vg[@]}" "${scmd[@]}")
    [[ $side == client ]] && ccmd=("${vg[@]}" "${ccmd[@]}")
    start "server-$side" "${scmd[@]}"
    spid=$STARTED_PID
    sleep "$([[ $side == server ]] && echo 2 || echo 0.3)"
    start "client-$side" "${ccmd[@]}"
    cpid=$STARTED_PID
    vpid=$([[ $side == server ]] && echo "$spid" || echo "$cpid")
    if ! wait_tcp "$socks" 60; then
        log "$side: client did not come up"
        tail -n 5 "$WORK/server-$side.log" "$WORK/client-$side.log" >&2
        return 1
    fi
    sleep 1
    callgrind_control -z "$vpid" >/dev/null 2>&1 || log "$side: could not zero counters (totals include start-up)"
    log "$side under callgrind: downloading $SIZE_MB MB"
    out=$(curl -s -o /dev/null --max-time 600 --socks5-hostname "127.0.0.1:$socks" \
        -w '%{size_download} %{time_total}' "http://127.0.0.1:$BULK_PORT/bytes/$bytes")
    log "$side: curl: $out"
    [[ ${out%% *} == "$bytes" ]] || { log "$side: download incomplete"; return 1; }
    callgrind_control --dump=download "$vpid" >/dev/null 2>&1
    sleep 1
    kill "$spid" "$cpid" 2>/dev/null
    wait "$spid" "$cpid" 2>/dev/null
    # The dump requested after the download (callgrind.SIDE.PID.1) holds exactly the download;
    # without it, the whole run's file.
    dump=$(ls "$WORK/callgrind.$side".*.1 2>/dev/null | head -n 1)
    [[ -z $dump ]] && dump=$(ls "$WORK/callgrind.$side".* 2>/dev/null | head -n 1)
    [[ -n $dump ]] || { log "$side: no callgrind output"; return 1; }
    report "$side" "$dump"
}

start bulk "$BULK" --listen 127.0.0.1:0
for _ in $(seq 50); do
    [[ -s $WORK/bulk.out ]] && break
    sleep 0.1
done
BULK_PORT=$(head -n1 "$WORK/bulk.out" 2>/dev/null)
[[ -n $BULK_PORT ]] && wait_tcp "$BULK_PORT" 5 || { echo "bulk_http did not start" >&2; exit 1; }

echo "# ostp callgrind profile: $SIZE_MB MB single-stream download through SOCKS5 ($CARRIER carrier)"
case $SIDE in
server | client) profile_side "$SIDE" ;;
*)
    profile_side server
    profile_side client
    ;;
esac
