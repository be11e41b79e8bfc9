"""Does the gradient guard save a run from a planted fault, and does it stay quiet on a healthy run?

Every trial is a real ``lightning.Trainer.fit`` of ``flight_root_cause.py``'s tiny BERT (width 32, 5 layers,
built from its config, no download) on SST-2 (``--sst2 PATH`` to its ``train.tsv``, with that script's
word-level tokenizer: the ``--vocab`` (2000) most frequent words) or, without ``--sst2``, on its synthetic
task. Of the ``--rows`` (20000) rows read, the last ``--eval-rows`` (1000) are a held-out split, never trained
on; after each fit its final **eval loss** (mean cross-entropy) and **accuracy** are measured. (SST-2's train
file holds phrases of the same sentences, so the split is held out by row, not by sentence; the vocabulary is
counted over all rows read, the held-out labels are never seen.) Defaults: batch 32, AdamW lr 2e-3, 500 steps,
fault at step 310 (between the ticks at 300 and 350): measured on SST-2 (seed 0), the train loss over the 20
steps before the fault is ~0.47-0.50 (chance 0.693) and a healthy run ends at eval loss ~0.47-0.50, accuracy
~0.76-0.77 (each row records both); a fit takes 10-16 s on one thread of a shared 2-core CPU.

One fault is planted between ticks at step ``F`` (``--fault-step``), once the model has learned:

* ``nan``     one parameter's gradient NaN at F (one step);
* ``grad``    one parameter's gradient x``--grad-factor`` (1e4) at F and F+1;
* ``lr``      the learning rate x100 for F..F+2, restored after;
* ``batch``   a corrupted batch at F, two sub-kinds: ``batch:labels`` (labels flipped) and
              ``batch:noise`` (input ids replaced with random ids);
* ``growth``  one encoder layer's gradients (every tensor of ``model.bert.encoder.layer.i``)
              x``--growth``**k (1.3**k) at step F+k for k = 0..``--growth-steps``-1 (20), then normal again.

The planted parameter (``nan``, ``grad``) is ``flight_root_cause.PARAMS[seed % 5]``, the planted layer
(``growth``) ``encoder.layer.{seed % 5}``. Variants, all with the same seed (init) and the same data order:

* ``healthy``     no fault, no defence (the twin every other trial of the seed is compared with);
* ``unguarded``   the fault, no defence;
* ``skip`` / ``zclip`` / ``clip``  the fault + ``TickCallback(guard=Guard(mode))``, default thresholds
  (skip z=5, window 128, warm-up 64, on the loss and the log grad norm; zclip z=3, alpha 0.97, warm-up 25; clip z=4, alpha
  0.97, warm-up 25); ``--warmup N`` sets the warm-up of all three (and of the ZClip / AdaGC peers);
* ``zclip_peer``  the fault + ``peers/zclip.py``'s ``ZClipCallback(max_grad_norm=None)`` (its defaults);
* ``olmo_skip``   the fault + OLMo-core's own ``SkipStepAdamW`` (``peers/olmo_skip.py``; window 128, sigma 6)
                  with the same lr / betas / eps / weight decay, fed by ``OlmoSkipStepCallback``;
* ``adagc_peer``  the fault + ``peers/adagc.py``'s ``AdaGCCallback()`` (the paper's defaults: lambda_rel 1.05,
                  beta 0.98, lambda_abs 1 in a 25-step warm-up; it clips most steps a little by design, so
                  its "false interventions" are its normal operation).

A warm-up that would not end before ``F`` (short smoke runs only) is lowered to ``F // 2`` (skip and OLMo:
the window to ``F``); each row records its defence's arguments (``settings``).

Every defence also runs without a fault (``kind="none"``): its interventions there are **false
interventions** (steps skipped or clipped on a healthy run: for the guard ``len(load_guard(dir))`` and the
tensors it scaled, for the peers their recorded lists). Every variant, unguarded and peers included, runs
with ``TickCallback(ticks="every:50", log_to_loggers=False)`` (its dense series and flight recorder on)
writing to a temporary directory, so costs are comparable. The optimizer is AdamW (lr ``--lr``, betas
0.9/0.999, eps 1e-8, weight decay 0.01; OLMo's ``SkipStepAdamW`` with the same for ``olmo_skip``). No
``gradient_clip_val`` unless ``--grad-clip`` is given.

Reported per fault and variant: the share of trials whose final eval loss is within 0.02 nats of the healthy
twin's (same seed), and whose accuracy is within 0.5 points of it; the mean |delta eval loss| (finite runs;
also against the same defence's own healthy run, which separates the fault from the defence's own effect);
the runs with a non-finite eval loss or parameter; the share of trials where the defence acted at the fault
(steps F .. last fault step + 8). Per variant: false interventions on healthy runs (mean per run, share of
runs with any). Fit time per variant. A perturbed trajectory (any intervention, on a healthy run too) ends
~0.01-0.02 nats from its twin by itself: the healthy table's "mean abs delta" is that noise floor.

    python benchmarks/guard_faults.py --sst2 /work/shared/data/sst2/train.tsv     # the full grid, 10 seeds
    python benchmarks/guard_faults.py --sst2 /work/shared/data/sst2/train.tsv --warmup 150 \\
        --variants healthy,zclip,clip,zclip_peer,adagc_peer              # warm-up past the norm's rise
    python benchmarks/guard_faults.py --sst2 /work/shared/data/sst2/train.tsv --seeds 1 --kinds nan,grad \\
        --variants healthy,unguarded,skip --steps 60 --fault-step 40              # a smoke run
    python benchmarks/guard_faults.py --summarize                                  # the tables again

Each trial is appended to ``--out`` (benchmarks/results/guard_faults.json, one JSON object a line) as soon
as it ends; a second invocation with the same settings skips the trials already there (an interrupted run
continues). Trials with other settings (steps, fault step, lr, data, warm-up, ...) are kept apart by their
``config`` and summarized apart.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # flight_root_cause and peers/, also when this file is imported
    sys.path.append(_HERE)

KINDS = ("nan", "grad", "lr", "batch", "growth")
BATCH_MODES = ("labels", "noise")
VARIANTS = ("healthy", "unguarded", "skip", "zclip", "clip", "zclip_peer", "olmo_skip", "adagc_peer")
GUARD_MODES = ("skip", "zclip", "clip")
PEERS = ("zclip_peer", "olmo_skip", "adagc_peer")
GROWTH_LAYERS = tuple(f"model.bert.encoder.layer.{i}" for i in range(5))
BETAS, EPS, WEIGHT_DECAY = (0.9, 0.999), 1e-8, 0.01  # torch's AdamW defaults, stated for OLMo's optimizer
SLACK = 8  # interventions up to this many steps after the last fault step count as "at the fault"
LOSS_TOL, ACC_TOL = 0.02, 0.005  # nats; accuracy (0.5 points)
BEFORE = 20  # steps before F whose mean train loss a row records
#: arguments that change a trial's result: the resume key and the summary's groups
CONFIG_KEYS = ("sst2", "steps", "fault_step", "lr", "batch", "seq", "vocab", "hidden", "layers_model",
               "grad_factor", "growth", "growth_steps", "eval_rows", "rows", "grad_clip", "tick_every",
               "warmup")


# ---------------------------------------------------------------------------------------------- the trials

def fault_label(kind: str, target: str) -> str:
    return f"batch:{target}" if kind == "batch" else kind


def variant_name(kind: str, defence: str) -> str:
    if defence == "none":
        return "healthy" if kind == "none" else "unguarded"
    return defence


def grid(kinds, variants, seeds: int, layers: int) -> list[tuple[str, str, int, str]]:
    """(kind, target, seed, defence) of every trial, seed-major (an interrupted run holds whole seeds)."""
    defences = [v for v in variants if v not in ("healthy", "unguarded")]
    out = []
    for seed in range(seeds):
        faults = [("none", "")]
        for kind in kinds:
            if kind == "batch":
                faults += [("batch", m) for m in BATCH_MODES]
            elif kind in ("nan", "grad"):
                faults.append((kind, flight().PARAMS[seed % len(flight().PARAMS)]))
            elif kind == "growth":
                faults.append((kind, GROWTH_LAYERS[seed % min(len(GROWTH_LAYERS), layers)]))
            else:
                faults.append((kind, ""))
        for kind, target in faults:
            if kind == "none" and "healthy" in variants or kind != "none" and "unguarded" in variants:
                out.append((kind, target, seed, "none"))
            out += [(kind, target, seed, d) for d in defences]
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def config_of(args) -> dict:
    return {k: getattr(args, k) for k in CONFIG_KEYS}


def config_id(config: dict) -> str:
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]


def flight():
    import flight_root_cause

    return flight_root_cause


# ------------------------------------------------------------------------------------------ model + faults

def make_classes():
    """The fault, the classifier and the loss log, built on ``flight_root_cause``'s (imported lazily: that
    module imports lightning and transformers)."""
    import lightning as L

    fr = flight()
    from tick_lightning.select import clean_name

    class PlantedFault(fr.Fault):
        """``flight_root_cause.Fault`` plus ``growth``: the gradients of every tensor under ``target`` (a
        module name) x ``growth ** k`` at step ``step + k``, k = 0 .. ``growth_steps`` - 1."""

        def __init__(self, kind: str, step: int, target: str = "", growth: float = 1.3,
                     growth_steps: int = 20, **kwargs):
            super().__init__(kind, step, target, **kwargs)
            self.growth, self.growth_steps = growth, growth_steps

        @property
        def steps(self) -> range:
            if self.kind == "growth":
                return range(self.step, self.step + self.growth_steps)
            return super().steps

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if self.kind != "growth":
                return super().on_before_optimizer_step(trainer, pl_module, optimizer)
            k = trainer.global_step - self.step
            if 0 <= k < self.growth_steps:
                factor = self.growth ** k
                for name, p in pl_module.named_parameters():
                    if p.grad is not None and clean_name(name).startswith(self.target + "."):
                        p.grad.mul_(factor)

    class Net(fr.Classifier):
        """The tiny BERT with the optimizer of its variant (AdamW, or OLMo's SkipStepAdamW)."""

        def __init__(self, *args, olmo_window: int | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.olmo_window = olmo_window

        def configure_optimizers(self):
            if self.olmo_window is None:
                return torch.optim.AdamW(self.parameters(), lr=self.lr, betas=BETAS, eps=EPS,
                                         weight_decay=WEIGHT_DECAY)
            from peers.olmo_skip import make_skip_step_adamw

            return make_skip_step_adamw(self.parameters(), lr=self.lr, betas=BETAS, eps=EPS,
                                        weight_decay=WEIGHT_DECAY, rolling_interval_length=self.olmo_window,
                                        sigma_factor=6)

    class LossLog(L.Callback):
        """The train loss of every step (a host read a step: nothing on a CPU)."""

        def __init__(self):
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss))

    return PlantedFault, Net, LossLog


