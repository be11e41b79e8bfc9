"""Benchmark: patched vs original normalization layers, side by side in one run.

Forward+backward time of each variant at hidden 768 / 4096 / 8192, fp32 and bf16 (input and weights), then
one training step (forward, backward, AdamW) of a small Llama-style and a small BERT model, patched vs
unpatched. Prints a markdown table with the ratio original/patched (> 1: patched is faster).

Original and patched runs are interleaved (A B A B ...) and the median is reported, so a noisy shared
machine affects both sides alike.

    python benchmarks/norms.py                 # CPU, small row count
    python benchmarks/norms.py --device cuda   # GPU: rows default 8192 (batch 4 x seq 2048)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from tick_lightning.norms import patch_norms


def _variants():
    from transformers.models.cohere.modeling_cohere import CohereLayerNorm
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    return {
        "nn.LayerNorm": lambda h: nn.LayerNorm(h),
        "nn.RMSNorm": lambda h: nn.RMSNorm(h, eps=1e-6),
        "LlamaRMSNorm": lambda h: LlamaRMSNorm(h),
        "GemmaRMSNorm (1+w)": lambda h: GemmaRMSNorm(h),
        "T5LayerNorm": lambda h: T5LayerNorm(h),
        "CohereLayerNorm (eager LN)": lambda h: CohereLayerNorm(h),
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_pair(fn_a, fn_b, device: str, repeats: int, warmup: int = 3) -> tuple[float, float]:
    for _ in range(warmup):
        fn_a(), fn_b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, out in ((fn_a, ta), (fn_b, tb)):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            out.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def bench_layers(device: str, rows: int, repeats: int, hiddens, dtypes):
    results = []
    for vname, make in _variants().items():
        for hidden in hiddens:
            for dtype in dtypes:
                original = nn.Sequential(make(hidden)).to(device=device, dtype=dtype)
                patched = copy.deepcopy(original)
                patch_norms(patched)
                x = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
                g = torch.randn(rows, hidden, device=device, dtype=dtype)

                def step(model, x=x, g=g):
                    def run():
                        y = model(x)
                        y.backward(g.to(y.dtype))
                    return run

                t_orig, t_patch = _time_pair(step(original), step(patched), device, repeats)
                results.append((vname, hidden, str(dtype).replace("torch.", ""), t_orig, t_patch))
                print(f"| {vname} | {hidden} | {results[-1][2]} | {t_orig * 1e3:.3f} | {t_patch * 1e3:.3f} | "
                      f"{t_orig / t_patch:.2f}x |", flush=True)
    return results


def _tiny_models(device: str, dtype: torch.dtype, hidden: int):
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 2,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=512))
    bert = BertForMaskedLM(BertConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 2,
                                      num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=512,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    return {"Llama-style (4 layers)": llama, "BERT (4 layers)": bert}


def bench_models(device: str, batch: int, seq: int, hidden: int, repeats: int, dtypes):
    for dtype in dtypes:
        for name, model in _tiny_models(device, dtype, hidden).items():
            model = model.to(device=device, dtype=dtype)
            ids = torch.randint(0, 1024, (batch, seq), device=device)
            runs = []
            for patch in (False, True):
                m = copy.deepcopy(model)
                if patch:
                    patch_norms(m)
                opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

                def run(m=m, opt=opt, ids=ids):
                    loss = m(input_ids=ids, labels=ids).loss
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                runs.append(run)
            t_orig, t_patch = _time_pair(runs[0], runs[1], device, repeats)
            print(f"| {name} train step, hidden {hidden}, batch {batch}x{seq} | {str(dtype).replace('torch.', '')} | "
                  f"{t_orig * 1e3:.2f} | {t_patch * 1e3:.2f} | {t_orig / t_patch:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rows", type=int, default=None, help="rows of the layer input (default: cpu 256, cuda 8192)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per side (default: cpu 15, cuda 50)")
    parser.add_argument("--hiddens", type=int, nargs="+", default=[768, 4096, 8192])
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads on CPU (1 is far steadier on a shared, loaded machine)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA device is available; use --device cpu")
    cpu = args.device == "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = args.rows or (256 if cpu else 8192)
    repeats = args.repeats or (15 if cpu else 50)
    dtypes = [torch.float32, torch.bfloat16]
    print(f"torch {torch.__version__}, device {args.device}"
          f"{'' if cpu else ' (' + torch.cuda.get_device_name() + ')'}, threads {torch.get_num_threads()}, "
          f"rows {rows}, repeats {repeats}\n", flush=True)
    print("| layer | hidden | dtype | original ms (fwd+bwd) | patched ms | speed-up |")
    print("|---|---|---|---|---|---|")
    bench_layers(args.device, rows, repeats, args.hiddens, dtypes)
    if not args.skip_models:
        print("\n| model | dtype | unpatched ms | patched ms | speed-up |")
        print("|---|---|---|---|---|")
        # bf16 matmuls on a CPU without bf16 units take ~14 s per step here: fp32 only on CPU
        model_dtypes = [torch.float32] if cpu else dtypes
        bench_models(args.device, 4 if cpu else 8, 128 if cpu else 512, 256 if cpu else 1024, repeats, model_dtypes)


if __name__ == "__main__":
    main()
