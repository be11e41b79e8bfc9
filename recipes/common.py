"""Shared pieces of the recipes: the CLI, the run directory, data and checkpoint loading, PEFT, schedules.

A recipe (``recipes/<name>.py``) defines a :class:`RecipeModule` and a ``LightningDataModule`` whose
``__init__`` arguments are its config, and a ``main(args)`` that calls :func:`run_recipe`. Everything else
(the run directory, ticks, precision, seeds, checkpoints, metrics, export, report) lives here, once.

Run directory (``--run_dir``, default ``runs/<recipe>-<YYYYmmdd-HHMMSS>``)::

    config.yaml      the resolved config (re-run it with --config)
    ticks/           TickCallback records (tick_lightning.store.load_ticks reads them)
    checkpoints/     Lightning checkpoints (last.ckpt; resume with --ckpt_path)
    metrics.json     final validation / test metrics
    model/           save_pretrained of the Hugging Face model (+ tokenizer or image processor)
    report/          the tick report (tick_lightning.report)
    logs/            logger output

Example:
    >>> from recipes.common import auto_precision, infer_format
    >>> auto_precision() in ("32-true", "bf16-mixed", "16-mixed")
    True
    >>> infer_format("data/train.tsv")
    ('csv', {'delimiter': '\\t'})
"""

from __future__ import annotations

import datetime as _dt
import glob
import json
import math
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import ModelParallelStrategy

__all__ = [
    "RecipeError",
    "RecipeCLI",
    "RecipeModule",
    "TickConfig",
    "RenormConfig",
    "run_recipe",
    "auto_precision",
    "warmup_cosine_schedule",
    "apply_peft",
    "PEFT_METHODS",
    "load_pretrained_or_config",
    "from_pretrained_or_error",
    "hub_offline",
    "HUB_UNREACHABLE",
    "infer_format",
    "load_split",
    "rename_columns",
    "require_columns",
    "SplitsDataModule",
    "train_tokenizer",
    "default_run_dir",
    "summarize_ticks",
]

PEFT_METHODS = ("none", "lora", "ln_tuning")
HUB_UNREACHABLE = "the hub is not reachable (HF_HUB_OFFLINE=1 or no network); pass a local path: {flag}=/path/to/dir"


class RecipeError(ValueError):
    """Bad recipe input (config, data or checkpoint), raised before training starts."""


# --------------------------------------------------------------------------------------------- config groups
@dataclass
class RenormConfig:
    """One ``tick_lightning.renorm.Renorm`` entry of ``--tick.renorm`` (same fields, same defaults)."""

    target: Union[str, list[str]]
    method: str = "layernorm"
    at: Union[str, int, list[int]] = "ticks"
    dim: int = -1
    keep_norm: bool = False
    eps: float = 1e-5
    fold: Optional[str] = None


@dataclass
class TickConfig:
    """The ``tick`` config group: the arguments of ``TickCallback`` a recipe exposes.

    ``enabled=False`` runs without a TickCallback (plain fine-tuning). ``dirpath`` is always ``<run_dir>/ticks``.
    The other fields are ``TickCallback``'s arguments, with the recipes' defaults (tests/test_recipes_optim.py
    checks that they stay the same set as its signature).
    """

    enabled: bool = True
    ticks: Union[str, list[int], None] = "log:20"
    states: Optional[list[str]] = None
    state_ticks: Optional[dict[str, str]] = None
    select: Union[str, list[str], None] = None
    norm_select: Union[str, list[str], None] = "norm"
    patch_norms: bool = True
    renorm: Optional[list[RenormConfig]] = None
    ranks: str = "zero"
    log_to_loggers: bool = True


def make_tick_callback(cfg: TickConfig, dirpath: Path):
    """Build the ``TickCallback`` described by a :class:`TickConfig` (``None`` when disabled)."""
    if not cfg.enabled:
        return None
    from tick_lightning.callback import TickCallback

    renorm = None
    if cfg.renorm:
        try:
            from tick_lightning.renorm import Renorm
        except ImportError:  # package __init__ not exporting it yet
            from tick_lightning.renorm.spec import Renorm

    try:
        if cfg.renorm:
            renorm = [Renorm(**asdict(r)) if isinstance(r, RenormConfig) else Renorm(**r) for r in cfg.renorm]
        kwargs = {k: v for k, v in asdict(cfg).items() if k not in ("enabled", "renorm")}
        return TickCallback(**kwargs, renorm=renorm, dirpath=str(dirpath))
    except (ValueError, TypeError) as err:  # TickCallback / Renorm name the bad argument and the valid choices
        raise RecipeError(f"bad --tick option: {err}") from err


