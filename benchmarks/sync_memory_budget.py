"""Sync and memory budget of TickCallback, measured with the instruments of tests/instruments.py.

1. Host traffic per optimizer step in a real Trainer fit of a tiny BERT (CPU, accelerator simulated as in
   tests/test_sync_budget.py): host syncs, host-to-device and device-to-host copies on non-tick steps and
   on ticks, with every state on (``nonfinite`` off), then with ``nonfinite`` on.
2. Extra bytes per tick state on BERT-base-sized and ~1B-sized models built on ``meta`` (no memory used):
   the peak of the storages each state's device work allocates and holds at once (``LiveBytes``), by
   calling the functions the callback calls (``stats.tensor_stats``, ``stats.global_norm``,
   ``stats.update_norms`` after a copy of every trainable parameter, ``RenormPlan.run`` with stacked
   batches, as on an accelerator), next to the largest parameter and the whole model.

    python benchmarks/sync_memory_budget.py                       # both parts, prints Markdown
    python benchmarks/sync_memory_budget.py --models bert-base    # the smaller model only
    python benchmarks/sync_memory_budget.py --append docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from instruments import LiveBytes  # noqa: E402

from tick_lightning import stats  # noqa: E402
from tick_lightning.renorm import RenormPlan  # noqa: E402
from tick_lightning.renorm.ops import MAX_BATCH_BYTES  # noqa: E402

MODELS = {
    # BERT-base: 110 M parameters, largest the 30522 x 768 word embedding
    "bert-base": ("bert", dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                               intermediate_size=3072)),
    # ~1.1 B parameters, Llama-style (TinyLlama shape): 22 layers, hidden 2048, MLP 5632, vocab 32000
    "1b": ("llama", dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                         num_key_value_heads=4, intermediate_size=5632)),
}


def meta_model(kind: str, cfg: dict) -> torch.nn.Module:
    with torch.device("meta"):
        if kind == "bert":
            from transformers import BertConfig, BertForSequenceClassification

            return BertForSequenceClassification(BertConfig(**cfg))
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**cfg))


def state_bytes(model: torch.nn.Module) -> dict[str, int]:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.empty_like(p) for p in params]  # stand-ins for .grad (allocated before measuring)
    out = {}
    with torch.no_grad():
        with LiveBytes() as mem:
            stats.tensor_stats([p.detach() for p in params])
        out["weight"] = mem.peak
        with LiveBytes() as mem:
            stats.tensor_stats(grads)
            stats.global_norm(grads)
        out["grad"] = mem.peak
        with LiveBytes() as mem:  # what the callback does today: copy every trainable parameter, then compare
            before = [p.detach().clone() for p in params]
            stats.update_norms([p.detach() for p in params], before)
            del before
        out["update"] = mem.peak
        linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
        for label, cap in (("renorm (uncapped)", 1 << 62), (f"renorm (cap {MAX_BATCH_BYTES >> 20} MiB)", MAX_BATCH_BYTES)):
            plan = RenormPlan(linears, batch=True, max_batch_bytes=cap)
            with LiveBytes() as mem:
                plan.run("unit", stats=True)
            out[label] = mem.peak
    return out


def traffic_per_step() -> list[tuple[str, tuple, tuple]]:
    import test_sync_budget as budget

    stats._host_rows = stats._device_rows  # the accelerator kernels (as the tests' fixture does)
    rows = []
    for label, kwargs in (("every state, nonfinite off", {}), ("every state, nonfinite on", {"ticks": "0,4,nonfinite"})):
        with tempfile.TemporaryDirectory() as tmp:
            traffic = budget.run(Path(tmp), "cpu", **kwargs)
        per = traffic.by_label()
        off = [per.get(s, {"sync": 0, "h2d": 0, "d2h": 0}) for s in range(budget.STEPS) if s not in budget.TICKS]
        on = [per.get(s, {"sync": 0, "h2d": 0, "d2h": 0}) for s in budget.TICKS]
        rows.append((label, tuple(max(r[k] for r in off) for k in ("sync", "h2d", "d2h")),
                     tuple(max(r[k] for r in on) for k in ("sync", "h2d", "d2h"))))
    return rows


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bert-base,1b", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--skip-traffic", action="store_true")
    parser.add_argument("--append", default=None, help="append the Markdown section to this file")
    args = parser.parse_args()
    lines = ["", "## Sync and memory budget (`benchmarks/sync_memory_budget.py`, issue 19)", "",
             f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, torch {torch.__version__}; "
             f"date {datetime.date.today()}; command `python benchmarks/sync_memory_budget.py {' '.join(sys.argv[1:])}`.",
             ""]
    if not args.skip_traffic:
        lines += ["Host traffic per optimizer step (tiny BERT, real Trainer fit on CPU, accelerator simulated; the most",
                  "over the steps of each kind; accumulation 2, `Renorm(at=\"step\")` on). The promise: 0 / 0 / 0 between",
                  "ticks (1 / 0 / 0 with `nonfinite`), 0 / 0 / 1 on a tick.", "",
                  "| run | non-tick step: syncs / h2d / d2h | tick: syncs / h2d / d2h |", "|---|---|---|"]
        try:
            for label, off, on in traffic_per_step():
                lines.append(f"| {label} | {' / '.join(map(str, off))} | {' / '.join(map(str, on))} |")
        except Exception as err:  # noqa: BLE001 - report what broke instead of no section
            lines.append(f"| (failed: {type(err).__name__}: {str(err)[:120]}) | | |")
        lines.append("")
    lines += ["Extra bytes at a tick per state, on models built on `meta` (peak of the storages alive at once, MiB):", "",
              "| model | parameters | whole model fp32 | largest parameter fp32 | weight | grad | update | renorm (uncapped) "
              f"| renorm (cap {MAX_BATCH_BYTES >> 20} MiB) |", "|---|---|---|---|---|---|---|---|---|"]
    for name in args.models.split(","):
        kind, cfg = MODELS[name]
        model = meta_model(kind, cfg)
        params = list(model.parameters())
        measured = state_bytes(model)
        total = sum(p.numel() for p in params)
        largest = max(p.numel() for p in params)
        cells = " | ".join(mib(v) for v in measured.values())
        lines.append(f"| {name} | {total / 1e6:,.0f} M | {mib(4 * total)} | {mib(4 * largest)} | {cells} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append:
        with open(args.append, "a") as fh:
            fh.write(text)
        print(f"appended to {args.append}")


if __name__ == "__main__":
    main()
