#!/usr/bin/env python3
"""bench_report.py — turns the Google Benchmark JSON files of scripts/bench.sh
into the data files its gnuplot script draws, and a markdown summary.

    bench_report.py RESULTS_DIR DATA_DIR

reads RESULTS_DIR/{bench_generate,bench_kv_cache,bench_decode,bench_rss}.json
(a missing file leaves its tables out), writes whitespace-separated columns to
DATA_DIR/*.dat and RESULTS_DIR/summary.md. The run's facts (machine, command,
flags, wall time) come from the environment bench.sh sets: BENCH_MACHINE,
BENCH_CORES, BENCH_COMMAND, BENCH_FLAGS, BENCH_OMP, BENCH_WALL_SECONDS.
Standard library only.
"""

import json
import os
import sys
from datetime import datetime, timezone

# The reference points of issue 4 (llama2.c's run, -Ofast -march=native
# -fopenmp, 2 threads, random weights, on this machine): quoted, not measured
# by this script.
RUN_TOK_S_2_THREADS = {"stories15M": 610.0, "stories42M": 220.0, "stories110M": 105.0}

TIME_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------

class Run:
    """One benchmark entry: family, plain arguments, named arguments, seconds per iteration, counters."""

    def __init__(self, entry):
        parts = entry["name"].split("/")
        self.family = parts[0]
        self.args = []     # "16", "stories15M"
        self.named = {}    # "threads" -> "2"
        for part in parts[1:]:
            if part == "real_time" or part.startswith(("min_time:", "iterations:")):
                continue
            if ":" in part:
                key, value = part.split(":", 1)
                self.named[key] = value
            else:
                self.args.append(part)
        self.seconds = entry["real_time"] * TIME_UNIT_SECONDS[entry["time_unit"]]
        self.counters = entry

    def arg(self, i=0):
        return int(self.args[i])

    def threads(self):
        return int(self.named.get("threads", "1"))

    def __getitem__(self, key):
        return self.counters[key]

    def get(self, key, default=None):
        return self.counters.get(key, default)


def load(results_dir, program):
    path = os.path.join(results_dir, program + ".json")
    if not os.path.exists(path):
        return None, []
    with open(path) as f:
        data = json.load(f)
    runs = [Run(b) for b in data["benchmarks"] if b.get("run_type", "iteration") == "iteration"]
    return data["context"], runs


def family(runs, name):
    return [r for r in runs if r.family == name]


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------