@dataclass
class CheckpointConfig:
    """The ``checkpoint`` config group: when ``<run_dir>/checkpoints/last.ckpt`` is written during training.

    It is written every ``every_n_train_steps`` optimizer steps, every ``train_time_interval`` (whichever comes
    first; either can be ``null``), and when training ends. ``--ckpt_path last`` resumes from it.
    """

    every_n_train_steps: Optional[int] = 500
    train_time_interval: Optional[timedelta] = timedelta(minutes=30)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` writing only ``last.ckpt``: every N optimizer steps and/or time interval, and at the end.

    Lightning's ``ModelCheckpoint`` with ``save_top_k=0`` writes ``last.ckpt`` only when a top-k checkpoint was
    written at the same step, or at ``on_train_end`` when no ``last.ckpt`` was written before (so a run killed
    before its end has none, and a run that saved at step 500 of 600 ends with the step-500 one). Here the step
    and time triggers save ``last.ckpt`` directly (``on_train_batch_end`` saves last after top-k either way), and
    the end of training always saves the final state.

    Example:
        >>> RunCheckpoint("runs/x/checkpoints", every_n_train_steps=100).save_last
        True
    """

    def __init__(self, dirpath: Union[str, os.PathLike], every_n_train_steps: Optional[int] = None,
                 train_time_interval: Optional[timedelta] = None) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise RecipeError(f"--checkpoint.every_n_train_steps={every_n_train_steps} must be >= 1, or null to "
                              "save only on the time interval and at the end.")
        if train_time_interval is not None and train_time_interval.total_seconds() <= 0:
            raise RecipeError(f"--checkpoint.train_time_interval={train_time_interval} must be positive (e.g. "
                              "0:30:00), or null.")
        super().__init__(dirpath=str(dirpath), save_last=True, save_top_k=0, every_n_train_steps=every_n_train_steps,
                         train_time_interval=None if every_n_train_steps else train_time_interval)
        # Lightning's __init__ accepts one trigger, but its on_train_batch_end saves when either one fires
        self._train_time_interval = train_time_interval

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # skips fast_dev_run and a step already saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


# --------------------------------------------------------------------------------------------- small helpers
def auto_precision() -> str:
    """``bf16-mixed`` on GPUs with native bf16 (compute capability >= 8), ``16-mixed`` on older GPUs, ``32-true``
    without a GPU.

    It runs while the command line is parsed, before Lightning starts (or forks) the other ranks, so it must not
    initialize CUDA: ``torch.cuda.is_available`` is NVML-based under Lightning (``PYTORCH_NVML_BASED_CUDA_CHECK=1``),
    and the compute capability comes from NVML too. Only when CUDA is already initialized does it ask torch
    (``is_bf16_supported(including_emulation=False)``: V100/T4 emulate bf16 slowly, so they get ``16-mixed``).

    Example:
        >>> auto_precision() if not torch.cuda.is_available() else "32-true"
        '32-true'
    """
    if not torch.cuda.is_available():
        return "32-true"
    if torch.version.hip:
        return "bf16-mixed"
    if torch.cuda.is_initialized():
        return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "16-mixed"
    capability = nvml_compute_capability()
    if capability is None:  # no NVML: do not guess bf16
        return "16-mixed"
    return "bf16-mixed" if capability[0] >= 8 else "16-mixed"


def nvml_compute_capability(device: int = 0) -> Optional[tuple[int, int]]:
    """The compute capability of CUDA device ``device`` (after ``CUDA_VISIBLE_DEVICES``) read from NVML, without
    initializing CUDA in this process (so Lightning can still fork ranks); None when NVML is unavailable."""
    from ctypes import CDLL, byref, c_int, c_void_p

    try:
        nvml = CDLL("libnvidia-ml.so.1")
        index = getattr(torch.cuda, "_get_nvml_device_index", lambda d: d)(device)  # maps CUDA_VISIBLE_DEVICES
        handle, major, minor = c_void_p(), c_int(), c_int()
        if (nvml.nvmlInit_v2() != 0 or nvml.nvmlDeviceGetHandleByIndex_v2(index, byref(handle)) != 0
                or nvml.nvmlDeviceGetCudaComputeCapability(handle, byref(major), byref(minor)) != 0):
            return None
    except (OSError, RuntimeError, ValueError):
        return None
    return major.value, minor.value


#: rank 0 exports its run directory here; the ranks Lightning's DDP launcher starts later inherit it
RUN_DIR_ENV = "TICK_LIGHTNING_RUN_DIR"


#: checkpoint path values Lightning resolves itself (``trainer.fit(ckpt_path=...)``)
SPECIAL_CKPT_PATHS = ("last", "best", "hpc")


def default_run_dir(recipe: str, root: Union[str, os.PathLike, None] = None) -> str:
    """``<root>/<recipe>-<YYYYmmdd-HHMMSS>``; ``root`` is ``--trainer.default_root_dir``, else ``runs``.

    Lightning's DDP launcher re-runs the command once per extra local rank, seconds later: those ranks
    (``LOCAL_RANK`` > 0) take the directory rank 0 chose instead of a timestamp of their own.
    """
    if os.environ.get("LOCAL_RANK", "0") != "0" and os.environ.get(RUN_DIR_ENV):
        return os.environ[RUN_DIR_ENV]
    return os.path.join(root or "runs", f"{recipe}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")


def latest_run_dir(recipe: str, root: Union[str, os.PathLike, None] = None) -> Optional[str]:
    """The newest ``<root>/<recipe>-*`` run directory that holds a ``checkpoints/last*.ckpt`` (None if none).

    ``--ckpt_path last`` without ``--run_dir`` continues this run.
    """
    found = glob.glob(os.path.join(glob.escape(str(root or "runs")), glob.escape(recipe) + "-*", "checkpoints",
                                   "last*.ckpt"))
    if not found:
        return None
    return str(Path(max(found, key=os.path.getmtime)).parent.parent)


def resolve_run_dir(recipe: str, run_dir: Optional[str], default_root_dir: Optional[str],
                    ckpt_path: Optional[str]) -> Path:
    """The run directory of this invocation: ``--run_dir``; else, with ``--ckpt_path last``, the latest run of
    this recipe under the root (``--trainer.default_root_dir`` or ``runs``); else a new timestamped one there."""
    if run_dir:
        return Path(run_dir)
    if ckpt_path == "last" and os.environ.get("LOCAL_RANK", "0") == "0":
        latest = latest_run_dir(recipe, default_root_dir)
        if latest is not None:
            return Path(latest)
    return Path(default_run_dir(recipe, default_root_dir))


def check_ckpt_path(ckpt_path: Optional[str], run_dir: Path) -> None:
    """Refuse a ``--ckpt_path`` file that does not exist (``last``/``best``/``hpc`` are Lightning's to resolve)."""
    if ckpt_path in (None, "", *SPECIAL_CKPT_PATHS) or "://" in str(ckpt_path) or os.path.exists(ckpt_path):
        return
    raise RecipeError(f"--ckpt_path={ckpt_path!r} does not exist; pass an existing checkpoint, or --ckpt_path=last "
                      f"to resume the latest checkpoint of the run directory ({run_dir / 'checkpoints'}).")


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup from 0 over ``warmup_steps``, then cosine decay to 0 at ``total_steps`` (a ``LambdaLR``).

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> sched = warmup_cosine_schedule(opt, warmup_steps=2, total_steps=10)
        >>> [round(opt.param_groups[0]["lr"], 2) for _ in range(3) if not sched.step()]
        [0.5, 1.0, 0.96]
    """
    from transformers import get_cosine_schedule_with_warmup

    if warmup_steps < 0 or total_steps <= 0 or warmup_steps > total_steps:
        raise RecipeError(
            f"warmup_steps={warmup_steps} and total_steps={total_steps} are invalid: need 0 <= warmup_steps <= "
            "total_steps and total_steps > 0 (set --trainer.max_steps or --trainer.max_epochs)."
        )
    return get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)


def hub_offline() -> bool:
    """Whether the environment forbids hub access (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


def from_pretrained_or_error(cls: Any, name: str, *, flag: str = "--model.checkpoint", what: str = "checkpoint",
                             **kwargs: Any) -> Any:
    """``cls.from_pretrained(name, **kwargs)`` that turns an unreachable hub name into a clear :class:`RecipeError`.

    Example:
        >>> from transformers import AutoConfig
        >>> os.environ["HF_HUB_OFFLINE"] = "1"
        >>> from_pretrained_or_error(AutoConfig, "no-such-org/no-such-model")  # doctest: +SKIP
        Traceback (most recent call last):
        recipes.common.RecipeError: cannot load 'no-such-org/no-such-model': the hub is not reachable (...)
    """
    local = Path(name).expanduser()
    if not local.exists() and looks_like_path(name):
        raise RecipeError(f"{flag}={name!r}: no such local directory; pass an existing directory (with config.json, "
                          "as written by save_pretrained) or a hub name such as 'org/model'.")
    if local.exists():
        try:
            return cls.from_pretrained(str(local), **kwargs)
        except (OSError, ValueError) as err:
            raise RecipeError(f"cannot load {what} from the local path {str(local)!r}: {err}") from err
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        text = str(err)
        offline_like = hub_offline() or any(s in text for s in (
            "offline", "connect", "Connection", "resolve", "Max retries", "couldn't connect", "not reachable"))
        if offline_like:
            raise RecipeError(f"cannot load {name!r}: " + HUB_UNREACHABLE.format(flag=flag)) from err
        raise RecipeError(f"cannot load {what} {name!r} with {getattr(cls, '__name__', cls)}: {text}") from err


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id (``org/model`` or ``model``).

    Example:
        >>> [looks_like_path(n) for n in ("bert-base-uncased", "google/vit-base", "./ckpt", "/data/m", "a/b/c")]
        [False, False, True, True, True]
    """
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or name.endswith("/")
            or os.sep != "/" and os.sep in name)


def load_pretrained_or_config(auto_cls: Any, checkpoint: Optional[str] = None, config: Optional[dict] = None,
                              *, flag: str = "--model.checkpoint", **kwargs: Any) -> Any:
    """Load ``auto_cls`` from a checkpoint (hub name or local dir), or build it from a config dict.

    ``config`` needs ``model_type`` (``"bert"``, ``"vit"``, ``"llama"`` ...) when there is no checkpoint;
    ``kwargs`` (``num_labels``, ``vocab_size`` ...) go to the config (from scratch) or to ``from_pretrained``.

    Example:
        >>> from transformers import AutoModelForSequenceClassification as M
        >>> m = load_pretrained_or_config(M, None, dict(model_type="bert", hidden_size=32, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=64, vocab_size=50), num_labels=3)
        >>> m.config.num_labels
        3
    """
    from transformers import AutoConfig

    if checkpoint:
        if config:
            kwargs = {**config, **kwargs}
            kwargs.pop("model_type", None)
        return from_pretrained_or_error(auto_cls, checkpoint, flag=flag, **kwargs)
    if not config or "model_type" not in config:
        raise RecipeError(
            f"no checkpoint and no model config: pass {flag}=<hub name or local dir>, or --model.model_config with "
            "a 'model_type' (e.g. {'model_type': 'bert', 'hidden_size': 64, ...})."
        )
    cfg = dict(config)
    model_type = cfg.pop("model_type")
    try:
        hf_config = AutoConfig.for_model(model_type, **{**cfg, **kwargs})
    except ValueError as err:
        raise RecipeError(f"model_type {model_type!r} in --model.model_config is not known: {err}") from err
    return auto_cls.from_config(hf_config)


def apply_peft(model: torch.nn.Module, method: str = "none", **kw: Any) -> torch.nn.Module:
    """Wrap ``model`` for parameter-efficient fine-tuning: ``"none"``, ``"lora"`` or ``"ln_tuning"`` (``peft``).

    Keyword arguments go to ``peft.LoraConfig`` / ``peft.LNTuningConfig`` (``r``, ``lora_alpha``,
    ``target_modules``, ``modules_to_save``, ``task_type`` ...). LoRA targets ``"all-linear"`` by default.

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> m = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=64))
        >>> p = apply_peft(m, "lora", r=4, task_type="SEQ_CLS")
        >>> any("lora_A" in n for n, _ in p.named_parameters())
        True
    """
    if method not in PEFT_METHODS:
        raise RecipeError(f"peft method {method!r} is not supported; choose one of {list(PEFT_METHODS)}.")
    if method == "none":
        return model
    import peft

    kw = {k: v for k, v in kw.items() if v is not None}
    if method == "lora":
        kw.setdefault("target_modules", "all-linear")
        return peft.get_peft_model(model, peft.LoraConfig(**kw))
    kw.pop("r", None), kw.pop("lora_alpha", None), kw.pop("lora_dropout", None)
    return peft.get_peft_model(model, peft.LNTuningConfig(**kw))


# --------------------------------------------------------------------------------------------- sharding (FSDP2)
class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as plain FSDP2: every process is one data-parallel shard.

    ``ModelParallelStrategy``'s ``"auto"`` sizes mean data parallel across nodes and tensor parallel within a
    node; a recipe shards parameters only (``fully_shard``, see :func:`shard_model`), so here the data-parallel
    size is the world size and the tensor-parallel size 1. Registered as ``--trainer.strategy=fsdp2``; runs on
    CPU (gloo) as on GPU (nccl).

    Example:
        >>> from lightning.pytorch.strategies import StrategyRegistry
        >>> "fsdp2" in StrategyRegistry
        True
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(**kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def _register_fsdp2() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    if "fsdp2" not in StrategyRegistry:
        StrategyRegistry.register("fsdp2", FSDP2Strategy, description="FSDP2 (fully_shard) per transformer block",
                                  override=True)


_register_fsdp2()


def no_split_modules(model: torch.nn.Module) -> set[str]:
    """Class names of the blocks a Hugging Face model must not split: its ``_no_split_modules`` (as Accelerate's
    ``device_map`` and FSDP auto-wrap read them), from every ``PreTrainedModel`` inside (PEFT wrappers included).

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> sorted(no_split_modules(BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        ...                                                intermediate_size=8, vocab_size=10))))
        ['BertEmbeddings', 'BertLayer']
    """
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds FSDP2-sharded (``DTensor``) parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def shard_model(model: torch.nn.Module, mesh: Any) -> torch.nn.Module:
    """``fully_shard`` every block named by :func:`no_split_modules`, then the root (idempotent: a sharded model is
    returned as it is, since Lightning calls ``configure_model`` again for the final validation)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return model
    names = no_split_modules(model)
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise RecipeError(f"--trainer.strategy=fsdp2 shards each transformer block, but {type(model).__name__} names "
                          "none (no _no_split_modules); use --trainer.strategy=ddp.")
    for block in blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def full_state_dict(model: torch.nn.Module) -> Optional[dict]:
    """The whole state dict of a sharded model on CPU on rank 0 (``{}`` on the other ranks; a collective: call it
    on every rank); None for an unsharded model."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded_replica(model: torch.nn.Module, state_dict: dict) -> torch.nn.Module:
    """A plain (unsharded) copy of a Hugging Face model, PEFT wrapper included, holding ``state_dict``.

    The copy is built on the meta device from the model's config and adapter config, then takes the tensors of
    ``state_dict`` as they are (``assign=True``), so rank 0 holds the gathered weights once.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.device("meta"):
        replica = type(base)._from_config(base.config)
        if base is not model:
            import peft

            replica = peft.get_peft_model(replica, model.peft_config["default"])
    replica.load_state_dict(state_dict, strict=True, assign=True)
    replica.tie_weights() if hasattr(replica, "tie_weights") else None
    return replica


# --------------------------------------------------------------------------------------------- data helpers
_FORMATS = {".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"}), ".json": ("json", {}),
            ".jsonl": ("json", {}), ".parquet": ("parquet", {}), ".txt": ("text", {}), ".text": ("text", {})}


def infer_format(path: str) -> tuple[str, dict]:
    """The ``datasets`` builder and its options for a local file or folder (a folder is an ImageFolder).

    Example:
        >>> infer_format("x.parquet")
        ('parquet', {})
    """
    if os.path.isdir(path):
        return "imagefolder", {}
    suffix = Path(path).suffix.lower()
    if suffix not in _FORMATS:
        raise RecipeError(f"cannot tell the format of {path!r} from its suffix {suffix!r}; known suffixes: "
                          f"{sorted(_FORMATS)} (or a folder for an ImageFolder); or set --data.format.")
    return _FORMATS[suffix]


def load_split(split: str, *, dataset: Optional[str] = None, data_files: Optional[dict] = None,
               format: Optional[str] = None, dataset_config: Optional[str] = None, flag: str = "--data.dataset"):
    """Load one split with ``datasets.load_dataset``: from local ``data_files[split]`` or a hub ``dataset``.

    Local splits are loaded one at a time, so splits whose columns differ (the SST-2 TSVs) load fine;
    ``format`` is ``csv``/``tsv``/``json``/``parquet``/``text``/``imagefolder`` or inferred from the suffix.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "train.tsv"; _ = p.write_text("label\\tsentence\\n1\\tgood\\n")
        >>> list(load_split("train", data_files={"train": str(p)})["sentence"])  # doctest: +SKIP
        ['good']
    """
    import datasets

    if data_files:
        if split not in data_files:
            raise RecipeError(f"no file for split {split!r} in --data.data_files; given splits: {sorted(data_files)}.")
        path = data_files[split]
        paths = [path] if isinstance(path, str) else list(path)
        for p in paths:
            if not os.path.exists(p):
                raise RecipeError(f"data file for split {split!r} does not exist: {p!r}.")
        if format in (None, ""):
            builder, opts = infer_format(paths[0])
        elif format == "tsv":
            builder, opts = "csv", {"delimiter": "\t"}
        else:
            builder, opts = format, {}
        for p in paths:
            if builder in ("csv", "json", "text"):
                check_text_file(p, f"data file of split {split!r}")
            elif builder == "imagefolder":
                check_image_folder(p, f"image folder of split {split!r}")
        try:
            if builder == "imagefolder":
                return datasets.load_dataset("imagefolder", data_dir=paths[0], split="train")
            return datasets.load_dataset(builder, data_files={split: paths}, split=split, **opts)
        except (ValueError, FileNotFoundError, datasets.exceptions.DatasetGenerationError) as err:
            if "no data" in str(err) or "empty" in str(err).lower() or "No (supported) data" in str(err):
                raise RecipeError(f"split {split!r} is empty: no rows/images in {paths}; check its data file.") from err
            raise RecipeError(f"cannot load split {split!r} from {paths} as {builder!r}: {err}") from err
    if not dataset:
        raise RecipeError("no data: pass --data.dataset=<hub name> or --data.data_files={train: ..., validation: ...}.")
    try:
        return datasets.load_dataset(dataset, dataset_config, split=split)
    except Exception as err:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError ...)
        if isinstance(err, ValueError) and "Unknown split" in str(err):
            raise RecipeError(f"dataset {dataset!r} has no split {split!r}: {err}") from err
        if hub_offline() or "connect" in str(err).lower() or "offline" in str(err).lower():
            raise RecipeError(
                f"cannot load dataset {dataset!r}: the hub is not reachable (HF_HUB_OFFLINE=1 or no network); pass "
                "local files: --data.data_files={train: /path/train.tsv, validation: /path/dev.tsv}"
            ) from err
        raise RecipeError(f"cannot load dataset {dataset!r} split {split!r}: {err}") from err


def check_text_file(path: Union[str, os.PathLike], what: str = "file") -> None:
    """Raise :class:`RecipeError` when a text data file is empty (0 bytes) or not UTF-8 (naming the byte offset).

    Reads the file once, in 1 MiB chunks, with an incremental decoder.

    Example:
        >>> import tempfile; p = Path(tempfile.mkdtemp()) / "x.csv"; _ = p.write_bytes(b"a,b\n\xff\n")
        >>> check_text_file(p)
        Traceback (most recent call last):
        recipes.common.RecipeError: file ... is not UTF-8: byte 0xff at offset 4 ...
    """
    import codecs

    path = Path(path)
    if path.stat().st_size == 0:
        raise RecipeError(f"{what} {str(path)!r} is empty (0 bytes); pass a file with a header and rows.")
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise RecipeError(
                    f"{what} {str(path)!r} is not UTF-8: byte 0x{chunk[err.start]:02x} at offset {offset + err.start} "
                    f"({err.reason}); re-encode it, e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed`.") from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as err:
            raise RecipeError(f"{what} {str(path)!r} is not UTF-8: it ends inside a multi-byte character "
                              f"({err.reason}); re-encode it as UTF-8.") from None


