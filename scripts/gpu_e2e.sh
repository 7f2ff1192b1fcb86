#!/usr/bin/env bash
# GPU end-to-end evidence for `--attention-backend psa` (issue 4). One stage per device call,
# each well under 9 minutes. Run from the repo root on the device machine (carry .devbundle):
#   bash scripts/gpu_e2e.sh STAGE
# Stages: smoke | equal | serve | serve_fi | robust | bench | bench_triton | bench_log | serving | eval
#         eval_hybrid | eval_equal (issue 7) | tiered_kernels | tiered_equal | capacity (issue 6)
# Results: $OUT/*.json (+ server logs) and benchmarks/results/*.json.
set -uo pipefail
STAGE=${1:?stage}
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/psa_out}; mkdir -p "$OUT" benchmarks/results
source .devbundle/install.sh || exit 1
# Editable install registers the sglang.srt.plugins entry point; --no-deps: offline machine.
python3 -m pip install --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1 \
  || { tail -20 "$OUT/pip.log"; exit 1; }
python3 -c "import sglang_psa.plugin, sglang_psa.kernels" || exit 1
COMMIT=${PSA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo none)}
DEV=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
PORT=30000; URL=http://127.0.0.1:$PORT
M8=/tmp/m8b; M1=/tmp/m1b
CLIENT="python3 scripts/e2e_client.py --url $URL"

model() {  # model DIR PRESET MAXLEN
  [ -f "$1/config.json" ] || python3 .devbundle/make-tiny-model.py "$1" --preset "$2" --max-len "$3" || exit 1
}

start_server() {  # start_server LOGNAME ARGS...
  local log=$OUT/$1.log; shift
  python3 -m sglang.launch_server --load-format ${LOAD_FORMAT:-dummy} --port $PORT --mem-fraction-static 0.7 ${SERVER_EXTRA:-} "$@" > "$log" 2>&1 &
  SERVER=$!
  for _ in $(seq 240); do
    python3 -c "import urllib.request as u; u.urlopen('$URL/health', timeout=2)" 2>/dev/null && return 0
    kill -0 $SERVER 2>/dev/null || { tail -40 "$log"; return 1; }
    sleep 2
  done
  tail -40 "$log"; return 1
}
stop_server() { kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; sleep 3; }

# PSA budget for the functional and throughput runs. Dummy weights give nearly flat attention, so
# tau alone would select almost everything; max_pages caps the budget at what the synthetic skewed
# cache needs (pages of 32 tokens: 128 pages = 4k tokens, LServe's ~constant budget).
PSA_ARGS=(--attention-backend psa --page-size 32 --psa-tau 0.9 --psa-max-pages 128 --psa-dense-below 4096 --psa-stats --psa-stats-interval 64)
BENCH_PSA=(--attention-backend psa --page-size 32 --psa-tau 0.9 --psa-max-pages 160 --psa-dense-below 4608)

case $STAGE in
smoke)
  model $M1 llama3-1b 32768
  python3 -m sglang.launch_server --help | grep -q "psa" && echo "help lists psa" || { echo "psa missing in --help"; exit 1; }
  start_server smoke_psa --model-path $M1 "${PSA_ARGS[@]}" --enable-metrics || exit 1
  $CLIENT generate --lens 1000 8000 --out "$OUT/smoke_generate.json"; rc=$?
  curl -s $URL/metrics | grep psa > "$OUT/smoke_metrics.txt"
  stop_server; exit $rc ;;
equal)
  # tau=1.0 must reproduce flashinfer's greedy tokens. max_pages covers 70k tokens (2200 pages of 32).
  model $M8 llama3-8b 140000
  LENS="4096 16384 32768 65536"
  start_server equal_fi --model-path $M8 --attention-backend flashinfer --page-size 32 || exit 1
  $CLIENT generate --lens $LENS --out "$OUT/equal_flashinfer.json"; stop_server
  start_server equal_psa --model-path $M8 --attention-backend psa --page-size 32 --psa-tau 1.0 \
    --psa-max-pages 2200 --psa-dense-below 0 || exit 1
  $CLIENT generate --lens $LENS --out "$OUT/equal_psa.json"; stop_server
  $CLIENT compare --a "$OUT/equal_psa.json" --b "$OUT/equal_flashinfer.json" --out "$OUT/equal_compare.json"; rc=$?
  python3 - "$OUT/equal_compare.json" "$COMMIT" "$DEV" <<'PY'