def write_dat(path, header, rows):
    with open(path, "w") as f:
        f.write("# " + " ".join(header) + "\n")
        for row in rows:
            f.write(" ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row) + "\n")


def fmt(x, digits=3):
    if x is None:
        return "–"
    if abs(x) >= 999.5:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|---|" + "|".join("---:" for _ in header[1:]) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(ok):
    return "met" if ok else "**missed**"


# ---------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------

def generation_section(runs, data_dir, out, targets):
    cached = {r.arg(): r for r in family(runs, "BM_GenerateCached")}
    uncached = {r.arg(): r for r in family(runs, "BM_GenerateUncached")}
    rows, dat = [], []
    for n in sorted(set(cached) & set(uncached)):
        c, u = cached[n], uncached[n]
        measured = u.seconds / c.seconds
        predicted = u["predicted_speedup"]
        rows.append([n, fmt(c.seconds * 1e3), fmt(u.seconds * 1e3), fmt(measured), fmt(predicted),
                     fmt(measured / predicted)])
        dat.append([n, c.seconds, u.seconds, measured, predicted])
    if rows:
        write_dat(os.path.join(data_dir, "speedup.dat"),
                  ["positions", "cached_s", "uncached_s", "measured_speedup", "predicted_speedup"], dat)
        out.append("## Cached vs uncached generation (stories15M shape, 1 thread)\n")
        out.append("A one-token prompt generated to N positions; the prediction is "
                   "Σ max(FLOPs / GEMM rate, bytes / read bandwidth) over the steps "
                   "(benchmarks/bench_work.hpp), with both rates measured right before each benchmark.\n")
        out.append(table(["N positions", "cached ms", "uncached ms", "measured speedup", "predicted speedup",
                          "measured / predicted"], rows) + "\n")
        within = all(abs(d[3] / d[4] - 1) <= 0.25 for d in dat)
        worst = max(dat, key=lambda d: abs(d[3] / d[4] - 1))
        targets.append(["measured speedup within 25% of predicted at every length",
                        f"worst at N = {worst[0]}: measured {fmt(worst[3])}× vs predicted {fmt(worst[4])}×",
                        verdict(within)])
        if dat[-1][0] == 1024:
            targets.append(["speedup at 1024 positions ≥ 15×", f"{fmt(dat[-1][3])}×", verdict(dat[-1][3] >= 15)])

    c_steps = {r.arg(): r for r in family(runs, "BM_CachedStep")}
    u_steps = {r.arg(): r for r in family(runs, "BM_UncachedStep")}
    rows, dat = [], []
    for n in sorted(set(c_steps) | set(u_steps)):
        c, u = c_steps.get(n), u_steps.get(n)
        cs = c.seconds if c else float("nan")
        cp = c["predicted_s"] if c else float("nan")
        us = u.seconds if u else float("nan")
        up = u["predicted_s"] if u else float("nan")
        dat.append([n, cs, cp, us, up])
        rows.append([n, fmt(cs * 1e3), fmt(cp * 1e3), fmt(us * 1e3), fmt(up * 1e3), fmt(us / cs)])
    if rows:
        write_dat(os.path.join(data_dir, "steps.dat"),
                  ["positions", "cached_s", "cached_predicted_s", "uncached_s", "uncached_predicted_s"], dat)
        out.append("### One step to n positions\n")
        out.append(table(["n", "cached ms", "predicted", "uncached ms", "predicted", "uncached / cached"], rows) + "\n")


def append_section(runs, data_dir, out, targets):
    fresh = {r.arg(): r["time_per_token"] for r in family(runs, "BM_KVCacheAppend")}
    reused = {r.arg(): r["time_per_token"] for r in family(runs, "BM_KVCacheAppendReused")}
    naive = {r.arg(): r["time_per_token"] for r in family(runs, "BM_NaiveConcatAppend")}
    ns = sorted(set(fresh) | set(reused) | set(naive))
    if not ns:
        return
    nan = float("nan")
    write_dat(os.path.join(data_dir, "append.dat"), ["tokens", "kvcache_s", "kvcache_reused_s", "naive_s"],
              [[n, fresh.get(n, nan), reused.get(n, nan), naive.get(n, nan)] for n in ns])
    out.append("## Appending one token at a time (4 kv heads × d_k 16)\n")
    out.append("Time per appended token. *new cache*: an empty KVCache grown to N tokens each time "
               "(geometric reallocation and first-touch page faults included); *reused*: one cache, "
               "clear() between runs; *naive concat*: reallocate and copy every step.\n")
    rows = [[n, fmt(fresh.get(n, nan) * 1e9), fmt(reused.get(n, nan) * 1e9), fmt(naive.get(n, nan) * 1e9),
             fmt(naive.get(n, nan) / fresh.get(n, nan))] for n in ns]
    out.append(table(["N tokens", "KVCache ns (new cache)", "KVCache ns (reused)", "naive concat ns",
                      "naive / KVCache"], rows) + "\n")
    for label, series in (("new cache", fresh), ("reused", reused)):
        if series:
            spread = max(series.values()) / min(series.values())
            targets.append([f"append cost per token flat within 2× from 1 to 8192 ({label})",
                            f"max / min = {fmt(spread)}", verdict(spread <= 2)])


def attention_section(runs, data_dir, out):
    steps = family(runs, "BM_AttentionStep")
    if not steps:
        return
    by = {(r.arg(), r.threads()): r for r in steps}
    ns = sorted({n for n, _ in by})
    threads = sorted({t for _, t in by})
    nan = float("nan")
    dat, rows = [], []
    for n in ns:
        line, row = [n], [n]
        for t in threads:
            r = by.get((n, t))
            line += [r.seconds if r else nan, r["kv_GBps"] if r else nan]
            row += [fmt(r.seconds * 1e6) if r else "–", fmt(r["kv_GBps"]) if r else "–"]
        dat.append(line)
        rows.append(row)
    header = ["cached_tokens"] + [f"{k}_{t}t" for t in threads for k in ("seconds", "GBps")]
    write_dat(os.path.join(data_dir, "attention.dat"), header, dat)
    out.append("## One attention decode step over n cached tokens (stories15M layer: d_model 288, 6 heads)\n")
    out.append("kv GB/s = 2·n·kv_dim·4 bytes per step / step time. One layer's K and V at 8192 tokens "
               "(18.9 MB) fit in the 32 MB L3, so rates above DRAM bandwidth are possible.\n")
    out.append(table(["n"] + [h for t in threads for h in (f"µs ({t} thr)", f"kv GB/s ({t} thr)")], rows) + "\n")


def decode_section(runs, data_dir, out, targets):
    reads = {}
    for name in ("BM_MemoryRead", "BM_MemoryReadAfter"):
        for r in family(runs, name):
            reads[(name, r.threads())] = r["bytes_per_second"] * 1e-9
    decode = {(r.args[0], r.threads()): r for r in family(runs, "BM_Decode")}
    prefill = {(r.args[0], r.threads()): r for r in family(runs, "BM_Prefill")}
    if not decode and not prefill:
        return
    out.append("## Decode and prefill (llama2.c checkpoints with random weights, written and loaded by kvcache)\n")
    if reads:
        out.append("Memory read bandwidth, summing 256 MB (same process): " + "; ".join(
            f"{t} thread{'s' if t > 1 else ''}: {fmt(reads.get(('BM_MemoryRead', t)))} GB/s before, "
            f"{fmt(reads.get(('BM_MemoryReadAfter', t)))} GB/s after"
            for t in sorted({t for _, t in reads})) + ".\n")
    rows, dat = [], []
    models = ["stories15M", "stories42M", "stories110M"]
    for model in models:
        for t in (1, 2):
            d, p = decode.get((model, t)), prefill.get((model, t))
            if not d and not p:
                continue
            d_tok = d["tokens_per_second"] if d else None
            p_tok = p["tokens_per_second"] if p else None
            eff = d["effective_GBps"] if d else None
            read = d.get("read_GBps") if d else None
            rows.append([model, t, fmt(d_tok), fmt(p_tok), fmt(p_tok / d_tok) if d and p else "–",
                         fmt(d["bytes_per_token"] * 1e-6) if d else "–", fmt(eff), fmt(read),
                         fmt(eff / read) if d and read else "–",
                         fmt(RUN_TOK_S_2_THREADS[model]) if t == 2 else "–"])
            dat.append([model, t, d_tok or 0.0, p_tok or 0.0, eff or 0.0, read or 0.0])
    write_dat(os.path.join(data_dir, "decode.dat"),
              ["model", "threads", "decode_tok_s", "prefill_tok_s", "effective_GBps", "read_GBps"], dat)
    out.append(table(["model", "threads", "decode tok/s", "prefill tok/s (256-token prompt)", "prefill / decode",
                      "MB read per token", "effective GB/s", "read GB/s (just before)", "effective / read",
                      "llama2.c run tok/s (issue 4, not measured here)"], rows) + "\n")

    d = decode.get(("stories110M", 2))
    if d and d.get("read_GBps"):
        ratio = d["effective_GBps"] / d["read_GBps"]
        targets.append(["decode stories110M, 2 threads: effective ≥ 90% of read bandwidth",
                        f"{fmt(d['effective_GBps'])} / {fmt(d['read_GBps'])} GB/s = {ratio:.0%}", verdict(ratio >= 0.9)])
    for model in models:
        d = decode.get((model, 2))
        if d:
            tok = d["tokens_per_second"]
            targets.append([f"decode {model}, 2 threads ≥ llama2.c run ({fmt(RUN_TOK_S_2_THREADS[model])} tok/s, quoted)",
                            f"{fmt(tok)} tok/s", verdict(tok >= RUN_TOK_S_2_THREADS[model])])
    for t in (1, 2):
        d, p = decode.get(("stories15M", t)), prefill.get(("stories15M", t))
        if d and p:
            ratio = p["tokens_per_second"] / d["tokens_per_second"]
            targets.append([f"prefill stories15M ≥ 5× decode per token ({t} thread{'s' if t > 1 else ''})",
                            f"{fmt(ratio)}×", verdict(ratio >= 5)])


def bf16_section(runs, out, targets):
    """Decode with bfloat16 weights next to float32 (same process) and llama2.c's run."""
    f32 = {(r.args[0], r.threads()): r for r in family(runs, "BM_Decode")}
    bf16 = {(r.args[0], r.threads()): r for r in family(runs, "BM_DecodeBf16")}
    if not bf16:
        return
    rows = []
    for model in ("stories15M", "stories42M", "stories110M"):
        for t in (1, 2):
            b, f = bf16.get((model, t)), f32.get((model, t))
            if not b:
                continue
            tok = b["tokens_per_second"]
            run = RUN_TOK_S_2_THREADS[model] if t == 2 else None
            rows.append([model, t, fmt(tok), fmt(f["tokens_per_second"]) if f else "–",
                         fmt(tok / f["tokens_per_second"]) if f else "–",
                         fmt(b["bytes_per_token"] * 1e-6), fmt(b["effective_GBps"]), fmt(b.get("read_GBps")),
                         fmt(tok / run) if run else "–"])
    b = bf16.get(("stories110M", 2))
    if b:
        ratio = b["tokens_per_second"] / RUN_TOK_S_2_THREADS["stories110M"]
        targets.append([f"stretch: bf16 weights, decode stories110M, 2 threads ≥ 1.7× llama2.c run "
                        f"({fmt(1.7 * RUN_TOK_S_2_THREADS['stories110M'])} tok/s)",
                        f"{fmt(b['tokens_per_second'])} tok/s = {ratio:.2f}×", verdict(ratio >= 1.7)])
    out.append("## Decode with bfloat16 weights (`WeightType::bf16`, products in float32)\n")
    out.append(table(["model", "threads", "bf16 decode tok/s", "f32 decode tok/s", "bf16 / f32", "MB read per token",
                      "effective GB/s", "read GB/s (just before)", "× llama2.c run (quoted)"], rows) + "\n")


def batch_section(runs, out, targets):
    """Aggregate decode tokens/s of B sessions stepped together (issue 5), 1 and 2 threads."""
    batch = family(runs, "BM_BatchedDecode")
    if not batch:
        return
    tok = {(int(r.named["B"]), r.threads()): r["tokens_per_second"] for r in batch}
    threads = sorted({t for _, t in tok})
    rows = []
    for b in sorted({b for b, _ in tok}):
        row = [b]
        for t in threads:
            base = tok.get((1, t))
            row += [fmt(tok.get((b, t))), fmt(tok[(b, t)] / base) if base and (b, t) in tok else "–"]
        rows.append(row)
    for t in threads:
        if (1, t) in tok and (8, t) in tok:
            ratio = tok[(8, t)] / tok[(1, t)]
            targets.append([f"(issue 5) batch 8 ≥ 3× the tokens/s of batch 1 (stories15M shape, {t} thread{'s' if t > 1 else ''})",
                            f"{ratio:.2f}×", verdict(ratio >= 3)])
    out.append("## Batched decode (stories15M shape, random weights, `Decoder::forward_batch`)\n")
    out.append(table(["sessions"] + [h for t in threads for h in (f"tokens/s, all sessions ({t} thr)", f"× batch 1 ({t} thr)")],
                     rows) + "\n")


def rss_section(runs, out, targets):
    rss = family(runs, "BM_GenerateRss")
    if not rss:
        return
    rows = []
    for r in rss:
        w, kv, peak = r["weight_bytes"], r["kv_bytes"], r["peak_rss_bytes"]
        limit = 1.1 * (w + kv) + 20e6
        rows.append([r.args[0], fmt(w * 1e-6), fmt(kv * 1e-6), fmt(peak * 1e-6), fmt(r["ratio"]),
                     fmt(r["excess_MB"]), fmt(limit * 1e-6), verdict(peak <= limit)])
        targets.append([f"peak RSS of kvcache-generate {r.args[0]} ≤ 1.1 × (weights + KV) + 20 MB",
                        f"{fmt(peak * 1e-6)} MB vs {fmt(limit * 1e-6)} MB", verdict(peak <= limit)])
    out.append("## Peak memory of kvcache-generate (all max_seq_len positions, 2 threads; MB = 10⁶ bytes)\n")
    out.append(table(["model", "weights MB", "KV cache MB", "peak RSS MB", "ratio", "excess MB", "limit MB",
                      "target"], rows) + "\n")


# ---------------------------------------------------------------------------

def main():
    if len(sys.argv) != 3:
        sys.exit("usage: bench_report.py RESULTS_DIR DATA_DIR")
    results_dir, data_dir = sys.argv[1], sys.argv[2]
    os.makedirs(data_dir, exist_ok=True)

    out, targets = [], []
    env = os.environ.get
    wall = env("BENCH_WALL_SECONDS")
    out.append("# Benchmark summary\n")
    facts = [
        ("machine", env("BENCH_MACHINE", "?")),
        ("cores", env("BENCH_CORES", "?")),
        ("date", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        ("command", f"`{env('BENCH_COMMAND', 'scripts/bench.sh')}`"),
        ("compiler flags", f"`{env('BENCH_FLAGS', '?')}`"),
        ("OpenMP", env("BENCH_OMP", "?")),
    ]
    if wall:
        facts.append(("benchmarks' wall time", f"{int(float(wall))} s (build excluded)"))
    out.append("\n".join(f"- {k}: {v}" for k, v in facts) + "\n")
    out.append("Timings on a shared machine are noisy; each comparison below is between figures "
               "taken in the same process, minutes apart at most.\n")

    body = []
    _, runs = load(results_dir, "bench_generate")
    generation_section(runs, data_dir, body, targets)
    _, runs = load(results_dir, "bench_kv_cache")
    append_section(runs, data_dir, body, targets)
    attention_section(runs, data_dir, body)
    _, runs = load(results_dir, "bench_decode")
    decode_section(runs, data_dir, body, targets)
    bf16_section(runs, body, targets)
    _, runs = load(results_dir, "bench_rss")
    rss_section(runs, body, targets)
    _, runs = load(results_dir, "bench_batch")
    batch_section(runs, body, targets)

    if targets:
        out.append("## Targets of issue 4\n")
        out.append(table(["target", "this run", ""], targets) + "\n")
    out += body
    with open(os.path.join(results_dir, "summary.md"), "w") as f:
        f.write("\n".join(out))


if __name__ == "__main__":
    main()