#: the suffixes the ``imagefolder`` builder of ``datasets`` reads (PIL decodes them)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def check_image_folder(folder: Union[str, os.PathLike], what: str = "image folder", max_names: int = 5) -> None:
    """Decode every image of an ImageFolder and raise :class:`RecipeError` naming the unreadable ones (and a count).

    A corrupt or truncated file otherwise crashes training when its batch comes, without its name. JPEGs are
    decoded at reduced size (``Image.draft``), which still reads all of their data.

    Example:
        >>> import tempfile; d = Path(tempfile.mkdtemp()); (d / "cat").mkdir(); _ = (d / "cat" / "a.jpg").write_bytes(b"x")
        >>> check_image_folder(d)
        Traceback (most recent call last):
        recipes.common.RecipeError: image folder ... has 1 unreadable image(s) of 1: ...a.jpg (...) ...
    """
    from PIL import Image

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    bad = []
    for path in files:
        try:
            with Image.open(path) as img:
                img.draft("RGB", (32, 32))
                img.load()
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError ... for broken files
            bad.append(f"{path} ({type(err).__name__}: {err})")
    if bad:
        more = f" and {len(bad) - max_names} more" if len(bad) > max_names else ""
        raise RecipeError(f"{what} {str(folder)!r} has {len(bad)} unreadable image(s) of {len(files)}: "
                          f"{'; '.join(bad[:max_names])}{more}; remove or replace them.")