def defence_settings(defence: str, fault_step: int, warmup: int | None = None) -> dict:
    """The arguments of a defence: its defaults, or ``warmup`` (``--warmup``: the guard's and the ZClip /
    AdaGC peers' warm-up; OLMo's is its window // 2, not set apart); a warm-up that would not end before the
    fault lowered to ``fault_step // 2`` (the skip windows to ``fault_step``)."""
    from tick_lightning import Guard

    short = max(2, fault_step // 2)
    if defence in GUARD_MODES:
        spec = Guard(defence) if warmup is None else Guard(defence, warmup=warmup)
        if spec.warmup >= fault_step:
            spec = Guard(defence, window=max(3, fault_step)) if defence == "skip" else \
                Guard(defence, warmup=short)
        return spec.arguments()
    steps = 25 if warmup is None else warmup
    if defence == "zclip_peer":
        return {"max_grad_norm": None, "warmup_steps": steps if steps < fault_step else short}
    if defence == "adagc_peer":
        return {"warmup_steps": steps if steps < fault_step else short}
    if defence == "olmo_skip":
        return {"rolling_interval_length": 128 if 64 < fault_step else max(4, fault_step)}
    return {}


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, labels: torch.Tensor, batch: int = 250) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (a ``Classifier``) on a held-out split."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(ids), batch):
        x, y = ids[i:i + batch], labels[i:i + batch]
        logits = model.model(input_ids=x, attention_mask=(x > 0).long()).logits.float()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
    model.train()
    return loss_sum / len(ids), correct / len(ids)


