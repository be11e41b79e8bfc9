"""Cost of one tick's tensor statistics: the CPU strategy against the accelerator strategy, side by side.

``tick_lightning.stats.tensor_stats`` picks a strategy by device. Both take the mean and the centred sum
of squares in two chunked passes; ``_host_rows`` (CPU) derives the norm from them, takes the absmax from
``aminmax`` and counts non-finite elements only where the norm is not finite; ``_device_rows`` (accelerators)
uses foreach norms and absmax and always counts, so it never syncs. This script times both on the parameters of a BERT (weights and a gradient-sized copy: what a tick with
``weight`` and ``grad`` reads), interleaved, and reports each one's largest relative error against fp64.

    python benchmarks/tick_stats.py                                  # CPU, BERT h256 x 4
    python benchmarks/tick_stats.py --hidden 768 --layers 12 --threads 1
    python benchmarks/tick_stats.py --device cuda --hidden 768 --layers 12
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import BertConfig, BertForSequenceClassification

from tick_lightning import stats


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.stack(out).sum().item()  # wait for the values either way
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64), intermediate_size=4 * args.hidden))
    model = model.to(args.device, getattr(torch, args.dtype))
    weights = [p.detach() for p in model.parameters()]
    tensors = weights + [torch.randn_like(w) * 1e-3 for w in weights]  # weights + gradient-like tensors
    numel = sum(t.numel() for t in tensors)
    ref = [t.double() for t in tensors]
    ref = torch.stack([torch.stack([x.norm(), x.mean(), x.std(correction=0), x.abs().max()]) for x in ref])
    errors = {}
    for name, rows in (("device", stats._device_rows(tensors)), ("host", stats._host_rows(tensors))):
        rows, r = torch.stack(rows)[:, :4].double().cpu(), ref.cpu()
        rel = (rows - r).abs() / r.abs().clamp_min(1e-30)
        rel[:, 1] = (rows[:, 1] - r[:, 1]).abs() / r[:, 2].clamp_min(1e-30)  # a mean near 0: error in units of std
        errors[name] = float(rel.max())
    strategies = {"device (foreach norm + absmax, isfinite count)": stats._device_rows,
                  "host (norm from moments, aminmax, non-finite count without a host read)": stats._host_rows}
    times: dict[str, list[float]] = {k: [] for k in strategies}
    for r in range(args.repeats + 2):
        for name in (list(strategies) if r % 2 else list(strategies)[::-1]):
            t = timed(lambda: strategies[name](tensors), args.device)
            if r >= 2:  # two warm-up rounds
                times[name].append(t)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"device {args.device}, {args.dtype}; {len(tensors)} tensors, {numel / 1e6:.1f}M elements")
    base = statistics.median(times[list(strategies)[0]])
    print("| strategy | median ms | ns/element | speed-up vs device strategy | max error vs fp64 (relative; mean: in stds) |\n"
          "|---|---|---|---|---|")
    for (name, ts), err in zip(times.items(), (errors["device"], errors["host"])):
        m = statistics.median(ts)
        print(f"| {name} | {m * 1e3:.1f} | {m / numel * 1e9:.2f} | {base / m:.2f}x | {err:.1e} |")


if __name__ == "__main__":
    main()
