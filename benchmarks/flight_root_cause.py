"""The flight recorder's root cause measured like a detector: faults planted in real Lightning fits.

Every trial is a real fit of a tiny BERT (width 32, 5 layers) built from its config (no download) on a real but tiny task:
SST-2 sentences (``--sst2 PATH`` to its ``train.tsv``, with a word-level tokenizer trained on it: the
``--vocab`` most frequent words) or, with no path, a synthetic learnable task (the label is whether the
first token is 1 or 2). ``TickCallback`` records with its defaults (dense loss / grad_norm, the flight
recorder on) and ticks every ``--tick-every`` steps; one fault is planted at step ``F`` (between ticks):

* ``grad``   one parameter's gradient x``--grad-factor`` (1e4) for 2 steps (F, F+1);
* ``batch``  a corrupted batch at F: labels flipped (``labels``) or input ids replaced with noise (``noise``);
* ``lr``     the optimizer's learning rate x100 for 3 steps (F..F+2), restored after;
* ``nan``    one parameter's gradient NaN at F;
* ``norm``   one LayerNorm's input x1e4 at F (a forward pre-hook for that one step, ahead of any other): the
             norm cancels the scale, so only each norm's input absmax (a default series) shows it;
* ``drift``  layer 0's attention query weight x1.5 after each optimizer step for 20 steps (F..F+19): a slow
             drift (attention-logit growth) that no single step shows;
* ``freeze`` layer 0's MLP input weight's gradient zeroed from F to the end (a frozen layer);
* ``offopt`` layer 1's MLP output weight's update x100 at F and F+1, outside the optimizer;
* ``healthy`` no fault.

``--family bert`` (the default) is the tiny BERT classifier; ``--family gpt2`` a tiny GPT-2 (width 32, 4
layers, 2 heads) trained as a character-level LM on ``--text`` (Tiny Shakespeare) or, with no path, on a
synthetic learnable sequence (each window counts up from a random token). Its query weight is the first third
of the fused ``c_attn`` (the drift multiplies only those columns).

Each trial's outcome (``outcome``): ``find_anomalies(load_run(ticks_dir))``; the findings whose step is in
``[F - SLACK, last fault step + SLACK]`` and whose kind is an event's (``EVENT_KINDS``: a loss / gradient
spike, a non-finite loss / gradient, an exception, a layer jump; not a tick's per-layer finding) are **at the event** (``event_found``: at least one), the rest are
**elsewhere**. ``named`` is the ``layer`` of the first finding at the event that names one (the root-cause
finding); ``named_planted`` whether it is the planted parameter (``grad``, ``nan``) or one of the planted
LayerNorm's parameters (``norm``); None for ``batch`` / ``lr`` / ``healthy`` (no single planted layer).
From ``root_cause.csv``'s table (``root_cause_table``), the rank-1 row of the event nearest F gives
``start_step`` (when the named layer deviated), ``moved_step`` (when the loss / global norm moved) and
``lead`` (the table's: ``moved_step - start_step``, the steps the layer was off before the run-level series showed it; 0
for an earlier event's aftermath or a fall after the run moved), and its
``scope`` (``layer`` or ``run-wide``; ``said_run_wide``: a finding at the event names no layer and says
run-wide, counted in the summary's ``run_wide`` with the table's scope). ``warn_step`` is the first at-event finding's step (``delay`` = it - F)
and ``loss_step`` the first loss spike / non-finite loss among them: ``warn_lead = loss_step - warn_step``
(how many steps before the loss moved the first warning came; None when the loss did not move).

    python benchmarks/flight_root_cause.py                                   # synthetic task, full grid
    python benchmarks/flight_root_cause.py --sst2 /work/shared/data/sst2/train.tsv
    python benchmarks/flight_root_cause.py --seeds 1 --kinds grad,healthy --steps 160   # quick look
    python benchmarks/flight_root_cause.py --sst2 /work/shared/data/sst2/train.tsv --flight none          # ring only
    python benchmarks/flight_root_cause.py --sst2 /work/shared/data/sst2/train.tsv \
        --flight update_norm,input_absmax,attn_logit
    python benchmarks/flight_root_cause.py --family gpt2 --text /work/shared/data/text/tinyshakespeare.txt

Prints the table and writes every trial's raw outcome to ``--out`` (benchmarks/results/flight_root_cause.json).
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from tick_lightning import TickCallback
from tick_lightning.reporting import find_anomalies, load_run
from tick_lightning.reporting.rules.root_cause import root_cause_table
from tick_lightning.select import clean_name

KINDS = ("grad", "batch", "lr", "nan", "norm", "drift", "freeze", "offopt", "healthy")
SLACK = 8  # = Thresholds().spike_min_history: the report's own event gap
#: Finding kinds of an event (what the root-cause fold emits); a tick's per-layer finding near F is not one.
EVENT_KINDS = {"loss_spike", "grad_spike", "nonfinite_loss", "nonfinite_grad", "exception", "layer_jump",
               "input_jump", "layer_drop", "layer_zero", "layer_trend", "layer_rise", "attn_jump", "attn_rise",
               "update_jump"}
#: the kinds whose first finding says the loss moved (``loss_step``)
LOSS_KINDS = {"loss_spike", "nonfinite_loss"}
#: Planted parameters (grad, nan) and LayerNorm modules (norm) of the tiny BERT, input end to output end.
PARAMS = ("model.bert.encoder.layer.0.attention.self.query.weight",
          "model.bert.encoder.layer.0.intermediate.dense.weight",
          "model.bert.encoder.layer.1.attention.self.value.weight",
          "model.bert.encoder.layer.1.output.dense.weight",
          "model.classifier.weight")
NORMS = ("model.bert.embeddings.LayerNorm",
         "model.bert.encoder.layer.0.attention.output.LayerNorm",
         "model.bert.encoder.layer.0.output.LayerNorm",
         "model.bert.encoder.layer.1.attention.output.LayerNorm",
         "model.bert.encoder.layer.1.output.LayerNorm")
BATCH_MODES = ("labels", "noise")
#: (drift, freeze, offopt) targets: the query weight, an MLP input weight, an MLP output weight
TARGETS = {"drift": "model.bert.encoder.layer.0.attention.self.query.weight",
           "freeze": "model.bert.encoder.layer.0.intermediate.dense.weight",
           "offopt": "model.bert.encoder.layer.1.output.dense.weight"}
GPT2_PARAMS = ("model.transformer.h.0.attn.c_attn.weight", "model.transformer.h.0.mlp.c_fc.weight",
               "model.transformer.h.1.attn.c_proj.weight", "model.transformer.h.1.mlp.c_proj.weight",
               "model.transformer.wpe.weight")
GPT2_NORMS = ("model.transformer.h.0.ln_1", "model.transformer.h.0.ln_2", "model.transformer.h.1.ln_1",
              "model.transformer.h.1.ln_2", "model.transformer.ln_f")
GPT2_TARGETS = {"drift": "model.transformer.h.0.attn.c_attn.weight",
                "freeze": "model.transformer.h.0.mlp.c_fc.weight",
                "offopt": "model.transformer.h.1.mlp.c_proj.weight"}


# ---------------------------------------------------------------------------------------------- data + model

def synthetic_data(n: int, vocab: int, seq: int, seed: int = 0) -> TensorDataset:
    """Label = whether the first token is 1 (else 2); the rest is noise: learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    ids[:, 0] = torch.randint(1, 3, (n,), generator=g)
    return TensorDataset(ids, (ids[:, 0] == 1).long())


