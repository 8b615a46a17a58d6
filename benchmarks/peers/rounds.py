#!/usr/bin/env python3
"""SeqPar against a peer, round by round: reads JSON lines of `seqpar bench attention --json` and torch_sdpa.py, each
tagged with a "round" field, and prints each round's GFLOP/s and ratio (SeqPar over the peer) per direction, then the
median ratio over the rounds. The host's speed drifts by 2x between calls and within one (benchmarks/results/bf16/
run-1f3bde5): a ratio of two figures taken minutes apart says little, one of figures taken back to back says more, and
the median of several such rounds most.

Usage: rounds.py FILE.jsonl [--algorithm ring]
"""
import argparse
import json
import statistics
import sys
from collections import defaultdict

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("file")
parser.add_argument("--algorithm", default="ring")
args = parser.parse_args()

rates = defaultdict(dict)  # (round, direction) -> {"seqpar": GFLOP/s, "peer": GFLOP/s}
try:
    lines = open(args.file).readlines()
except OSError as e:
    sys.exit(f"rounds.py: cannot read {args.file}: {e.strerror}")
for n, line in enumerate(lines, 1):
    line = line.strip()
    if not line.startswith("{"):
        continue
    try:
        r = json.loads(line)
    except json.JSONDecodeError as e:
        sys.exit(f"rounds.py: {args.file}:{n}: not JSON ({e})")
    if "round" not in r or "gflops" not in r or "direction" not in r:
        continue
    side = "peer" if r.get("bench") == "peer" else ("seqpar" if r.get("algorithm") == args.algorithm else None)
    if side:
        rates[(r["round"], r["direction"])][side] = r["gflops"]

if not rates:
    sys.exit(f"rounds.py: no tagged figures of {args.algorithm} or a peer in {args.file}")
directions = sorted({d for _, d in rates}, key=lambda d: ["forward", "backward"].index(d) if d in ("forward", "backward") else 2)
print(f"# {args.algorithm} over the peer, per round (GFLOP/s, both measured back to back)")
print(f"{'round':<6} {'direction':<9} {'seqpar':>8} {'peer':>8} {'ratio':>6}")
ratios = defaultdict(list)
fb = []  # forward + backward: ratio of total times for the same FLOPs (backward counted 2.5x forward)
for rnd in sorted({r for r, _ in rates}):
    for d in directions:
        x = rates.get((rnd, d), {})
        if "seqpar" in x and "peer" in x:
            ratios[d].append(x["seqpar"] / x["peer"])
            print(f"{rnd:<6} {d:<9} {x['seqpar']:>8.1f} {x['peer']:>8.1f} {ratios[d][-1]:>6.2f}")
    f, b = rates.get((rnd, "forward"), {}), rates.get((rnd, "backward"), {})
    if all(k in f and k in b for k in ("seqpar", "peer")):
        seqpar_time = 1 / f["seqpar"] + 2.5 / b["seqpar"]
        peer_time = 1 / f["peer"] + 2.5 / b["peer"]
        fb.append(peer_time / seqpar_time)
for d in directions:
    if ratios[d]:
        print(f"# median {d}: {statistics.median(ratios[d]):.2f}x over {len(ratios[d])} rounds "
              f"({min(ratios[d]):.2f}-{max(ratios[d]):.2f})")
if fb:
    print(f"# median forward+backward: {statistics.median(fb):.2f}x over {len(fb)} rounds ({min(fb):.2f}-{max(fb):.2f})")
