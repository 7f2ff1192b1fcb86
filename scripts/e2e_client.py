"""Client side of the GPU end-to-end checks (scripts/gpu_e2e.sh). Standard library only.

Subcommands (all talk to http://127.0.0.1:PORT and write one JSON file):
  generate   greedy outputs for long prompts given as input_ids (lengths from --lens)
  compare    token equality of two `generate` files (tau=1.0 psa vs flashinfer)
  serve      OpenAI chat API, an sgl.function with fork, a multi-turn shared-prefix chat and its
             radix cache hit rate, PSA statistics from /metrics
  robust     N mixed requests incl. bad ones; then the token pool must be back to full
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import random
import re
import sys
import time
import urllib.error
import urllib.request


def _post(url: str, body: dict, timeout: float = 600) -> tuple[int, dict | str]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")[:500]
    except Exception as e:  # connection reset, timeout: the caller records it
        return -1, repr(e)


def _get(url: str, timeout: float = 60) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


VOCAB = 8000  # ids below it exist in every model the checks use (--vocab lowers it)


def set_vocab(n: int) -> None:
    global VOCAB
    VOCAB = n


def prompt_ids(n: int, seed: int) -> list[int]:
    # ids < VOCAB: inside the tokenizer vocabulary; deterministic per (n, seed)
    rng = random.Random(seed * 1_000_003 + n)
    return [rng.randrange(10, VOCAB) for _ in range(n)]


def cmd_generate(a) -> dict:
    """Greedy outputs per prompt length; --concurrent sends them all at once (one mixed decode batch)."""
    res = {"lens": a.lens, "max_new_tokens": a.max_new_tokens, "concurrent": a.concurrent, "outputs": []}

    def one(item):
        i, n = item
        t = time.time()
        code, d = _post(
            f"{a.url}/generate",
            {"input_ids": prompt_ids(n, i), "sampling_params": {"max_new_tokens": a.max_new_tokens,
                                                                "temperature": 0, "ignore_eos": True}},
        )  # fmt: skip
        ok = code == 200 and isinstance(d, dict)
        print(f"len {n}: {'ok' if ok else d}", flush=True)
        return {"len": n, "seed": i, "ok": ok, "seconds": round(time.time() - t, 2),
                "output_ids": d.get("output_ids") if ok else None, "error": None if ok else d}  # fmt: skip

    items = list(enumerate(a.lens))
    if a.concurrent:
        with cf.ThreadPoolExecutor(len(items) or 1) as ex:
            res["outputs"] = list(ex.map(one, items))
    else:
        res["outputs"] = [one(it) for it in items]
    return res


def cmd_compare(a) -> dict:
    x, y = (json.load(open(p)) for p in (a.a, a.b))
    rows, all_eq = [], True
    for ox, oy in zip(x["outputs"], y["outputs"]):
        ix, iy = ox.get("output_ids") or [], oy.get("output_ids") or []
        first = next((i for i, (p, q) in enumerate(zip(ix, iy)) if p != q), None)
        eq = bool(ix) and ix == iy
        all_eq &= eq
        rows.append({"len": ox["len"], "equal": eq, "first_diff": first,
                     "n_tokens": len(ix), "a": ix, "b": iy})  # fmt: skip
    print(json.dumps([{k: r[k] for k in ("len", "equal", "first_diff")} for r in rows]))
    return {"all_equal": all_eq, "a": a.a, "b": a.b, "rows": rows}


def _metrics(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        text = _get(f"{url}/metrics")
    except Exception as e:
        return {"error": repr(e)}
    for line in text.splitlines():
        m = re.match(r"^(sglang:(?:psa_\w+|cache_hit_rate|prompt_tokens_total|"
                     r"cached_tokens_total)\S*)\s+([-\d.e+]+)$", line)  # fmt: skip
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def cmd_serve(a) -> dict:
    res: dict = {}
    # 1. OpenAI chat API
    code, d = _post(f"{a.url}/v1/chat/completions", {
        "model": "default", "messages": [{"role": "user", "content": "Say hello. " * 200}],
        "max_tokens": 32, "temperature": 0,
    })  # fmt: skip
    res["openai_chat"] = {"status": code, "ok": code == 200 and "choices" in d,
                          "usage": d.get("usage") if isinstance(d, dict) else d}  # fmt: skip
    # 2. SGLang frontend program with fork
    try:
        import sglang as sgl

        @sgl.function
        def forked(s, doc):
            s += "Document: " + doc + "\n"
            forks = s.fork(3)
            for i, f in enumerate(forks):
                f += f"Question {i}: what is part {i}? Answer:" + sgl.gen("ans", max_tokens=16)
            s += "Summary:" + sgl.gen("summary", max_tokens=16)

        sgl.set_default_backend(sgl.RuntimeEndpoint(a.url))
        state = forked.run(doc="lorem ipsum " * 1500, temperature=0)
        res["sgl_fork"] = {"ok": True, "summary_chars": len(state["summary"])}
    except Exception as e:
        res["sgl_fork"] = {"ok": False, "error": repr(e)[:500]}
    # 3. Multi-turn chat sharing a long prefix; radix hit rate from cached_tokens
    system = prompt_ids(a.prefix_len, 99)
    hist = list(system)
    cached, prompt = 0, 0
    turns = []
    for t in range(a.turns):
        hist = hist + prompt_ids(64, 1000 + t)
        code, d = _post(f"{a.url}/generate", {
            "input_ids": hist, "sampling_params": {"max_new_tokens": 32, "temperature": 0,
                                                   "ignore_eos": True}})  # fmt: skip
        if code != 200:
            turns.append({"turn": t, "error": d})
            break
        meta = d["meta_info"]
        cached += meta.get("cached_tokens", 0)
        prompt += meta.get("prompt_tokens", len(hist))
        turns.append({"turn": t, "prompt_tokens": meta.get("prompt_tokens"),
                      "cached_tokens": meta.get("cached_tokens")})  # fmt: skip
        hist = hist + d["output_ids"]
    res["multiturn"] = {"turns": turns, "hit_rate": cached / prompt if prompt else 0.0}
    res["metrics"] = _metrics(a.url)
    res["ok"] = bool(res["openai_chat"]["ok"] and res["sgl_fork"]["ok"] and prompt)
    return res


def _pool_state(url: str) -> dict:
    try:
        return json.loads(_get(f"{url}/v1/loads"))
    except Exception as e:
        return {"error": repr(e)}


def cmd_robust(a) -> dict:
    rng = random.Random(0)

    def one(i: int):
        kind = rng.choice(["ok", "ok", "ok", "empty", "too_long", "bad_temp", "bad_max",
                           "chat_ok", "bad_json_schema", "stream"])  # fmt: skip
        sp = {"max_new_tokens": rng.randint(1, 64), "temperature": 0.7}
        body: dict = {"input_ids": prompt_ids(rng.randint(16, a.max_len // 4), i),
                      "sampling_params": sp}  # fmt: skip
        url = f"{a.url}/generate"
        if kind == "empty":
            body["input_ids"] = []
        elif kind == "too_long":
            body["input_ids"] = prompt_ids(a.max_len + 100, i)
        elif kind == "bad_temp":
            sp["temperature"] = -1
        elif kind == "bad_max":
            sp["max_new_tokens"] = -5
        elif kind == "bad_json_schema":
            sp["json_schema"] = "{not json"
        elif kind == "stream":
            body["stream"] = True
        elif kind == "chat_ok":
            url = f"{a.url}/v1/chat/completions"
            body = {"model": "default", "messages": [{"role": "user", "content": "hi " * 50}],
                    "max_tokens": 16}  # fmt: skip
        if kind == "stream":
            req = urllib.request.Request(url, json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})  # fmt: skip
            try:
                with urllib.request.urlopen(req, timeout=600) as r:
                    r.read()
                    return kind, r.status
            except urllib.error.HTTPError as e:
                return kind, e.code
            except Exception:
                return kind, -1
        code, _ = _post(url, body)
        return kind, code

    with cf.ThreadPoolExecutor(32) as ex:
        results = list(ex.map(one, range(a.n)))
    by_kind: dict = {}
    for kind, code in results:
        by_kind.setdefault(kind, {}).setdefault(str(code), 0)
        by_kind[kind][str(code)] += 1
    alive = False
    try:
        alive = _get(f"{a.url}/health", timeout=10) is not None
    except Exception:
        pass
    time.sleep(2)
    flush = _post(f"{a.url}/flush_cache", {})[0]
    time.sleep(2)
    loads = _pool_state(a.url)
    used = None
    try:
        used = sum(
            x.get("num_used_tokens", 0) for x in loads.get("loads", loads if isinstance(loads, list) else [])
        )
    except Exception:
        pass
    good = sum(1 for k, c in results if k in ("ok", "chat_ok", "stream") and c == 200)
    return {"n": a.n, "by_kind": by_kind, "good_ok": good, "server_alive": alive,
            "flush_status": flush, "loads": loads, "num_used_tokens_after": used,
            "ok": alive and used == 0}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["generate", "compare", "serve", "robust"])
    p.add_argument("--url", default="http://127.0.0.1:30000")
    p.add_argument("--out", required=True)
    p.add_argument("--lens", type=int, nargs="*", default=[4096, 16384, 32768, 65536])
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--concurrent", action="store_true", help="generate: send every prompt at once")
    p.add_argument("--a")
    p.add_argument("--b")
    p.add_argument("--prefix-len", type=int, default=8192)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--max-len", type=int, default=32768)
    p.add_argument("--label", default="")
    p.add_argument("--vocab", type=int, default=VOCAB, help="prompt token ids are drawn below this")
    a = p.parse_args()
    set_vocab(a.vocab)
    res = {"cmd": a.cmd, "label": a.label, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    res.update({"generate": cmd_generate, "compare": cmd_compare, "serve": cmd_serve,
                "robust": cmd_robust}[a.cmd](a))  # fmt: skip
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    ok = res.get("ok", res.get("all_equal", True))
    print(f"{a.cmd}: {'OK' if ok else 'FAILED'} -> {a.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