def sst2_data(path: str | Path, vocab: int, seq: int, limit: int = 20000) -> TensorDataset:
    """SST-2 ``train.tsv`` (label and sentence columns, in the order its header names), a word-level tokenizer trained on it: the ``vocab - 3``
    most frequent lowercase words (0 pad, 1 unknown, 2 a leading [CLS])."""
    lines = Path(path).read_text().splitlines()
    label_first = lines[0].split("\t")[0].strip() == "label"  # the header says the column order
    rows = []
    for line in lines[1:limit + 1]:
        a, _, b = line.partition("\t") if label_first else line.rpartition("\t")
        text, label = (b, a) if label_first else (a, b)
        if label.strip() in ("0", "1"):
            rows.append((text.lower().split(), int(label)))
    counts = collections.Counter(w for words, _ in rows for w in words)
    index = {w: i + 3 for i, (w, _) in enumerate(counts.most_common(vocab - 3))}
    ids = torch.zeros(len(rows), seq, dtype=torch.long)
    for r, (words, _) in enumerate(rows):
        tok = [2] + [index.get(w, 1) for w in words][:seq - 1]
        ids[r, :len(tok)] = torch.tensor(tok)
    return TensorDataset(ids, torch.tensor([label for _, label in rows]))


def lm_data(path: str | None, n: int, seq: int, vocab: int, seed: int = 0) -> tuple[TensorDataset, int]:
    """Windows of ``seq + 1`` characters of ``path`` (its own character vocabulary), or of a counting sequence
    (``start, start + 1, ...`` mod ``vocab``) with no path; the vocabulary size."""
    g = torch.Generator().manual_seed(seed)
    if path:
        text = Path(path).read_text(encoding="utf-8")
        chars = sorted(set(text))
        lookup = {c: i for i, c in enumerate(chars)}
        ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
        starts = torch.randint(0, len(ids) - seq - 1, (n,), generator=g)
        return TensorDataset(torch.stack([ids[s:s + seq + 1] for s in starts.tolist()])), len(chars)
    starts = torch.randint(0, vocab, (n, 1), generator=g)
    return TensorDataset((starts + torch.arange(seq + 1)) % vocab), vocab