import json, sys, time
d = json.load(open(sys.argv[1])); d.update(commit=sys.argv[2], device=sys.argv[3],
  date=time.strftime("%Y-%m-%d"), model="llama3-8b shape, dummy weights", config="tau=1.0 page 32 max_pages 2200")
json.dump(d, open("benchmarks/results/e2e_tau1_equal_flashinfer.json", "w"), indent=1)
PY
  exit $rc ;;
serve|serve_fi)
  model $M8 llama3-8b 140000
  if [ $STAGE = serve ]; then ARGS=("${PSA_ARGS[@]}"); else ARGS=(--attention-backend flashinfer --page-size 32); fi
  start_server $STAGE --model-path $M8 "${ARGS[@]}" --enable-metrics || exit 1
  $CLIENT serve --label $STAGE --prefix-len 16384 --turns 6 --out "$OUT/$STAGE.json"; rc=$?
  grep "PSA decode stats" "$OUT/$STAGE.log" | tail -3
  stop_server
  cp "$OUT/$STAGE.json" "benchmarks/results/e2e_$STAGE.json"
  exit $rc ;;
robust)
  model $M8 llama3-8b 40000
  start_server robust --model-path $M8 "${PSA_ARGS[@]}" --context-length 32768 || exit 1
  $CLIENT robust --n 200 --max-len 32768 --out "$OUT/robust.json"; rc=$?
  stop_server
  cp "$OUT/robust.json" benchmarks/results/e2e_robust.json
  exit $rc ;;
bench|bench_triton|bench_log)
  # bench_one_batch decode throughput, one process per backend over the issue's sizes (bench_one_batch
  # skips the combinations that do not fit the KV pool). Budget cap: 160 pages x 32 tokens (5k tokens,
  # chosen from the synthetic skewed cache); requests below 4608 tokens decode densely (all pages).
  model $M8 llama3-8b 140000
  if [ $STAGE = bench ]; then
    RUNS=${BENCH_RUNS:-"psa flashinfer psa_accesslog"}
  elif [ $STAGE = bench_log ]; then
    RUNS="psa_nolog psa_accesslog"  # access-log overhead, both in this run
  else
    RUNS="triton"
  fi
  for B in $RUNS; do
    # bench_one_batch prefills each size in one forward pass and writes its results only at the end:
    # 262k-token prefills (4 x 64k, 8 x 32k) run out of memory and take every result with them.
    SIZES=(--batch-size 1 4 16 --input-len 4096 32768 131072)
    case $B in
    psa) ARGS=("${BENCH_PSA[@]}") ;;
    psa_reuse4) ARGS=("${BENCH_PSA[@]}" --psa-reuse-steps 4) ;;  # selection reuse, 4 steps
    psa_nolog) ARGS=("${BENCH_PSA[@]}"); SIZES=(--batch-size 1 4 --input-len 32768 131072) ;;
    psa_accesslog) ARGS=("${BENCH_PSA[@]}" --psa-access-log "$OUT/accesslog" --psa-access-log-source dummy-weights-8b-bench)
                   SIZES=(--batch-size 1 4 --input-len 32768 131072) ;;
    triton) ARGS=(--attention-backend triton --page-size 32) ;;
    *) ARGS=(--attention-backend $B --page-size 32) ;;
    esac
    RES=$OUT/bench_$B.jsonl; rm -f "$RES"
    timeout ${BENCH_TIMEOUT:-400} python3 scripts/bench_e2e_one_batch.py --model-path $M8 --load-format dummy \
      --mem-fraction-static 0.7 --cuda-graph-max-bs 16 --disable-prefill-cuda-graph "${ARGS[@]}" "${SIZES[@]}" --output-len 32 \
      --run-name "$B" --result-filename "$RES" > "$OUT/bench_$B.log" 2>&1 || { echo "bench $B failed"; tail -20 "$OUT/bench_$B.log"; }
    python3 - "$RES" "$B" "$COMMIT" "$DEV" <<'PY'
