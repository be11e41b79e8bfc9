#!/usr/bin/env bash
# The prepared GPU check (issues 16, 19 and 32): one run, under 9 minutes on one H200, every result in one
# Markdown file (time limits add up to 8.3 minutes). Installs nothing; needs torch with CUDA, lightning, transformers (not `datasets`).
#
#   bash benchmarks/gpu_check.sh              # on a GPU machine: writes $OUT/gpu-check.md (default ./runs/gpu-check-<time>)
#   bash benchmarks/gpu_check.sh --dry-run    # anywhere: checks every command it would run exists, runs none
#   make gpu-check                            # the same, with the repository's python
#
# Steps (each with its own time limit; a failing step is recorded and the next one runs):
#   1. pytest -m gpu                  every GPU-only test (the sync-budget ones in step 2)
#   2. sync budget on cuda            tests/test_sync_budget.py under torch.cuda.set_sync_debug_mode("error"), the
#                                     guard's three modes included (zero host syncs per step)
#   3. FSDP1 and FSDP2 on one GPU     Lightning strategy="fsdp" and ModelParallelStrategy(fully_shard), ticks
#   4. benchmarks --device cuda       overhead.py (and the guard's cost), norms.py, renorm_experiment.py (cost part),
#                                     sync_memory_budget.py
set -u
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT_DIR="${OUT:-runs/gpu-check-$(date +%Y%m%d-%H%M%S)}"
REPORT="$OUT_DIR/gpu-check.md"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
FAILED=0

FSDP_CHECK='
import sys, torch, lightning as L
sys.path.insert(0, "tests")
import tiny
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from tick_lightning import Renorm, RenormCallback, TickCallback, load_ticks
from tick_lightning.renorm import RenormError

class Sharded(tiny.HFClassifier):
    def configure_model(self):
        from torch.distributed.fsdp import fully_shard
        for block in self.model.transformer.h:
            fully_shard(block, mesh=self.device_mesh["data_parallel"])
        fully_shard(self.model, mesh=self.device_mesh["data_parallel"])

def fit(name, strategy, module, callbacks):
    out = f"{sys.argv[1]}/{name}"
    trainer = tiny.trainer(out, accelerator="cuda", devices=1, strategy=strategy, callbacks=callbacks, max_steps=6)
    trainer.fit(module, tiny.loader(tiny.token_dataset(64), batch_size=4))
    return out

for name, strategy, module in (("fsdp1", FSDPStrategy(), tiny.HFClassifier(tiny.tiny_gpt2())),
                               ("fsdp2", ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1), Sharded(tiny.tiny_gpt2()))):
    ticks = TickCallback(ticks="0,3,5", dirpath=f"{sys.argv[1]}/{name}/ticks", log_to_loggers=False)
    try:
        fit(name, strategy, module, [ticks])
        df = load_ticks(f"{sys.argv[1]}/{name}/ticks")
        print(f"{name} ticks: steps {sorted(df.step.unique())}, {len(df)} rows, states {sorted(df.state.unique())}")
        print(df[(df.state == "grad") & (df.name == "") & (df.stat == "norm")][["step", "value"]].to_string(index=False))
    except Exception as err:
        print(f"{name} ticks FAILED: {type(err).__name__}: {err}")
    renorm = RenormCallback([Renorm("*.attn.c_attn.weight", method="unit", at="step")], ticks="every:2",
                            dirpath=f"{sys.argv[1]}/{name}/renorm")
    module = tiny.HFClassifier(tiny.tiny_gpt2()) if name == "fsdp1" else Sharded(tiny.tiny_gpt2())
    strategy = FSDPStrategy() if name == "fsdp1" else ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    try:
        fit(f"{name}-renorm", strategy, module, [renorm])
        print(f"{name} renorm: applied {renorm.engine.applications}")
    except RenormError as err:  # expected for FSDP1: flattened views are refused
        print(f"{name} renorm refused: {err}")
    except Exception as err:
        print(f"{name} renorm FAILED: {type(err).__name__}: {err}")
'

