"""Step-time overhead of TickCallback, side by side in one process.

Variants, each the same training run (same model init, same data, same number of steps):
  baseline   no callback
  every100   TickCallback(ticks="every:100"), every state
  every10    TickCallback(ticks="every:10"), every state (all per-parameter statistics)
  naive10    a naive recorder at every 10 steps: .item() per parameter per statistic
  host10     every10 with TickCallback(update_on_host=True): the update copy in pinned host memory
  nodense100 every100 with TickCallback(dense=False): no per-step series (every100 records loss + grad_norm)
  hist10     every10 with the opt-in histogram states too (weight_hist, grad_hist of every parameter)
  dense100   every100 with every dense series (dense=["loss", "grad_norm", "update_norm"])
  flight100  every100 with the flight recorder on (its default, with the hooked series input_absmax and attn_logit;
             the same run as every100)
  ring100    every100 with flight=[] (the gradient ring alone: no hook between ticks)
  noflight100 every100 with the dense series on but flight=False
  flightx100 every100 with flight=["update_norm", "input_absmax"] (the opt-in flight series)
  attn100    every100 with flight=["attn_logit"] (each attention block's logit scale every step: the early warning)
  guard_skip / guard_zclip / guard_clip   flight100 (the defaults) with TickCallback(guard=Guard(mode)), thresholds
             at their defaults (warm-up 20 steps): the guard's cost is the ratio to flight100; with ``--fused`` the
             optimizer is AdamW(fused=True), whose own on-device skip the guard uses (else the ``copy`` path)

The guard's device bytes (statistics, decision rows, the ``copy`` path's copies) are read at the last batch and
printed with the ratios, e.g. ``--variants flight100,guard_skip,guard_zclip,guard_clip``.

The flight recorder's cost: flight100 / noflight100 / flightx100 against nodense100, with the recorder's
device bytes (``cb._flight.nbytes``, read at the last batch: the ring is freed at fit end), e.g.
``--variants nodense100,noflight100,flight100,flightx100``.

The dense series are the only per-step work; their cost is the non-tick hook time of every100 / dense100
against nodense100 (on CPU the device work runs inside the hooks), printed side by side with the ratio.

``--strategy fsdp2 --devices N`` runs each variant under Lightning's ModelParallelStrategy with
``fully_shard`` per BERT layer (re-launched under ``torch.distributed.run``), and also prints the
collectives TickCallback issues per tick (counted inside its hooks; FSDP's own are not counted).

Rounds interleave the variants (A B C D, B C D A, ...) so drift of a shared machine hits all alike;
the median over rounds of each variant's time per step is compared with the baseline's.

    python benchmarks/overhead.py                                   # CPU default
    python benchmarks/overhead.py --device cuda --precision bf16-mixed --hidden 768 --layers 12 --steps 300
    python benchmarks/overhead.py --strategy fsdp2 --devices 2 --hidden 64 --layers 2 --steps 40 --rounds 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertForSequenceClassification

from tick_lightning import Guard, TickCallback


class Model(L.LightningModule):
    def __init__(self, hidden: int, layers: int, vocab: int, seq: int, fsdp2: bool = False, fused: bool = False):
        super().__init__()
        self.fsdp2, self.fused = fsdp2, fused
        torch.manual_seed(0)
        self.model = BertForSequenceClassification(BertConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
            intermediate_size=4 * hidden, max_position_embeddings=seq, num_labels=2))

    def configure_model(self):
        if self.fsdp2:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in self.model.bert.encoder.layer:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        return self.model(input_ids=ids, labels=labels).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4, fused=self.fused or None)


class NaiveRecorder(Callback):
    """What a first attempt looks like: a Python loop with a host sync per parameter per statistic."""

    def __init__(self, every: int):
        self.every, self.rows = every, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step % self.every:
            return
        for name, p in pl_module.named_parameters():
            for t in (p, p.grad):
                if t is None:
                    continue
                t = t.detach().float()
                self.rows.append((name, t.norm().item(), t.mean().item(), t.std().item(), t.abs().max().item(),
                                  (~torch.isfinite(t)).sum().item()))


HOOKS = ("on_train_batch_start", "on_before_backward", "on_before_optimizer_step", "on_train_batch_end")


class TimedTickCallback(TickCallback):
    """TickCallback whose own hook time is accumulated per step, split into tick and non-tick steps.

    Step-time ratios on a noisy machine cannot resolve 1%; the time spent inside the callback can. It is
    host time: on a GPU the device work it launches is asynchronous (and is in the step-time ratios).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hook_seconds: dict[int, float] = {}
        self.collectives: dict[int, int] = {}
        self._inside: list[int] = []
        _count_collectives(self)
        for hook in HOOKS:
            setattr(self, hook, self._timed(getattr(self, hook)))

    def _timed(self, fn):
        def wrapper(trainer, *args, **kwargs):
            t0 = time.perf_counter()
            step = self._hook_step if fn.__name__ == "on_train_batch_end" else trainer.global_step
            self._inside.append(step)
            try:
                out = fn(trainer, *args, **kwargs)
            finally:
                self._inside.pop()
            self.hook_seconds[step] = self.hook_seconds.get(step, 0.0) + time.perf_counter() - t0
            return out

        return wrapper

    def on_train_batch_start(self, trainer, *args, **kwargs):  # remember the step the batch belongs to
        self._hook_step = trainer.global_step
        return super().on_train_batch_start(trainer, *args, **kwargs)