import json, os, sys, time
rows = [json.loads(l) for l in open(sys.argv[1])] if os.path.exists(sys.argv[1]) else []
out = {"backend": sys.argv[2], "commit": sys.argv[3], "device": sys.argv[4], "date": time.strftime("%Y-%m-%d"),
       "model": "llama3-8b shape, dummy weights, mem 0.7, page 32, CUDA graphs", "tool": "sglang bench_one_batch",
       "psa_budget": "tau 0.9, max_pages 160 x 32 tokens (cap chosen from the synthetic skewed cache), "
                     "dense below 4608 tokens, stats off", "results": rows}
json.dump(out, open(f"benchmarks/results/bench_one_batch_{sys.argv[2]}.json", "w"), indent=1)
print(sys.argv[2], json.dumps([(r.get("batch_size"), r.get("input_len"), round(r.get("median_decode_latency", 0) * 1e3, 2)) for r in rows]))
PY
  done
  ;;
serving)
  # SGLang's bench_serving, generated-shared-prefix workload (groups of requests sharing a 16k system
  # prompt: radix sharing + long-context decode), psa and flashinfer in one run.
  model $M8 llama3-8b 140000
  export SERVER_EXTRA=--disable-prefill-cuda-graph  # both servers; decode graphs stay on
  for B in psa flashinfer; do
    if [ $B = psa ]; then ARGS=("${BENCH_PSA[@]}" --psa-stats --enable-metrics); else ARGS=(--attention-backend flashinfer --page-size 32); fi
    start_server serving_$B --model-path $M8 "${ARGS[@]}" || continue
    timeout 240 python3 -m sglang.benchmark.serving --backend sglang --port $PORT --tokenizer $M8 \
      --dataset-name generated-shared-prefix --gsp-num-groups 4 --gsp-prompts-per-group 8 \
      --gsp-system-prompt-len 16384 --gsp-question-len 256 --gsp-output-len 128 --num-prompts 32 \
      --request-rate inf --seed 1 --output-file "$OUT/serving_$B.jsonl" > "$OUT/serving_client_$B.log" 2>&1
    tail -25 "$OUT/serving_client_$B.log"
    stop_server
  done
  python3 - "$OUT" "$COMMIT" "$DEV" <<'PY'
import json, os, sys, time
out = {"tool": "sglang.benchmark.serving generated-shared-prefix (4 groups x 8 prompts, 16k shared prefix, "
               "256-token questions, 128 output tokens, all at once)", "commit": sys.argv[2], "device": sys.argv[3],
       "date": time.strftime("%Y-%m-%d"),
       "model": "llama3-8b shape, dummy weights, mem 0.7, page 32, decode CUDA graphs, no prefill graphs",
       "psa_budget": "tau 0.9, max_pages 160 x 32 tokens, dense below 4608", "results": {}}
for b in ("psa", "flashinfer"):
    f = os.path.join(sys.argv[1], f"serving_{b}.jsonl")
    if os.path.exists(f):
        out["results"][b] = [json.loads(l) for l in open(f)][-1]
json.dump(out, open("benchmarks/results/bench_serving_gsp.json", "w"), indent=1)
PY
  ;;
eval)
  # Issue 7: accuracy of every backend setting on the trained small model (servers in parallel).
  PSA_COMMIT=$COMMIT timeout 400 python3 scripts/eval_accuracy.py --parallel 8 --model models/psa-llama-2m \
    --lengths 4096,8192 --samples 20 --log-dir "$OUT/evallogs" --access-log "$OUT/accesslog_trained" \
    2>&1 | tee "$OUT/eval.log"
  ;;