def interventions(defence: str, peer, ticks_dir: Path) -> tuple[list[int], int]:
    """(steps the defence acted on, tensors it scaled in all: 0 where it does not scale single tensors)."""
    if defence in GUARD_MODES:
        from tick_lightning import load_guard

        table = load_guard(ticks_dir)
        return [int(s) for s in table.step], int(sum(len(t) for t in table.tensors))
    if defence == "olmo_skip":
        return list(peer.skipped_steps), 0
    if defence == "zclip_peer":
        return list(peer.clipped_steps), 0
    if defence == "adagc_peer":
        return list(peer.clipped_steps), int(peer.clipped_tensors)
    return [], 0


def trial(kind: str, target: str, seed: int, defence: str, data, evalset, args, workdir: Path) -> dict:
    """One real fit with the fault (``kind="none"``: none) and the defence; eval loss and accuracy after."""
    import lightning as L

    from tick_lightning import Guard, TickCallback

    PlantedFault, Net, LossLog = make_classes()
    torch.manual_seed(seed)
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    settings = defence_settings(defence, args.fault_step, args.warmup)
    callbacks = []
    fault = None
    if kind != "none":
        fault = PlantedFault(kind, args.fault_step, target, growth=args.growth,
                             growth_steps=args.growth_steps, grad_factor=args.grad_factor, vocab=args.vocab,
                             seed=seed)
        callbacks.append(fault)  # first: every reader of the gradients sees the fault
    guard = Guard(**settings) if defence in GUARD_MODES else None
    callbacks.append(TickCallback(ticks=f"every:{args.tick_every}", dirpath=run_dir / "ticks",
                                  log_to_loggers=False, guard=guard))
    peer = None
    if defence == "zclip_peer":
        from peers.zclip import ZClipCallback

        peer = ZClipCallback(**settings)
    elif defence == "adagc_peer":
        from peers.adagc import AdaGCCallback

        peer = AdaGCCallback(**settings)
    elif defence == "olmo_skip":
        from peers.olmo_skip import OlmoSkipStepCallback

        peer = OlmoSkipStepCallback()
    if peer is not None:
        callbacks.append(peer)
    log = LossLog()
    callbacks.append(log)
    model = Net(args.vocab, args.seq, args.hidden, args.layers_model, seed, args.lr,
                olmo_window=settings.get("rolling_interval_length"))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=run_dir, callbacks=callbacks, num_sanity_val_steps=0,
                        gradient_clip_val=args.grad_clip or None)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    trainer.fit(model, loader)
    fit_s = time.perf_counter() - t0
    eval_loss, eval_acc = evaluate(model, *evalset)
    nonfinite = sum(not bool(torch.isfinite(p).all()) for p in model.parameters())
    steps, tensors = interventions(defence, peer, run_dir / "ticks")
    fault_steps = fault.steps if fault is not None else range(0)
    last = fault_steps.stop - 1 + SLACK
    at_fault = [s for s in steps if len(fault_steps) and fault_steps.start <= s <= last]
    losses = log.losses
    before = losses[max(0, args.fault_step - BEFORE):args.fault_step]
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return dict(kind=kind, target=target, fault=fault_label(kind, target) if kind != "none" else "none",
                seed=seed, variant=variant_name(kind, defence), defence=defence, settings=settings,
                fault_steps=[fault_steps.start, fault_steps.stop - 1] if len(fault_steps) else [],
                eval_loss=eval_loss, eval_acc=eval_acc, nonfinite_params=nonfinite,
                finite=math.isfinite(eval_loss) and nonfinite == 0,
                interventions=len(steps), intervention_steps=steps, intervention_tensors=tensors,
                at_fault=len(at_fault), before_fault=sum(s < args.fault_step for s in steps),
                train_loss_before_fault=statistics.fmean(before) if before else None,
                train_loss_end=statistics.fmean(losses[-BEFORE:]) if losses else None,
                fit_s=round(fit_s, 2))


