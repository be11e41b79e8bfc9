"""``TickCore``: the recorder behind ``TickCallback`` (Lightning), ``TickTrainerCallback`` (``tick_lightning.hf``) and
``TickLoop`` (``tick_lightning.loop``), importing nothing of Lightning.

An adapter drives it with six step events -- ``fit_begin`` (with a checkpoint's state to continue),
``batch_begin``, ``gradients_ready`` (accumulated, unscaled, before clipping), ``batch_end`` (the loss
back-propagated), ``fit_end``, ``fit_failed`` -- and ``state_dict`` / ``load_state_dict`` for checkpoints; each is
the Lightning hook of the same moment (``on_train_batch_start``, ``on_before_optimizer_step``, ...), which
``TickCallback`` receives from Lightning directly. Every method takes a ``trainer``: anything with the attributes a
Lightning ``Trainer`` has and the core reads (``global_step``, ``current_epoch``, ``optimizers``,
``accumulate_grad_batches``, ``world_size``, ``global_rank``, ``strategy`` (``broadcast``, ``barrier``), ``loggers``,
``log_dir``, ...): Lightning's own, or an adapter's view of another loop (``hf._TrainerView``, ``loop._LoopView``).
``TickCallback`` is this class registered as a Lightning ``Callback``.

The hooks decide (integer comparisons, ``schedule.py``) and route; each state's collector
(``tick_lightning.collect``) does the device work; ``records.to_host`` makes the tick's one host copy;
storage (``store.py``) is reached through four methods only (``_open_records``, ``_emit``,
``_flush_records``, ``_close_records``).

Step semantics: a tick at step ``s`` is the optimizer step whose batch is processed while the tick
counter (``collect.steps.tick_step``: ``trainer.global_step``, or the number of batches under manual
optimization) is ``s``. Its gradients are that batch's (summed over accumulation micro-batches, after AMP
unscaling, before gradient clipping), its weights are those *before* the update, ``update`` is the change
the optimizer applied, and ``loss`` is the sum of the micro-batch losses back-propagated (each already divided
by ``accumulate_grad_batches``).
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from tick_lightning import amp, dist
from tick_lightning.collect import (
    ActivationCollector,
    AmpCollector,
    Collector,
    GradCollector,
    HistogramCollector,
    LossCollector,
    LrCollector,
    MemoryCollector,
    NonfiniteWatch,
    NormInputCollector,
    ParamSet,
    RenormCollector,
    SnapshotCollector,
    Tick,
    TimeCollector,
    UpdateCollector,
    WeightCollector,
    tick_step,
    total_steps,
)
from tick_lightning.collect.dense import DenseCollector, dense_table
from tick_lightning.collect.flight import FlightRecorder, event_table
from tick_lightning.collect.stepwise import StepFlush, StepPhase
from tick_lightning.config import (  # noqa: F401 - DEFAULT_STATES, RANKS re-exported
    DEFAULT_STATES,
    RANKS,
    DenseSeries,
    DirPath,
    FlightExtras,
    FlightWindow,
    FlushEvery,
    RankPolicy,
    StateNames,
    StateTicks,
    TickConfig,
    Ticks,
    check_dirpath,
)
from tick_lightning.guard import Guard, GuardEngine, GuardError
from tick_lightning.records import Block, to_host
from tick_lightning.renorm.spec import Renorm
from tick_lightning.select import Selector, clean_name, select_modules, select_parameters
from tick_lightning.store import Recorder
from tick_lightning.triggers import Event, SpikeTrigger

__all__ = ["PARAMETER_STATES", "TickCore", "TrainerView"]

#: what ``on_train_batch_end`` reads of a LightningModule, for a loop whose optimization is automatic
_AUTOMATIC = SimpleNamespace(automatic_optimization=True)


class TrainerView:
    """What ``TickCore`` reads of a trainer, for a loop that is not Lightning's (the adapters' views derive from it):
    the parts that hold for the whole fit. The step counters -- ``global_step``, ``max_steps``,
    ``estimated_stepping_batches`` -- are the subclass's: a counter the loop moves, or its trainer's own state.
    Ranks come from the default ``torch.distributed`` group when there is one (DDP), broadcasts and barriers go
    through it (``dist.GroupStrategy``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, log_dir: str, *, accumulate: int = 1,
                 scaler: Any = None, precision: str = "32-true", num_training_batches: float = math.inf) -> None:
        grouped = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.optimizers = [optimizer]
        self.accumulate_grad_batches = accumulate
        self.world_size = torch.distributed.get_world_size() if grouped else 1
        self.global_rank = torch.distributed.get_rank() if grouped else 0
        self.is_global_zero = self.global_rank == 0
        self.precision, self.precision_plugin = precision, SimpleNamespace(scaler=scaler)
        self.strategy = dist.GroupStrategy()
        self.loggers: list = []
        self.log_dir = self.default_root_dir = log_dir
        self.num_training_batches = num_training_batches
        self.current_epoch = 0
        self.sanity_checking = False
        self.state = SimpleNamespace(fn="fit")
        self.callback_metrics: dict = {}

#: States that describe individual parameters: refused on flattened per-rank views (FSDP1, DeepSpeed).
PARAMETER_STATES = ("weight", "grad", "update", "snapshot", "weight_hist", "grad_hist")


def _model_exists(module: nn.Module) -> bool:
    """Parameters exist and are real (not ``meta`` placeholders that ``configure_model`` will replace)."""
    params = list(module.parameters())
    return bool(params) and not any(p.is_meta for p in params)


