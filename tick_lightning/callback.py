"""``TickCallback``: record the state of a Lightning training run at scheduled ticks.

The recorder is ``tick_lightning.core.TickCore`` (no Lightning in it: the Hugging Face ``Trainer`` adapter and the
plain-loop one drive the same core); ``TickCallback`` is that core registered as a Lightning ``Callback``: Lightning
calls its hooks with its own ``Trainer`` and ``LightningModule``, which have every attribute the core reads. Step
semantics, the arguments and what each records: the class docstring and ``tick_lightning.core``.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from tick_lightning.config import DEFAULT_STATES, RANKS  # noqa: F401 - re-exported
from tick_lightning.core import PARAMETER_STATES, TickCore  # noqa: F401 - re-exported

__all__ = ["TickCallback"]


class TickCallback(TickCore, Callback):
    """Record loss, learning rates, weight / gradient / update statistics, norm-layer inputs, AMP state,
    time and memory at scheduled ticks; cost nothing between ticks.

    Args:
        ticks: the schedule (see ``tick_lightning.schedule``): ``[50, 100]``, ``"0,50,100,every:25"``,
            ``"log:20"``, ``"frac:0.5"``, ``"epoch"``, ``"nonfinite"`` (any ``ScheduleSpec``; from a command
            line or YAML it is checked while they are parsed, see ``tick_lightning.config.Ticks``).
        states: states to record (default: all of ``loss, lr, amp, weight, grad, update, norm_input,
            time, memory``; add ``"snapshot"`` for safetensors copies of the selected parameters, and
            ``"weight_hist"`` / ``"grad_hist"`` for per-parameter histograms of the selected parameters'
            weights / gradients, fixed log2 bins, ``tick_lightning.histograms``).
        state_ticks: per-state schedules overriding ``ticks`` for states in ``states``, e.g.
            ``{"weight": "every:500"}``.
        select: parameters for per-parameter states: globs over names and/or kinds
            (``"norm"``, ``"attention"``, ``"embedding"``, ``"lora"``, ``"linear"``); ``!`` excludes.
            The global gradient norm always covers every parameter the optimizer steps.
        norm_select: which normalization layers feed ``norm_input`` (default: every norm layer).
        dirpath: run directory for the records (default ``<trainer.log_dir>/ticks``).
        patch_norms: patch every normalization layer (``tick_lightning.patch_norms``) once the model exists
            (in ``setup``, or after ``configure_model``); ``norm_input`` is then read from the patched layers
            (the path that works under ``torch.compile``).
        renorm: ``Renorm`` specs applied after real optimizer steps (see ``tick_lightning.renorm``).
        ranks: ``"zero"`` (global rank 0 records; others do nothing unless parameters are sharded) or
            ``"all"`` (each rank writes its own records, e.g. to see per-rank losses).
        log_to_loggers: also send each tick to the Trainer's loggers: the global scalars
            (``ticks/<state>/<stat>``) and the per-layer summaries of ``tick_lightning.loggers.log_tick``
            (TensorBoard histograms over layers of gradient norms, update ratios and weight norms; their
            min / median / max as scalars for every logger).
        activations: modules (``select_modules`` globs or kinds, e.g. ``"*.layer.*.output"``) whose *output*
            feeds the ``activation`` state: mean, RMS, absmax and kurtosis per tick, forward hooks only on
            tick batches. Adds ``"activation"`` to ``states``.
        log_select: glob pattern(s) over parameter names whose gradient norm and update ratio also go to
            the loggers as grouped scalars ``ticks/grad_norm/<name>``, ``ticks/update_ratio/<name>`` (at most 32).
        dense: record every optimizer step's ``loss`` and global ``grad_norm`` (``True``, the default: a few
            device kernels per step, no sync), also ``update_norm`` (a list naming it: one persistent copy
            of the trainable parameters and a copy + norm per step), or nothing (``False``). Rows
            ``state="dense"`` (docs/records.md); ``spike:K`` schedule terms watch them.
        dense_flush_every: the dense buffer's rows: it reaches the host with each tick's one copy, and on
            its own after this many steps without a tick (one extra copy then); spikes are detected then.
            With the flight recorder on, at most ``flight_window // 2`` (so a spike is found while the ring
            still holds the steps before it).
        flight: the flight recorder (``tick_lightning.collect.flight``): every step's per-parameter gradient
            norm and non-finite flag in a device ring of the last ``flight_window`` steps, written around
            every spike, non-finite step, layer jump and exception, at checkpoints and at the end of fit (rows
            ``state="flight"``, docs/records.md); ``True`` (the default: ``"input_absmax"`` and
            ``"attn_logit"`` where the model has norm layers / attention blocks), ``False``, or a list of extras
            (``[]``: the gradient ring alone, no hook between ticks): ``"update_norm"`` (per-parameter update
            norms; one copy of the trainable parameters, as for ``dense=[..., "update_norm"]``; a weight written
            outside the optimizer shows there only: its jump is an event), ``"input_absmax"`` (each norm layer's
            max |input|; forward hooks on those layers every step; a jump there, which a norm hides from every
            gradient, is an event), ``"attn_logit"`` (each attention block's logit scale ``rms(q) rms(k)
            sqrt(head_dim)`` and the output head's logit rms; forward hooks on its query and key projections and
            on the head every step; a climb there is the early warning of attention- or output-logit growth).
            Needs the dense ``grad_norm`` series (its spikes are the events).
        flight_window: the ring's steps (memory: ``flight_window x parameters x 8`` bytes per series).
        guard: a ``Guard`` (``tick_lightning.guard``) that judges every optimizer step on the device, after the
            statistics above have read its gradients and before Lightning's ``gradient_clip_val`` and the
            update: ``Guard("clip")`` scales a gradient tensor that jumps against its own running norm,
            ``Guard("zclip")`` the global gradient against its EMA z-score, ``Guard("skip")`` leaves parameters and
            optimizer state untouched when the loss or global norm is an outlier or non-finite. No host sync;
            the same decision on every rank; its statistics go through checkpoints. Each intervention is a
            row ``state="guard"`` (``load_guard``) and a flight-recorder event. Also a mode name or a mapping of
            its fields (``{mode: zclip, z: 3}``) from YAML, a command line or ``TICK_LIGHTNING_CONFIG``.
        update_on_host: hold the ``update`` state's copy of the weights in pinned host memory instead of on
            the device (saves the copy's device memory at a tick, costs two transfers).
        reset_peak_memory: reset CUDA's peak-memory counter at each tick so ``memory/peak_bytes`` is the tick
            step's own peak (a global side effect on every other reader of that counter; off by default).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from tick_lightning import TickCallback, load_ticks
        >>> ticks = TickCallback(ticks="0,50,100,every:25", state_ticks={"weight": "every:100"})
        >>> trainer = Trainer(max_steps=200, callbacks=[ticks])        # doctest: +SKIP
        >>> trainer.fit(model, datamodule)                             # doctest: +SKIP
        >>> load_ticks(ticks.dirpath).query("state == 'loss'")          # doctest: +SKIP
    """

    @property
    def state_key(self) -> str:
        """Lightning's key for this callback's state in a checkpoint: one per schedule and directory."""
        return self._generate_state_key(ticks=str(self.schedule), dirpath=self._dirpath_arg)

    @staticmethod
    def _say(message: str) -> None:
        rank_zero_info(message)