class LM(L.LightningModule):
    """A tiny GPT-2 from its config, next-token cross-entropy."""

    def __init__(self, vocab: int, seq: int, hidden: int, layers: int, seed: int, lr: float):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(seed)
        self.lr = lr
        self.model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=hidden, n_layer=layers,
                                               n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        logits = self.model(input_ids=ids[:, :-1]).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class Classifier(L.LightningModule):
    def __init__(self, vocab: int, seq: int, hidden: int, layers: int, seed: int, lr: float):
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(seed)
        self.lr = lr
        self.model = BertForSequenceClassification(BertConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
            intermediate_size=2 * hidden, max_position_embeddings=seq, num_labels=2, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0))

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        return self.model(input_ids=ids, attention_mask=(ids > 0).long(), labels=labels).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


# ------------------------------------------------------------------------------------------------- faults

class Fault(Callback):
    """One planted fault (see the module docstring), first in the callback list."""

    def __init__(self, kind: str, step: int, target: str = "", grad_factor: float = 1e3, vocab: int = 64,
                 seed: int = 0):
        self.kind, self.step, self.target, self.grad_factor, self.vocab = kind, step, target, grad_factor, vocab
        self.seed, self._hook, self._lr, self._before = seed, None, None, None

    @property
    def steps(self) -> range:
        """The optimizer steps the fault touches (``freeze``: its first 20)."""
        n = {"grad": 2, "lr": 3, "offopt": 2, "drift": 20, "freeze": 20}.get(self.kind, 1)
        return range(self.step, self.step + n) if self.kind != "healthy" else range(0)

    def _param(self, pl_module) -> torch.Tensor:
        return dict((clean_name(n), p) for n, p in pl_module.named_parameters())[self.target]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        if step not in self.steps:
            return
        if self.kind == "batch":
            ids, labels = batch
            if self.target == "labels":
                labels.copy_(1 - labels)
            else:
                g = torch.Generator().manual_seed(self.seed)
                ids.copy_(torch.randint(3, self.vocab, ids.shape, generator=g).to(ids.device))
        elif self.kind == "lr":
            opt = trainer.optimizers[0]
            if self._lr is None:
                self._lr = [group["lr"] for group in opt.param_groups]
            for group, lr in zip(opt.param_groups, self._lr):
                group["lr"] = lr * 100.0
        elif self.kind == "norm":
            module = dict((clean_name(n), m) for n, m in pl_module.named_modules())[self.target]
            # ahead of every other pre-hook (the recorder's input_absmax observer): the fault is upstream
            self._hook = module.register_forward_pre_hook(lambda m, args: (args[0] * 1e4, *args[1:]), prepend=True)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step
        if self.kind in ("grad", "nan") and step in self.steps:
            p = self._param(pl_module)
            p.grad.mul_(self.grad_factor) if self.kind == "grad" else p.grad.fill_(float("nan"))
        elif self.kind == "freeze" and step >= self.step:
            self._param(pl_module).grad.zero_()
        elif self.kind == "offopt" and step in self.steps:
            self._before = self._param(pl_module).detach().clone()

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        step = trainer.global_step - 1  # the optimizer step that just ran
        if self.kind == "lr" and self._lr is not None and trainer.global_step >= self.steps.stop:
            for group, lr in zip(trainer.optimizers[0].param_groups, self._lr):
                group["lr"] = lr
            self._lr = None
        elif self.kind == "drift" and step in self.steps:
            p = self._param(pl_module)
            # GPT-2's c_attn is [hidden, 3 * hidden] (q | k | v columns): only the query's third drifts
            (p[:, :p.shape[0]] if p.shape[1] == 3 * p.shape[0] else p).mul_(1.5)
        elif self.kind == "offopt" and self._before is not None:
            p = self._param(pl_module)
            p.copy_(self._before + 100.0 * (p - self._before))
            self._before = None


