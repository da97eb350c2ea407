#!/usr/bin/env python3
"""GGUF speed: kvcache-generate (and, when asked, llama.cpp) on GGUF files of
every weight type, side by side in one run; driven by scripts/bench_gguf.sh.

Each run is one generation: a prompt of --prompt-len ids (BOS, then fixed
pseudo-random ids), then --decode ids generated (-n prompt + decode), and
both rates come from that run's stats line (wall clock, same definitions in
both programs):
  prefill_tok_s = prompt tokens / time to the first generated id
  decode_tok_s  = (generated - 1) / time from the first to the last id
Order: for each thread count, --reps repetitions of (for each type: kvcache,
then llama.cpp), so the systems and types interleave. kvcache runs get
OMP_WAIT_POLICY=ACTIVE; llama.cpp runs f32 K/V, flash attention off, through
the peer's llamacpp_generate.mjs (node-llama-cpp).

Other processes: before each run it waits until the CPUs have been idle for
3 s; after it, it compares the machine's busy CPU time (/proc/stat) with the
run's own (wait4 rusage). A run during which others used more than
max(0.15 s, 5% of its wall time) is marked contaminated and repeated (up to
3 attempts); every attempt is recorded, the summary uses clean runs only.

usage: bench_gguf.py --kvcache BIN --gguf-dir DIR --model NAME --out RESULTS.jsonl
                     [--peer DIR --node-llama-cpp-dir DIR] [--types f32,f16,bf16,q8_0,q4_0]
                     [--threads 1,2] [--reps 3] [--prompt-len 64] [--decode 128]
       bench_gguf.py --summarize RESULTS.jsonl   (markdown tables on stdout)
The GGUF DIR holds NAME.TYPE.gguf for every type.
"""
import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

TICK = os.sysconf("SC_CLK_TCK")


def busy_seconds():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v[:3]) + sum(v[5:8])) / TICK  # all but idle and iowait


def wait_idle(limit_s=120, window=3):
    start, quiet = time.time(), 0
    while quiet < window and time.time() - start < limit_s:
        b = busy_seconds()
        time.sleep(1.0)
        quiet = quiet + 1 if busy_seconds() - b < 0.1 else 0
    return time.time() - start


def measured(cmd, env):
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        b0, t0 = busy_seconds(), time.time()
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=err)
        _, status, ru = os.wait4(p.pid, 0)
        wall, other = time.time() - t0, busy_seconds() - b0
        err.seek(0)
        text = err.read().decode(errors="replace")
    own = ru.ru_utime + ru.ru_stime
    return os.waitstatus_to_exitcode(status), text, wall, own, other - own


def stats_of(text):
    m = re.search(r"^stats: (.*)$", text, re.M)
    if not m:
        return None
    out = {}
    for k, v in re.findall(r"(\w+)=(\S+)", m.group(1)):
        try:
            out[k] = float(v)
        except ValueError:
            out[k] = v
    return out


