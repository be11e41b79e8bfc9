"""What the recipes share, one concern per module (import from the module, e.g. ``recipes._shared.hub``).

==================  =====================================================================================
module              what it is for
==================  =====================================================================================
``cli``             ``RecipeCLI`` / ``run_recipe``: the command line, run directory, validation, export, report
``errors``          ``RecipeError``, the checks of input files and ``--config``, the one ``error:`` line
``config``          the ``tick`` config group and the ``TickCallback`` it builds
``checkpointing``   the ``checkpoint`` config group and ``RunCheckpoint`` (``last.ckpt`` during training)
``run_dir``         where a run's files go; which run ``--ckpt_path last`` continues
``precision``       the default ``--trainer.precision`` from the hardware
``hub``             models / tokenizers / processors from a hub name, a local directory or a config
``adapters``        PEFT (``lora``, ``ln_tuning``)
``sharding``        the ``fsdp2`` strategy, ``fully_shard`` per block, the gathered state dict
``data``            one split from the hub or local files, column checks, ``SplitsDataModule``
``tokenizer``       a small tokenizer trained on the fly
``optim``           fused Adam/AdamW policy, AdamW parameter groups (no-decay, layer-wise lr decay)
``schedule``        linear warmup + cosine decay
``module``          ``RecipeModule``, the LightningModule base of the Hugging Face recipes
``summary``         the tick report and the summary printed after a run
==================  =====================================================================================
"""