def rename_columns(ds, split: str, column_map: Optional[dict]):
    """Rename columns by ``column_map``: either ``{old: new}`` for every split or ``{split: {old: new}}``.

    Example:
        >>> import datasets
        >>> d = datasets.Dataset.from_dict({"content": ["x"], "label": [0]})
        >>> rename_columns(d, "validation", {"validation": {"content": "sentence"}}).column_names
        ['sentence', 'label']
    """
    if not column_map:
        return ds
    if all(isinstance(v, dict) for v in column_map.values()):
        mapping = column_map.get(split, {})
    else:
        mapping = column_map
    mapping = {old: new for old, new in mapping.items() if old in ds.column_names and old != new}
    return ds.rename_columns(mapping) if mapping else ds


def require_columns(ds, split: str, columns: Iterable[str], flag_hint: str = "") -> None:
    """Raise a :class:`RecipeError` listing the available columns when a needed one is missing."""
    missing = [c for c in columns if c and c not in ds.column_names]
    if missing:
        raise RecipeError(
            f"split {split!r} has no column(s) {missing}; available columns: {ds.column_names}. "
            f"Set the column names{flag_hint} or map them with --data.column_map="
            "{" + split + ": {available_name: expected_name}}."
        )
    if len(ds) == 0:
        raise RecipeError(f"split {split!r} is empty (0 rows); check its data file or dataset name.")