# ---------------------------------------------------------------------------------------------- data

def load_data(args):
    """(train set, (held-out ids, labels)): the last ``eval_rows`` rows held out."""
    fr = flight()
    if args.sst2:
        full = fr.sst2_data(args.sst2, args.vocab, args.seq, limit=args.rows)
        ids, labels = full.tensors
        cut = len(ids) - args.eval_rows
        return torch.utils.data.TensorDataset(ids[:cut], labels[:cut]), (ids[cut:], labels[cut:])
    train = fr.synthetic_data(args.batch * args.steps, args.vocab, args.seq, seed=0)
    held = fr.synthetic_data(args.eval_rows, args.vocab, args.seq, seed=1)
    return train, held.tensors


# ---------------------------------------------------------------------------------------------- the summary

def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _ok(r: dict, twin: dict) -> bool:
    """The trial ended where its healthy twin did (eval loss within ``LOSS_TOL``)."""
    d = r["eval_loss"] - twin[r["seed"]]["eval_loss"]
    return math.isfinite(d) and abs(d) <= LOSS_TOL


def summarize_rows(rows: list[dict]) -> dict:
    """Per config: the fault table (per fault and variant) and the healthy table (per variant)."""
    out = {}
    for cid in dict.fromkeys(r["config_id"] for r in rows):
        rs = [r for r in rows if r["config_id"] == cid]
        twin = {r["seed"]: r for r in rs if r["kind"] == "none" and r["defence"] == "none"}
        own = {(r["seed"], r["defence"]): r for r in rs if r["kind"] == "none"}
        faults, healthy = [], []
        order = {v: i for i, v in enumerate(VARIANTS)}
        labels = [f for f in ["nan", "grad", "lr", "batch:labels", "batch:noise", "growth"]
                  if any(r["fault"] == f for r in rs)]
        for label in labels:
            for variant in sorted({r["variant"] for r in rs if r["fault"] == label}, key=order.get):
                group = [r for r in rs if r["fault"] == label and r["variant"] == variant
                         and r["seed"] in twin]
                if not group:
                    continue
                deltas = [r["eval_loss"] - twin[r["seed"]]["eval_loss"] for r in group]
                acc = [r["eval_acc"] - twin[r["seed"]]["eval_acc"] for r in group]
                finite = [abs(d) for d, r in zip(deltas, group) if r["finite"] and math.isfinite(d)]
                vs_own = [r["eval_loss"] - own[(r["seed"], r["defence"])]["eval_loss"] for r in group
                          if (r["seed"], r["defence"]) in own]
                # the issue's test: of the trials the unguarded run did not survive, the share this variant did
                bare = {r["seed"]: r for r in rs if r["fault"] == label and r["variant"] == "unguarded"}
                lost = [r for r in group if r["seed"] in bare and not _ok(bare[r["seed"]], twin)]
                faults.append(dict(
                    fault=label, variant=variant, trials=len(group),
                    loss_ok=sum(math.isfinite(d) and abs(d) <= LOSS_TOL for d in deltas) / len(group),
                    acc_ok=sum(math.isfinite(a) and abs(a) <= ACC_TOL + 1e-12 for a in acc) / len(group),
                    mean_abs_delta=statistics.fmean(finite) if finite else float("nan"),
                    max_abs_delta=max(finite) if finite else float("nan"),
                    mean_abs_delta_own=statistics.fmean(abs(d) for d in vs_own if math.isfinite(d))
                    if any(math.isfinite(d) for d in vs_own) else float("nan"),
                    no_worse=sum(math.isfinite(d) and d <= LOSS_TOL for d in deltas) / len(group),
                    own_ok=sum(math.isfinite(d) and abs(d) <= LOSS_TOL for d in vs_own) / max(len(vs_own), 1),
                    saved=sum(_ok(r, twin) for r in lost), lost=len(lost),
                    nonfinite=sum(not r["finite"] for r in group),
                    at_fault=statistics.fmean(r["at_fault"] for r in group),
                    acted=sum(r["at_fault"] > 0 for r in group) / len(group),
                    fit_s=statistics.fmean(r["fit_s"] for r in group)))
        for variant in sorted({r["variant"] for r in rs if r["kind"] == "none"}, key=order.get):
            group = [r for r in rs if r["kind"] == "none" and r["variant"] == variant and r["seed"] in twin]
            if not group:
                continue
            deltas = [r["eval_loss"] - twin[r["seed"]]["eval_loss"] for r in group]
            healthy.append(dict(
                variant=variant, runs=len(group),
                false_mean=statistics.fmean(r["interventions"] for r in group),
                false_any=sum(r["interventions"] > 0 for r in group) / len(group),
                false_max=max(r["interventions"] for r in group),
                tensors_mean=statistics.fmean(r["intervention_tensors"] for r in group),
                mean_abs_delta=statistics.fmean(abs(d) for d in deltas) if all(map(math.isfinite, deltas))
                else float("nan"),
                eval_loss=statistics.fmean(r["eval_loss"] for r in group),
                eval_acc=statistics.fmean(r["eval_acc"] for r in group),
                train_loss_before_fault=statistics.fmean(r["train_loss_before_fault"] for r in group
                                                         if r["train_loss_before_fault"] is not None),
                fit_s=statistics.fmean(r["fit_s"] for r in group)))
        meta = dict(config=rs[0]["config"], machines=sorted({r["machine"] for r in rs}),
                    torch=sorted({r["torch"] for r in rs}), first=min(r["date"] for r in rs),
                    last=max(r["date"] for r in rs), trials=len(rs), seeds=len({r["seed"] for r in rs}),
                    fit_s_total=round(sum(r["fit_s"] for r in rs)))
        out[cid] = dict(meta=meta, faults=faults, healthy=healthy)
    return out


