#!/usr/bin/env bash
# End-to-end benchmark of the ostp tunnel on loopback, with same-run baselines.
#
#   bash benches/tunnel.sh
#
# Builds release, starts the bulk_http example (HTTP origin), an ostp server + client, and (when
# available) shadowsocks-libev (ss-server + ss-local, chacha20-ietf-poly1305), then prints a
# markdown table: single-stream download MB/s (ostp / direct / shadowsocks), CPU seconds per GB
# of server and client, TTFB median, idle and peak RSS (and idle RSS of anonymous pages only: the
# rest are the binary's and libc's file pages, which the kernel can drop and read again), 100
# concurrent streams, server RSS with 1,000 idle sessions, goodput through the lossy_relay example at 100 Mbit/s, 50 ms RTT with
# 1 % and 5 % loss (a 100 MB download on a fresh session: ~9 s, of which the first ~0.3 s are
# the connect and the congestion controller's start-up; 30 MB runs spent a tenth of their time
# there and measured 83 / 71 Mbit/s where 100 MB runs measured 90 / 81), ostp's event-loop wake-ups per GB of a single-stream download, and the
# single stream again with a `-C target-cpu=native` build of ostp and over the TCP carrier
# (`listen_tcp` on the server, `transport.mode: "uot"` on the client), a static musl build's own
# rows (the libc of OpenWrt routers: throughput, CPU, idle and peak RSS, 1,000 idle sessions), and (as root) through TUN
# mode beside SOCKS5 in a pair of network namespaces. Every
# section is independent: a failing one prints "n/a" and the run goes on.
#
# Loop wake-ups are counted by the loops themselves (`LoopCore::wait` returns; no tracing, so the
# measurement does not slow what it measures): the server exports `ostp_loop_wakeups_total` in
# GET /metrics (published about once a second, so it is read 1.2 s after the download), and a
# second client started with RUST_LOG=debug just for this download logs "client loop: N
# wake-ups" when it stops (its own start-up and 1.2 s of idling are included: a few wake-ups).
#
# The two rows that swing most between runs on a shared machine, 100 concurrent streams and TTFB,
# are measured in ROUNDS rounds (default 5) interleaved across direct, ostp and shadowsocks-libev
# (round 1 inside each section, the others at the end while all three are up), and each column
# shows the median of its rounds: a burst of load then hits every column alike instead of one.
# Peak RSS is read after round 1 (later sections, the lossy ones especially, grow it).
#
# Tunables (environment): SIZE_MB (single stream, default 300), STREAMS (100), STREAM_MB (5),
# ROUNDS (5), TTFB_N (21), IDLE_SESSIONS (1000), IDLE_SETTLE_S (12), LOSSY_MB (100), LOSSY_MAX_S (60), SKIP_SS=1, NO_BUILD=1,
# OSTP_BIN (use this ostp binary instead of building one), NATIVE_BIN (a -C target-cpu=native
# build to use), SKIP_NATIVE=1, MUSL_BIN (a static musl build to use), SKIP_MUSL=1, SKIP_TCP=1, SKIP_TUN=1, TUN_MTU (the TUN
# client's `tun.mtu`; default: the config default), CARGO_TARGET_DIR. Requires curl; uses /proc for CPU and memory figures (Linux).

set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
SIZE_MB=${SIZE_MB:-300}
STREAMS=${STREAMS:-100}
STREAM_MB=${STREAM_MB:-5}
TTFB_N=${TTFB_N:-21}
ROUNDS=${ROUNDS:-5}
IDLE_SESSIONS=${IDLE_SESSIONS:-1000}
LOSSY_MB=${LOSSY_MB:-100}
LOSSY_MAX_S=${LOSSY_MAX_S:-60}
CURL_MAX_S=${CURL_MAX_S:-120}

OSTP=${OSTP_BIN:-$TARGET/release/ostp}
BULK="$TARGET/release/examples/bulk_http"
RELAY="$TARGET/release/examples/lossy_relay"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ostp-bench.XXXXXX")
CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
PIDS=()

log() { echo "[bench] $*" >&2; }

NETNS=()
# The curl command of `download` (a namespace runs it through `ip netns exec`) and the origin's
# host in the URLs of `single_stream`.
CURL_CMD=(curl)
ORIGIN_HOST=127.0.0.1

