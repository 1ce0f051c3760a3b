"""The matrix products of a decode step: cuBLAS (``F.linear`` and the elementwise op after it, the Hugging Face
model's eager path) against ``megatron_tnllm.ops.skinny_linear`` (one Triton kernel with the residual add or the
gated product in its epilogue), at the products of one Hugging Face decode step of a preset.

Per preset and row count M (the decode batch): qkvu (D -> 4D), out + residual (D -> D), glu ((x W1^T) * (x W2^T),
D -> G), l3 + residual (G -> D) and the LM head (D -> V). Each case is timed as a CUDA graph of calls that cycle
through copies of its weights (at least --cycle-mib of them, several times the L2 cache, so every call reads its
weights from HBM as a decode step does) and replayed (``Bench.graph_ms``); ms per call is the median replay over
the calls in it. The
floor is the least traffic (weights, x, the output and the residual) at --bandwidth. Errors: max relative error
against the fp64 product of the same bf16 inputs. ``--sweep`` also times each of SWEEP's launch settings.

    python tools/bench/bench_skinny.py --out DIR                  # tnl-1b and tnl-7b, M = 1, 16, 64
    python tools/bench/bench_skinny.py --sweep --out DIR          # and the launch settings of SWEEP
    python tools/bench/bench_skinny.py --smoke --out DIR          # CPU, Triton interpreter, tiny shapes

Writes DIR/bench_skinny.json and DIR/bench_skinny.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from op_bench import Bench, markdown_table, op_bench, op_parser, results_header, write_report

from megatron_tnllm.configs import get_preset

SWEEP = {  # launch settings timed beside the default with --sweep (fields of fused.SkinnyConfig)
    f"k{k}_s{s}_w{w}_p{p}": dict(block_k=k, num_stages=s, num_warps=w, programs_per_sm=p)
    for k, s, w, p in [(k, s, 4, p) for k in (64, 128, 256) for s in (3, 5) for p in (1, 2)]
    + [(128, 4, 8, 1), (256, 3, 8, 1)]
}


def products(preset: str) -> list[tuple[str, int, int, bool, bool]]:
    """(name, N, K, glu, residual) of one decode step's products (HF layout, TP = 1)."""
    cfg = get_preset(preset)
    D, G, V = cfg.hidden_size, cfg.glu_size, cfg.vocab_size
    return [
        ("qkvu", 4 * D, D, False, False),
        ("out+res", D, D, False, True),
        ("glu", G, D, True, False),
        ("l3+res", D, G, False, True),
        ("lm_head", V, D, False, False),
    ]


