"""Cost of dhp_fx itself: optimize() + first forward vs plain Dynamo capture, BERT-base sized.

Run: python benchmarks/bench_pass_cost.py [--layers 12] [--seq 128]
Each measurement runs in a fresh process so neither side profits from the other's warm caches.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time, torch
from transformers import BertConfig, BertModel
layers, seq, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
cfg = BertConfig(num_hidden_layers=layers)  # BERT-base: hidden 768, 12 heads
cfg._attn_implementation = "sdpa"
torch.manual_seed(0)
model = BertModel(cfg).eval()
ids = torch.randint(0, cfg.vocab_size, (1, seq))
with torch.no_grad():
    model(input_ids=ids)  # warm the eager path so only capture cost differs
    start = time.perf_counter()
    if mode == "dynamo":
        torch.compile(model, backend="eager")(input_ids=ids)
    else:
        import dhp_fx
        opt = dhp_fx.optimize(model)
        opt(input_ids=ids)
        assert len(opt.sites) == layers, opt.report()
    elapsed = time.perf_counter() - start
    second = time.perf_counter()
    ids2 = torch.randint(0, cfg.vocab_size, (1, seq + 7))
    (torch.compile(model, backend="eager") if mode == "dynamo" else opt)(input_ids=ids2)
print(json.dumps({"mode": mode, "first_call_s": elapsed, "new_length_call_s": time.perf_counter() - second}))
"""


def run(mode: str, layers: int, seq: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(layers), str(seq), mode], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rows = {m: min((run(m, args.layers, args.seq) for _ in range(args.repeats)), key=lambda r: r["first_call_s"])
            for m in ("dynamo", "dhp_fx")}
    extra = rows["dhp_fx"]["first_call_s"] - rows["dynamo"]["first_call_s"]
    print(f"BERT-base sized, {args.layers} layers, seq {args.seq}, best of {args.repeats} fresh processes")
    print(f"plain Dynamo capture + first forward: {rows['dynamo']['first_call_s']:.2f} s")
    print(f"dhp_fx optimize() + first forward:    {rows['dhp_fx']['first_call_s']:.2f} s  (+{extra:.2f} s)")
    print(f"call at a new sequence length: dynamo {rows['dynamo']['new_length_call_s']:.2f} s, "
          f"dhp_fx {rows['dhp_fx']['new_length_call_s']:.2f} s")
    print("target: dhp_fx overhead <= 5 s:", "met" if extra <= 5 else "MISSED")


if __name__ == "__main__":
    main()