# ------------------------------------------------------------------------------------------------- trials

def planted_match(kind: str, target: str, named: str | None) -> bool | None:
    """Whether ``named`` is the planted layer: the parameter (grad, nan), the LayerNorm (its input, with
    its input absmax, a default series) or one of its parameters (norm); None where no single layer was planted
    (batch, lr, healthy)."""
    if kind == "drift":  # the query weight, or the attention block holding it (its logit scale)
        return named is not None and (named == target or target.startswith(named + "."))
    if kind in ("grad", "nan", "freeze", "offopt"):
        return named == target
    if kind == "norm":
        return named is not None and (named == target or named.startswith(target + "."))
    return None


def outcome(findings, table, kind: str, target: str, steps: range) -> dict:
    """A trial's outcome from its findings and root-cause table (the fields of the module docstring)."""
    rows = [dict(step=int(f.step), last_step=int(f.last_step), layer=f.layer, kind=f.kind, detail=f.detail)
            for f in findings]
    if len(steps):
        lo, hi = steps.start - SLACK, steps.stop - 1 + SLACK
        at = sorted((r for r in rows if lo <= r["step"] <= hi and r["kind"] in EVENT_KINDS), key=lambda r: r["step"])
    else:
        at = []
    out = dict(kind=kind, target=target, fault_steps=[steps.start, steps.stop - 1] if len(steps) else [],
               findings=len(rows), at_event=len(at), elsewhere=len(rows) - len(at), event_found=bool(at),
               named=None, named_planted=None, trigger=None, event_step=None, start_step=None, moved_step=None,
               lead=None, scope=None, warn_step=None, delay=None, loss_step=None, warn_lead=None,
               finding_kinds=[r["kind"] for r in at], all_findings=rows)
    named = next((r["layer"] for r in at if r["layer"]), None)  # the earliest finding's
    out["said_run_wide"] = any(not r["layer"] and "run-wide" in (r["detail"] or "") for r in at)
    if at:
        out["warn_step"] = min(r["step"] for r in at)
        out["delay"] = out["warn_step"] - steps.start
        loss = [r["step"] for r in at if r["kind"] in LOSS_KINDS]
        out["loss_step"] = min(loss) if loss else None
        out["warn_lead"] = out["loss_step"] - out["warn_step"] if loss else None
    out["named"] = named
    if kind != "healthy":
        out["named_planted"] = planted_match(kind, target, named)
    if len(steps) and table is not None and not table.empty:
        events = sorted(set(int(s) for s in table.event_step if lo <= int(s) <= hi),
                        key=lambda s: abs(s - steps.start))
        if events:
            first = table[table.event_step == events[0]].sort_values("rank").iloc[0]
            out.update(event_step=events[0], trigger=str(first.trigger), start_step=int(first.start_step),
                       moved_step=int(first.moved_step), lead=int(first.lead),  # the table's: 0 for an aftermath
                       table_first=str(first.layer), scope=str(first.scope))
    return out


