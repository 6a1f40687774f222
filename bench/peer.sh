#!/usr/bin/env bash
# Peer comparison: direct calls to the peer bench's fake OpenAI upstream vs the same calls
# through the LiteLLM proxy and through our gateway (llm-router), measured in ONE run with the
# peer's own load generator (three --url targets, alternating blocks over --rounds rounds).
#
#   (a) non-streaming, c=1    n=$N_A    p50/p99, added p50 vs direct, proxy CPU ms/request
#   (b) non-streaming, c=$C_B n=$N_B    rps, p50/p99, proxy CPU ms/request
#   (c) streaming,     c=1    n=$N_C    TTFB p50/p99 (first body byte), full-stream p50
#
# Everything listens on 127.0.0.1 on free ports. Every process this script starts is stopped
# by PID on exit (never by name). Prints a short human table, then one JSON summary line
# (the last line of stdout); progress goes to stderr.
#
#   bash bench/peer.sh                 # about 3-4 minutes on the 2-core box
#   PIN=1 bash bench/peer.sh           # taskset: upstream+loadgen on CPU 0, both proxies on CPU 1
#
# Env knobs (defaults in brackets):
#   PEER_BENCH [$(dirname "$0")/../../shared/peer-bench]   fake_upstream.py + loadgen.py
#   LITELLM_VENV [/tmp/litellm-venv]   missing -> LiteLLM is skipped (direct vs llm-router only)
#   BENCH_VENV [/tmp/bench-venv]       python for the fake upstream and the load generator
#   GATEWAY_VENV [<repo>/.venv]        provides bin/llm-router
#   UP_PORT / LITELLM_PORT / GATEWAY_PORT [free ports]
#   PIN [0]  N_A [300] N_B [3000] C_B [32] N_C [300] ROUNDS [6]
#   WARM_A [100] WARM_B [300] WARM_C [50]   unmeasured warm-up requests per target
#   FAKE_DELAY_MS [0]                       passed to the fake upstream
#   MAX_SECONDS [400]                       hard bound per loadgen scenario
#   OUT_DIR [mktemp -d /tmp/llm-router-peer.XXXXXX]   configs, logs, per-scenario JSON
#
# Setup of the peer venvs (see the peer README):
#   python3.11 -m venv /tmp/litellm-venv && /tmp/litellm-venv/bin/pip install 'litellm[proxy]==1.106.2'
#   python3.11 -m venv /tmp/bench-venv && /tmp/bench-venv/bin/pip install starlette uvicorn uvloop httptools aiohttp orjson
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"

PEER_BENCH="${PEER_BENCH:-$(dirname "$0")/../../shared/peer-bench}"
if [ ! -d "$PEER_BENCH" ] || [ ! -f "$PEER_BENCH/loadgen.py" ] || [ ! -f "$PEER_BENCH/fake_upstream.py" ]; then
  echo "peer.sh: peer bench not found at '$PEER_BENCH' (need loadgen.py and fake_upstream.py)." >&2
  echo "peer.sh: set PEER_BENCH=/path/to/peer-bench; refusing to run without the peer's own tools." >&2
  exit 2
fi
PEER_BENCH="$(cd "$PEER_BENCH" && pwd)"

LITELLM_VENV="${LITELLM_VENV:-/tmp/litellm-venv}"
BENCH_VENV="${BENCH_VENV:-/tmp/bench-venv}"
GATEWAY_VENV="${GATEWAY_VENV:-$ROOT/.venv}"
PIN="${PIN:-0}"
N_A="${N_A:-300}"; N_B="${N_B:-3000}"; C_B="${C_B:-32}"; N_C="${N_C:-300}"
ROUNDS="${ROUNDS:-6}"
WARM_A="${WARM_A:-100}"; WARM_B="${WARM_B:-300}"; WARM_C="${WARM_C:-50}"
MAX_SECONDS="${MAX_SECONDS:-400}"
export FAKE_DELAY_MS="${FAKE_DELAY_MS:-0}"
OUT_DIR="${OUT_DIR:-$(mktemp -d /tmp/llm-router-peer.XXXXXX)}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
HOST=127.0.0.1