def _device(module: nn.Module) -> torch.device:
    """A LightningModule's (or a Hugging Face model's) ``device``; a plain ``nn.Module`` has none: its parameters'."""
    device = getattr(module, "device", None)
    if isinstance(device, torch.device):
        return device
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def _is_compiled(module: nn.Module) -> bool:
    from torch._dynamo.eval_frame import OptimizedModule

    return getattr(module, "_compiler_ctx", None) is not None or any(isinstance(m, OptimizedModule)
                                                                      for m in module.modules())


class TickCore:
    """The recorder (module docstring); its arguments and what each records: ``TickCallback``'s docstring. An
    adapter builds one and calls its hooks with its loop's ``trainer`` view."""

    def __init__(
        self,
        ticks: Ticks = "every:100",
        states: StateNames | None = None,
        state_ticks: StateTicks | None = None,
        select: Selector = None,
        norm_select: Selector = "norm",
        dirpath: DirPath | None = None,
        patch_norms: bool = False,
        renorm: Sequence[Renorm] | None = None,
        ranks: RankPolicy = "zero",
        log_to_loggers: bool = True,
        log_select: str | Sequence[str] | None = None,
        activations: Selector = None,
        update_on_host: bool = False,
        reset_peak_memory: bool = False,
        dense: DenseSeries | bool = True,
        dense_flush_every: FlushEvery = 256,
        flight: FlightExtras | bool = True,
        flight_window: FlightWindow = 128,
        guard: Guard | None = None,
    ) -> None:
        super().__init__()
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.config = cfg = TickConfig(**arguments)  # every argument checked here, before any training
        self.schedule, self.states, self.state_schedules = cfg.schedule, cfg.chosen_states, dict(cfg.state_schedules)
        self.select, self.norm_select, self.activations = select, norm_select, activations
        self.dirpath = self._dirpath_arg = None if dirpath is None else str(dirpath)
        self.patch_norms, self.ranks, self.renorm_specs = patch_norms, ranks, list(renorm or [])
        self.log_to_loggers, self.log_select = log_to_loggers, log_select
        self.dense, self.dense_flush_every = cfg.dense_series, dense_flush_every
        self.flight, self.flight_window = cfg.flight_extras, flight_window  # flight None: the recorder is off
        self._flight_asked = flight is not True  # extras named by the user (not the defaults)
        self._flight = None if cfg.flight_extras is None else FlightRecorder(flight_window, cfg.flight_extras)
        # the every-step phase: the dense row and the flight ring share one computation of the partial sums
        self._dense = DenseCollector(cfg.dense_series, cfg.dense_capacity) if cfg.dense_series else None
        self.guard = cfg.guard
        self._guard = None if cfg.guard is None else GuardEngine(cfg.guard, cfg.dense_capacity)
        self._steps = StepPhase(self._dense, self._flight, self._guard)
        self._trigger = SpikeTrigger()  # the online spike watch behind spike:K ticks and flight dumps
        self._resumed_spikes: dict | None = None  # from load_state_dict, taken at on_train_start
        self._spike_schedules = any(s.spike_steps for s in self.state_schedules.values())
        self._unobserved: list[str] = []  # norm layers a compiled graph hides from norm_input (on_fit_start)

        # resume state (state_dict): the run and attempt being continued, the last tick recorded
        self._recorder = Recorder()
        self.last_tick_step = -1
        # per-fit state
        self._renorm = None
        if self.renorm_specs:  # validates the specs now; resolved against the live model at fit start
            from tick_lightning.renorm import RenormEngine

            self._renorm = RenormEngine(self.renorm_specs, default_schedule=self.state_schedules["renorm"])
        self._norm_patch_report = None
        self._resolved = False
        self._shapes: dict[str, tuple] = {}
        self._params = ParamSet()
        self._norm = NormInputCollector([])
        self._activation = ActivationCollector([])
        self._watch = NonfiniteWatch()
        self._watch_nonfinite = any(s.nonfinite for s in self.state_schedules.values())
        self._snapshot = SnapshotCollector(self._params)
        self._loss = LossCollector()
        self._grad = GradCollector(self._params)
        # the order is the order of the work: time and memory first (before our temporaries), renorm last
        self._collectors: list[Collector] = [
            TimeCollector(), MemoryCollector(reset_peak_memory), self._loss, LrCollector(), AmpCollector(),
            WeightCollector(self._params), self._grad,
            UpdateCollector(self._params, on_host=update_on_host), self._norm, self._snapshot,
            HistogramCollector(self._params, "weight_hist"), HistogramCollector(self._params, "grad_hist"),
            self._activation,
        ]
        self._renorm_collector = None
        if self._renorm is not None:
            self._renorm_collector = RenormCollector(self._renorm, self._is_tick)
            self._collectors.append(self._renorm_collector)
        self._tick: Tick | None = None
        self._active: list[Collector] = []
        self._tick_global_step = 0
        self._records = False
        self._writes = False
        self._sharded = False
        self._trainer_ref = None  # weakref to the fitting Trainer, for the loggers at flushes outside hooks

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        if stage != "fit":
            return
        # a new fit is a new run unless Lightning restores our state from a checkpoint after this hook
        self._recorder.reset()
        self.last_tick_step = -1
        self._resumed_spikes = None  # not a stale one from an earlier validate(ckpt_path=...)
        self.dirpath = self._dirpath_arg
        # a model that exists now is resolved before any strategy wraps it; one that configure_model builds
        # (Lightning calls it after setup) is resolved in on_fit_start. Decided alike on every rank: resolving
        # can be a collective (FSDP2), and a model may exist on rank 0 only (the others on meta until
        # configure_model gives them rank 0's weights)
        exists = _model_exists(pl_module)
        if dist.any_rank(torch.tensor(float(not exists))) > 0:
            exists = False
        if exists:
            self._resolve(pl_module)

    def check_selection(self, pl_module: nn.Module) -> None:
        """Raise the error fitting ``pl_module`` would raise for this callback's selectors (``select``,
        ``norm_select``, ``activations``, the ``renorm`` targets), changing nothing: a launcher can refuse them
        against the model it built before it writes anything (the recipes do).

        Example:
            >>> from torch import nn
            >>> TickCore(select="encoder.*").check_selection(nn.Sequential(nn.Linear(2, 2)))
            Traceback (most recent call last):
            ...
            tick_lightning.select.SelectionError: Parameter selector 'encoder.*' matches nothing. ...
        """
        select_parameters(pl_module, self.select)
        self._check_log_select(pl_module)
        self._modules(pl_module)
        if self._renorm is not None:
            self._renorm.targets(pl_module)
        if self.guard is not None and self.guard.mode == "clip" and self.guard.select is not None:
            try:
                select_parameters(pl_module, self.guard.select)
            except ValueError as err:
                raise GuardError(f"Guard select: {err}") from None

    def _check_log_select(self, pl_module: nn.Module) -> None:
        """``log_select`` names parameters whose series go to the loggers: one that names none is a typo."""
        if self.log_select is None or not (self.log_to_loggers):
            return
        from tick_lightning.select import SelectionError

        try:
            select_parameters(pl_module, self.log_select)
        except SelectionError as err:
            raise SelectionError(f"log_select: {err}") from None

    def _modules(self, pl_module: nn.Module) -> tuple[list, list]:
        """The norm layers (for ``norm_input`` and the flight recorder's ``input_absmax``) and the ``activations``
        modules the arguments select, ``[]`` for a state not recorded."""
        wants_norms = "norm_input" in self.states or (self._flight is not None and "input_absmax" in self._flight.extras)
        norms = self._norm_layers(pl_module) if wants_norms else []
        activations = select_modules(pl_module, self.activations, what="module") if "activation" in self.states else []
        return norms, activations

    def _resolve(self, pl_module: nn.Module) -> None:
        """Select parameters and norm layers, patch norms: every check of the user's arguments, on every rank."""
        self._params.selected = select_parameters(pl_module, self.select)
        self._check_log_select(pl_module)
        self._shapes = {n: tuple(p.shape) for n, p in self._params.selected}
        if self.patch_norms:
            from tick_lightning.norms import patch_norms

            with dist.unsharded(pl_module):  # FSDP2: the probe needs the real parameters
                self._norm_patch_report = patch_norms(pl_module, select=None, stats=True)
        norms, self._activation.modules = self._modules(pl_module)  # the patched layers, once patched
        if "norm_input" in self.states:
            self._norm.modules = norms
        if self._flight is not None and "input_absmax" in self._flight.extras:
            self._flight.norm_modules = norms
        self._resolved = True

    def _attention_blocks(self, pl_module: nn.Module) -> list:
        """``attn_logit``'s columns: the attention blocks, then the output head; a warning (not an error: the fit
        is still worth recording) when ``flight=["attn_logit"]`` was asked for and the model has no attention block
        that ``collect.attention`` recognises (the default recorder takes what the model has, silently)."""
        from tick_lightning.collect.attention import FUSED_QKV, QK_PAIRS, attention_blocks, output_head

        blocks = attention_blocks(pl_module)
        if not blocks and self._flight_asked:
            names = ", ".join(f"{q}/{k}" for q, k in QK_PAIRS) + ", " + ", ".join(FUSED_QKV)
            warnings.warn(f"TickCallback: flight=['attn_logit'] found no attention block in this model (query and key "
                          f"projections named {names}, with a head_dim); only the output head's logits are recorded.",
                          stacklevel=3)
        head = output_head(pl_module)
        return blocks + ([head] if head is not None else [])

    def _norm_layers(self, pl_module: nn.Module) -> list:
        """The layers ``norm_select`` names; a model without normalization layers has none (not an error)
        unless the user named some."""
        try:
            return select_modules(pl_module, self.norm_select, what="normalization layer")
        except ValueError:
            if self.norm_select != "norm":
                raise
            return []

    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        total = total_steps(trainer)
        self.state_schedules = {s: sched.bind(total) for s, sched in self.state_schedules.items()}
        if total is not None:  # the fit's last step is always recorded (not re-normalized: that would change it)
            self.state_schedules = {s: sched if s == "renorm" else sched.including([total - 1])
                                    for s, sched in self.state_schedules.items()}
        if not self._resolved:
            self._resolve(pl_module)
        # strategies may replace Parameter objects (FSDP2 makes DTensors): look them up again by name
        current = {clean_name(n): p for n, p in pl_module.named_parameters()}
        self._params.selected = [(n, current.get(n, p)) for n, p in self._params.selected]
        modules = {clean_name(n): m for n, m in pl_module.named_modules()}
        self._norm.modules = [(n, modules.get(n, m)) for n, m in self._norm.modules]
        self._activation.modules = [(n, modules.get(n, m)) for n, m in self._activation.modules]
        if self._flight is not None:
            self._flight.norm_modules = [(n, modules.get(n, m)) for n, m in self._flight.norm_modules]
            if "attn_logit" in self._flight.extras:  # the live modules, after the strategy wrapped the model
                self._flight.attention = self._attention_blocks(pl_module)
        self._sharded = any(dist.is_sharded(p) for p in current.values())
        # ranks="zero": only rank 0 records; sharded statistics need every rank in the collectives
        self._writes = self.ranks == "all" or trainer.global_rank == 0
        self._records = self._writes or self._sharded
        if self._renorm is not None:  # plans on the live parameters, after the strategy set the model up
            self._renorm.resolve(pl_module, total_steps=total_steps(trainer))
            self._renorm_collector.record = self._records
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.log_dir or trainer.default_root_dir) / "ticks")
            check_dirpath(self.dirpath)
        unpatched = [n for n, m in self._norm.modules if not hasattr(m, "tick_observer")]
        self._unobserved = []
        if "norm_input" in self.states and unpatched and _is_compiled(pl_module):
            # a compiled graph does not run the forward hooks norm_input would add at a tick: those layers are
            # left out (rows of NaN would read as a finding), named in the manifest and the report
            self._unobserved = unpatched
            self._norm.modules = [(n, m) for n, m in self._norm.modules if hasattr(m, "tick_observer")]
            warnings.warn(f"TickCallback: the model is compiled (torch.compile) and {len(unpatched)} normalization "
                          f"layer(s) are not patched (e.g. {unpatched[0]!r}); a compiled graph does not run the "
                          "forward hooks norm_input needs, so they are not recorded. Pass "
                          "TickCallback(patch_norms=True): patched layers observe their own input under compile.",
                          stacklevel=2)

    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        # after checkpoint restore and dataloader setup: global_step and our state_dict are the resumed ones
        if any(s.epoch_every for s in self.state_schedules.values()) and math.isinf(trainer.num_training_batches):
            raise ValueError("Tick schedule term 'epoch' needs a sized train dataloader (its last batch ends the epoch); "
                             "use 'every:N' for iterable datasets.")
        self._trainer_ref = weakref.ref(trainer)
        # a rank that records nothing keeps no every-step rows; with a guard it still judges every step
        self._steps.dense = self._dense if self._records else None
        self._steps.flight = self._flight if self._records else None  # (a flat-parameter strategy turns it off)
        self._check_views(trainer, pl_module)
        flat_group = dist.flat_shard_group(pl_module, trainer.world_size)
        if self._steps.collectors or self._guard is not None:  # before the manifest, which names the flight columns
            self._steps.setup(trainer.optimizers, pl_module, _device(pl_module), flat_group=flat_group)
        if self._guard is not None:  # every check of the guard against the model and trainer, before anything is written
            self._guard.record = self._records
            self._guard.setup(self._steps.layout, _device(pl_module), trainer.optimizers, pl_module,
                              scaler=amp.grad_scaler(trainer), total_steps=total_steps(trainer),
                              flat=flat_group is not None,
                              deepspeed=type(trainer.strategy).__name__ == "DeepSpeedStrategy")
        self._open_records(trainer, pl_module)
        # a resume continues the spike watch of the fit that wrote the checkpoint (its window, pending spike:K ticks)
        resumed, self._resumed_spikes = self._resumed_spikes, None
        self._trigger.reset(resumed)

    def _check_views(self, trainer: Any, pl_module: nn.Module) -> None:
        """Refuse per-parameter statistics of flattened per-rank views (FSDP1, DeepSpeed ZeRO-3) at fit start."""
        if self._flight is not None and dist.flat_shard_group(pl_module, trainer.world_size) is not None:
            # per-parameter series of per-rank slices would name the wrong layers: the recorder stays off
            # (the dense global norm is reduced over the shards: dist.flat_shard_group)
            self._steps.flight = None
            warnings.warn("TickCallback: the flight recorder is off under FSDP1 / flat parameters (each rank "
                          "holds slices of flattened parameters, not whole layers); use ModelParallelStrategy "
                          "(FSDP2) for per-layer series.", stacklevel=2)
        if not any(s in self.states for s in PARAMETER_STATES):
            return
        problems = dist.flat_views(pl_module, self._shapes, self._params.selected, trainer.world_size)
        if problems:
            raise RuntimeError(
                "TickCallback: per-parameter states " f"{[s for s in PARAMETER_STATES if s in self.states]} "
                f"would describe per-rank slices as whole parameters: {problems[0]}"
                f"{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}. Use ModelParallelStrategy "
                "(FSDP2, fully_shard: exact statistics of sharded parameters), or record only "
                "states=['loss', 'lr', 'amp', 'norm_input', 'time', 'memory'] with this strategy.")
        if type(trainer.strategy).__name__ == "DeepSpeedStrategy":
            warnings.warn("TickCallback under DeepSpeed: gradients live in DeepSpeed's partitioned buffers; "
                          "weight / grad / update statistics describe each rank's local view, not the global "
                          "parameters (grad rows may be NaN).", stacklevel=2)
            self._grad.warn_without_grads = False  # no .grad there by design: not the FSDP2 failure it warns about

    def _manifest(self, trainer: Any, pl_module: nn.Module) -> dict:
        import transformers

        model = getattr(pl_module, "model", pl_module)
        model = getattr(model, "_orig_mod", model)
        return {
            "schedule": str(self.schedule),
            "state_schedules": {s: str(v) for s, v in self.state_schedules.items()},
            "states": list(self.states),
            "precision": str(trainer.precision),
            "world_size": trainer.world_size,
            "ranks": self.ranks,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "parameters": {n: list(self._shapes.get(n, p.shape)) for n, p in self._params.selected},
            "norm_layers": [n for n, _ in self._norm.modules],
            "norm_input_unobserved": list(self._unobserved),
            **({"guard": {**self._guard.spec.arguments(), "skip_paths": self._guard.skip_paths}}
               if self._guard is not None else {}),
            **({"flight": self._steps.flight.manifest()} if self._steps.flight is not None else {}),
            "versions": {"torch": torch.__version__, "lightning": _version("lightning"),
                         "transformers": transformers.__version__, "tick_lightning": _version("tick-lightning")},
        }

    # --------------------------------------------------------------- decision
    def _due(self, trainer: Any, step: int, batch_idx: int) -> frozenset:
        """States due at ``step``. Integer arithmetic only: this runs on every training batch."""
        if step <= self.last_tick_step:  # resumed: never record a step twice
            return frozenset()
        acc = trainer.accumulate_grad_batches
        # the epoch's last optimizer step is the one whose window holds its last batch
        last_of_epoch = batch_idx // acc == (int(trainer.num_training_batches) - 1) // acc \
            if not math.isinf(trainer.num_training_batches) else False
        epoch = trainer.current_epoch
        spike = self._trigger.detected_at
        return frozenset(s for s, sched in self.state_schedules.items()
                         if sched.is_step_tick(step) or (last_of_epoch and sched.is_epoch_tick(epoch))
                         or sched.is_spike_tick(step, spike))

    def _is_tick(self, step: int) -> bool:
        return self.state_schedules["renorm"].is_step_tick(step) if "renorm" in self.state_schedules \
            else self.schedule.is_step_tick(step)

    # ---------------------------------------------------------------- routing
    def on_train_batch_start(self, trainer: Any, pl_module: nn.Module, batch: Any,
                             batch_idx: int) -> None:
        step = tick_step(trainer)
        if self._steps.ready and self._steps.open_step != step:
            self._steps.batch_start(step, trainer.current_epoch, trainer.global_step)  # closes the previous step
            if self._steps.flight is not None and self._steps.flight.post_due(step):
                self._flush_steps(dense=False, flight=True)  # the steps after an event
            self._flush_dense_if_full()
        if self._tick is not None:
            if self._tick.step == step:
                return  # a further accumulation micro-batch of the same optimizer step
            self._end_tick(trainer, stepped=False)  # the previous window ended without an optimizer step
        due = self._due(trainer, step, batch_idx) if self._records else frozenset()
        renorm = self._renorm_collector is not None and self._renorm.due(step, self._is_tick(step))
        if due or renorm or (self._records and self._watch_nonfinite):
            self._open_tick(trainer, pl_module, step, due)

    def _open_tick(self, trainer: Any, pl_module: nn.Module, step: int, due: frozenset) -> None:
        tick = Tick(step=step, due=due, device=_device(pl_module), trainer=trainer,
                    optimizers=max(1, len(trainer.optimizers)))
        self._tick, self._tick_global_step = tick, trainer.global_step
        self._watch.reset()
        self._active = []
        self._activate(tick, always=[self._loss] if self._watch_nonfinite and self._records else [])

    def _activate(self, tick: Tick, always: Sequence[Collector] = ()) -> None:
        for collector in self._collectors:
            if collector not in self._active and (collector.wants(tick) or collector in always):
                self._active.append(collector)
                collector.open(tick)

    def on_before_backward(self, trainer: Any, pl_module: nn.Module, loss: Tensor) -> None:
        if self._guard is not None:  # fp16: the loss Lightning hands over is scaled
            scaler = amp.grad_scaler(trainer)
            self._guard.observe_loss(loss, None if scaler is None else scaler._scale)
        tick = self._tick
        if tick is not None and self._records and self._watch_nonfinite and not tick.due:
            self._watch.observe_loss(loss)  # a device flag, read once per step in on_before_optimizer_step

    def on_before_optimizer_step(self, trainer: Any, pl_module: nn.Module,
                                 optimizer: torch.optim.Optimizer) -> None:
        self._steps.before_optimizer_step(optimizer)  # before clipping, after unscaling, like the tick's grad
        self._before_tick_step(trainer, optimizer)
        self._steps.apply_guard(optimizer)  # after every reader of the gradients, before clipping and the step
        if self._tick is not None and self._guard is not None:
            self._tick.add_guard_skip(self._guard.last_skip)  # a skipped step is not re-normalized either

    def _before_tick_step(self, trainer: Any, optimizer: torch.optim.Optimizer) -> None:
        tick = self._tick
        if tick is None:
            return
        index = next((i for i, o in enumerate(trainer.optimizers) if o is optimizer), 0)
        tick.add_found_inf(amp.found_inf(amp.grad_scaler(trainer), optimizer))
        if self._records and self._watch_nonfinite and not tick.due and tick.stepped_optimizers == 0:
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if self._watch.check(tick.found_inf, grads, self._sharded):  # rank-identical when sharded
                tick.due = frozenset(s for s, sched in self.state_schedules.items() if sched.nonfinite) - {"norm_input", "activation"}
                self._activate(tick)
        tick.stepped_optimizers += 1
        for collector in self._active:
            collector.before_step(tick, optimizer, index)

    def on_train_batch_end(self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        self._steps.batch_end(loss if isinstance(loss, Tensor) else None, trainer.global_step,
                              manual=not pl_module.automatic_optimization)
        tick = self._tick
        if tick is None:
            self._flush_dense_if_full()
            return
        for collector in self._active:
            collector.micro_batch(tick, loss if isinstance(loss, Tensor) else None)
        if not pl_module.automatic_optimization:  # manual: a batch is a step, whatever its optimizers did
            self._end_tick(trainer, stepped=tick.stepped_optimizers > 0)
        elif trainer.global_step > self._tick_global_step:
            self._end_tick(trainer, stepped=True)
        self._flush_dense_if_full()

    def on_validation_start(self, trainer: Any, pl_module: nn.Module) -> None:
        for collector in self._active:  # validation inside a tick's window observes nothing
            collector.pause()

    def on_validation_end(self, trainer: Any, pl_module: nn.Module) -> None:
        for collector in self._active:
            collector.resume()
        self._record_metrics(trainer)

    def _record_metrics(self, trainer: Any) -> None:
        """The metrics the module logged, as they stand after a validation of the fit (``val_loss``, ``val_acc``,
        ...): rows ``state="metric"`` at the optimizer steps done. One host read of each scalar, once per
        validation (not in the training loop)."""
        if trainer.sanity_checking or not self._writes or trainer.state.fn != "fit":
            return
        import pyarrow as pa

        from tick_lightning.records import ROW_SCHEMA

        metrics = {}
        for key, value in trainer.callback_metrics.items():
            if isinstance(value, Tensor) and value.numel() == 1:
                metrics[str(key)] = float(value.detach().float().cpu())
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[str(key)] = float(value)
        if metrics:
            n = len(metrics)
            self._recorder.write_rows(pa.table({
                "step": pa.array([trainer.global_step] * n, type=pa.int64()),
                "epoch": pa.array([trainer.current_epoch] * n, type=pa.int32()),
                "state": pa.array(["metric"] * n), "name": pa.array(list(metrics)),
                "stat": pa.array(["value"] * n), "value": pa.array(list(metrics.values()), type=pa.float64())},
                schema=ROW_SCHEMA))

    def on_train_end(self, trainer: Any, pl_module: nn.Module) -> None:
        if self._tick is not None:
            self._end_tick(trainer, stepped=False)
        self._steps.end()
        self._flush_steps(flight=True)
        self._steps.teardown()
        self._close_records(compact=True)
        if self._writes and trainer.global_rank == 0 and self.last_tick_step >= 0:
            self._say(f"tick-lightning: records in {self.dirpath}; see them with: tick-lightning report "
                      f"{self.dirpath}")

    @staticmethod
    def _say(message: str) -> None:
        """One line for the person running the fit (rank 0 only: the caller decides); Lightning's logs it."""
        print(message, flush=True)

    def on_exception(self, trainer: Any, pl_module: nn.Module, exception: BaseException) -> None:
        self._drop_tick()
        if self._steps.ready and not self._sharded:  # no collective on a failing rank: it could hang
            try:
                failed_at = self._steps.open_step
                self._steps.end()
                events = [Event(failed_at, "exception", math.nan)] if failed_at is not None else []
                self._flush_steps(flight=True, events=events)
            except Exception as err:  # noqa: BLE001 - never hide the training exception behind ours
                warnings.warn(f"TickCallback: the dense series and flight recorder since the last flush were "
                              f"lost: {err}", stacklevel=2)
        self._steps.teardown()
        self._close_records(compact=False)  # what was recorded stays on disk as parts

    def teardown(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        self._drop_tick()
        self._close_records(compact=True)

    # ---------------------------------------------------------------- closing
    def _end_tick(self, trainer: Any, stepped: bool) -> None:
        tick, active = self._tick, self._active
        try:
            tick.stepped = stepped
            if stepped:
                for collector in active:
                    collector.after_step(tick)
            if not self._records:
                return
            # the dense rows ride in a recorded tick's copy (not in renorm-only or nonfinite-watch windows)
            flush = self._steps.take(tick.gather) if tick.due else None
            tick.gather.run()  # every rank, same order: one collective per process group
            blocks = [b for c in active if c is not self._loss or c.wants(tick) for b in c.blocks(tick)]
            extra = flush.blocks() if flush is not None else []
            if not blocks and not extra:
                return
            host = to_host(blocks + extra)  # the tick's one copy
            host, rows = host[:len(blocks)], self._step_rows(flush, host[len(blocks):]) if flush else []
            if not blocks:
                if self._writes:
                    self._emit(trainer, tick.step, trainer.current_epoch, [], rows)
                self._after_step_rows(flush)
                return
            host += [b for c in active for b in c.host_blocks(tick)]
            if self._writes:
                self._emit(trainer, tick.step, trainer.current_epoch, host, rows)
                if self._snapshot.tensors is not None:
                    self._save_snapshot(trainer, tick.step, self._snapshot.tensors)
                self._log(trainer, tick.step, host)
            self.last_tick_step = tick.step
            self._after_step_rows(flush)
        finally:
            self._drop_tick()

    def _flush_dense_if_full(self) -> None:
        if self._steps.ready and self._steps.full:
            self._flush_steps()

    def _flush_steps(self, dense: bool = True, flight: bool = False, events: Sequence[Event] = ()) -> None:
        """The every-step rows to the host on their own (a full buffer, end of fit, a checkpoint, an event):
        one copy. Every rank calls it at the same step."""
        gather = dist.Gather()
        flush = self._steps.take(gather, dense=dense, flight=flight)
        if flush is None and not events:
            return
        gather.run()  # every rank: flushes happen at rank-identical steps
        rows = self._step_rows(flush, to_host(flush.blocks())) if flush is not None else []
        if events:
            rows.append(event_table(events))
        if self._writes:
            self._emit(None, None, None, [], rows)
        self._after_step_rows(flush)

    def _step_rows(self, flush: StepFlush, host: list[Block]) -> list:
        """The host copy of a flush as tables; the spike trigger sees the dense values (spike:K ticks, flight
        dumps follow) and the flight rows its layer watch has not seen (dumps follow); its events are written
        with them. The guard's interventions are rows of their own and events (the same on every rank: its
        decisions are)."""
        dense_host, flight_host, watch_host, guard_host = flush.split(host)
        watched = {b.state: b.values for b in watch_host}
        tables, guard_events = [], []
        if flush.guard is not None:
            guard_rows = self._guard.table(flush.guard, guard_host)
            guard_events = GuardEngine.events(guard_rows)
            tables.append(guard_rows)
            if guard_events:
                self._log_guard(flush.guard.steps[-1])
        if flush.dense is not None:
            values = flush.dense.host_values(dense_host)
            agree = self._sharded and (self._spike_schedules or self._steps.flight is not None)
            # a norm layer's input jumping (which no gradient shows): this rank's own values, agreed with the rest
            local = (self._trigger.observe_inputs(flush.watch.steps, watched["flight_absmax"])
                     if "flight_absmax" in watched else [])
            if "flight_attn" in watched:  # attention logits climbing: the early warning, before the loss moves
                local += self._trigger.observe_attention(flush.watch.steps, watched["flight_attn"])
            events = self._trigger.observe(flush.dense.steps, values, agree=self._agree if agree else int,
                                           local=local)
            if flush.watch is not None:  # one layer's jump, which the dense series may not show
                events += self._trigger.observe_layers(flush.watch.steps, watched["flight"], flush.watch.present)
                if "flight_update" in watched:  # a weight written outside the optimizer shows only in its update
                    events += self._trigger.observe_updates(flush.watch.steps, watched["flight_update"],
                                                            flush.watch.present)
            tables.append(dense_table(flush.dense, values))
            self._trigger.hit = self._trigger.hit or bool(guard_events)
            events = sorted(events + guard_events, key=lambda e: e.step)
            if events and self._steps.flight is not None:
                tables.append(event_table(events))
        if flush.flight is not None:
            tables.append(flush.flight.table(flight_host))
        return tables

    def _after_step_rows(self, flush: StepFlush | None) -> None:
        """An event was found in a flush (on any rank): the flight ring's steps before it are dumped now, one
        more copy, and the steps after it once they have passed (``FlightRecorder.arm``)."""
        recorder = self._steps.flight
        if flush is None or flush.dense is None or recorder is None or not self._trigger.hit:
            return
        self._trigger.hit = False
        recorder.arm(flush.dense.steps[-1])
        if flush.flight is None:
            self._flush_steps(dense=False, flight=True)

    @staticmethod
    def _agree(level: int) -> int:
        return int(dist.any_rank(torch.tensor(float(level))))  # each rank sees its own loss and norm inputs

    @property
    def spike_detected_at(self) -> int | None:
        """The step at which the host last learned of a spike (``TickSchedule.is_spike_tick``)."""
        return self._trigger.detected_at

    @property
    def spikes(self) -> list:
        """``(series, spikes.Spike)`` found online this fit, in order."""
        return self._trigger.spikes

    def _drop_tick(self) -> None:
        tick, active = self._tick, self._active
        self._tick, self._active = None, []
        for collector in active:
            collector.close(tick)

    def _log_guard(self, step: int) -> None:
        """The guard's counters to the loggers as soon as a flush brings new interventions (ticks log them too)."""
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        if trainer is None or not (self.log_to_loggers and trainer.loggers and trainer.global_rank == 0):
            return
        for logger in trainer.loggers:
            logger.log_metrics({"ticks/guard/skipped": float(self._guard.skipped),
                                "ticks/guard/clipped": float(self._guard.clipped)}, step=step)

    def _log(self, trainer: Any, step: int, blocks: list[Block]) -> None:
        if not (self.log_to_loggers and trainer.loggers and trainer.global_rank == 0):
            return
        metrics = {}
        for b in blocks:
            for i, name in enumerate(b.names):
                if name == "" or b.state == "lr":
                    for j, stat in enumerate(b.stats):
                        key = f"ticks/lr/{name}/{stat}" if b.state == "lr" else f"ticks/{b.state}/{stat}"
                        metrics[key] = float(b.values[i, j])
        from tick_lightning.loggers import log_tick

        if self._guard is not None:  # interventions so far (as of this tick's flush)
            metrics["ticks/guard/skipped"] = float(self._guard.skipped)
            metrics["ticks/guard/clipped"] = float(self._guard.clipped)
        log_tick(trainer.loggers, step, blocks, select=self.log_select, extra=metrics)

    # ---------------------------------------------------------------- storage (the only four places)
    def _open_records(self, trainer: Any, pl_module: nn.Module) -> None:
        # The first step this fit can record, in tick units: where a resume supersedes the rows an earlier
        # attempt wrote after the checkpoint. Ticks up to last_tick_step are in the checkpoint; under manual
        # optimization a checkpoint saved at a batch's end holds the batch counter before that batch's increment.
        first = max(tick_step(trainer), self.last_tick_step + 1)
        self._recorder.start(self.dirpath, rank=trainer.global_rank, start_step=first,
                             manifest=self._manifest(trainer, pl_module), writes=self._writes,
                             broadcast=lambda obj: trainer.strategy.broadcast(obj, src=0))

    def _emit(self, trainer: Any | None, step: int | None, epoch: int | None, blocks: list[Block],
              rows: Sequence = ()) -> None:
        """One tick's blocks and/or tables of rows that carry their own steps (dense, flight), as one write."""
        if blocks:
            self._recorder.write(step, epoch, blocks)
        if rows:
            import pyarrow as pa

            self._recorder.write_rows(pa.concat_tables(rows))

    def _flush_records(self) -> None:
        self._recorder.flush()

    def _close_records(self, compact: bool) -> None:
        self._recorder.close(compact=compact)

    def _save_snapshot(self, trainer: Any, step: int, tensors: dict) -> None:
        from safetensors.torch import save_file

        out = self._recorder.snapshot_dir
        out.mkdir(parents=True, exist_ok=True)
        save_file({name: t.contiguous() for name, t in tensors.items()},
                  str(out / f"step{step:08d}-rank{trainer.global_rank}.safetensors"))

    # ---------------------------------------------------------------- the step events of a loop that is not Lightning's
    # An adapter (``tick_lightning.hf``, ``tick_lightning.loop``) calls these with its ``trainer`` view; each is the
    # Lightning hook (or hooks) of the same moment, in Lightning's order.
    def fit_begin(self, trainer: Any, model: nn.Module, state: dict | None = None) -> None:
        """Training begins: a new run, or the continuation of the checkpoint whose ``state_dict()`` is ``state``."""
        self.setup(trainer, model, "fit")
        if state is not None:
            self.load_state_dict(state)
        self.on_fit_start(trainer, model)
        self.on_train_start(trainer, model)

    def batch_begin(self, trainer: Any, model: nn.Module, batch_idx: int) -> None:
        """A (micro-)batch begins; ``batch_idx`` counts them within the epoch (a tick's collectors open on its step's
        first)."""
        self.on_train_batch_start(trainer, model, None, batch_idx)

    def gradients_ready(self, trainer: Any, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer steps next: its gradients are complete (accumulated, reduced, unscaled), not yet clipped."""
        self.on_before_optimizer_step(trainer, model, optimizer)

    def batch_end(self, trainer: Any, loss: Tensor | None, batch_idx: int) -> None:
        """The (micro-)batch ended with the loss it back-propagated; the step ends with its last one, once
        ``trainer.global_step`` has moved past it (the optimizer stepped)."""
        self.on_train_batch_end(trainer, _AUTOMATIC, loss, None, batch_idx)

    def fit_end(self, trainer: Any, model: nn.Module) -> None:
        """Training ended: the last records, the flight ring, the run closed."""
        self.on_train_end(trainer, model)
        self.teardown(trainer, model, "fit")

    def fit_failed(self, trainer: Any, model: nn.Module, error: BaseException) -> None:
        """Training raised ``error``: the flight ring dumped with an ``"exception"`` event, what was recorded kept."""
        self.on_exception(trainer, model, error)

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        # flushes first: a checkpoint never claims a tick (or a dense or flight step) that is not on disk
        self._flush_steps(flight=True)
        state = {**self._recorder.state_dict(), "last_tick_step": self.last_tick_step, "dirpath": self.dirpath,
                 "spikes": self._trigger.state_dict()}
        if self._renorm is not None:
            state["renorm"] = self._renorm.state_dict()
        if self._guard is not None:
            state["guard"] = self._guard.state_dict()
        return state

    def on_save_checkpoint(self, trainer: Any, pl_module: nn.Module, checkpoint: dict) -> None:
        # Lightning has called every rank's state_dict (each flushed its own writer) before this hook, and
        # rank 0 writes the file after it: with every rank writing, wait for all of them, so the checkpoint
        # cannot outlive another rank's queued ticks. (save_checkpoint runs on every rank, as Lightning requires.)
        if self.ranks == "all" and trainer.world_size > 1:
            trainer.strategy.barrier("TickCallback.on_save_checkpoint")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._recorder.load_state_dict(state_dict)
        self.last_tick_step = int(state_dict.get("last_tick_step", -1))
        if self.dirpath is None and state_dict.get("dirpath"):
            self.dirpath = state_dict["dirpath"]
        self._resumed_spikes = state_dict.get("spikes")
        if self._renorm is not None and "renorm" in state_dict:
            self._renorm.load_state_dict(state_dict["renorm"])
        if self._guard is not None and state_dict.get("guard"):
            self._guard.load_state_dict(state_dict["guard"])

    @property
    def norm_patch_report(self):
        """The ``NormPatchReport`` of ``patch_norms=True`` (``None`` otherwise)."""
        return self._norm_patch_report


def _version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001 - running from a source tree
        return "unknown"