cleanup() {
    local pid ns
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null
    done
    for ns in "${NETNS[@]}"; do
        ip netns del "$ns" 2>/dev/null
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
# helpers

port_in_use() {
    local hex
    hex=$(printf ':%04X ' "$1")
    grep -q "$hex" /proc/net/tcp /proc/net/tcp6 /proc/net/udp /proc/net/udp6 2>/dev/null
}

USED_PORTS=" "
free_port() {
    local p
    while :; do
        p=$((20000 + RANDOM % 40000))
        if ! port_in_use "$p" && [[ $USED_PORTS != *" $p "* ]]; then
            USED_PORTS+="$p "
            echo "$p"
            return
        fi
    done
}

# wait_tcp PORT [SECONDS]: until something accepts on 127.0.0.1:PORT.
wait_tcp() {
    local port=$1 deadline=$((SECONDS + ${2:-10}))
    while ((SECONDS < deadline)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }

# start NAME CMD...: runs CMD in the background (stderr to $WORK/NAME.log); sets STARTED_PID.
start() {
    local name=$1
    shift
    "$@" >"$WORK/$name.out" 2>"$WORK/$name.log" &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
}

stop() {
    local pid=${1:-}
    [[ -z $pid ]] && return
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
}

# cpu_ticks PID: utime + stime in clock ticks.
cpu_ticks() {
    [[ -r /proc/$1/stat ]] || { echo ""; return; }
    sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'
}

# mem_mb PID FIELD (VmRSS | VmHWM) in MB with one decimal.
mem_mb() {
    [[ -r /proc/$1/status ]] || { echo "n/a"; return; }
    awk -v f="$2:" '$1 == f {printf "%.1f", $2 / 1024; found=1} END {if (!found) print "n/a"}' "/proc/$1/status"
}

# cpu_per_gb TICKS_BEFORE TICKS_AFTER BYTES
cpu_per_gb() {
    if [[ -z $1 || -z $2 || -z $3 || $3 == 0 ]]; then
        echo "n/a"
        return
    fi
    awk -v a="$1" -v b="$2" -v n="$3" -v hz="$CLK_TCK" 'BEGIN {printf "%.2f", (b - a) / hz / (n / 1e9)}'
}

# download PROXY_ARGS... -- URL EXPECTED_BYTES: prints "bytes seconds" or nothing on failure.
download() {
    local args=() url bytes out
    while [[ $1 != -- ]]; do
        args+=("$1")
        shift
    done
    shift
    url=$1 bytes=$2
    out=$("${CURL_CMD[@]}" -s -o /dev/null --max-time "$CURL_MAX_S" "${args[@]}" -w '%{size_download} %{time_total}' "$url") || return 1
    [[ ${out%% *} == "$bytes" ]] || return 1
    echo "$out"
}

mbps() { awk -v b="$1" -v t="$2" 'BEGIN {if (t > 0) printf "%.1f", b / t / 1e6; else print "n/a"}'; }

# single_stream LABEL SERVER_PID CLIENT_PID PROXY_ARGS...: sets SS_MBPS, SS_CPU_SERVER, SS_CPU_CLIENT.
single_stream() {
    local label=$1 spid=$2 cpid=$3
    shift 3
    local bytes=$((SIZE_MB * 1000 * 1000)) s0 c0 s1 c1 out
    SS_MBPS=n/a SS_CPU_SERVER=n/a SS_CPU_CLIENT=n/a
    s0=$([[ -n $spid ]] && cpu_ticks "$spid")
    c0=$([[ -n $cpid ]] && cpu_ticks "$cpid")
    if out=$(download "$@" -- "http://$ORIGIN_HOST:$BULK_PORT/bytes/$bytes" "$bytes"); then
        s1=$([[ -n $spid ]] && cpu_ticks "$spid")
        c1=$([[ -n $cpid ]] && cpu_ticks "$cpid")
        SS_MBPS=$(mbps $out)
        [[ -n $spid ]] && SS_CPU_SERVER=$(cpu_per_gb "$s0" "$s1" "$bytes")
        [[ -n $cpid ]] && SS_CPU_CLIENT=$(cpu_per_gb "$c0" "$c1" "$bytes")
        log "$label: single stream $SIZE_MB MB at $SS_MBPS MB/s"
    else
        log "$label: single-stream download failed"
    fi
}

# ttfb_median PROXY_ARGS...: median of TTFB_N time_starttransfer for GET / (milliseconds).
ttfb_median() {
    local i t samples=()
    for ((i = 0; i < TTFB_N; i++)); do
        t=$(curl -s -o /dev/null --max-time 10 "$@" -w '%{time_starttransfer}' "http://127.0.0.1:$BULK_PORT/") || return 1
        samples+=("$t")
    done
    printf '%s\n' "${samples[@]}" | sort -g | awk '{a[NR] = $1} END {printf "%.2f", a[int((NR + 1) / 2)] * 1000}'
}

# concurrent PROXY_ARGS...: aggregate MB/s of STREAMS parallel downloads of STREAM_MB each.
concurrent() {
    local bytes=$((STREAM_MB * 1000 * 1000)) i start end ok=0 pids=()
    start=$(date +%s.%N)
    for ((i = 0; i < STREAMS; i++)); do
        curl -s -o /dev/null --max-time "$CURL_MAX_S" "$@" -w '%{size_download}\n' \
            "http://127.0.0.1:$BULK_PORT/bytes/$bytes" >"$WORK/conc.$i" 2>/dev/null &
        pids+=($!)
    done
    for i in "${pids[@]}"; do
        wait "$i"
    done
    end=$(date +%s.%N)
    for ((i = 0; i < STREAMS; i++)); do
        [[ $(cat "$WORK/conc.$i" 2>/dev/null) == "$bytes" ]] && ok=$((ok + 1))
    done
    rm -f "$WORK"/conc.*
    if ((ok != STREAMS)); then
        log "concurrent: only $ok/$STREAMS streams completed"
        echo "n/a"
        return
    fi
    awk -v n="$((bytes * STREAMS))" -v a="$start" -v b="$end" 'BEGIN {printf "%.1f", n / (b - a) / 1e6}'
}

# median DECIMALS VALUES...: the median of the numeric values (n/a ones ignored; n/a if none).
median() {
    local decimals=$1
    shift
    printf '%s\n' "$@" | grep -E '^[0-9.]+$' | sort -g | awk -v d="$decimals" '{a[NR] = $1}
        END {if (NR == 0) print "n/a"; else printf "%." d "f", (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a + 0 > 0 && b + 0 > 0) printf "%.2f", a / b; else print "n/a"}'; }

hex16() { od -An -tx1 -N16 /dev/urandom | tr -d ' \n'; }

# write_client_config FILE SERVER_PORT SOCKS_PORT
write_client_config() {
    cat >"$1" <<EOF
{"mode":"client","server":"127.0.0.1:$2","access_key":"$ACCESS_KEY","socks5_bind":"127.0.0.1:$3","tun":{"enable":false,"dns":"1.1.1.1"},"turn":{"enabled":false},"mux":{"enabled":false,"sessions":1},"debug":false}
EOF
}

# start_pair BIN SERVER_NAME SERVER_CONFIG CLIENT_NAME CLIENT_CONFIG: starts an ostp server, then
# (0.3 s later) its client; sets PAIR_SERVER and PAIR_CLIENT to their PIDs.
start_pair() {
    start "$2" "$1" --config "$3"
    PAIR_SERVER=$STARTED_PID
    sleep 0.3
    start "$4" "$1" --config "$5"
    PAIR_CLIENT=$STARTED_PID
}

# idle_sessions_rss SERVER_PID OSTP_PORT API_PORT LABEL: sets IDLE_RSS to the server's RSS (MB) with
# IDLE_SESSIONS idle sessions (hidden client flag), n/a when they do not all come online. A key may
# complete at most 16 handshakes per 2-minute epoch (single-use hello tags, docs/PROTOCOL.md 3.1),
# so the sessions are spread over fresh API-created keys, 10 sessions each. The idle clients are
# the glibc $OSTP whatever the server is: only the server's RSS is read. Called directly, not in
# $(...), so the clients it starts are in PIDS for the EXIT trap.
idle_sessions_rss() {
    local spid=$1 port=$2 api=$3 label=$4 per_key=10 remaining=$IDLE_SESSIONS k=0 n key online=0 pids=()
    IDLE_RSS=n/a
    while ((remaining > 0)); do
        n=$((remaining < per_key ? remaining : per_key))
        key=$(curl -s --max-time 5 -X POST -H "Authorization: Bearer $API_TOKEN" "http://127.0.0.1:$api/api/users" |
            grep -o '"key":"[^"]*"' | cut -d'"' -f4)
        [[ -z $key ]] && break
        printf '{"mode":"client","server":"127.0.0.1:%s","access_key":"%s","socks5_bind":"127.0.0.1:0"}\n' \
            "$port" "$key" >"$WORK/idle-$label-$k.json"
        start "$label-idle-$k" "$OSTP" --bench-idle-sessions "$n" --config "$WORK/idle-$label-$k.json"
        pids+=("$STARTED_PID")
        remaining=$((remaining - n))
        k=$((k + 1))
    done
    # Wait until the server reports the sessions online (up to 90 s), then sample it.
    for _ in $(seq 1 180); do
        online=$(curl -s --max-time 5 -H "Authorization: Bearer $API_TOKEN" "http://127.0.0.1:$api/api/server/status" |
            grep -o '"online_sessions":[0-9]*' | head -n 1 | cut -d: -f2)
        online=${online:-0}
        ((online >= IDLE_SESSIONS)) && break
        sleep 0.5
    done
    log "$label: idle sessions online: $online of $IDLE_SESSIONS ($k client processes)"
    # Idle means settled: the server gives free heap pages back at most every 10 s
    # (runtime/malloc.rs HeapTrim), so the reading waits a little longer than that.
    sleep "${IDLE_SETTLE_S:-12}"
    if alive "$spid" && ((online >= IDLE_SESSIONS)); then
        IDLE_RSS=$(mem_mb "$spid" VmRSS)
    fi
    for n in "${pids[@]}"; do
        stop "$n"
    done
}

# metric NAME: the value of an unlabelled series in the ostp server's GET /metrics.
metric() {
    curl -s --max-time 5 -H "Authorization: Bearer $API_TOKEN" "http://127.0.0.1:$API_PORT/metrics" |
        awk -v n="$1" '$1 == n {print $2; found=1; exit} END {if (!found) exit 1}'
}

# per_gb BEFORE AFTER BYTES: (AFTER - BEFORE) per 1e9 bytes, whole number.
per_gb() {
    if [[ -z $1 || -z $2 || -z $3 || $3 == 0 ]]; then
        echo "n/a"
        return
    fi
    awk -v a="$1" -v b="$2" -v n="$3" 'BEGIN {printf "%.0f", (b - a) / (n / 1e9)}'
}

# loop_wakeups: one single-stream download through a fresh debug-logging client; sets WAKE_S and
# WAKE_C (wake-ups per GB of the server's tunnel loop and of the client's loop).
loop_wakeups() {
    local socks bytes w0 w1 pid n
    socks=$(free_port)
    bytes=$((SIZE_MB * 1000 * 1000))
    write_client_config "$WORK/wake.json" "$OSTP_PORT" "$socks"
    start ostp-wake env RUST_LOG=debug "$OSTP" --config "$WORK/wake.json"
    pid=$STARTED_PID
    if wait_tcp "$socks" 10 && sleep 1.2 && w0=$(metric ostp_loop_wakeups_total) &&
        download --socks5-hostname "127.0.0.1:$socks" -- "http://127.0.0.1:$BULK_PORT/bytes/$bytes" "$bytes" >/dev/null; then
        sleep 1.2
        w1=$(metric ostp_loop_wakeups_total) && WAKE_S=$(per_gb "$w0" "$w1" "$bytes")
        stop "$pid"
        n=$(grep -o 'client loop: [0-9]* wake-ups' "$WORK/ostp-wake.log" | awk '{print $3}' | tail -n 1)
        [[ -n $n ]] && WAKE_C=$(per_gb 0 "$n" "$bytes")
    else
        stop "$pid"
    fi
    log "ostp: loop wake-ups per GB: server $WAKE_S, client $WAKE_C"
}

# ---------------------------------------------------------------------------------------------
# build

if [[ -z ${NO_BUILD:-} ]]; then
    log "building release (examples, then the ostp binary)"
    (cd "$ROOT" && cargo build --release --example bulk_http --example lossy_relay) >&2 ||
        log "building the examples failed"
    if [[ -z ${OSTP_BIN:-} ]] && ! (cd "$ROOT" && cargo build --release --bin ostp) >&2; then
        log "building ostp failed: tunnel sections will be n/a"
        OSTP="$WORK/missing-ostp" # never run a stale binary
    fi
fi
if [[ ! -x $BULK ]]; then
    echo "bulk_http example not built ($BULK); nothing can be measured" >&2
    exit 1
fi

# ---------------------------------------------------------------------------------------------
# origin server

start bulk "$BULK" --listen 127.0.0.1:0
BULK_PID=$STARTED_PID
for _ in $(seq 50); do
    [[ -s $WORK/bulk.out ]] && break
    sleep 0.1
done
BULK_PORT=$(head -n1 "$WORK/bulk.out" 2>/dev/null)
if [[ -z $BULK_PORT ]] || ! wait_tcp "$BULK_PORT" 5; then
    echo "bulk_http did not start" >&2
    exit 1
fi
log "bulk_http on 127.0.0.1:$BULK_PORT (pid $BULK_PID)"

# Results default to n/a.
for k in direct ostp ss; do
    declare "MBPS_$k=n/a" "TTFB_$k=n/a" "CONC_$k=n/a" "CPUS_$k=n/a" "CPUC_$k=n/a"
    declare "RSS_IDLE_S_$k=n/a" "RSS_IDLE_C_$k=n/a" "RSS_PEAK_S_$k=n/a" "RSS_PEAK_C_$k=n/a"
    declare "ANON_IDLE_S_$k=n/a" "ANON_IDLE_C_$k=n/a"
done
IDLE_SESSIONS_RSS=n/a
WAKE_S=n/a
WAKE_C=n/a
LOSSY_1=n/a
LOSSY_5=n/a

# ---------------------------------------------------------------------------------------------
# direct baseline

single_stream direct "" ""
MBPS_direct=$SS_MBPS
TTFB_direct=$(ttfb_median) || TTFB_direct=n/a
CONC_direct=$(concurrent)
log "direct: ttfb $TTFB_direct ms, $STREAMS streams $CONC_direct MB/s"

# ---------------------------------------------------------------------------------------------
# ostp

ACCESS_KEY=$(hex16)
API_TOKEN="t$(hex16)"
OSTP_PORT=$(free_port)
API_PORT=$(free_port)
SOCKS_PORT=$(free_port)
SERVER_PID=""
CLIENT_PID=""
if [[ -x $OSTP ]]; then
    cat >"$WORK/server.json" <<EOF
{"mode":"server","listen":"127.0.0.1:$OSTP_PORT","access_keys":["$ACCESS_KEY"],"api":{"enabled":true,"bind":"127.0.0.1:$API_PORT","token":"$API_TOKEN"},"allow_private_destinations":true,"max_sessions":4096,"max_sessions_per_user":4096}
EOF
    write_client_config "$WORK/client.json" "$OSTP_PORT" "$SOCKS_PORT"
    start_pair "$OSTP" ostp-server "$WORK/server.json" ostp-client "$WORK/client.json"
    SERVER_PID=$PAIR_SERVER CLIENT_PID=$PAIR_CLIENT
    if wait_tcp "$SOCKS_PORT" 10 && alive "$SERVER_PID" && alive "$CLIENT_PID"; then
        sleep 0.5
        RSS_IDLE_S_ostp=$(mem_mb "$SERVER_PID" VmRSS)
        RSS_IDLE_C_ostp=$(mem_mb "$CLIENT_PID" VmRSS)
        ANON_IDLE_S_ostp=$(mem_mb "$SERVER_PID" RssAnon)
        ANON_IDLE_C_ostp=$(mem_mb "$CLIENT_PID" RssAnon)
        PROXY=(--socks5-hostname "127.0.0.1:$SOCKS_PORT")
        single_stream ostp "$SERVER_PID" "$CLIENT_PID" "${PROXY[@]}"
        MBPS_ostp=$SS_MBPS CPUS_ostp=$SS_CPU_SERVER CPUC_ostp=$SS_CPU_CLIENT
        TTFB_ostp=$(ttfb_median "${PROXY[@]}") || TTFB_ostp=n/a
        CONC_ostp=$(concurrent "${PROXY[@]}")
        log "ostp: ttfb $TTFB_ostp ms, $STREAMS streams $CONC_ostp MB/s"
        RSS_PEAK_S_ostp=$(mem_mb "$SERVER_PID" VmHWM)
        RSS_PEAK_C_ostp=$(mem_mb "$CLIENT_PID" VmHWM)
        loop_wakeups
    else
        log "ostp server/client did not come up (see $WORK/ostp-*.log):"
        tail -n 5 "$WORK/ostp-server.log" "$WORK/ostp-client.log" >&2 2>/dev/null
    fi

    if alive "$SERVER_PID"; then
        idle_sessions_rss "$SERVER_PID" "$OSTP_PORT" "$API_PORT" ostp
        IDLE_SESSIONS_RSS=$IDLE_RSS
    fi

    # Goodput through the lossy relay: 100 Mbit/s, 25 ms each way (50 ms RTT), 1 % / 5 % loss.
    if [[ -x $RELAY ]] && alive "$SERVER_PID"; then
        for loss in 1 5; do
            relay_port=$(free_port)
            lossy_socks=$(free_port)
            start "relay-$loss" "$RELAY" --listen "127.0.0.1:$relay_port" --upstream "127.0.0.1:$OSTP_PORT" \
                --rate-mbit 100 --delay-ms 25 --loss "0.0$loss" --seed 1
            relay_pid=$STARTED_PID
            write_client_config "$WORK/lossy-$loss.json" "$relay_port" "$lossy_socks"
            start "lossy-client-$loss" "$OSTP" --config "$WORK/lossy-$loss.json"
            lossy_client=$STARTED_PID
            result=n/a
            if wait_tcp "$lossy_socks" 10 && alive "$relay_pid"; then
                bytes=$((LOSSY_MB * 1000 * 1000))
                if out=$(CURL_MAX_S=$LOSSY_MAX_S download --socks5-hostname "127.0.0.1:$lossy_socks" -- \
                    "http://127.0.0.1:$BULK_PORT/bytes/$bytes" "$bytes"); then
                    result=$(mbps $out)
                fi
            fi
            log "lossy $loss %: $result MB/s"
            declare "LOSSY_$loss=$result"
            stop "$lossy_client"
            stop "$relay_pid"
        done
    fi
else
    log "no ostp binary at $OSTP: tunnel sections are n/a"
fi

# ---------------------------------------------------------------------------------------------
# ostp built for this machine's CPU (RUSTFLAGS="-C target-cpu=native", own target dir): its own
# rows, same origin and run. Skipped with SKIP_NATIVE=1, and with NO_BUILD=1 unless NATIVE_BIN
# names a binary (a stale one is never run).

MBPS_native=n/a CPUS_native=n/a CPUC_native=n/a
NATIVE=${NATIVE_BIN:-$ROOT/target/native/release/ostp}
if [[ -z ${SKIP_NATIVE:-} && ( -n ${NATIVE_BIN:-} || -z ${NO_BUILD:-} ) && -f $WORK/server.json ]]; then
    if [[ -z ${NATIVE_BIN:-} ]]; then
        log "building ostp with -C target-cpu=native (target/native)"
        (cd "$ROOT" && CARGO_TARGET_DIR="$ROOT/target/native" RUSTFLAGS="-C target-cpu=native" \
            cargo build --release --bin ostp) >&2 || { log "native build failed"; NATIVE="$WORK/missing-native"; }
    fi
    if [[ -x $NATIVE ]]; then
        NATIVE_PORT=$(free_port)
        NATIVE_SOCKS=$(free_port)
        sed -e "s/127.0.0.1:$OSTP_PORT/127.0.0.1:$NATIVE_PORT/" -e 's/"api":{[^}]*}/"api":{"enabled":false}/' \
            "$WORK/server.json" >"$WORK/native-server.json"
        write_client_config "$WORK/native-client.json" "$NATIVE_PORT" "$NATIVE_SOCKS"
        start_pair "$NATIVE" native-server "$WORK/native-server.json" native-client "$WORK/native-client.json"
        native_server=$PAIR_SERVER native_client=$PAIR_CLIENT
        if wait_tcp "$NATIVE_SOCKS" 10 && alive "$native_server"; then
            sleep 0.5
            single_stream native "$native_server" "$native_client" --socks5-hostname "127.0.0.1:$NATIVE_SOCKS"
            MBPS_native=$SS_MBPS CPUS_native=$SS_CPU_SERVER CPUC_native=$SS_CPU_CLIENT
        else
            log "native ostp did not come up"
        fi
        stop "$native_client"
        stop "$native_server"
    fi
fi

# ---------------------------------------------------------------------------------------------
# ostp as a static musl binary (`--target <arch>-unknown-linux-musl`), the libc OpenWrt routers
# run: its own server (with the API, for the idle sessions) and client, same origin and run.
# Idle and peak RSS, single stream, 1,000 idle sessions, and the concurrent streams (round 1
# here, the others interleaved with the other columns' rounds at the end).
# The target is added with rustup when missing; n/a when it cannot be. Skipped with SKIP_MUSL=1,
# and with NO_BUILD=1 unless MUSL_BIN names a binary.

MUSL_TARGET="$(uname -m)-unknown-linux-musl"
for v in MBPS CPUS CPUC CONC RSS_IDLE_S RSS_IDLE_C ANON_IDLE_S ANON_IDLE_C RSS_PEAK_S RSS_PEAK_C IDLE_RSS; do
    declare "${v}_musl=n/a"
done
MUSL=${MUSL_BIN:-$TARGET/$MUSL_TARGET/release/ostp}
if [[ -z ${SKIP_MUSL:-} && ( -n ${MUSL_BIN:-} || -z ${NO_BUILD:-} ) && -f $WORK/server.json ]]; then
    if [[ -z ${MUSL_BIN:-} ]]; then
        log "building ostp for $MUSL_TARGET (static)"
        if ! (rustup target list --installed 2>/dev/null | grep -qx "$MUSL_TARGET" ||
            timeout 300 rustup target add "$MUSL_TARGET") >&2 ||
            ! (cd "$ROOT" && cargo build --release --bin ostp --target "$MUSL_TARGET") >&2; then
            log "musl build failed: its rows are n/a"
            MUSL="$WORK/missing-musl"
        fi
    fi
    if [[ -x $MUSL ]]; then
        MUSL_PORT=$(free_port)
        MUSL_API=$(free_port)
        MUSL_SOCKS=$(free_port)
        sed -e "s/127.0.0.1:$OSTP_PORT/127.0.0.1:$MUSL_PORT/" -e "s/127.0.0.1:$API_PORT/127.0.0.1:$MUSL_API/" \
            "$WORK/server.json" >"$WORK/musl-server.json"
        write_client_config "$WORK/musl-client.json" "$MUSL_PORT" "$MUSL_SOCKS"
        start_pair "$MUSL" musl-server "$WORK/musl-server.json" musl-client "$WORK/musl-client.json"
        musl_server=$PAIR_SERVER musl_client=$PAIR_CLIENT
        if wait_tcp "$MUSL_SOCKS" 10 && alive "$musl_server" && alive "$musl_client"; then
            sleep 0.5
            RSS_IDLE_S_musl=$(mem_mb "$musl_server" VmRSS) RSS_IDLE_C_musl=$(mem_mb "$musl_client" VmRSS)
            ANON_IDLE_S_musl=$(mem_mb "$musl_server" RssAnon) ANON_IDLE_C_musl=$(mem_mb "$musl_client" RssAnon)
            single_stream musl "$musl_server" "$musl_client" --socks5-hostname "127.0.0.1:$MUSL_SOCKS"
            MBPS_musl=$SS_MBPS CPUS_musl=$SS_CPU_SERVER CPUC_musl=$SS_CPU_CLIENT
            CONC_musl=$(concurrent --socks5-hostname "127.0.0.1:$MUSL_SOCKS")
            RSS_PEAK_S_musl=$(mem_mb "$musl_server" VmHWM) RSS_PEAK_C_musl=$(mem_mb "$musl_client" VmHWM)
            idle_sessions_rss "$musl_server" "$MUSL_PORT" "$MUSL_API" musl
            IDLE_RSS_musl=$IDLE_RSS
            log "musl: idle RSS $RSS_IDLE_S_musl / $RSS_IDLE_C_musl MB, $STREAMS streams $CONC_musl MB/s"
        else
            log "musl ostp did not come up (see $WORK/musl-*.log)"
        fi
        # Kept up (idle) for the interleaved rounds of the 100-stream row when it worked.
        if [[ $CONC_musl == n/a ]]; then
            stop "$musl_client"
            stop "$musl_server"
        fi
    else
        log "no musl binary at $MUSL: its rows are n/a"
    fi
elif [[ -z ${SKIP_MUSL:-} ]]; then
    log "musl rows skipped (NO_BUILD=1 without MUSL_BIN, or the ostp section did not run)"
fi

# ---------------------------------------------------------------------------------------------
# ostp over the TCP carrier (docs/PROTOCOL.md §7): its own server (UDP and TCP on one port) and a
# client in `uot` mode; same origin and run. Skipped with SKIP_TCP=1; n/a if either side refuses.

MBPS_tcp=n/a CPUS_tcp=n/a CPUC_tcp=n/a
if [[ -z ${SKIP_TCP:-} && -x $OSTP && -f $WORK/server.json ]]; then
    TCP_PORT=$(free_port)
    TCP_SOCKS=$(free_port)
    sed -e "s/\"listen\":\"127.0.0.1:$OSTP_PORT\"/\"listen\":\"127.0.0.1:$TCP_PORT\",\"listen_tcp\":\"127.0.0.1:$TCP_PORT\"/" \
        -e 's/"api":{[^}]*}/"api":{"enabled":false}/' "$WORK/server.json" >"$WORK/tcp-server.json"
    write_client_config "$WORK/tcp-client.json" "$TCP_PORT" "$TCP_SOCKS"
    sed -i -e 's/"debug":false}/"debug":false,"transport":{"mode":"uot"}}/' "$WORK/tcp-client.json"
    start_pair "$OSTP" tcp-server "$WORK/tcp-server.json" tcp-client "$WORK/tcp-client.json"
    tcp_server=$PAIR_SERVER tcp_client=$PAIR_CLIENT
    if wait_tcp "$TCP_SOCKS" 10 && alive "$tcp_server" && alive "$tcp_client"; then
        sleep 0.5
        single_stream tcp-carrier "$tcp_server" "$tcp_client" --socks5-hostname "127.0.0.1:$TCP_SOCKS"
        MBPS_tcp=$SS_MBPS CPUS_tcp=$SS_CPU_SERVER CPUC_tcp=$SS_CPU_CLIENT
    else
        log "ostp over TCP did not come up (see $WORK/tcp-*.log)"
    fi
    stop "$tcp_client"
    stop "$tcp_server"
fi

# ---------------------------------------------------------------------------------------------
# TUN mode vs SOCKS5 (root only; SKIP_TUN=1 skips). Namespace "in" holds the client (TUN mode,
# with its SOCKS5 port too) and curl, namespace "out" the origin; the server runs here, on our end
# of "in"'s link, so "in" reaches "out" only through the tunnel. Both rows are measured in this
# topology, same run: plain curl (captured by the TUN device) and curl through SOCKS5.

MBPS_tun=n/a CPUS_tun=n/a CPUC_tun=n/a MBPS_tunsocks=n/a CPUS_tunsocks=n/a CPUC_tunsocks=n/a
if [[ -z ${SKIP_TUN:-} && $(id -u) == 0 && -x $OSTP && -x $BULK && -f $WORK/server.json ]] &&
    command -v ip >/dev/null; then
    NS_IN="ostp-bench-in-$$" NS_OUT="ostp-bench-out-$$"
    NETNS+=("$NS_IN" "$NS_OUT")
    tun_net() {
        ip netns add "$NS_IN" && ip netns add "$NS_OUT" &&
            ip link add "obi$$" type veth peer name "obin$$" && ip link set "obin$$" netns "$NS_IN" &&
            ip addr add 10.211.0.1/30 dev "obi$$" && ip link set "obi$$" up &&
            ip -n "$NS_IN" addr add 10.211.0.2/30 dev "obin$$" && ip -n "$NS_IN" link set "obin$$" up &&
            ip -n "$NS_IN" link set lo up &&
            ip link add "obo$$" type veth peer name "obon$$" && ip link set "obon$$" netns "$NS_OUT" &&
            ip addr add 10.211.0.5/30 dev "obo$$" && ip link set "obo$$" up &&
            ip -n "$NS_OUT" addr add 10.211.0.6/30 dev "obon$$" && ip -n "$NS_OUT" link set "obon$$" up &&
            ip -n "$NS_OUT" link set lo up
    }
    if tun_net 2>"$WORK/tun-net.log"; then
        start tun-origin ip netns exec "$NS_OUT" "$BULK" --listen 10.211.0.6:0
        tun_origin_pid=$STARTED_PID
        for _ in $(seq 50); do
            [[ -s $WORK/tun-origin.out ]] && break
            sleep 0.1
        done
        TUN_ORIGIN=$(head -n1 "$WORK/tun-origin.out" 2>/dev/null)
        TUN_PORT=$(free_port)
        sed -e "s/\"listen\":\"127.0.0.1:$OSTP_PORT\"/\"listen\":\"10.211.0.1:$TUN_PORT\"/" \
            -e 's/"api":{[^}]*}/"api":{"enabled":false}/' "$WORK/server.json" >"$WORK/tun-server.json"
        printf '{"mode":"client","server":"10.211.0.1:%s","access_key":"%s","socks5_bind":"127.0.0.1:1088","tun":{"enable":true,"dns":"1.1.1.1"%s}}\n' \
            "$TUN_PORT" "$ACCESS_KEY" "${TUN_MTU:+,\"mtu\":$TUN_MTU}" >"$WORK/tun-client.json"
        start tun-server "$OSTP" --config "$WORK/tun-server.json"
        tun_server=$STARTED_PID
        sleep 0.3
        start tun-client ip netns exec "$NS_IN" "$OSTP" --config "$WORK/tun-client.json"
        tun_client=$STARTED_PID
        for _ in $(seq 100); do
            grep -q "all traffic now goes into the tunnel" "$WORK/tun-client.log" 2>/dev/null && break
            sleep 0.1
        done
        if [[ -n $TUN_ORIGIN ]] && grep -q "all traffic now goes into the tunnel" "$WORK/tun-client.log"; then
            saved_bulk=$BULK_PORT
            BULK_PORT=$TUN_ORIGIN ORIGIN_HOST=10.211.0.6
            CURL_CMD=(ip netns exec "$NS_IN" curl)
            single_stream tun "$tun_server" "$tun_client"
            MBPS_tun=$SS_MBPS CPUS_tun=$SS_CPU_SERVER CPUC_tun=$SS_CPU_CLIENT
            single_stream tun-socks5 "$tun_server" "$tun_client" --socks5-hostname 127.0.0.1:1088
            MBPS_tunsocks=$SS_MBPS CPUS_tunsocks=$SS_CPU_SERVER CPUC_tunsocks=$SS_CPU_CLIENT
            CURL_CMD=(curl)
            BULK_PORT=$saved_bulk ORIGIN_HOST=127.0.0.1
        else
            log "TUN mode did not come up (see $WORK/tun-*.log)"
        fi
        stop "$tun_client"
        stop "$tun_server"
        stop "$tun_origin_pid"
    else
        log "cannot build the TUN bench namespaces: $(cat "$WORK/tun-net.log")"
    fi
    ip netns del "$NS_IN" 2>/dev/null
    ip netns del "$NS_OUT" 2>/dev/null
    ip link del "obi$$" 2>/dev/null
    ip link del "obo$$" 2>/dev/null
fi

# ---------------------------------------------------------------------------------------------
# shadowsocks-libev baseline

if [[ -z ${SKIP_SS:-} ]]; then
    if ! command -v ss-server >/dev/null || ! command -v ss-local >/dev/null; then
        if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
            log "installing shadowsocks-libev (apt-get)"
            timeout 300 apt-get install -y -qq shadowsocks-libev >/dev/null 2>&1 ||
                { timeout 120 apt-get update -qq >/dev/null 2>&1 &&
                    timeout 300 apt-get install -y -qq shadowsocks-libev >/dev/null 2>&1; } ||
                log "could not install shadowsocks-libev"
        fi
    fi
    if command -v ss-server >/dev/null && command -v ss-local >/dev/null; then
        SS_PORT=$(free_port)
        SS_LOCAL=$(free_port)
        SS_PASS=$(hex16)
        start ss-server ss-server -s 127.0.0.1 -p "$SS_PORT" -k "$SS_PASS" -m chacha20-ietf-poly1305
        SSS_PID=$STARTED_PID
        start ss-local ss-local -s 127.0.0.1 -p "$SS_PORT" -b 127.0.0.1 -l "$SS_LOCAL" -k "$SS_PASS" \
            -m chacha20-ietf-poly1305
        SSL_PID=$STARTED_PID
        if wait_tcp "$SS_LOCAL" 10 && alive "$SSS_PID"; then
            sleep 0.3
            RSS_IDLE_S_ss=$(mem_mb "$SSS_PID" VmRSS)
            RSS_IDLE_C_ss=$(mem_mb "$SSL_PID" VmRSS)
            ANON_IDLE_S_ss=$(mem_mb "$SSS_PID" RssAnon)
            ANON_IDLE_C_ss=$(mem_mb "$SSL_PID" RssAnon)
            PROXY=(--socks5-hostname "127.0.0.1:$SS_LOCAL")
            single_stream shadowsocks "$SSS_PID" "$SSL_PID" "${PROXY[@]}"
            MBPS_ss=$SS_MBPS CPUS_ss=$SS_CPU_SERVER CPUC_ss=$SS_CPU_CLIENT
            TTFB_ss=$(ttfb_median "${PROXY[@]}") || TTFB_ss=n/a
            CONC_ss=$(concurrent "${PROXY[@]}")
            log "shadowsocks: ttfb $TTFB_ss ms, $STREAMS streams $CONC_ss MB/s"
            RSS_PEAK_S_ss=$(mem_mb "$SSS_PID" VmHWM)
            RSS_PEAK_C_ss=$(mem_mb "$SSL_PID" VmHWM)
            SS_PROXY=("${PROXY[@]}")
        else
            log "shadowsocks did not come up"
        fi
    else
        log "shadowsocks-libev not available: its column is n/a"
    fi
fi

# ---------------------------------------------------------------------------------------------
# rounds 2..ROUNDS of the noisy rows, interleaved: direct, ostp, shadowsocks-libev in turn (each
# only while it is up), then the median of all rounds per column.

R_CONC_direct=("$CONC_direct") R_TTFB_direct=("$TTFB_direct")
R_CONC_ostp=("$CONC_ostp") R_TTFB_ostp=("$TTFB_ostp")
R_CONC_ss=("$CONC_ss") R_TTFB_ss=("$TTFB_ss")
R_CONC_musl=("$CONC_musl")
OSTP_UP=$(alive "$SERVER_PID" && alive "$CLIENT_PID" && [[ $CONC_ostp != n/a ]] && echo 1)
SS_UP=$(alive "${SSS_PID:-}" && alive "${SSL_PID:-}" && [[ $CONC_ss != n/a ]] && echo 1)
MUSL_UP=$(alive "${musl_server:-}" && alive "${musl_client:-}" && [[ $CONC_musl != n/a ]] && echo 1)
for ((round = 2; round <= ROUNDS; round++)); do
    R_CONC_direct+=("$(concurrent)") R_TTFB_direct+=("$(ttfb_median || echo n/a)")
    if [[ -n $OSTP_UP ]]; then
        R_CONC_ostp+=("$(concurrent --socks5-hostname "127.0.0.1:$SOCKS_PORT")")
        R_TTFB_ostp+=("$(ttfb_median --socks5-hostname "127.0.0.1:$SOCKS_PORT" || echo n/a)")
    fi
    if [[ -n $SS_UP ]]; then
        R_CONC_ss+=("$(concurrent "${SS_PROXY[@]}")")
        R_TTFB_ss+=("$(ttfb_median "${SS_PROXY[@]}" || echo n/a)")
    fi
    if [[ -n $MUSL_UP ]]; then
        R_CONC_musl+=("$(concurrent --socks5-hostname "127.0.0.1:$MUSL_SOCKS")")
    fi
    log "round $round: $STREAMS streams MB/s direct ${R_CONC_direct[-1]}, ostp ${R_CONC_ostp[-1]}, ss ${R_CONC_ss[-1]}, musl ${R_CONC_musl[-1]}; ttfb ms direct ${R_TTFB_direct[-1]}, ostp ${R_TTFB_ostp[-1]}, ss ${R_TTFB_ss[-1]}"
done
if ((ROUNDS > 1)); then
    for k in direct ostp ss; do
        declare -n conc_rounds="R_CONC_$k" ttfb_rounds="R_TTFB_$k"
        declare "CONC_$k=$(median 1 "${conc_rounds[@]}")" "TTFB_$k=$(median 2 "${ttfb_rounds[@]}")"
        unset -n conc_rounds ttfb_rounds
    done
    CONC_musl=$(median 1 "${R_CONC_musl[@]}")
    log "medians of $ROUNDS rounds: $STREAMS streams MB/s direct $CONC_direct, ostp $CONC_ostp, ss $CONC_ss; ttfb ms direct $TTFB_direct, ostp $TTFB_ostp, ss $TTFB_ss"
fi
stop "${SSL_PID:-}"
stop "${SSS_PID:-}"
stop "${musl_client:-}"
stop "${musl_server:-}"

# ---------------------------------------------------------------------------------------------
# report

echo
echo "## ostp tunnel benchmark ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, loopback)"
echo
echo "Single stream: $SIZE_MB MB; concurrent: $STREAMS × $STREAM_MB MB; TTFB: median of $TTFB_N \`GET /\`;"
echo "both of these: median of $ROUNDS interleaved rounds."
echo
echo "| metric | ostp | direct | shadowsocks-libev | ostp / direct | ostp / ss |"
echo "|---|---:|---:|---:|---:|---:|"
row() { echo "| $1 | $2 | $3 | $4 | $5 | $6 |"; }
row "single-stream download (MB/s)" "$MBPS_ostp" "$MBPS_direct" "$MBPS_ss" \
    "$(ratio "$MBPS_ostp" "$MBPS_direct")" "$(ratio "$MBPS_ostp" "$MBPS_ss")"
row "$STREAMS concurrent streams, aggregate (MB/s)" "$CONC_ostp" "$CONC_direct" "$CONC_ss" \
    "$(ratio "$CONC_ostp" "$CONC_direct")" "$(ratio "$CONC_ostp" "$CONC_ss")"
row "TTFB median (ms)" "$TTFB_ostp" "$TTFB_direct" "$TTFB_ss" \
    "$(ratio "$TTFB_ostp" "$TTFB_direct")" "$(ratio "$TTFB_ostp" "$TTFB_ss")"
row "server CPU (s per GB)" "$CPUS_ostp" "–" "$CPUS_ss" "–" "$(ratio "$CPUS_ostp" "$CPUS_ss")"
row "client CPU (s per GB)" "$CPUC_ostp" "–" "$CPUC_ss" "–" "$(ratio "$CPUC_ostp" "$CPUC_ss")"
row "single stream, \`-C target-cpu=native\` build (MB/s)" "$MBPS_native" "–" "$MBPS_ss" "–" "$(ratio "$MBPS_native" "$MBPS_ss")"
row "server CPU, native build (s per GB)" "$CPUS_native" "–" "$CPUS_ss" "–" "$(ratio "$CPUS_native" "$CPUS_ss")"
row "client CPU, native build (s per GB)" "$CPUC_native" "–" "$CPUC_ss" "–" "$(ratio "$CPUC_native" "$CPUC_ss")"
row "static musl build: single stream (MB/s)" "$MBPS_musl" "–" "$MBPS_ss" "–" "$(ratio "$MBPS_musl" "$MBPS_ss")"
row "static musl build: server / client CPU (s per GB)" "$CPUS_musl / $CPUC_musl" "–" "$CPUS_ss / $CPUC_ss" "–" "$(ratio "$CPUS_musl" "$CPUS_ss") / $(ratio "$CPUC_musl" "$CPUC_ss")"
row "static musl build: $STREAMS concurrent streams, aggregate (MB/s)" "$CONC_musl" "–" "$CONC_ss" "–" "$(ratio "$CONC_musl" "$CONC_ss")"
row "static musl build: server / client RSS idle (MB)" "$RSS_IDLE_S_musl / $RSS_IDLE_C_musl" "–" "$RSS_IDLE_S_ss / $RSS_IDLE_C_ss" "–" "–"
row "static musl build: server / client RSS peak (MB)" "$RSS_PEAK_S_musl / $RSS_PEAK_C_musl" "–" "$RSS_PEAK_S_ss / $RSS_PEAK_C_ss" "–" "–"
row "static musl build: idle RSS, anonymous pages only (MB)" "$ANON_IDLE_S_musl / $ANON_IDLE_C_musl" "–" "–" "–" "–"
row "static musl build: server RSS with $IDLE_SESSIONS idle sessions (MB)" "$IDLE_RSS_musl" "–" "–" "–" "–"
row "single stream over the TCP carrier (MB/s)" "$MBPS_tcp" "–" "$MBPS_ss" "–" "$(ratio "$MBPS_tcp" "$MBPS_ss")"
row "server CPU, TCP carrier (s per GB)" "$CPUS_tcp" "–" "$CPUS_ss" "–" "$(ratio "$CPUS_tcp" "$CPUS_ss")"
row "client CPU, TCP carrier (s per GB)" "$CPUC_tcp" "–" "$CPUC_ss" "–" "$(ratio "$CPUC_tcp" "$CPUC_ss")"
row "single stream, TUN mode, plain curl in a namespace (MB/s)" "$MBPS_tun" "–" "–" "–" "–"
row "single stream, same client and namespace via SOCKS5 (MB/s)" "$MBPS_tunsocks" "–" "–" "–" "–"
row "client CPU, TUN mode / via SOCKS5 (s per GB)" "$CPUC_tun / $CPUC_tunsocks" "–" "–" "–" "–"
row "server RSS idle / peak (MB)" "$RSS_IDLE_S_ostp / $RSS_PEAK_S_ostp" "–" "$RSS_IDLE_S_ss / $RSS_PEAK_S_ss" "–" "–"
row "client RSS idle / peak (MB)" "$RSS_IDLE_C_ostp / $RSS_PEAK_C_ostp" "–" "$RSS_IDLE_C_ss / $RSS_PEAK_C_ss" "–" "–"
row "idle RSS, anonymous pages only, server / client (MB)" "$ANON_IDLE_S_ostp / $ANON_IDLE_C_ostp" "–" "$ANON_IDLE_S_ss / $ANON_IDLE_C_ss" "–" "–"
row "server RSS with $IDLE_SESSIONS idle sessions (MB)" "$IDLE_SESSIONS_RSS" "–" "–" "–" "–"
row "loop wake-ups per GB, server / client" "$WAKE_S / $WAKE_C" "–" "–" "–" "–"
row "goodput 100 Mbit/s, 50 ms RTT, 1 % loss (MB/s; link max 12.5)" "$LOSSY_1" "–" "–" "–" "–"
row "goodput 100 Mbit/s, 50 ms RTT, 5 % loss (MB/s; link max 12.5)" "$LOSSY_5" "–" "–" "–" "–"