log() { echo "peer.sh: $*" >&2; }

PY_BENCH="$BENCH_VENV/bin/python"
LITELLM_BIN="$LITELLM_VENV/bin/litellm"
GATEWAY_BIN="$GATEWAY_VENV/bin/llm-router"
[ -x "$PY_BENCH" ] || { log "missing $PY_BENCH (set BENCH_VENV; see the setup lines at the top of this script)"; exit 2; }
[ -x "$GATEWAY_BIN" ] || { log "missing $GATEWAY_BIN (set GATEWAY_VENV)"; exit 2; }
WITH_LITELLM=1
if [ ! -x "$LITELLM_BIN" ] || [ ! -x "$LITELLM_VENV/bin/python" ]; then
  WITH_LITELLM=0
  log "LiteLLM venv not found at $LITELLM_VENV (no bin/litellm): SKIPPING LiteLLM; comparing direct vs llm-router only"
fi
for v in N_A N_B C_B N_C ROUNDS WARM_A WARM_B WARM_C MAX_SECONDS; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || { log "$v must be a non-negative integer (got '${!v}')"; exit 2; }
done

if [ "$PIN" = "1" ]; then
  command -v taskset >/dev/null || { log "PIN=1 needs taskset"; exit 2; }
  [ "$(nproc)" -ge 2 ] || { log "PIN=1 needs at least 2 CPUs"; exit 2; }
  PIN_UP=(taskset -c 0); PIN_LG=(taskset -c 0); PIN_PX=(taskset -c 1)
else
  PIN_UP=(); PIN_LG=(); PIN_PX=()
fi

# ------------------------------------------------------------------ ports (loopback, free)
free_port() {
  "$PY_BENCH" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
port_busy() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }
UP_PORT="${UP_PORT:-$(free_port)}"
GATEWAY_PORT="${GATEWAY_PORT:-$(free_port)}"
LITELLM_PORT="${LITELLM_PORT:-$(free_port)}"
for _ in 1 2 3 4 5; do   # bounded: make the three ports distinct
  [ "$GATEWAY_PORT" != "$UP_PORT" ] || GATEWAY_PORT=$(free_port)
  [ "$LITELLM_PORT" != "$UP_PORT" ] && [ "$LITELLM_PORT" != "$GATEWAY_PORT" ] || LITELLM_PORT=$(free_port)
done
PORTS=("$UP_PORT" "$GATEWAY_PORT")
[ "$WITH_LITELLM" = 1 ] && PORTS+=("$LITELLM_PORT")
[ "$(printf '%s\n' "${PORTS[@]}" | sort -u | wc -l)" = "${#PORTS[@]}" ] || { log "could not pick distinct ports: ${PORTS[*]}"; exit 2; }
for p in "${PORTS[@]}"; do
  if port_busy "$p"; then log "port $p on $HOST is already in use; aborting"; exit 2; fi
done