def print_summary(summary: dict) -> None:
    for cid, s in summary.items():
        m = s["meta"]
        cfg = m["config"]
        print(f"\n### config {cid}: {'SST-2' if cfg['sst2'] else 'synthetic'}, {cfg['steps']} steps, "
              f"fault at {cfg['fault_step']}, lr {cfg['lr']:g}, batch {cfg['batch']}, "
              f"grad clip {cfg['grad_clip'] or 'none'}, warm-up {cfg.get('warmup') or 'defaults'}")
        print(f"{m['trials']} trials, {m['seeds']} seeds, {m['fit_s_total']} s of fits; machine "
              f"{'; '.join(m['machines'])}; torch {', '.join(m['torch'])}; {m['first']} - {m['last']}\n")
        print(f"| fault | variant | trials | eval loss within {LOSS_TOL} of healthy twin | accuracy "
              f"within {ACC_TOL * 100:g} pt | mean abs delta loss (finite) | max | mean abs delta vs own "
              f"healthy run | within {LOSS_TOL} of its own healthy run | at most {LOSS_TOL} worse than the twin | trials the unguarded run lost: saved | "
              "non-finite runs | acted at fault (mean steps) | s / fit |")
        print("|---" * 14 + "|")
        for r in s["faults"]:
            saved = "-" if r["variant"] == "unguarded" else f"{r['saved']}/{r['lost']}"
            print(f"| {r['fault']} | {r['variant']} | {r['trials']} | {r['loss_ok']:.0%} | "
                  f"{r['acc_ok']:.0%} | {_fmt(r['mean_abs_delta'], '.4f')} | "
                  f"{_fmt(r['max_abs_delta'], '.4f')} | "
                  f"{_fmt(r['mean_abs_delta_own'], '.4f')} | {r['own_ok']:.0%} | {r['no_worse']:.0%} | "
                  f"{saved} | {r['nonfinite']} | "
                  f"{r['acted']:.0%} ({r['at_fault']:.1f}) | {r['fit_s']:.1f} |")
        print("\nhealthy runs (no fault): false interventions (steps skipped or clipped)\n")
        print("| variant | runs | false interventions per run (max) | runs with any | tensors scaled per "
              "run | mean abs delta loss vs healthy | eval loss | eval acc | train loss before F | s / fit |")
        print("|---" * 10 + "|")
        for r in s["healthy"]:
            print(f"| {r['variant']} | {r['runs']} | {r['false_mean']:.2f} ({r['false_max']}) | "
                  f"{r['false_any']:.0%} | {r['tensors_mean']:.1f} | {_fmt(r['mean_abs_delta'], '.4f')} | "
                  f"{r['eval_loss']:.4f} | {r['eval_acc']:.4f} | {_fmt(r['train_loss_before_fault'])} | "
                  f"{r['fit_s']:.1f} |")
    print(f"\nsummarized {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on "
          f"{platform.platform()}, torch {torch.__version__}")