eval_hybrid)
  # Issue 7 (session 8): the log-normal order, floor + cap, fixed budgets and streaming layers 0-2
  # (scripts/find_streaming_layers.py's choice for this model) through the servers, vs Quest top-k.
  ONLY=dense,topk-10,topk-12,topk-16,topk-lognormal-12,psa-lognormal-0.95-min16,psa-lognormal-0.8-min10-max12
  ONLY=$ONLY,topk-12-stream0-2,topk-16-stream0-2,topk-lognormal-12-stream0-2,psa-lognormal-0.8-min10-max12-stream0-2
  PSA_COMMIT=$COMMIT timeout ${EVAL_TIMEOUT:-540} python3 scripts/eval_accuracy.py --parallel ${EVAL_PARALLEL:-8} --model models/psa-llama-2m \
    --lengths 4096,8192 --samples ${EVAL_SAMPLES:-100} --tasks kv_retrieval,passkey --topks 10,12,16 \
    --lognormal 0.95:16,0.8:10:12,0.01:12:12 --streaming-layers 0-2 \
    --hybrid topk-12,topk-16,topk-lognormal-12,psa-lognormal-0.8-min10-max12 --only $ONLY \
    --log-dir "$OUT/evallogs" 2>&1 | tee "$OUT/eval_hybrid.log"
  ;;
eval_equal)
  # Issue 7's third bar through the servers: pages at equal accuracy, PSA vs Quest top-k and top-k in
  # PSA's log-normal order, on 500 kv-retrieval prompts (the offline twin's comparison,
  # eval-accuracy-hf-equal-20261204.json; passkey is 1.00 for every setting).
  PSA_COMMIT=$COMMIT timeout ${EVAL_TIMEOUT:-540} python3 scripts/eval_accuracy.py --parallel ${EVAL_PARALLEL:-8} --model models/psa-llama-2m \
    --lengths 4096,8192 --samples ${EVAL_SAMPLES:-250} --tasks kv_retrieval --topks 10,11,12,13 \
    --lognormal 0.8:10:12,0.01:10:10,0.01:11:11 \
    --only dense,topk-10,topk-11,topk-12,topk-13,psa-lognormal-0.8-min10-max12,topk-lognormal-10,topk-lognormal-11 \
    --log-dir "$OUT/evallogs" 2>&1 | tee "$OUT/eval_equal.log"
  R=$(ls -t benchmarks/results/eval-accuracy-2*.json | head -1)
  python3 scripts/accuracy_noise.py --results "$R" --equal-accuracy psa-lognormal-0.8-min10-max12 \
    --curve topk-10,topk-11,topk-12,topk-13 --curve topk-lognormal-10,topk-lognormal-11 | tail -2
  ;;
