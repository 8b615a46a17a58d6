#!/usr/bin/env python3
"""PyTorch's scaled_dot_product_attention on CPU, the peer SeqPar is compared with on the same cores.

Times F.scaled_dot_product_attention forward (and backward with --backward) in --dtype (float32, or bfloat16 as
SeqPar's --precision bf16 computes: bf16 tensors, fp32 accumulation inside PyTorch's flash kernel) on (1, H, L, D)
tensors with --threads intra-op threads: warm-up runs first, then the median of --repeats. Prints one JSON line per direction with
the field names of `seqpar bench attention --json` (bench "peer", algorithm "torch-sdpa"), FLOPs counted as SeqPar
counts them (forward 4 H L^2 D, half when causal; backward 2.5x), so GFLOP/s compare directly.
"""
import argparse
import json
import statistics
import sys
import time

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--seq-len", type=int, default=16384)
parser.add_argument("--heads", type=int, default=16)
parser.add_argument("--head-dim", type=int, default=64)
parser.add_argument("--causal", action="store_true")
parser.add_argument("--threads", type=int, default=16)
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--warmup", type=int, default=1)
parser.add_argument("--backward", action="store_true")
parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
args = parser.parse_args()
for name in ("seq_len", "heads", "head_dim", "threads", "repeats"):
    if getattr(args, name) < 1:
        sys.exit(f"torch_sdpa.py: --{name.replace('_', '-')} must be at least 1")

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    sys.exit("torch_sdpa.py: PyTorch is not installed here: pip install torch (CPU build), or run it where it is")

torch.set_num_threads(args.threads)
torch.manual_seed(0)
L, H, D = args.seq_len, args.heads, args.head_dim
dtype = getattr(torch, args.dtype)
q, k, v = (torch.randn(1, H, L, D, dtype=torch.float32).to(dtype).requires_grad_(args.backward) for _ in range(3))
flops = 4 * H * L * L * D / (2 if args.causal else 1)


def timed(fn, setup=None):
    """Median, min and max seconds of fn(); setup() runs untimed before each call."""
    for _ in range(args.warmup):
        if setup:
            setup()
        fn()
    times = []
    for _ in range(args.repeats):
        if setup:
            setup()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times), max(times)


def forward():
    with torch.no_grad():
        F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)


out = F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)
grad = torch.randn_like(out)


state = {}


def backward_setup():
    # The forward with autograd, untimed: the figure is the backward pass alone.
    q.grad = k.grad = v.grad = None
    state["o"] = F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)


def backward():
    state["o"].backward(grad)


runs = [("forward", forward, None, flops)]
if args.backward:
    runs.append(("backward", backward, backward_setup, 2.5 * flops))
for direction, fn, setup, f in runs:
    med, lo, hi = timed(fn, setup)
    print(json.dumps({
        "bench": "peer", "algorithm": "torch-sdpa", "direction": direction, "ranks": 1, "threads": args.threads,
        "seq_len": L, "heads": H, "kv_heads": H, "head_dim": D, "causal": args.causal, "time_s": med,
        "time_min_s": lo, "time_max_s": hi, "gflops": f / med / 1e9, "torch_version": torch.__version__,
        "dtype": args.dtype, "precision": "bf16" if args.dtype == "bfloat16" else "fp32",
        "backend": torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends.cpu, "get_cpu_capability") else "",
    }, sort_keys=True))