def run(a):
    rng = random.Random(12345)
    prompt = " ".join(["1"] + [str(rng.randrange(3, 32000)) for _ in range(a.prompt_len - 1)])
    steps = str(a.prompt_len + a.decode)
    env_kv = dict(os.environ, OMP_WAIT_POLICY="ACTIVE")
    env_ll = dict(os.environ, NODE_LLAMA_CPP_DIR=a.node_llama_cpp_dir or "")
    systems = ["kvcache"] + (["llama.cpp"] if a.peer else [])

    def command(system, wtype, threads):
        model = os.path.join(a.gguf_dir, f"{a.model}.{wtype}.gguf")
        if system == "kvcache":
            return [a.kvcache, model, "--prompt-ids", prompt, "-n", steps, "-t", "0", "--ids",
                    "--ignore-eos", "--stats", "--threads", str(threads)], env_kv
        return ["node", os.path.join(a.peer, "llamacpp_generate.mjs"), model, "--prompt-ids", prompt,
                "-n", steps, "--threads", str(threads), "--kv-type", "f32", "--flash-attn", "off",
                "--stats"], env_ll

    t_start = time.time()
    with open(a.out, "a") as out:
        for threads in [int(t) for t in a.threads.split(",")]:
            for rep in range(a.reps):
                for wtype in a.types.split(","):
                    for system in systems:
                        cmd, env = command(system, wtype, threads)
                        for attempt in range(3):
                            waited = wait_idle(window=3 if attempt == 0 else 10)
                            rc, err, wall, own, other = measured(cmd, env)
                            dirty = other > max(0.15, 0.05 * wall)
                            st = stats_of(err)
                            rec = dict(model=a.model, type=wtype, system=system, threads=threads, rep=rep,
                                       attempt=attempt, rc=rc, wall_s=round(wall, 3), own_cpu_s=round(own, 3),
                                       other_cpu_s=round(other, 3), contaminated=dirty, waited_s=round(waited, 1),
                                       prompt_len=a.prompt_len, decode=a.decode, stats=st,
                                       time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
                            if rc != 0 or st is None:
                                rec["stderr_tail"] = err[-1500:]
                            out.write(json.dumps(rec) + "\n")
                            out.flush()
                            if not dirty:
                                break
                        rates = "failed" if st is None else \
                            f"prefill {st.get('prefill_tok_s')} decode {st.get('decode_tok_s')} tok/s"
                        print(f"[{time.time() - t_start:6.0f}s] t={threads} rep{rep} {wtype:5} {system:9}: {rates}"
                              f"{' CONTAMINATED' if dirty else ''}", flush=True)


def summarize(path):
    recs = [json.loads(line) for line in open(path)]
    good = [r for r in recs if r["rc"] == 0 and r["stats"] and not r["contaminated"]]
    dropped = len(recs) - len(good)
    types = list(dict.fromkeys(r["type"] for r in recs))
    threads = sorted({r["threads"] for r in recs})
    systems = list(dict.fromkeys(r["system"] for r in recs))

    def med(system, wtype, t, key):
        v = [r["stats"][key] for r in good if (r["system"], r["type"], r["threads"]) == (system, wtype, t)
             and isinstance(r["stats"].get(key), float)]
        return (statistics.median(v), min(v), max(v), len(v)) if v else None

    def fmt(x):
        return "–" if x is None else f"{x[0]:.1f}"

    print(f"Runs: {len(recs)} recorded, {dropped} dropped (contaminated or failed); "
          f"medians of the clean runs, tokens/s.\n")
    for key, label in (("decode_tok_s", "decode"), ("prefill_tok_s", "prefill")):
        head = ["weights"] + [f"{s} {t}T" for t in threads for s in systems]
        if "llama.cpp" in systems:
            head += [f"kvcache/llama.cpp {t}T" for t in threads]
        print(f"**{label}** (tokens/s)\n")
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" + "---:|" * (len(head) - 1))
        for wtype in types:
            row = [wtype] + [fmt(med(s, wtype, t, key)) for t in threads for s in systems]
            if "llama.cpp" in systems:
                for t in threads:
                    k, ll = med("kvcache", wtype, t, key), med("llama.cpp", wtype, t, key)
                    row.append("–" if not (k and ll) else f"{k[0] / ll[0]:.2f}")
            print("| " + " | ".join(row) + " |")
        print()
    for t in threads:
        q, f = med("kvcache", "q8_0", t, "decode_tok_s"), med("kvcache", "f32", t, "decode_tok_s")
        if q and f:
            print(f"- kvcache q8_0 / f32 decode, {t} thread(s): {q[0] / f[0]:.2f}×")
    if "llama.cpp" in systems:
        print("\nllama.cpp's own counters (llama_perf_context, without node-llama-cpp's per-token overhead), "
              "medians, decode / prefill tok/s:\n")
        for t in threads:
            parts = []
            for wtype in types:
                d = med("llama.cpp", wtype, t, "llama_eval_tok_s")
                p = med("llama.cpp", wtype, t, "llama_prefill_tok_s")
                parts.append(f"{wtype} {fmt(d)} / {fmt(p)}")
            print(f"- {t} thread(s): " + "; ".join(parts))
    print("\nmin–max of each median:\n")
    for r_key in ("decode_tok_s", "prefill_tok_s"):
        parts = []
        for t in threads:
            for s in systems:
                for wtype in types:
                    m = med(s, wtype, t, r_key)
                    if m:
                        parts.append(f"{s} {wtype} {t}T {m[1]:.1f}–{m[2]:.1f} (n={m[3]})")
        print(f"- {r_key}: " + "; ".join(parts))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--summarize")
    ap.add_argument("--kvcache")
    ap.add_argument("--gguf-dir")
    ap.add_argument("--model", default="r110M")
    ap.add_argument("--out")
    ap.add_argument("--peer")
    ap.add_argument("--node-llama-cpp-dir")
    ap.add_argument("--types", default="f32,f16,bf16,q8_0,q4_0")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--decode", type=int, default=128)
    a = ap.parse_args()
    if a.summarize:
        summarize(a.summarize)
        return
    if not (a.kvcache and a.gguf_dir and a.out):
        ap.error("--kvcache, --gguf-dir and --out are needed to run")
    run(a)


if __name__ == "__main__":
    sys.exit(main())