tiered_equal)
  # Issue 6: tiered mode (KV pool in pinned host memory, decode through the GPU hot pool) must return
  # resident PSA's greedy tokens, at tau 1.0 and tau 0.9, with a pool that holds everything, one with
  # no slots at all (every page through scratch) and one that evicts all the time. The trained model:
  # real weights, real attention (dummy weights repeat tokens, which makes equality too easy).
  # TE_CONCURRENT="" sends the prompts one after another (a schedule that does not depend on timing).
  export LOAD_FORMAT=auto
  GEN="$CLIENT generate --vocab 4000 --lens 2048 4096 8192 12288 ${TE_CONCURRENT---concurrent} --max-new-tokens 48"
  COMMON=(--model-path models/psa-llama-2m --attention-backend psa --page-size 32 --psa-max-pages 512
          --context-length 32768 --max-running-requests 4 --cuda-graph-max-bs 4)
  # miss path pool unless the name says split / host (the later flag wins)
  TIER=(--radix-cache-backend psa --psa-tiered --psa-host-kv-gb 1 --psa-stats-interval 8 --psa-miss-path pool)
  T1=(--psa-tau 1.0 --psa-dense-below 0); T09=(--psa-tau 0.9 --psa-dense-below 2048)
  RUNS=" ${TE_RUNS:-res_t1 tier_t1_head res_t09 tier_t09_evict res_t09_reuse tier_t09_head_reuse} "
  rc=0
  one() { local name=$1; shift
    [[ "$RUNS" == *" $name "* ]] || return 0
    start_server te_$name "${COMMON[@]}" "$@" || { rc=1; return 1; }
    $GEN --out "$OUT/te_$name.json" || rc=1; grep "PSA tiered" "$OUT/te_$name.log" | tail -3; stop_server; }
  one res_t1 "${T1[@]}"; one tier_t1 "${T1[@]}" "${TIER[@]}"
  one tier_t1_nopool "${T1[@]}" "${TIER[@]}" --psa-hot-pool-gb 0.001
  # pool sizes for the small model (16 KiB per page slot, 5120 scratch slots = 0.078 GiB first):
  # 0.078 = no slots (every page through scratch), 0.09 = ~800 slots (evicts every step)
  one res_t09 "${T09[@]}"; one tier_t09_nopool "${T09[@]}" "${TIER[@]}" --psa-hot-pool-gb 0.078
  one tier_t09_evict "${T09[@]}" "${TIER[@]}" --psa-hot-pool-gb 0.09
  # head slots (8 KiB; 4096 scratch = 0.031 GiB first): 0.04 = ~1100 slots, fewer than a step needs
  HEAD=(--psa-hot-pool-gb 0.04 --psa-hot-granularity head)
  one tier_t1_head "${T1[@]}" "${TIER[@]}" "${HEAD[@]}"
  one tier_t09_head "${T09[@]}" "${TIER[@]}" "${HEAD[@]}"
  one res_t09_reuse "${T09[@]}" --psa-reuse-steps 4
  one tier_t09_head_reuse "${T09[@]}" "${TIER[@]}" "${HEAD[@]}" --psa-reuse-steps 4
  one tier_t09_lru_prefetch "${T09[@]}" "${TIER[@]}" --psa-hot-pool-gb 0.09 --psa-hot-policy lru \
    --psa-prefetch previous-step
  # next-layer prefetch: layer l+1's pages selected with its query estimated from layer l's input
  one tier_t09_head_nl "${T09[@]}" "${TIER[@]}" "${HEAD[@]}" --psa-prefetch next-layer
  # write-through is the default since b918172 (the runs above use it); _inval drops written pages
  # instead (--psa-no-write-through), as every run did before
  one tier_t09 "${T09[@]}" "${TIER[@]}"  # a pool that holds everything: prefill fills it
  one tier_t09_inval "${T09[@]}" "${TIER[@]}" --psa-no-write-through
  one tier_t09_evict_inval "${T09[@]}" "${TIER[@]}" --psa-hot-pool-gb 0.09 --psa-no-write-through
  # next-step prefetch (the pages below each layer's cut, fetched for the next step) with evicting pools
  one tier_t09_evict_ns "${T09[@]}" "${TIER[@]}" --psa-hot-pool-gb 0.09 --psa-prefetch next-step
  one tier_t09_head_ns "${T09[@]}" "${TIER[@]}" "${HEAD[@]}" --psa-prefetch next-step
  # misses attended straight from host memory, copied into the pool beside (evicting pools)
  one tier_t09_evict_host "${T09[@]}" "${TIER[@]}" --psa-hot-pool-gb 0.09 --psa-miss-path host
  one tier_t09_head_host "${T09[@]}" "${TIER[@]}" "${HEAD[@]}" --psa-miss-path host
  # misses copied into their slots beside the resident pages' attention, then attended and merged
  one tier_t09_evict_split "${T09[@]}" "${TIER[@]}" --psa-hot-pool-gb 0.09 --psa-miss-path split
  one tier_t09_head_split "${T09[@]}" "${TIER[@]}" "${HEAD[@]}" --psa-miss-path split
  # sink and local-window pages pinned (leases) in pools smaller than a step's pages
  one tier_t09_evict_pin "${T09[@]}" "${TIER[@]}" --psa-hot-pool-gb 0.09 --psa-hot-pin-window
  one tier_t09_head_pin "${T09[@]}" "${TIER[@]}" "${HEAD[@]}" --psa-hot-pin-window
  # per-layer quotas following each layer's pages per step (re-derived every 2 steps) in evicting pools
  one tier_t09_evict_quota "${T09[@]}" "${TIER[@]}" --psa-hot-pool-gb 0.09 --psa-hot-quota adaptive \
    --psa-hot-quota-interval 2
  one tier_t09_head_quota "${T09[@]}" "${TIER[@]}" "${HEAD[@]}" --psa-hot-quota adaptive --psa-hot-quota-interval 2
  for pair in "tier_t1 res_t1" "tier_t1_nopool res_t1" "tier_t1_head res_t1" "tier_t09_nopool res_t09" \
              "tier_t09_evict res_t09" "tier_t09_head res_t09" "tier_t09_lru_prefetch res_t09" \
              "tier_t09_head_nl res_t09" "tier_t09_head_reuse res_t09_reuse" "tier_t09 res_t09" "tier_t09_inval res_t09" \
              "tier_t09_evict_inval res_t09" "tier_t09_evict_ns res_t09" "tier_t09_head_ns res_t09" \
              "tier_t09_evict_host res_t09" "tier_t09_head_host res_t09" "tier_t09_evict_split res_t09" \
              "tier_t09_head_split res_t09" "tier_t09_evict_pin res_t09" "tier_t09_head_pin res_t09" \
              "tier_t09_evict_quota res_t09" "tier_t09_head_quota res_t09"; do
    set -- $pair
    [ -f "$OUT/te_$1.json" ] && [ -f "$OUT/te_$2.json" ] || continue
    $CLIENT compare --a "$OUT/te_$1.json" --b "$OUT/te_$2.json" --out "$OUT/te_cmp_$1.json" || rc=1
  done
  python3 - "$OUT" "$COMMIT" "$DEV" "${TE_CONCURRENT---concurrent}" <<'PY'
