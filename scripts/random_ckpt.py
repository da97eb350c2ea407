#!/usr/bin/env python3
"""Write a llama2.c checkpoint (legacy version 0) of random float32 weights.

usage: random_ckpt.py OUT.bin DIM HIDDEN LAYERS HEADS KV_HEADS VOCAB SEQ [--seed S] [--untied]

Matrices are uniform in [-a, a] with a = sqrt(3 / in) (unit-variance
outputs for unit-variance inputs), RMSNorm weights 1. Standard library only:
the bytes come from random.Random(seed).randbytes, mapped to floats by
array('f'), so the file is the same on every machine for one seed.
"""
import argparse
import array
import math
import random
import struct


def write_uniform(f, rng, n, bound):
    chunk = 1 << 20
    while n > 0:
        k = min(n, chunk)
        # 24 random bits per value -> [-bound, bound)
        raw = rng.randbytes(4 * k)
        ints = array.array("I", raw)
        scale = 2.0 * bound / 4294967296.0
        vals = array.array("f", (i * scale - bound for i in ints))
        f.write(vals.tobytes())
        n -= k


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("shape", nargs=7, type=int, metavar="N")
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--untied", action="store_true")
    a = ap.parse_args()
    dim, hidden, layers, heads, kv_heads, vocab, seq = a.shape
    head = dim // heads
    kv_dim = head * kv_heads
    rng = random.Random(a.seed)
    ones = array.array("f", [1.0]) * dim
    with open(a.out, "wb") as f:
        f.write(struct.pack("<7i", dim, hidden, layers, heads, kv_heads, -vocab if a.untied else vocab, seq))
        write_uniform(f, rng, vocab * dim, 1.0)                      # token embedding
        for _ in range(layers):
            f.write(ones.tobytes())                                   # attention RMSNorm
        for rows in (dim, kv_dim, kv_dim, dim):                       # wq, wk, wv, wo
            write_uniform(f, rng, layers * rows * dim, math.sqrt(3.0 / dim))
        for _ in range(layers):
            f.write(ones.tobytes())                                   # FFN RMSNorm
        write_uniform(f, rng, layers * hidden * dim, math.sqrt(3.0 / dim))     # w1
        write_uniform(f, rng, layers * dim * hidden, math.sqrt(3.0 / hidden))  # w2
        write_uniform(f, rng, layers * hidden * dim, math.sqrt(3.0 / dim))     # w3
        f.write(ones.tobytes())                                       # final RMSNorm
        f.write(bytes(4 * seq * head))                                # two legacy RoPE tables (unused)
        if a.untied:
            write_uniform(f, rng, vocab * dim, math.sqrt(3.0 / dim))


if __name__ == "__main__":
    main()