_COUNTING: list = []


def _count_collectives(cb: TimedTickCallback) -> None:
    """Count torch.distributed collectives issued while one of ``cb``'s hooks runs."""
    import torch.distributed as tdist

    _COUNTING[:] = [cb]
    if getattr(tdist, "_tick_counted", False):
        return
    for name in ("all_gather", "all_reduce", "all_gather_into_tensor", "broadcast"):
        original = getattr(tdist, name)

        def counted(*a, _original=original, **k):
            for c in _COUNTING:
                if c._inside:
                    c.collectives[c._inside[-1]] = c.collectives.get(c._inside[-1], 0) + 1
            return _original(*a, **k)

        setattr(tdist, name, counted)
    tdist._tick_counted = True


class Clock(Callback):
    """Wall time from the end of the warm-up steps to the end of the run (one device sync at each end)."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.steps = warmup, None, 0

    def _sync(self, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.start is None:
            self._sync(pl_module)
            self.start = time.perf_counter()
            self.start_step = trainer.global_step

    def on_train_end(self, trainer, pl_module):
        self._sync(pl_module)
        self.seconds = time.perf_counter() - self.start
        self.steps = trainer.global_step - self.start_step


#: The guard variants (flight100 plus a Guard)
GUARDS = ("guard_skip", "guard_zclip", "guard_clip")
#: The flight-recorder variants: their ``flight=`` argument (every100 with the dense series on).
FLIGHT = {"flight100": True, "ring100": [], "noflight100": False, "flightx100": ["update_norm", "input_absmax"],
          "attn100": ["attn_logit"]}


class RingBytes(Callback):
    """The recorder's device bytes, read at the last batch (the ring is freed at the end of fit)."""

    def __init__(self, cb, steps: int):
        self.cb, self.steps = cb, steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.steps:
            flight = getattr(self.cb, "_flight", None)
            self.cb._ring_bytes = int(getattr(flight, "nbytes", 0) or 0)
            guard = getattr(self.cb, "_guard", None)
            self.cb._guard_bytes = int(guard.nbytes) if guard is not None else 0


def run(variant: str, args, data) -> float:
    callbacks: list = []
    tmp = tempfile.mkdtemp()
    guard = {"guard_skip": Guard("skip", warmup=20), "guard_zclip": Guard("zclip", warmup=20),
             "guard_clip": Guard("clip", warmup=20)}.get(variant)
    if variant in ("every100", "every10", "host10", "nodense100", "dense100", "hist10", *FLIGHT, *GUARDS):
        every = 10 if variant in ("every10", "host10", "hist10") else 100
        states = None
        if variant == "hist10":
            from tick_lightning.config import DEFAULT_STATES

            states = [*DEFAULT_STATES, "weight_hist", "grad_hist"]
        dense = {"nodense100": False, "dense100": ["loss", "grad_norm", "update_norm"]}.get(variant, True)
        flight = FLIGHT.get(variant, True)
        callbacks.append(TimedTickCallback(ticks=f"every:{every}", dirpath=f"{tmp}/ticks", log_to_loggers=False,
                                           update_on_host=variant == "host10", dense=dense, states=states,
                                           flight=flight, guard=guard))
        callbacks.append(RingBytes(callbacks[0], args.steps))
    elif variant == "naive10":
        callbacks.append(NaiveRecorder(10))
    clock = Clock(args.warmup)
    fsdp2 = args.strategy == "fsdp2"
    strategy = "auto"
    if fsdp2:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    trainer = L.Trainer(accelerator=args.device, devices=args.devices, strategy=strategy, precision=args.precision,
                        max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[*callbacks, clock], default_root_dir=tmp)
    trainer.fit(Model(args.hidden, args.layers, args.vocab, args.seq, fsdp2=fsdp2, fused=args.fused),
                DataLoader(data, batch_size=args.batch, shuffle=False))
    per_step = clock.seconds / clock.steps
    if callbacks and isinstance(callbacks[0], TimedTickCallback):
        cb = callbacks[0]
        measured = {s: t for s, t in cb.hook_seconds.items() if s >= args.warmup}
        ticks = [t for s, t in measured.items() if cb.schedule.is_step_tick(s)]
        others = [t for s, t in measured.items() if not cb.schedule.is_step_tick(s)]
        per_tick = [cb.collectives.get(s, 0) for s in measured if cb.schedule.is_step_tick(s)]
        HOOK_STATS.setdefault(variant, []).append(
            (statistics.mean(others) if others else 0.0, statistics.mean(ticks) if ticks else float("nan"), per_step,
             max(per_tick, default=0), max((cb.collectives.get(s, 0) for s in measured
                                            if not cb.schedule.is_step_tick(s)), default=0),
             getattr(cb, "_ring_bytes", 0), getattr(cb, "_guard_bytes", 0)))
    return per_step