class SplitsDataModule(L.LightningDataModule):
    """The skeleton the text and image DataModules share: train/validation/test splits from a hub dataset,
    local files or the recipe's built-in demo data, column renames, row limits, the column check, loaders.

    A subclass states its own ``__init__`` arguments (they are its config) and passes the shared ones on;
    it implements ``_demo(n, seed)`` (the demo rows of one split), ``_columns()`` (what every split needs)
    and ``_collate_fn(train)`` (the loaders' collate function), and may override ``file_format`` and set
    ``columns_hint`` / ``shuffle_before_limit``.
    """

    ROLES = ("train", "validation", "test")
    #: columns hint of the missing-column error, e.g. ``" (--data.text_column, --data.label_column)"``
    columns_hint = ""
    #: ``max_*_samples`` takes a seeded shuffle of the rows first (ImageFolders are sorted by class)
    shuffle_before_limit = False

    def __init__(self, *, dataset: Optional[str], dataset_config: Optional[str], data_files: Optional[dict],
                 label_column: str, column_map: Optional[dict], train_split: str, val_split: Optional[str],
                 test_split: Optional[str], batch_size: int, eval_batch_size: Optional[int], num_workers: int,
                 max_train_samples: Optional[int], max_eval_samples: Optional[int], demo_train_size: int,
                 demo_val_size: int) -> None:
        super().__init__()
        self.dataset, self.dataset_config, self.data_files = dataset, dataset_config, data_files
        self.label_column, self.column_map = label_column, column_map
        self.splits_names = {"train": train_split, "validation": val_split, "test": test_split}
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size or batch_size, num_workers
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self.demo_train_size, self.demo_val_size = demo_train_size, demo_val_size
        self.splits: dict[str, Any] = {}
        self.label_names: Optional[list[str]] = None
        self.num_labels: Optional[int] = None

    @property
    def is_demo(self) -> bool:
        return self.dataset is None and not self.data_files

    def roles(self) -> list[str]:
        """The split roles this run has (``test`` only with ``test_split``)."""
        return [r for r in self.ROLES if self.splits_names[r]]

    def file_format(self) -> Optional[str]:
        """The ``load_split`` format of ``data_files`` (None: from the file suffix)."""
        return None

    def _demo(self, n: int, seed: int):
        raise NotImplementedError

    def _columns(self) -> list[Optional[str]]:
        raise NotImplementedError

    def _collate_fn(self, train: bool):
        raise NotImplementedError

    def _raw(self, role: str):
        """One split as a ``datasets.Dataset``: loaded (or demo), renamed, limited and checked for its columns."""
        split = self.splits_names[role]
        if self.is_demo:
            n = self.demo_train_size if role == "train" else self.demo_val_size
            ds = self._demo(n, self.ROLES.index(role))  # seeds 0 / 1 / 2: distinct, reproducible splits
        else:
            ds = load_split(split, dataset=self.dataset, data_files=self.data_files, format=self.file_format(),
                            dataset_config=self.dataset_config)
        ds = rename_columns(ds, split, self.column_map)
        limit = self.max_train_samples if role == "train" else self.max_eval_samples
        if limit is not None:
            ds = (ds.shuffle(seed=0) if self.shuffle_before_limit else ds).select(range(min(limit, len(ds))))
        require_columns(ds, split, self._columns(), self.columns_hint)
        return ds

    def _loader(self, role: str, train: bool):
        if role not in self.splits:
            return None
        from torch.utils.data import DataLoader

        return DataLoader(self.splits[role], batch_size=self.batch_size if train else self.eval_batch_size,
                          shuffle=train, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          collate_fn=self._collate_fn(train))

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("validation", False)

    def test_dataloader(self):
        return self._loader("test", False)

    def has_test(self) -> bool:
        return "test" in self.splits


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 2000, kind: str = "wordlevel",
                    add_cls_sep: bool = True, lowercase: bool = True):
    """Train a small tokenizer on the fly (``tokenizers``) and wrap it as a ``PreTrainedTokenizerFast``.

    ``kind``: ``"wordlevel"`` (whitespace words), ``"bpe"`` (byte-level BPE) or ``"char"`` (characters).

    Example:
        >>> tok = train_tokenizer(["a good film", "a bad film"], vocab_size=20)
        >>> tok("a good film")["input_ids"][0] == tok.cls_token_id
        True
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    kinds = ("wordlevel", "bpe", "char")
    if kind not in kinds:
        raise RecipeError(f"tokenizer kind {kind!r} is not supported; choose one of {list(kinds)}.")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        tok.pre_tokenizer = (pre_tokenizers.Whitespace() if kind == "wordlevel"
                             else pre_tokenizers.Split("", behavior="isolated"))
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials)
        if kind == "char":
            tok.decoder = decoders.Fuse()
    if lowercase and kind == "wordlevel":
        tok.normalizer = normalizers.Lowercase()
    tok.train_from_iterator(texts, trainer=trainer)
    if add_cls_sep:
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def use_fused_optimizer(module: L.LightningModule, requested: Optional[bool] = None) -> bool:
    """Whether to build Adam/AdamW with ``fused=True`` (one kernel per step instead of a Python loop per tensor).

    ``requested=None`` (``--model.fused`` left unset) decides automatically, as the Hugging Face Trainer does
    with its default ``adamw_torch_fused``: fused when every trainable parameter is a plain floating tensor on
    CPU or CUDA, except

    - under ``16-mixed``: a fused step unscales gradients inside ``step``, so Lightning cannot unscale them
      before ``on_before_optimizer_step``, and clipping and the ticks' gradient statistics would see scaled
      gradients;
    - under any ``*-mixed`` precision with gradient clipping: Lightning's AMP plugin refuses to clip for an
      optimizer that could unscale internally;
    - under DeepSpeed, which brings its own optimizer handling.

    Example:
        >>> use_fused_optimizer(L.LightningModule(), requested=False)
        False
    """
    if requested is False:
        return False
    trainer = module._trainer
    precision = str(trainer.precision) if trainer is not None else "32-true"
    clipping = bool(getattr(trainer, "gradient_clip_val", None))
    reason = None
    if precision in ("16-mixed", "16"):
        reason = "the fp16 gradient scaler must unscale before clipping and tick statistics"
    elif precision in ("bf16-mixed", "bf16") and clipping:
        reason = "Lightning's AMP plugin does not clip gradients for a fused optimizer"
    if requested:
        if reason:
            raise RecipeError(f"--model.fused=true does not work with --trainer.precision={precision}"
                              f"{' and gradient clipping' if clipping else ''}: {reason}; use --model.fused=false.")
        return True
    deepspeed = trainer is not None and type(trainer.strategy).__name__.startswith("DeepSpeed")
    params = [p for p in module.parameters() if p.requires_grad]
    plain = all(type(p.data) is torch.Tensor and p.is_floating_point() and p.device.type in ("cpu", "cuda")
                for p in params)
    return bool(params) and plain and reason is None and not deepspeed


# Numbered transformer blocks in Hugging Face parameter names: BERT/ViT ``encoder.layer.3.``, Llama ``layers.3.``,
# GPT-2 ``h.3.``, timm-style ``blocks.3.`` (PEFT prefixes such as ``base_model.model.`` do not matter).
_BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")
# Below the blocks: any ``*embed*`` module (``embeddings``, ``embed_tokens``) and GPT-2's ``wte``/``wpe``.
_EMBEDDING_NAMES = ("wte", "wpe")


def check_layer_lr_decay(layer_lr_decay: float) -> None:
    """Raise :class:`RecipeError` unless ``0 < layer_lr_decay <= 1``."""
    if not (0 < layer_lr_decay <= 1):
        raise RecipeError(f"--model.layer_lr_decay={layer_lr_decay!r} must be in (0, 1]; 1 turns it off.")


def optimizer_param_groups(module: torch.nn.Module, lr: float, weight_decay: float,
                           layer_lr_decay: float = 1.0) -> list[dict]:
    """AdamW parameter groups: no weight decay for biases and norm weights, and layer-wise lr decay (LLRD).

    With ``layer_lr_decay`` d < 1 and L numbered blocks, block i (0-based) trains at ``lr * d**(L - i)``,
    the embeddings at ``lr * d**(L + 1)`` and everything above the blocks (pooler, head, final norm) at ``lr``:
    the lower, more general layers move less (the ELECTRA / BEiT fine-tuning recipe). Frozen parameters are left out.

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> m = BertForSequenceClassification(BertConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        ...                                              intermediate_size=8, vocab_size=10))
        >>> sorted({round(g["lr"], 4) for g in optimizer_param_groups(m, 1.0, 0.01, layer_lr_decay=0.5)})
        [0.125, 0.25, 0.5, 1.0]
    """
    check_layer_lr_decay(layer_lr_decay)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    blocks = {n: int(m.group(1)) for n, _ in named if (m := _BLOCK_INDEX.search(n))}
    num_blocks = max(blocks.values(), default=-1) + 1
    if layer_lr_decay < 1 and num_blocks == 0:
        raise RecipeError(f"--model.layer_lr_decay={layer_lr_decay} needs numbered transformer blocks "
                          "(names like 'encoder.layer.0.' or 'layers.0.'), and this model has none; use 1.0.")

    def depth(name: str) -> int:  # 0 = embeddings, 1..L = blocks, L + 1 = above the blocks
        if name in blocks:
            return blocks[name] + 1
        parts = name.lower().split(".")
        return 0 if any("embed" in q or q in _EMBEDDING_NAMES for q in parts) else num_blocks + 1

    groups: dict[tuple[int, bool], dict] = {}
    for name, p in named:
        no_decay = p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")
        d = depth(name) if layer_lr_decay < 1 else num_blocks + 1
        g = groups.setdefault((d, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                              "lr": lr * layer_lr_decay ** (num_blocks + 1 - d)})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


# --------------------------------------------------------------------------------------------- the module base
class RecipeModule(L.LightningModule):
    """Base LightningModule of the recipes: a Hugging Face model built from the data, AdamW + warmup/cosine.

    Subclasses implement :meth:`build` (create ``self.model`` once the data is known: label count, tokenizer)
    and the steps. Use it in your own Trainer by calling ``module.build(datamodule)`` after
    ``datamodule.setup("fit")`` (``setup`` does it for you when the Trainer has the datamodule).
    """

    def __init__(self, lr: float = 5e-4, weight_decay: float = 0.01, warmup_ratio: float = 0.06,
                 peft: str = "none", merge_lora: bool = True, fused: Optional[bool] = None,
                 layer_lr_decay: float = 1.0, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        if peft not in PEFT_METHODS:
            raise RecipeError(f"--model.peft={peft!r} is not supported; choose one of {list(PEFT_METHODS)}.")
        if not (lr > 0):
            raise RecipeError(f"--model.lr={lr!r} must be > 0.")
        if not (0 <= warmup_ratio < 1):
            raise RecipeError(f"--model.warmup_ratio={warmup_ratio!r} must be in [0, 1).")
        check_layer_lr_decay(layer_lr_decay)  # here too, so a bad value fails before the model is loaded
        self.lr, self.weight_decay, self.warmup_ratio = lr, weight_decay, warmup_ratio
        self.layer_lr_decay = layer_lr_decay
        self.peft, self.merge_lora, self.fused = peft, merge_lora, fused
        self.gradient_checkpointing = gradient_checkpointing
        self.model: Optional[torch.nn.Module] = None
        self.preprocessor: Any = None  # tokenizer or image processor, saved with the model

    # -- to implement
    def build(self, datamodule: L.LightningDataModule) -> None:
        """Create ``self.model`` (and ``self.preprocessor``) for this data; raise :class:`RecipeError` on mismatch."""
        raise NotImplementedError

    def prepare_model(self, model: torch.nn.Module, **peft_kwargs: Any) -> torch.nn.Module:
        """Training mode, activation checkpointing (``--model.gradient_checkpointing``) and PEFT for a loaded model."""
        model.train()  # from_pretrained returns eval mode; Lightning keeps module modes as they are
        if self.gradient_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise RecipeError(f"--model.gradient_checkpointing=true: {type(model).__name__} does not support it; "
                                  "use false.")
            # non-reentrant: works with frozen inputs (PEFT) and with FSDP2
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return apply_peft(model, self.peft, **peft_kwargs)

    def configure_model(self) -> None:
        """Under ``--trainer.strategy=fsdp2``: ``fully_shard`` each transformer block and the model."""
        if isinstance(self._trainer.strategy if self._trainer is not None else None, ModelParallelStrategy):
            if self.model is None:
                self.setup("fit")
            self.model = shard_model(self.model, self.device_mesh["data_parallel"])

    def setup(self, stage: str) -> None:
        if self.model is None:
            dm = self.trainer.datamodule if self._trainer is not None else None
            if dm is None:
                raise RecipeError(f"{type(self).__name__} needs its datamodule: call module.build(datamodule) first.")
            self.build(dm)

    # -- logging
    def log_step_metric(self, name: str, value: torch.Tensor, **kwargs: Any) -> None:
        """``self.log(name, value, **kwargs)`` on the training steps whose metrics Lightning sends to the loggers.

        Lightning writes step metrics every ``log_every_n_steps`` steps only, but ``self.log`` costs about
        0.5 ms of Python on every call (a few % of a small model's step). The loggers receive the same rows
        either way; the progress bar refreshes its value at the same rate.
        """
        # Lightning's own rule (private; when it is absent, log every step as plain self.log would)
        writes = getattr(getattr(self._trainer, "_logger_connector", None), "should_update_logs", True)
        if not (writes or self._trainer.fast_dev_run):
            return
        self.log(name, value, **kwargs)

    # -- optimisation
    def configure_optimizers(self):
        groups = optimizer_param_groups(self, self.lr, self.weight_decay, self.layer_lr_decay)
        opt = torch.optim.AdamW(groups, lr=self.lr, fused=use_fused_optimizer(self, self.fused))
        return self.with_warmup_cosine(opt, self.warmup_ratio)

    def with_warmup_cosine(self, opt: torch.optim.Optimizer, warmup_ratio: float):
        """``opt`` with linear warmup then cosine decay over the run's optimizer steps (``opt`` alone when the run
        has no step bound), in the form ``configure_optimizers`` returns."""
        total = self.trainer.estimated_stepping_batches  # inf without max_steps / max_epochs
        if not math.isfinite(total) or total <= 0:
            return opt
        sched = warmup_cosine_schedule(opt, int(warmup_ratio * total), int(total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- export
    def export_model(self, path: Union[str, os.PathLike], state_dict: Optional[dict] = None) -> Path:
        """``save_pretrained`` the Hugging Face model (LoRA merged when ``merge_lora``) with its preprocessor.

        ``state_dict``: the gathered weights of a sharded model (:func:`full_state_dict`), saved instead.
        """
        path = Path(path)
        model = self.model
        if state_dict is not None:
            model = unsharded_replica(model, state_dict)
        if self.peft != "none" and self.merge_lora and hasattr(model, "merge_and_unload"):
            import copy

            model = (model if state_dict is not None else copy.deepcopy(model)).merge_and_unload()
        model.save_pretrained(str(path))
        if self.preprocessor is not None:
            self.preprocessor.save_pretrained(str(path))
        return path


# --------------------------------------------------------------------------------------------- the CLI
class RecipeCLI(LightningCLI):
    """``LightningCLI`` with a run directory, a ``tick`` group, automatic precision, validation before training,
    and after ``fit``: ``metrics.json``, ``model/`` (save_pretrained) and the tick report.

    Example:
        >>> # in recipes/<name>.py
        >>> def main(args=None):                                   # doctest: +SKIP
        ...     RecipeCLI(MyModule, MyData, recipe="my_recipe", args=args)
    """

    def __init__(self, model_class, datamodule_class, *, recipe: str, links: Sequence[tuple] = (),
                 default_max_epochs: int = 1, **kwargs: Any) -> None:
        self.recipe = recipe
        self.links = list(links)
        self.default_max_epochs = default_max_epochs
        self.run_dir: Optional[Path] = None
        self._created_run_dir = False
        kwargs.setdefault("seed_everything_default", 42)
        kwargs.setdefault("save_config_callback", None)  # config.yaml is written by before_fit, once validated
        super().__init__(model_class, datamodule_class, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_dir", type=Optional[str], default=None,
                            help=f"where everything of the run goes (default runs/{self.recipe}-<timestamp>)")
        parser.add_dataclass_arguments(TickConfig, "tick")
        parser.add_dataclass_arguments(CheckpointConfig, "checkpoint")
        parser.set_defaults({"trainer.precision": auto_precision(), "trainer.log_every_n_steps": 10})
        for link in self.links:
            parser.link_arguments(*link)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # run_recipe passes sys.argv (with "fit" prepended) explicitly; skip LightningCLI's both-given warning
        self.config = parser.parse_object(args) if isinstance(args, dict) else parser.parse_args(args)
        # the run directory is fixed here, before anything is built, and written back into the config, so that
        # config.yaml names it and `--ckpt_path last` finds this directory's checkpoints
        sub = self.config.get("subcommand")
        if sub is None:
            return
        cfg = self.config[sub]
        self.run_dir = resolve_run_dir(self.recipe, cfg.get("run_dir"), cfg.get("trainer.default_root_dir"),
                                       cfg.get("ckpt_path"))
        cfg["run_dir"] = str(self.run_dir)
        check_ckpt_path(cfg.get("ckpt_path"), self.run_dir)

    # -- trainer with the run directory
    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        os.environ[RUN_DIR_ENV] = str(self.run_dir.resolve())  # for the ranks a DDP launch starts (see default_run_dir)
        self._created_run_dir = not self.run_dir.exists()
        cfg = self._get(self.config_init, "trainer", default={})
        callbacks = list(kwargs.pop("callbacks", None) or [])
        own = cfg.get("callbacks")
        callbacks += ([] if own is None else own if isinstance(own, list) else [own])
        if cfg.get("enable_checkpointing", True) is not False and not any(
                isinstance(c, ModelCheckpoint) for c in callbacks):
            ckpt_cfg = self._get(self.config_init, "checkpoint")
            ckpt_cfg = ckpt_cfg if isinstance(ckpt_cfg, CheckpointConfig) else CheckpointConfig(**(ckpt_cfg or {}))
            callbacks.append(RunCheckpoint(self.run_dir / "checkpoints", ckpt_cfg.every_n_train_steps,
                                           ckpt_cfg.train_time_interval))
        tick_cfg = self._get(self.config_init, "tick")
        if self.subcommand == "fit" and tick_cfg is not None:
            if isinstance(tick_cfg, dict):
                tick_cfg = TickConfig(**tick_cfg)
            tick = make_tick_callback(tick_cfg, self.run_dir / "ticks")
            if tick is not None:
                callbacks.append(tick)
        if cfg.get("default_root_dir") is None:
            kwargs["default_root_dir"] = str(self.run_dir)
        if cfg.get("logger") in (None, True):
            from lightning.pytorch.loggers import CSVLogger

            kwargs["logger"] = CSVLogger(save_dir=str(self.run_dir), name="logs")
        if cfg.get("max_epochs") is None:  # an explicit max_steps / max_time is not capped by the recipe's epochs
            bounded = cfg.get("max_steps", -1) not in (None, -1) or cfg.get("max_time") is not None
            kwargs["max_epochs"] = -1 if bounded else self.default_max_epochs
        kwargs["callbacks"] = callbacks
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError) as err:  # Lightning's checks of --trainer.*
            raise RecipeError(f"bad --trainer option: {err}") from err

    # -- validation before training
    def _prepare(self, stage: str) -> None:
        """Load the data and build the model now, so bad input fails before anything is written."""
        try:
            self.datamodule.prepare_data()
            self.datamodule.setup(stage)
            if getattr(self.model, "model", None) is None:
                self.model.build(self.datamodule)
        except BaseException:
            if self._created_run_dir and self.run_dir is not None and self.run_dir.exists():
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise

    def before_fit(self) -> None:
        self._prepare("fit")
        if self.trainer.is_global_zero:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            parser = self._parser(self.subcommand)
            parser.save(self.config[self.subcommand], str(self.run_dir / "config.yaml"), skip_none=False,
                        overwrite=True, multifile=False)

    def before_validate(self) -> None:
        self._prepare("validate")

    def before_test(self) -> None:
        self._prepare("test")

    def before_predict(self) -> None:
        self._prepare("predict")

    # -- after training: metrics, model, report
    def after_fit(self) -> None:
        trainer, dm = self.trainer, self.datamodule
        if trainer.interrupted:
            return
        metrics: dict[str, Any] = {"global_step": int(trainer.global_step), "epoch": int(trainer.current_epoch)}
        if dm.val_dataloader() is not None:
            out = trainer.validate(self.model, datamodule=dm, verbose=False)
            metrics["validate"] = {k: float(v) for k, v in (out[0] if out else {}).items()}
        if getattr(dm, "has_test", lambda: False)():
            out = trainer.test(self.model, datamodule=dm, verbose=False)
            metrics["test"] = {k: float(v) for k, v in (out[0] if out else {}).items()}
        gathered = full_state_dict(self.model.model) if self.model.model is not None else None  # every rank
        if not trainer.is_global_zero:
            return
        (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        self.model.export_model(self.run_dir / "model", **({} if gathered is None else {"state_dict": gathered}))
        report_path = make_report(self.run_dir)
        print_summary(self.run_dir, metrics, report_path)


def make_report(run_dir: Path) -> Optional[Path]:
    """Write ``run_dir/report`` with ``tick_lightning.report`` (None when the run recorded no ticks)."""
    from tick_lightning.reporting import report
    from tick_lightning.store import has_records

    ticks = run_dir / "ticks"
    if not has_records(ticks):  # ticks switched off, or the run ended before its first tick
        return None
    try:
        out = report(ticks, run_dir / "report")
    except Exception as err:  # the run's results are already saved; a report bug must not lose them
        print(f"warning: the tick report failed ({type(err).__name__}: {err}); retry with "
              f"`tick-lightning report {run_dir}`", file=sys.stderr)
        return None
    return Path(out) if out is not None else run_dir / "report"


def summarize_ticks(ticks_dir: Union[str, os.PathLike], max_rows: int = 12):
    """A small table of the ticks (step, loss, lr, global grad norm, ...) as a pandas DataFrame.

    Example:
        >>> summarize_ticks("runs/demo/ticks")  # doctest: +SKIP
    """
    from tick_lightning.store import load_ticks

    df = load_ticks(ticks_dir)
    keys = {("loss", "", "value"): "loss", ("lr", "group0", "lr"): "lr", ("grad", "", "norm"): "grad_norm",
            ("time", "", "step_seconds"): "step_s"}
    df = df[df["rank"] == df["rank"].min()]
    sel = df[[(s, n, t) in keys for s, n, t in zip(df["state"], df["name"], df["stat"])]]
    table = sel.assign(col=[keys[(s, n, t)] for s, n, t in zip(sel["state"], sel["name"], sel["stat"])])
    table = table.pivot_table(index="step", columns="col", values="value", aggfunc="last")
    updates = df[(df["state"] == "update") & (df["stat"] == "ratio")].groupby("step")["value"].median()
    if len(updates):
        table["update_ratio_median"] = updates
    if len(table) > max_rows:
        idx = sorted(set(list(table.index[:: max(1, len(table) // (max_rows - 1))]) + [table.index[-1]]))
        table = table.loc[idx]
    return table


def print_summary(run_dir: Path, metrics: dict, report_path: Optional[Path]) -> None:
    """Print the run directory, a short tick table, the final metrics and the report path."""
    print(f"\nrun directory: {run_dir}")
    from tick_lightning.store import has_records

    if has_records(run_dir / "ticks"):
        try:
            print("ticks:\n" + summarize_ticks(run_dir / "ticks").to_string(float_format=lambda v: f"{v:.4g}"))
        except FileNotFoundError:
            print("ticks: none recorded")
    for stage in ("validate", "test"):
        if stage in metrics:
            print(f"{stage}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics[stage].items()))
    print(f"model: {run_dir / 'model'}")
    print(f"report: {report_path}" if report_path else "report: none (no ticks recorded)")
    sys.stdout.flush()


def check_config_files(args: Sequence[str]) -> None:
    """Raise :class:`RecipeError` for a ``--config`` file that does not exist or is not valid YAML (naming the file,
    line and column; jsonargparse would name ``<unicode string>``)."""
    import yaml

    paths = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
    paths += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for path in paths:
        if not os.path.isfile(path):
            raise RecipeError(f"--config {path!r} does not exist; pass a YAML file (see `tick-lightning ls`).")
        try:
            with open(path, encoding="utf-8") as f:
                yaml.safe_load(f)
        except UnicodeDecodeError as err:
            raise RecipeError(f"--config {path!r} is not UTF-8 ({err.reason}); save it as UTF-8.") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err)
            raise RecipeError(f"--config {path!r} is not valid YAML{where}: {problem}; fix the file.") from None


def main_or_exit(cli: Any, args: Optional[list[str]] = None) -> None:
    """Run ``cli(args)``; bad input (a :class:`RecipeError`) is printed as one ``error:`` line and exits with 2."""
    try:
        cli(args)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def run_recipe(model_class, datamodule_class, recipe: str, args: Optional[list[str]] = None,
               links: Sequence[tuple] = (), **kwargs: Any) -> RecipeCLI:
    """Run a recipe's CLI (``fit`` by default when ``args`` has no subcommand).

    Example:
        >>> run_recipe(TextClassifier, TextData, "text_classification", ["--trainer.max_steps=5"])  # doctest: +SKIP
    """
    args = list(sys.argv[1:] if args is None else args)
    check_config_files(args)
    subcommands = set(LightningCLI.subcommands())
    first = next((a for a in args if not a.startswith("-")), None)
    if not args or (first not in subcommands and args[0] not in ("-h", "--help")):
        args = ["fit", *args]
    return RecipeCLI(model_class, datamodule_class, recipe=recipe, links=links, args=args, **kwargs)
