"""The cost of packing with per-example attention: forward + backward with flatlm's explicit block-causal mask
(``flatlm.train.step.packed_attention_mask``) against the same batch with plain causal attention (SDPA's causal
fast path, no mask), one process, interleaved; printed as ratios.

    python benchmarks/packed_attention.py [--hidden 256 --layers 4 --seq-len 128,512,1024] [--repeats 7]

Both runs see the same tokens; the packed one restarts positions every ``--example-len`` tokens, which is what
confines attention. The ratio is the price of the mask (building it, B L^2 bytes, and SDPA's masked kernel); the
padding it saves is the other side of the trade (see the README's SFT section).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flatlm.data.batch import Batch
from flatlm.train.step import token_losses


def step_time(model: torch.nn.Module, batch: Batch) -> float:
    t0 = time.perf_counter()
    losses = token_losses(model, batch, bf16=False)
    (losses.sums.sum() / losses.counts.sum()).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", default="128,512,1024")
    ap.add_argument("--example-len", type=int, default=64, help="tokens per packed example")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        intermediate_size=args.hidden * 11 // 4,
        max_position_embeddings=4096,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; hidden {args.hidden}, {args.layers} layers")
    print(f"{'seq_len':>8} {'causal ms':>10} {'packed ms':>10} {'ratio':>6}  mask MiB")
    for length in (int(x) for x in args.seq_len.split(",")):
        ids = torch.randint(0, config.vocab_size, (args.batch, length + 1))
        plain = Batch(ids[:, :-1], ids[:, 1:])
        positions = (torch.arange(length) % args.example_len).expand(args.batch, length).contiguous()
        packed = Batch(ids[:, :-1], ids[:, 1:], position_ids=positions)
        for _ in range(2):  # warm-up
            step_time(model, plain), step_time(model, packed)
        a, b = [], []
        for _ in range(args.repeats):
            a.append(step_time(model, plain))
            b.append(step_time(model, packed))
        ta, tb = statistics.median(a), statistics.median(b)
        mask_mib = args.batch * length * length / 2**20
        print(f"{length:>8} {ta * 1e3:>10.1f} {tb * 1e3:>10.1f} {tb / ta:>6.2f}  {mask_mib:.1f}")


if __name__ == "__main__":
    main()