# ------------------------------------------------------------------ cleanup (by PID only)
PIDS=()
cleanup() {
  local pid kids=() k
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] || continue
    # children of the processes we started (by PID, e.g. worker subprocesses), if any
    for k in $(ps -o pid= --ppid "$pid" 2>/dev/null || true); do kids+=("$k"); done
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]:-}" "${kids[@]:-}"; do
    [ -n "$pid" ] || continue
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_http() {  # url, timeout_s, pid: bounded poll, fails fast if the process died
  local url=$1 t=$2 pid=$3 i
  for i in $(seq 1 $((t * 4))); do
    kill -0 "$pid" 2>/dev/null || return 1
    curl -sf -o /dev/null --max-time 2 "$url" && return 0
    sleep 0.25
  done
  return 1
}
rss_kb() { awk '/^VmRSS:/{print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
now() { date +%s.%N; }

# Loopback only: keep any proxy settings away from the upstream clients of both proxies.
NOPROXY_ENV=(-u HTTP_PROXY -u HTTPS_PROXY -u ALL_PROXY -u http_proxy -u https_proxy -u all_proxy
             NO_PROXY='*' no_proxy='*')

# ------------------------------------------------------------------ fake upstream (peer's)
"${PIN_UP[@]}" env "${NOPROXY_ENV[@]}" "$PY_BENCH" "$PEER_BENCH/fake_upstream.py" --host "$HOST" --port "$UP_PORT" \
  >"$OUT_DIR/upstream.log" 2>&1 &
UP_PID=$!
PIDS+=("$UP_PID")
wait_http "http://$HOST:$UP_PORT/health" 20 "$UP_PID" || { log "upstream did not start"; cat "$OUT_DIR/upstream.log" >&2; exit 1; }
log "fake upstream pid=$UP_PID port=$UP_PORT FAKE_DELAY_MS=$FAKE_DELAY_MS"

MASTER_KEY="sk-bench-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"

# ------------------------------------------------------------------ LiteLLM (as run_litellm_peer.sh)
PX_PID=""; PX_STARTUP=null; PX_RSS0=0; LITELLM_VERSION=""
if [ "$WITH_LITELLM" = 1 ]; then
  mkdir -p "$OUT_DIR/litellm"
  cat >"$OUT_DIR/litellm/config.yaml" <<EOF
model_list:
  - model_name: fake-gpt
    litellm_params:
      model: openai/fake-gpt
      api_base: http://$HOST:$UP_PORT/v1
      api_key: sk-dummy-upstream-key
litellm_settings:
  telemetry: false
  set_verbose: false
  callbacks: []
  success_callback: []
  failure_callback: []
general_settings:
  disable_spend_logs: true
  disable_error_logs: true
EOF
  # No DB, local model-cost map, LITELLM_LOG=ERROR (also uvicorn's level: no access log),
  # a master key (1.106.x refuses to start without one), 1 worker.
  T0=$(now)
  (cd "$OUT_DIR/litellm" && exec env -u DATABASE_URL -u DIRECT_URL -u REDIS_HOST -u REDIS_URL "${NOPROXY_ENV[@]}" \
    LITELLM_MASTER_KEY="$MASTER_KEY" \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    LITELLM_LOG=ERROR \
    LITELLM_MODE=PRODUCTION \
    LITELLM_DONT_SHOW_FEEDBACK_BOX=true \
    "${PIN_PX[@]}" "$LITELLM_BIN" --config "$OUT_DIR/litellm/config.yaml" --host "$HOST" --port "$LITELLM_PORT" \
    --num_workers 1) >"$OUT_DIR/litellm.log" 2>&1 &
  PX_PID=$!
  PIDS+=("$PX_PID")
  wait_http "http://$HOST:$LITELLM_PORT/health/liveliness" 120 "$PX_PID" \
    || { log "LiteLLM did not start"; tail -50 "$OUT_DIR/litellm.log" >&2; exit 1; }
  PX_STARTUP=$(printf '%.2f' "$(echo "$(now) - $T0" | bc)")
  curl -sf --max-time 30 "http://$HOST:$LITELLM_PORT/v1/chat/completions" \
    -H "Authorization: Bearer $MASTER_KEY" -H 'Content-Type: application/json' \
    -d '{"model":"fake-gpt","messages":[{"role":"user","content":"ping"}]}' >"$OUT_DIR/litellm_first_response.json" \
    || { log "request through LiteLLM failed"; tail -50 "$OUT_DIR/litellm.log" >&2; exit 1; }
  PX_RSS0=$(rss_kb "$PX_PID")
  LITELLM_VERSION=$("$LITELLM_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))')
  log "litellm $LITELLM_VERSION pid=$PX_PID port=$LITELLM_PORT startup_s=$PX_STARTUP"
fi

# ------------------------------------------------------------------ our gateway
mkdir -p "$OUT_DIR/gateway"
cat >"$OUT_DIR/gateway/config.yaml" <<EOF
# generated by bench/peer.sh: persistence off, default router policy, one explicit model
models:
  - name: fake-gpt
    provider: openai_compatible
    base_url: http://$HOST:$UP_PORT/v1
    upstream_model: fake-gpt
default_model: fake-gpt
enable_persistence: false
router_policy: default
log_level: info
log_format: json
data_dir: $OUT_DIR/gateway/data
EOF
# Environment variables override the YAML file: pin the ones that matter, drop ones that would
# change the setup (a DB, client keys, extra models). cwd is the temp dir (no stray .env).
T0=$(now)
(cd "$OUT_DIR/gateway" && exec env -u DATABASE_URL -u GATEWAY_API_KEYS -u LLM_MODELS -u MODELS -u DEFAULT_MODEL \
  -u CONFIG_FILE -u HOST -u PORT -u DATA_DIR -u OPENAI_API_KEY "${NOPROXY_ENV[@]}" \
  ENABLE_PERSISTENCE=false ROUTER_POLICY=default LOG_LEVEL=info LOG_FORMAT=json \
  "${PIN_PX[@]}" "$GATEWAY_BIN" serve --config "$OUT_DIR/gateway/config.yaml" --host "$HOST" --port "$GATEWAY_PORT") \
  >"$OUT_DIR/gateway.log" 2>&1 &
GW_PID=$!
PIDS+=("$GW_PID")
wait_http "http://$HOST:$GATEWAY_PORT/ready" 180 "$GW_PID" \
  || { log "llm-router did not become ready"; tail -50 "$OUT_DIR/gateway.log" >&2; exit 1; }
GW_STARTUP=$(printf '%.2f' "$(echo "$(now) - $T0" | bc)")
curl -sf --max-time 30 "http://$HOST:$GATEWAY_PORT/v1/chat/completions" \
  -H "Authorization: Bearer $MASTER_KEY" -H 'Content-Type: application/json' \
  -d '{"model":"fake-gpt","messages":[{"role":"user","content":"ping"}]}' >"$OUT_DIR/gateway_first_response.json" \
  || { log "request through llm-router failed"; tail -50 "$OUT_DIR/gateway.log" >&2; exit 1; }
GW_RSS0=$(rss_kb "$GW_PID")
GW_VERSION=$("$GATEWAY_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("llm-router"))' 2>/dev/null || echo unknown)
GW_GIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
GW_DIRTY=$([ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ] && echo true || echo false)
UP_RSS0=$(rss_kb "$UP_PID")
log "llm-router $GW_VERSION ($GW_GIT dirty=$GW_DIRTY) pid=$GW_PID port=$GATEWAY_PORT startup_s=$GW_STARTUP"
log "pin=$PIN out=$OUT_DIR"

# ------------------------------------------------------------------ load (peer's loadgen)
URLS=(--url "direct=http://$HOST:$UP_PORT")
WATCH=(--watch-pid "upstream=$UP_PID" --watch-pid "llm-router=$GW_PID")
if [ "$WITH_LITELLM" = 1 ]; then
  URLS+=(--url "litellm=http://$HOST:$LITELLM_PORT")
  WATCH+=(--watch-pid "litellm=$PX_PID")
fi
URLS+=(--url "llm-router=http://$HOST:$GATEWAY_PORT")
LG=(timeout -k 10 $((MAX_SECONDS + 120)) "${PIN_LG[@]}" "$PY_BENCH" "$PEER_BENCH/loadgen.py"
    "${URLS[@]}" --api-key "$MASTER_KEY" --model fake-gpt --rounds "$ROUNDS" --max-seconds "$MAX_SECONDS"
    "${WATCH[@]}")

T_RUN0=$(now)
log "(a) c=1 n=$N_A non-stream (warm-up $WARM_A per target)"
"${LG[@]}" -n "$N_A" -c 1 --warmup "$WARM_A" >"$OUT_DIR/a_c1.json"
log "(b) c=$C_B n=$N_B non-stream (warm-up $WARM_B per target)"
"${LG[@]}" -n "$N_B" -c "$C_B" --warmup "$WARM_B" >"$OUT_DIR/b_c$C_B.json"
log "(c) c=1 n=$N_C stream (warm-up $WARM_C per target)"
"${LG[@]}" -n "$N_C" -c 1 --stream --warmup "$WARM_C" >"$OUT_DIR/c_stream.json"
RUN_S=$(printf '%.1f' "$(echo "$(now) - $T_RUN0" | bc)")

UP_RSS1=$(rss_kb "$UP_PID"); GW_RSS1=$(rss_kb "$GW_PID")
GW_ALIVE=true; kill -0 "$GW_PID" 2>/dev/null || GW_ALIVE=false
GW_LOG_ERR=$(grep -ciE '"level": ?"(error|critical)"|Traceback' "$OUT_DIR/gateway.log" || true)
GW_LOG_WARN=$(grep -ciE '"level": ?"warning"' "$OUT_DIR/gateway.log" || true)
GW_LOG_LINES=$(wc -l <"$OUT_DIR/gateway.log")
PX_RSS1=0; PX_ALIVE=null; PX_LOG_ERR=null; PX_LOG_WARN=null
if [ "$WITH_LITELLM" = 1 ]; then
  PX_RSS1=$(rss_kb "$PX_PID")
  PX_ALIVE=true; kill -0 "$PX_PID" 2>/dev/null || PX_ALIVE=false
  PX_LOG_ERR=$(grep -cE 'ERROR|Traceback|CRITICAL' "$OUT_DIR/litellm.log" || true)
  PX_LOG_WARN=$(grep -c 'WARNING' "$OUT_DIR/litellm.log" || true)
fi

# ------------------------------------------------------------------ report
export OUT_DIR C_B PIN WITH_LITELLM LITELLM_VERSION GW_VERSION GW_GIT GW_DIRTY PX_STARTUP GW_STARTUP RUN_S \
  PX_RSS0 PX_RSS1 GW_RSS0 GW_RSS1 UP_RSS0 UP_RSS1 PX_ALIVE GW_ALIVE PX_LOG_ERR PX_LOG_WARN GW_LOG_ERR \
  GW_LOG_WARN GW_LOG_LINES N_A N_B N_C ROUNDS
"$PY_BENCH" - <<'EOF'
import json, os, platform, sys
E = os.environ
out, cb = E["OUT_DIR"], E["C_B"]
with_litellm = E["WITH_LITELLM"] == "1"
targets = ["direct"] + (["litellm"] if with_litellm else []) + ["llm-router"]
own_proc = {"direct": "upstream", "litellm": "litellm", "llm-router": "llm-router"}
scen = {
    "a_c1": json.load(open(f"{out}/a_c1.json"))["results"],
    f"b_c{cb}": json.load(open(f"{out}/b_c{cb}.json"))["results"],
    "c_stream_c1": json.load(open(f"{out}/c_stream.json"))["results"],
}
def d(x, y):
    return None if x is None or y is None else round(y - x, 3)
def num(s):
    return None if s in ("", "null", None) else float(s)
def mb(kb):
    return round(int(kb or 0) / 1024, 1) if kb and kb != "0" else None
summary = {
    "bench": "llm-router peer comparison (peer loadgen, alternating rounds)",
    "litellm_version": E["LITELLM_VERSION"] or None,
    "llm_router_version": E["GW_VERSION"], "llm_router_git": E["GW_GIT"],
    "llm_router_worktree_dirty": E["GW_DIRTY"] == "true",
    "python": platform.python_version(), "cpus": os.cpu_count(), "pin": int(E["PIN"]),
    "fake_delay_ms": float(E["FAKE_DELAY_MS"]), "rounds": int(E["ROUNDS"]),
    "startup_s": {"litellm": num(E["PX_STARTUP"]), "llm-router": num(E["GW_STARTUP"])},
    "run_s": round(float(E["RUN_S"]), 1),
}
for key, res in scen.items():
    dr = res["direct"]
    s = {}
    for t in targets:
        r = res[t]
        cpu = r.get("cpu_ms_per_req", {})
        e = {"p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "rps": r["rps"], "ok": r["ok"],
             "errors": r["errors"], "cpu_ms_per_req": cpu.get(own_proc[t]),
             "upstream_cpu_ms_per_req": cpu.get("upstream"), "loadgen_cpu_ms_per_req": cpu.get("loadgen")}
        if t != "direct":
            e["added_p50_ms"] = d(dr["p50_ms"], r["p50_ms"])
            e["added_p99_ms"] = d(dr["p99_ms"], r["p99_ms"])
        if "ttfb_p50_ms" in r:
            e["ttfb_p50_ms"], e["ttfb_p99_ms"] = r["ttfb_p50_ms"], r["ttfb_p99_ms"]
            if t != "direct":
                e["added_ttfb_p50_ms"] = d(dr["ttfb_p50_ms"], r["ttfb_p50_ms"])
                e["added_ttfb_p99_ms"] = d(dr["ttfb_p99_ms"], r["ttfb_p99_ms"])
        if r.get("error_samples"):
            e["error_samples"] = r["error_samples"][:2]
        s[t] = e
    summary[key] = s
summary["rss_mb"] = {
    "litellm": {"after_start": mb(E["PX_RSS0"]), "after_run": mb(E["PX_RSS1"])} if with_litellm else None,
    "llm-router": {"after_start": mb(E["GW_RSS0"]), "after_run": mb(E["GW_RSS1"])},
    "upstream": {"after_start": mb(E["UP_RSS0"]), "after_run": mb(E["UP_RSS1"])},
}
summary["alive_at_end"] = {"litellm": json.loads(E["PX_ALIVE"]), "llm-router": json.loads(E["GW_ALIVE"])}
summary["log"] = {
    "litellm": {"error_lines": json.loads(E["PX_LOG_ERR"]), "warning_lines": json.loads(E["PX_LOG_WARN"])},
    "llm-router": {"error_lines": int(E["GW_LOG_ERR"]), "warning_lines": int(E["GW_LOG_WARN"]),
                   "lines": int(E["GW_LOG_LINES"])},
}
summary["errors_total"] = sum(summary[k][t]["errors"] for k in scen for t in targets)
summary["out_dir"] = out
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)

f = lambda x, w=7, p=2: f"{x:{w}.{p}f}" if isinstance(x, (int, float)) else f"{'-':>{w}}"
titles = {"a_c1": f"(a) c=1 n={E['N_A']}", f"b_c{cb}": f"(b) c={cb} n={E['N_B']}",
          "c_stream_c1": f"(c) stream c=1 n={E['N_C']}"}
lines = [
    f"litellm {summary['litellm_version'] or '(skipped)'} | llm-router {summary['llm_router_version']} "
    f"({summary['llm_router_git']}{', dirty worktree' if summary['llm_router_worktree_dirty'] else ''}) | "
    f"pin={summary['pin']} fake_delay_ms={summary['fake_delay_ms']:g} cpus={summary['cpus']}",
    f"{'scenario':<22} {'target':<11} {'p50 ms':>7} {'p99 ms':>7} {'+p50':>7} {'rps':>8} "
    f"{'TTFB p50':>8} {'TTFB p99':>8} {'+TTFB50':>7} {'CPU ms/req':>10} {'errors':>6}",
]
for key in scen:
    for t in targets:
        e = summary[key][t]
        lines.append(
            f"{titles[key] if t == 'direct' else '':<22} {t:<11} {f(e['p50_ms'])} {f(e['p99_ms'])} "
            f"{f(e.get('added_p50_ms'))} {f(e['rps'], 8, 1)} {f(e.get('ttfb_p50_ms'), 8)} "
            f"{f(e.get('ttfb_p99_ms'), 8)} {f(e.get('added_ttfb_p50_ms'))} {f(e['cpu_ms_per_req'], 10)} "
            f"{e['errors']:>6}"
        )
lines.append("+p50 / +TTFB50 = added vs direct (p50 diff); CPU ms/req = the target's own process "
             "(direct: the fake upstream)")
rss = summary["rss_mb"]
lines.append(
    "RSS MB start->end: "
    + (f"litellm {rss['litellm']['after_start']}->{rss['litellm']['after_run']}, " if with_litellm else "")
    + f"llm-router {rss['llm-router']['after_start']}->{rss['llm-router']['after_run']} | startup s: "
    + (f"litellm {summary['startup_s']['litellm']:.1f}, " if with_litellm else "")
    + f"llm-router {summary['startup_s']['llm-router']:.1f} | load phase {summary['run_s']} s"
)
table = "\n".join(lines)
open(f"{out}/table.txt", "w").write(table + "\n")
print(table)
print(json.dumps(summary))
EOF