def measure(preset: str, rows: int, args, bench: Bench, configs: dict) -> list[dict]:
    from megatron_tnllm.ops.skinny_linear import fused, skinny_glu, skinny_linear
    from megatron_tnllm.ops.skinny_linear.naive import skinny_glu_torch, skinny_linear_torch

    out = []
    for name, N, K, glu, residual in products(preset):
        per_copy = (2 if glu else 1) * N * K * bench.dtype.itemsize
        copies = max(2, -(-args.cycle_mib * 2**20 // per_copy))
        weights = [[bench.randn(N, K) * K**-0.5 for _ in range(2 if glu else 1)] for _ in range(copies)]
        x = bench.randn(rows, K)
        r = bench.randn(rows, N) if residual else None
        y_bytes = rows * N * bench.dtype.itemsize * (2 if residual else 1)
        floor_ms = (per_copy + x.numel() * x.element_size() + y_bytes) / (args.bandwidth * 1e12) * 1e3
        w0 = [w.double() for w in weights[0]]
        if glu:
            exact = skinny_glu_torch(x.double(), *w0)
        else:
            exact = skinny_linear_torch(x.double(), w0[0], None if r is None else r.double())

        def rel(y: torch.Tensor, exact: torch.Tensor = exact) -> float:
            return ((y.double() - exact).norm() / exact.norm()).item()

        def calls(fn: Callable, weights=weights, x=x, r=r, glu=glu) -> list[Callable[[], object]]:
            if glu:
                return [lambda w=w: fn(x, w[0], w[1]) for w in weights]
            return [lambda w=w: fn(x, w[0], r) for w in weights]

        torch_fn = skinny_glu_torch if glu else skinny_linear_torch
        ours_fn = (lambda *a: skinny_glu(*a, backend="triton")) if glu else (
            lambda *a: skinny_linear(*a, backend="triton")
        )  # fmt: skip
        base = {"preset": preset, "op": name, "rows": rows, "N": N, "K": K, "floor_ms": floor_ms}
        with torch.no_grad():
            t_torch = bench.graph_ms(calls(torch_fn))
            out.append({**base, "case": "cublas", "ms": t_torch, "err": rel(calls(torch_fn)[0]())})
            default = fused.CONFIG
            for label, kw in configs.items():
                fused.CONFIG = dataclasses.replace(default, **kw)
                try:
                    t = bench.graph_ms(calls(ours_fn))
                    out.append({**base, "case": label, "ms": t, "err": rel(calls(ours_fn)[0]())})
                except Exception as e:  # noqa: BLE001  (a setting that does not fit: out of shared memory)
                    out.append({**base, "case": label, "error": repr(e)[:160]})
                finally:
                    fused.CONFIG = default
        best = min((o for o in out if o["op"] == name and "ms" in o), key=lambda o: o["ms"])
        print(f"{preset} M={rows} {name}: cublas {t_torch:.4f} ms, floor {floor_ms:.4f}, best {best['case']} "
              f"{best['ms']:.4f}", flush=True)  # fmt: skip
    return out


def table(results: list[dict]) -> str:
    cells = []
    for r in results:
        if r["case"] != "ours":
            continue
        cub = next(c for c in results if c["case"] == "cublas" and c["op"] == r["op"] and c["rows"] == r["rows"]
                   and c["preset"] == r["preset"])  # fmt: skip
        best = min((c for c in results if "ms" in c and c["op"] == r["op"] and c["rows"] == r["rows"]
                    and c["preset"] == r["preset"] and c["case"] != "cublas"), key=lambda c: c["ms"])  # fmt: skip
        cells.append([
            r["preset"], str(r["rows"]), r["op"], f"{r['N']} x {r['K']}", f"{cub['ms']:.4f}", f"{r['ms']:.4f}",
            f"{r['floor_ms']:.4f}", f"{cub['ms'] / r['ms']:.2f}", f"{cub['ms'] / r['floor_ms']:.2f} / "
            f"{r['ms'] / r['floor_ms']:.2f}", f"{best['case']} {best['ms']:.4f}", f"{cub['err']:.1e} / {r['err']:.1e}",
        ])  # fmt: skip
    columns = ["preset", "M", "op", "N x K", "cuBLAS ms", "ours ms", "floor ms", "cuBLAS / ours",
               "x floor cuBLAS / ours", "fastest setting", "rel err cuBLAS / ours"]  # fmt: skip
    return markdown_table(columns, cells)


def main() -> None:
    parser = op_parser(__doc__.split("\n\n")[0], warmup=0, reps=20, smoke="tnl-tiny, M = 1 and 20")
    parser.add_argument("--rows", default="1,16,64", help="comma list of M (decode batch sizes)")
    parser.add_argument("--cycle-mib", type=int, default=256, help="weights cycled through per timed graph")
    parser.add_argument("--sweep", action="store_true", help="also time every launch setting of SWEEP")
    args = parser.parse_args()
    if args.smoke:
        args.presets, args.rows, args.cycle_mib = "tnl-tiny", "1,20", 1
    bench = op_bench(args)
    configs = {"ours": {}} | (SWEEP if args.sweep else {})
    results = []
    for preset in args.presets.split(","):
        for rows in (int(m) for m in args.rows.split(",")):
            results += measure(preset, rows, args, bench, configs)
    write_report(args, "bench_skinny", {**results_header(args, bench), "results": results}, table(results))


if __name__ == "__main__":
    main()