def trial(kind: str, target: str, seed: int, step: int, data: TensorDataset, args, workdir: Path,
          vocab: int) -> dict:
    """One real fit with one planted fault; its outcome, its wall time and the fit's final loss."""
    torch.manual_seed(seed)
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    fault = Fault(kind, step, target, grad_factor=args.grad_factor, vocab=vocab, seed=seed)
    cb = TickCallback(ticks=f"every:{args.tick_every}", dirpath=run_dir / "ticks", log_to_loggers=False,
                      flight=True if args.flight == "default"
                      else [e for e in args.flight.split(",") if e and e != "none"])
    trainer = L.Trainer(accelerator="cpu", max_steps=args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=run_dir,
                        callbacks=[fault, cb])
    loader = DataLoader(data, batch_size=args.batch, shuffle=True, generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    model = (LM(vocab, args.seq, args.hidden, args.layers_model, seed, args.lr) if args.family == "gpt2" else
             Classifier(vocab, args.seq, args.hidden, args.layers_model, seed, args.lr))
    trainer.fit(model, loader)
    fit_s = time.perf_counter() - t0
    run = load_run(run_dir / "ticks")
    out = outcome(find_anomalies(run), root_cause_table(run), kind, target, fault.steps)
    out.update(seed=seed, fit_s=round(fit_s, 2), report_s=round(time.perf_counter() - t0 - fit_s, 2),
               final_loss=float(trainer.callback_metrics.get("train_loss", float("nan")))
               if "train_loss" in trainer.callback_metrics else None)
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


def grid(kinds, seeds: int, layers: int, family: str = "bert") -> list[tuple[str, str, int, int]]:
    """(kind, target, seed, fault step) of every trial: ``layers`` targets x ``seeds`` seeds for the kinds
    with a planted layer, the batch modes x seeds, ``layers`` seeds for lr and healthy."""
    params, norms, targets = (GPT2_PARAMS, GPT2_NORMS, GPT2_TARGETS) if family == "gpt2" else (PARAMS, NORMS, TARGETS)
    out = []
    for kind in kinds:
        if kind in ("grad", "nan"):
            out += [(kind, t, s, 0) for t in params[:layers] for s in range(seeds)]
        elif kind == "norm":
            out += [(kind, t, s, 0) for t in norms[:layers] for s in range(seeds)]
        elif kind == "batch":
            if family == "bert":  # labels / noise ids of a classifier; an LM has no labels to flip
                out += [(kind, m, s, 0) for m in BATCH_MODES for s in range(seeds)]
        elif kind in targets:  # drift, freeze, offopt: one target, more seeds
            out += [(kind, targets[kind], s, 0) for s in range(max(seeds, 2) * 2)]
        else:  # lr, healthy: more seeds, no target
            out += [(kind, "", s, 0) for s in range(max(seeds, 2) * 2)]
    # the fault step: between ticks, varied by seed and target so no two trials of a kind plant at one step
    return [(k, t, s, 123 + 17 * s + 3 * (i % 5)) for i, (k, t, s, _) in enumerate(out)]


def summarize(results: list[dict]) -> list[dict]:
    """Per kind: trials, events found, named == planted, lead median / range, findings elsewhere."""
    rows = []
    for kind in KINDS:
        rs = [r for r in results if r["kind"] == kind]
        if not rs:
            continue
        leads = [r["lead"] for r in rs if r["lead"] is not None]
        planted = [r["named_planted"] for r in rs if r["named_planted"] is not None]
        names = collections.Counter(r["named"] or "-" for r in rs)
        delays = [r["delay"] for r in rs if r.get("delay") is not None]
        warn = [r["warn_lead"] for r in rs if r.get("warn_lead") is not None]
        rows.append(dict(kind=kind, trials=len(rs), events=sum(r["event_found"] for r in rs),
                         named_planted=sum(planted) if planted or kind not in ("batch", "lr", "healthy") else None,
                         run_wide=sum(r.get("scope") == "run-wide" or r.get("said_run_wide", False) for r in rs),
                         delay_median=statistics.median(delays) if delays else None,
                         warn_leads=warn, loss_moved=sum(r.get("loss_step") is not None for r in rs),
                         first_kinds=dict(collections.Counter(
                             r["finding_kinds"][0] if r["finding_kinds"] else "-" for r in rs).most_common()),
                         lead_median=statistics.median(leads) if leads else None,
                         lead_min=min(leads) if leads else None, lead_max=max(leads) if leads else None,
                         findings=sum(r["findings"] for r in rs), elsewhere=sum(r["elsewhere"] for r in rs),
                         max_findings=max(r["findings"] for r in rs), named=dict(names.most_common())))
    return rows


def print_table(summary: list[dict]) -> None:
    print(f"\n{'fault':8s} {'trials':>6s} {'events':>7s} {'named=planted':>14s} {'lead med [min,max]':>19s} "
          f"{'run-wide':>8s} {'delay med':>9s} {'findings elsewhere':>19s}")
    for r in summary:
        planted = f"{r['named_planted']}/{r['trials']}" if r["named_planted"] is not None else "-"
        lead = (f"{r['lead_median']:g} [{r['lead_min']},{r['lead_max']}]" if r["lead_median"] is not None else "-")
        events = f"{r['events']}/{r['trials']}" if r["kind"] != "healthy" else "-"
        delay = f"{r['delay_median']:g}" if r["delay_median"] is not None else "-"
        extra = (f"{r['findings']} (max {r['max_findings']}/run)" if r["kind"] == "healthy" else str(r["elsewhere"]))
        print(f"{r['kind']:8s} {r['trials']:6d} {events:>7s} {planted:>14s} {lead:>19s} {r['run_wide']:>8d} "
              f"{delay:>9s} {extra:>19s}")
    for r in summary:
        print(f"  {r['kind']}: first finding " + ", ".join(f"{k} x{v}" for k, v in r["first_kinds"].items())
              + f"; loss moved in {r['loss_moved']}, warning lead {r['warn_leads']}")
        if r["kind"] in ("batch", "lr", "norm", "drift", "freeze", "offopt"):
            print(f"  {r['kind']} named: " + ", ".join(f"{k} x{v}" for k, v in r["named"].items()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("bert", "gpt2"), default="bert")
    parser.add_argument("--sst2", default=None, help="SST-2 train.tsv (bert); default: the synthetic task")
    parser.add_argument("--text", default=None, help="a text file (gpt2, character-level); default: synthetic")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--layers", type=int, default=5, help="planted layers per kind (of 5)")
    parser.add_argument("--steps", type=int, default=220)
    parser.add_argument("--tick-every", type=int, default=50)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=500)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers-model", type=int, default=5, help="BERT layers (at least 2)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--grad-factor", type=float, default=1e4)
    parser.add_argument("--flight", default="default",
                        help="the recorder's extras: default (TickCallback's), none, or a list, e.g. update_norm")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the run directories (printed)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "flight_root_cause.json"))
    args = parser.parse_args(argv)
    args.layers_model = max(args.layers_model, 2)  # the planted names are in layers 0 and 1
    torch.set_num_threads(args.threads)
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.family == "gpt2":
        data, vocab = lm_data(args.text, args.batch * args.steps, args.seq, args.vocab)
    else:
        data, vocab = (sst2_data(args.sst2, args.vocab, args.seq) if args.sst2
                       else synthetic_data(args.batch * args.steps, args.vocab, args.seq)), args.vocab
    workdir = Path(tempfile.mkdtemp(prefix="flight-root-cause-"))
    results = []
    t0 = time.time()
    for i, (kind, target, seed, step) in enumerate(grid(args.kinds.split(","), args.seeds, args.layers, args.family)):
        r = trial(kind, target, seed, step, data, args, workdir, vocab)
        results.append(r)
        print(f"[{i + 1}] {kind:7s} seed {seed} step {step} {target or '-':55s} event {r['event_found']!s:5s} "
              f"named {r['named'] or '-'} ({r['named_planted']}) lead {r['lead']} {r['scope']} "
              f"delay {r['delay']} warn lead {r['warn_lead']} {r['finding_kinds'][:3]} findings {r['findings']} "
              f"({r['fit_s']:.0f}+{r['report_s']:.0f} s)", flush=True)
    summary = summarize(results)
    print_table(summary)
    meta = dict(machine=f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                task=(f"{args.family} " + (f"SST-2 {args.sst2}" if args.sst2 else args.text or "synthetic")),
                seconds=round(time.time() - t0),
                args={k: v for k, v in vars(args).items() if k != "out"})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, summary=summary, trials=results), indent=1, default=str))
    print(f"\n{meta['machine']}, torch {meta['torch']}, {meta['task']}, {meta['seconds']} s; raw results: {args.out}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