# ---------------------------------------------------------------------------------------------- main

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sst2", default=None, help="SST-2 train.tsv; default: the synthetic task")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--fault-step", type=int, default=310)
    parser.add_argument("--tick-every", type=int, default=50)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers-model", type=int, default=5, help="BERT layers (at least 2)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--grad-factor", type=float, default=1e4)
    parser.add_argument("--growth", type=float, default=1.3)
    parser.add_argument("--growth-steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=20000,
                        help="SST-2 rows read (the last --eval-rows held out)")
    parser.add_argument("--eval-rows", type=int, default=1000)
    parser.add_argument("--grad-clip", type=float, default=0.0, help="Lightning's gradient_clip_val; 0: none")
    parser.add_argument("--warmup", type=int, default=None,
                        help="warm-up of the guard and of the ZClip / AdaGC peers (default: each one's own)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    parser.add_argument("--summarize", action="store_true", help="print the tables of --out and exit")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "guard_faults.json"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.summarize:
        print_summary(summarize_rows(read_rows(out)))
        return
    args.layers_model = max(args.layers_model, 2)  # the planted parameters are in layers 0 and 1
    args.sst2 = str(Path(args.sst2).resolve()) if args.sst2 else None
    kinds = [k for k in args.kinds.split(",") if k]
    variants = [v for v in args.variants.split(",") if v]
    bad = [k for k in kinds if k not in KINDS] + [v for v in variants if v not in VARIANTS]
    if bad:
        parser.error(f"unknown kind / variant {bad}; kinds: {', '.join(KINDS)}; "
                     f"variants: {', '.join(VARIANTS)}")
    if not 0 < args.fault_step < args.steps:
        parser.error("--fault-step must be inside the run")
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    config = config_of(args)
    cid = config_id(config)
    done = {(r["kind"], r["target"], r["seed"], r["defence"]) for r in read_rows(out)
            if r["config_id"] == cid}
    todo = [t for t in grid(kinds, variants, args.seeds, args.layers_model) if t not in done]
    print(f"config {cid}: {len(todo)} trials to run ({len(done)} already in {out})", flush=True)
    if todo:
        data, evalset = load_data(args)
        workdir = Path(tempfile.mkdtemp(prefix="guard-faults-"))
        machine = f"{cpu_name()}, {os.cpu_count()} cores, {args.threads} thread(s)"
        out.parent.mkdir(parents=True, exist_ok=True)
        for i, (kind, target, seed, defence) in enumerate(todo):
            r = trial(kind, target, seed, defence, data, evalset, args, workdir)
            r.update(config_id=cid, config=config, machine=machine, torch=torch.__version__,
                     date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
            with out.open("a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"[{i + 1}/{len(todo)}] seed {seed} {r['fault']:12s} {r['variant']:10s} eval loss "
                  f"{r['eval_loss']:.4f} acc {r['eval_acc']:.3f} interventions {r['interventions']} "
                  f"(at fault {r['at_fault']}) train loss before F {_fmt(r['train_loss_before_fault'])} "
                  f"({r['fit_s']:.1f} s)", flush=True)
        if args.keep:
            print(f"run directories kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print_summary(summarize_rows(read_rows(out)))


if __name__ == "__main__":
    main()