# name | time limit (s) | command
STEPS=(
  "pytest -m gpu|120|$PYTHON -m pytest -q -m gpu tests --ignore=tests/test_sync_budget.py"
  "sync budget on cuda (set_sync_debug_mode error)|60|$PYTHON -m pytest -q tests/test_sync_budget.py -k cuda"
  "FSDP1 and FSDP2 on one GPU, ticks and renorm|80|$PYTHON -c \"\$FSDP_CHECK\" $OUT_DIR/fsdp"
  "overhead, cuda|70|$PYTHON benchmarks/overhead.py --device cuda --precision bf16-mixed --hidden 768 --layers 12 --steps 60 --rounds 2"
  "guard cost, cuda (fused AdamW)|60|$PYTHON benchmarks/overhead.py --device cuda --precision bf16-mixed --hidden 768 --layers 12 --steps 60 --rounds 2 --fused --variants flight100,guard_skip,guard_zclip,guard_clip"
  "norm kernels, cuda|40|$PYTHON benchmarks/norms.py --device cuda --repeats 20"
  "renorm cost, cuda|40|$PYTHON benchmarks/renorm_experiment.py --skip-quality --cost-hidden 768 --cost-layers 12 --device cuda"
  "sync and memory budget|30|$PYTHON benchmarks/sync_memory_budget.py"
)

dry_check() {  # every program, file and --flag of a command exists; runs nothing heavy
  local cmd="$1" word script="" ok=1
  for word in $cmd; do
    word="${word#--*=}"  # --ignore=tests/x.py: the path
    case "$word" in
      *.py|tests) [ -e "$word" ] || { echo "missing: $word"; ok=0; }; [[ "$word" == benchmarks/*.py ]] && script="$word" ;;
    esac
  done
  word="${cmd%% *}"
  command -v "$word" >/dev/null || { echo "missing program: $word"; ok=0; }
  if [ -n "$script" ]; then  # each --flag must be one the script's parser knows
    local help
    help="$($PYTHON "$script" --help 2>&1)" || { echo "$script --help failed: $help" | tail -3; ok=0; }
    for word in $cmd; do
      case "$word" in --*) grep -q -- "${word%%=*}" <<<"$help" || { echo "$script has no option $word"; ok=0; } ;; esac
    done
  fi
  [ "$ok" = 1 ]
}

if [ "$DRY" = 1 ]; then
  echo "dry run: checking ${#STEPS[@]} steps"
  $PYTHON -c "import torch, lightning, transformers, pyarrow" || { echo "missing a python package"; exit 1; }
  $PYTHON -c "import ast, sys; ast.parse(sys.argv[1])" "$FSDP_CHECK" || { echo "FSDP check does not parse"; exit 1; }
  $PYTHON -m pytest -q --collect-only -m gpu tests >/dev/null 2>&1 || { echo "pytest -m gpu does not collect"; FAILED=1; }
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<<"$step"
    if dry_check "$cmd"; then echo "ok    $name: $cmd (limit ${limit}s)"; else echo "FAIL  $name"; FAILED=1; fi
  done
  [ "$FAILED" = 0 ] && echo "dry run: every command exists" || echo "dry run: some commands are missing"
  exit "$FAILED"
fi

$PYTHON -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "no CUDA device visible to $PYTHON; run with --dry-run to check the script only"; exit 2; }
mkdir -p "$OUT_DIR"
{
  echo "# GPU check ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi not found"
  $PYTHON -c "import torch, lightning, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| lightning', lightning.__version__, '| transformers', transformers.__version__)"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo '```'
} >"$REPORT"

START=$SECONDS
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<<"$step"
  log="$OUT_DIR/step-$(echo "$name" | tr -c 'A-Za-z0-9\n' _ | cut -c1-40).log"
  echo "== $name (limit ${limit}s)"
  t0=$SECONDS
  FSDP_CHECK="$FSDP_CHECK" timeout --kill-after=10 "$limit" bash -c "$cmd" >"$log" 2>&1
  rc=$?
  [ "$rc" = 0 ] || FAILED=1
  status=$([ "$rc" = 0 ] && echo ok || { [ "$rc" = 124 ] && echo "TIMED OUT" || echo "FAILED (exit $rc)"; })
  {
    echo
    echo "## $name: $status, $((SECONDS - t0)) s"
    echo
    echo "\`$cmd\`"
    echo
    echo '```'
    grep -v -e "Warning" -e "warnings.warn" -e "^  warn" "$log" | tail -n 60
    echo '```'
  } >>"$REPORT"
  echo "   $status in $((SECONDS - t0)) s"
done
echo >>"$REPORT"
echo "Total: $((SECONDS - START)) s" >>"$REPORT"
echo "report: $REPORT"
exit "$FAILED"