import glob, json, os, sys, time
how = "concurrent" if sys.argv[4] else "sequential"
out = {"benchmark": "tiered_equal", "commit": sys.argv[2], "device": sys.argv[3], "date": time.strftime("%Y-%m-%d"),
       "model": f"models/psa-llama-2m (trained), greedy, 4 {how} prompts of 2k-12k tokens, 48 new tokens",
       "compare": {}}
for f in sorted(glob.glob(os.path.join(sys.argv[1], "te_cmp_*.json"))):
    d = json.load(open(f))
    out["compare"][os.path.basename(f)[7:-5]] = {"all_equal": d["all_equal"],
        "rows": [{k: r[k] for k in ("len", "equal", "first_diff", "n_tokens")} for r in d["rows"]]}
json.dump(out, open(f"benchmarks/results/e2e_tiered_equal-{sys.argv[2]}.json", "w"), separators=(",", ":"))
print(json.dumps({k: v["all_equal"] for k, v in out["compare"].items()}))
PY
  exit $rc ;;
tiered_kernels)
  # Issue 6, first call after kernel changes: the GPU tests of the tiered kernels (compiled, CUDA-graph
  # replays) against their references, then the kernel-level step of every miss path (bench_tiered:
  # sync / host / split / overlap / nofetch, clock placement, head slots, pool 2x the step's pages).
  python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/test_fused_place.py tests/test_tiered_device.py \
    tests/test_sparse_decode.py tests/test_page_copy.py > "$OUT/pytest_tiered_gpu.log" 2>&1; rc=$?
  tail -3 "$OUT/pytest_tiered_gpu.log"
  [ $rc -eq 0 ] || exit $rc
  python3 scripts/bench_tiered.py --fetch-backend triton --placement clock --granularity head --mults 2 \
    --out benchmarks/results 2>&1 | tail -4
  ;;