HOOK_STATS: dict[str, list] = {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default="baseline,every100,every10,naive10")
    parser.add_argument("--strategy", default="single", choices=("single", "fsdp2"))
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--fused", action="store_true", help="AdamW(fused=True) in every variant")
    args = parser.parse_args()
    if args.strategy == "fsdp2" and "LOCAL_RANK" not in os.environ:  # one process per rank, like torchrun
        import sys

        os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.devices}",
                                  *sys.argv])
    rank = int(os.environ.get("RANK", 0))

    g = torch.Generator().manual_seed(0)
    n = args.batch * args.steps
    data = TensorDataset(torch.randint(0, args.vocab, (n, args.seq), generator=g), torch.randint(0, 2, (n,), generator=g))
    variants = args.variants.split(",")
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            times[v].append(run(v, args, data))
            if rank == 0:
                print(f"round {r} {v:9s} {times[v][-1] * 1e3:8.2f} ms/step", flush=True)
    if rank != 0:
        return

    base = statistics.median(times["baseline"]) if "baseline" in times else None
    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {args.device}, precision {args.precision}, strategy {args.strategy} "
          f"x {args.devices}, AdamW{'(fused=True)' if args.fused else ''}")
    print(f"model: BERT hidden {args.hidden} x {args.layers} layers, batch {args.batch} x seq {args.seq}, "
          f"{args.steps} steps ({args.warmup} warm-up), {args.rounds} interleaved rounds\n")
    print(f"{'variant':10s} {'median ms/step':>15s} {'ratio':>7s}   per-round ms")
    for v in variants:
        med = statistics.median(times[v])
        ratio = f"{med / base:7.3f}" if base else "      -"
        print(f"{v:10s} {med * 1e3:15.2f} {ratio}   {' '.join(f'{t * 1e3:.1f}' for t in times[v])}")
    if HOOK_STATS:
        print("\ntime inside TickCallback hooks (host), medians over rounds:")
        print(f"{'variant':10s} {'non-tick step':>14s} {'tick step':>11s} {'amortized/step':>15s} {'of step time':>13s}"
              f" {'collectives/tick':>17s} {'/non-tick':>10s}")
        for v, rows in HOOK_STATS.items():
            other = statistics.median(r[0] for r in rows)
            tick = statistics.median(r[1] for r in rows)
            every = 10 if v in ("every10", "host10", "hist10") else 100
            amortized = other * (every - 1) / every + tick / every
            step = statistics.median(r[2] for r in rows)
            print(f"{v:10s} {other * 1e6:11.1f} us {tick * 1e3:8.2f} ms {amortized * 1e3:12.3f} ms {amortized / step:12.2%}"
                  f" {max(r[3] for r in rows):17d} {max(r[4] for r in rows):10d}")
        if "nodense100" in HOOK_STATS:
            off = statistics.median(r[0] for r in HOOK_STATS["nodense100"])
            step = statistics.median(r[2] for r in HOOK_STATS["nodense100"])
            print("\ndense series, per non-tick step (hook time; on CPU the device work runs inside the hooks):")
            print(f"{'variant':11s} {'hooks':>10s} {'vs dense off':>13s} {'ratio':>7s} {'of step time':>13s}"
                  f" {'flight ring':>12s}")
            for v in ("nodense100", "every100", "dense100", *FLIGHT, *GUARDS):
                if v in HOOK_STATS:
                    t = statistics.median(r[0] for r in HOOK_STATS[v])
                    ring = max(r[5] for r in HOOK_STATS[v])
                    print(f"{v:11s} {t * 1e6:7.1f} us {(t - off) * 1e6:10.1f} us {t / off:7.2f} {(t - off) / step:12.3%}"
                          f" {ring / 2**10:9.1f} KiB")
        guarded = [v for v in GUARDS if v in HOOK_STATS]
        if guarded and "flight100" in times:
            ref = statistics.median(times["flight100"])
            ref_hooks = statistics.median(r[0] for r in HOOK_STATS["flight100"])
            params = sum(p.numel() for p in Model(args.hidden, args.layers, args.vocab, args.seq).parameters())
            print(f"\nthe guard against flight100 (the same run without it; {params:,} trainable parameters, "
                  f"{4 * params / 2**20:.1f} MiB in fp32):")
            print(f"{'variant':11s} {'step ratio':>10s} {'hooks/step vs flight100':>24s} {'guard device bytes':>19s}")
            for v in guarded:
                t = statistics.median(r[0] for r in HOOK_STATS[v])
                print(f"{v:11s} {statistics.median(times[v]) / ref:10.3f} {(t - ref_hooks) * 1e6:21.1f} us"
                      f" {max(r[6] for r in HOOK_STATS[v]) / 2**20:15.2f} MiB")


if __name__ == "__main__":
    main()
    from recipes._shared.sharding import end_process_group

    end_process_group()  # --strategy fsdp2 under torchrun (gloo on CPU): as the recipes do after a run