capacity)
  # Issue 6: concurrent 64k requests and decode throughput at each backend's own maximum, one run.
  model $M8 llama3-8b 140000
  N=${CAP_N:-8}; L=${CAP_LEN:-65536}
  CAP=(--model-path $M8 --page-size 32 --context-length ${CAP_CTX:-$((L + 4464))} --max-running-requests 16 --cuda-graph-max-bs 8
       --disable-prefill-cuda-graph)
  FILES=()
  # tiered runs: a name with _head uses head slots, _nl next-layer prefetch, _prev previous-step
  # prefetch, _ns next-step prefetch (_mN: a margin of N pages, --psa-prefetch-margin), _host misses
  # attended from host memory (--psa-miss-path host), _split misses copied on a side stream beside the
  # resident pages' attention, then attended and merged (--psa-miss-path split), _nocopy skips the host copies (wrong tokens; times everything but the transfers),
  # _torchq estimates the next layer's query through torch's native paths instead of next_query.py,
  # _pN gives the side-stream prefetch copy N programs (--psa-prefetch-programs), _inval drops the
  # pool's copies of written pages (--psa-no-write-through; write-through is the default), _pin pins the
  # sink and local-window pages (--psa-hot-pin-window), _quota sets per-layer quotas (--psa-hot-quota
  # adaptive). TIER_EXTRA="--psa-hot-pool-gb 35" on an H200 gives
  # the pool an H100's size (0.9 x the 39.9 GiB of KV FlashInfer gets there at mem 0.7)
  for B in ${CAP_RUNS:-tiered flashinfer hicache}; do
    SKIP=0; TORCHQ=0
    case $B in
    flashinfer) ARGS=(--attention-backend flashinfer) ;;
    hicache) ARGS=(--attention-backend flashinfer --enable-hierarchical-cache --hicache-size ${HICACHE_GB:-48}) ;;
    tiered*) ARGS=("${BENCH_PSA[@]}" --radix-cache-backend psa --psa-tiered --psa-host-kv-gb ${HOST_GB:-66}
                   --psa-stats-interval 16 --psa-miss-path pool ${TIER_EXTRA:-})  # the names say split / host
             [[ $B == *_head* ]] && ARGS+=(--psa-hot-granularity head)
             [[ $B == *_nl* ]] && ARGS+=(--psa-prefetch next-layer)
             [[ $B == *_prev* ]] && ARGS+=(--psa-prefetch previous-step)
             [[ $B == *_ns* ]] && ARGS+=(--psa-prefetch next-step)
             [[ $B =~ _m([0-9]+) ]] && ARGS+=(--psa-prefetch-margin ${BASH_REMATCH[1]})
             [[ $B == *_host* ]] && ARGS+=(--psa-miss-path host)
             [[ $B == *_split* ]] && ARGS+=(--psa-miss-path split)
             [[ $B == *_nocopy* ]] && SKIP=1
             [[ $B == *_torchq* ]] && TORCHQ=1
             [[ $B == *_inval* ]] && ARGS+=(--psa-no-write-through)
             [[ $B == *_pin* ]] && ARGS+=(--psa-hot-pin-window)
             [[ $B == *_quota* ]] && ARGS+=(--psa-hot-quota adaptive)
             [[ $B =~ _p([0-9]+) ]] && ARGS+=(--psa-prefetch-programs ${BASH_REMATCH[1]}) ;;
    esac
    SGLANG_PSA_LOOKAHEAD_TORCH=$TORCHQ SGLANG_PSA_TIERED_SKIP_COPY=$SKIP start_server cap_$B "${CAP[@]}" "${ARGS[@]}" \
      || { grep -iE "error|Traceback" "$OUT/cap_$B.log" | tail -5; continue; }
    PROF=
    if [ -n "${CAP_PROFILE:-}" ]; then  # CAP_PROFILE=STEPS: a GPU profile of STEPS decode steps at N running
      ( timeout 280 bash -c "until grep -q '#running-req: $N,' '$OUT/cap_$B.log'; do sleep 1; done" \
        && python3 scripts/profile_server_decode.py capture --url $URL --steps $CAP_PROFILE --dir /tmp/prof_$B ) &
      PROF=$!
    fi
    timeout ${CAP_TIMEOUT:-300} python3 scripts/bench_capacity.py run --n $N --len $L --out-len ${CAP_OUT:-64} \
      --label $B --out "$OUT/cap_$B.json" && FILES+=("$OUT/cap_$B.json")
    if [ -n "$PROF" ]; then
      wait $PROF && python3 scripts/profile_server_decode.py summarize /tmp/prof_$B --steps $CAP_PROFILE \
        --out "$OUT/prof_$B.json" --meta "{\"label\": \"$B\", \"commit\": \"$COMMIT\", \"device\": \"$DEV\"}" | head -40
    fi
    grep -E "PSA tiered|#running-req" "$OUT/cap_$B.log" | tail -4
    stop_server
  done
  python3 scripts/bench_capacity.py merge --baseline ${CAP_BASELINE:-flashinfer} --out "benchmarks/results/capacity-$COMMIT.json" \
    --meta "{\"commit\": \"$COMMIT\", \"device\": \"$DEV\", \"date\": \"$(date -u +%F)\", \"model\": \"llama3-8b shape, dummy weights, mem 0.7, page 32\", \"psa\": \"${BENCH_PSA[*]}\"}" "${FILES[@]}"
  ;;
*) echo "unknown stage $STAGE"; exit 2 ;;
esac
