"""phibook's GEMV builds against oneDNN's packed linear: phi-1.5's fused weights, 1-16 rows.

    python bench/bench_gemv.py                                  # 12 layers, rows 1 2 4 8 16, 5 rounds
    python bench/bench_gemv.py --layers 24 --rows 1 16 --rounds 9

A decode step at batch 1-16 is these matrix products: each of a layer's two fused weights
(14336 x 2048 in, 2048 x 10240 out) times 1-16 input rows. This times them alone, in one
process, every system over the same numbers:

- every build of phibook's GEMV this CPU runs at ATen's level (``kernels.GEMV_BUILDS``), not
  only the one FastForward picks, and the candidates that never serve until a run like this one
  says they should (``kernels.GEMV_CANDIDATES``): on an AVX512-BF16 CPU ``gemv_bf16.cpp``
  (``vdpbf16ps``) with one stream a thread and with four ("streams4"), and ``decode_f32.cpp``'s
  bf16 (weights widened to fp32 as read); on an AVX2 one the latter;
- the library path a user would get instead: oneDNN's inner product on a weight reordered once
  (``mkldnn._reorder_linear_weight``, what FastForward packs where it runs no GEMV) in each dtype
  oneDNN takes here and whose check passed, else ATen's ``F.linear`` (bf16 on AVX2).

Each GEMV is first checked on this CPU against float64 at every row count (its kernel probe's
check, ``kernels.check_gemv``); a build that misses is reported and not timed. Systems run in
alternating rounds (the order flips each round); a round times ``--passes`` passes over all
layers. Reported: ms a pass (median, range) and GB/s of the weights' own bytes, with the
read-bandwidth probe before and after and the load before. The probe reads one stream a thread,
so a GEMV that reads several can pass it (docs/performance.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, run_between_bandwidth_probes  # noqa: E402

from phibook.inference import kernels as K  # noqa: E402
from phibook.inference.pages import huge_page_copy  # noqa: E402

SHAPES = ((14336, 2048), (2048, 10240))  # phi-1.5's fused input and output projections (out, in)


def gemv_systems() -> dict[str, tuple[torch.dtype, K.GemvOp]]:
    """Every GEMV build and candidate this CPU runs at ATen's level, loaded: name -> (dtype, op)."""
    systems = {}
    for build in K.gemv_builds_here(candidates=True):
        try:
            K.load_gemv(build)
        except K.Unsupported as exc:
            print(f"skipped {build.source.name} ({K.DTYPE_SHORT[build.dtype]}): {exc}", file=sys.stderr)
            continue
        name = f"gemv {build.label}"
        systems[name] = (build.dtype, getattr(getattr(torch.ops, build.namespace), build.op))
    return systems


def checked(name: str, dtype: torch.dtype, op: K.GemvOp, rows: list[int]) -> bool:
    """Whether ``op`` matches float64 at every row count (its kernel probe's check, kernels.check_gemv)."""
    try:
        K.check_gemv(op, dtype, rows=tuple(rows))
    except AssertionError as exc:
        print(f"{name}: wrong result ({exc}); not timed", file=sys.stderr)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12, help="phi-1.5 layers of weights to stream (24 is the model)")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="input rows (1-16)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    ap.add_argument("--passes", type=int, default=3, help="passes over all layers a round")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    args = ap.parse_args(argv)
    if args.layers < 1 or args.rounds < 1 or args.passes < 1:
        ap.error("--layers, --rounds and --passes must be at least 1")
    if any(not 1 <= m <= K.GEMV_MAX_ROWS for m in args.rows):
        ap.error(f"--rows must be 1 to {K.GEMV_MAX_ROWS}")
    torch.set_num_threads(args.threads)

    gemvs = {name: sys_ for name, sys_ in gemv_systems().items() if checked(name, *sys_, args.rows)}
    onednn = [dt for dt in (torch.float32, torch.bfloat16)
              if K.onednn_supports(dt) and K.kernel_ok(f"onednn-{K.DTYPE_SHORT[dt]}")]
    dtypes = sorted({dt for dt, _ in gemvs.values()} | set(onednn) | {torch.float32}, key=str)
    library = {dt: f"oneDNN packed {K.DTYPE_SHORT[dt]}" if dt in onednn else f"ATen F.linear {K.DTYPE_SHORT[dt]}"
               for dt in dtypes}
    g = torch.Generator().manual_seed(1)
    master = [[torch.randn(n, k, generator=g) / k**0.5 for n, k in SHAPES] for _ in range(args.layers)]
    plain = {dt: [[huge_page_copy(w.to(dt)) for w in layer] for layer in master] for dt in dtypes}
    packed = {dt: [[torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in layer] for layer in plain[dt]]
              for dt in onednn}
    del master
    empty = torch.empty(0)

    def gemv_pass(dtype: torch.dtype, op: K.GemvOp, xs: list[torch.Tensor]):
        return lambda: [op(w, x, empty) for layer in plain[dtype] for w, x in zip(layer, xs)]

    def library_pass(dtype: torch.dtype, xs: list[torch.Tensor]):
        if dtype in packed:
            return lambda: [torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
                            for layer in packed[dtype] for w, x in zip(layer, xs)]
        return lambda: [torch.nn.functional.linear(x, w) for layer in plain[dtype] for w, x in zip(layer, xs)]

    def table() -> list[str]:
        times: dict[tuple[str, int], list[float]] = {}
        systems: dict[str, tuple[torch.dtype, object]] = {
            **{name: (dt, op) for name, (dt, op) in gemvs.items()},
            **{library[dt]: (dt, None) for dt in dtypes},
        }
        for r in range(args.rounds):
            for m in args.rows:
                order = list(systems) if r % 2 == 0 else list(reversed(systems))
                for name in order:
                    dt, op = systems[name]
                    xs = [torch.randn(m, k).to(dt) for _, k in SHAPES]
                    run = gemv_pass(dt, op, xs) if op is not None else library_pass(dt, xs)
                    run()  # warm: the first call of a shape builds oneDNN's primitive
                    t = time.perf_counter()
                    for _ in range(args.passes):
                        run()
                    times.setdefault((name, m), []).append((time.perf_counter() - t) / args.passes)
        lines = ["| rows | system | ms a pass (median) | range | GB/s (median) | library same dtype's time / this |",
                 "|---:|---|---:|---|---:|---:|"]
        for m in args.rows:
            for name, (dt, _) in systems.items():
                ts = times[(name, m)]
                nbytes = sum(n * k for n, k in SHAPES) * args.layers * torch.empty((), dtype=dt).element_size()
                peer = times[(library[dt], m)]
                ratio = f"{median(peer) / median(ts):.2f}x"
                lines.append(f"| {m} | {name} | {median(ts) * 1e3:.1f} | {min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f} | "
                             f"{nbytes / median(ts) / 1e9:.1f} | {ratio} |")
        return lines

    run_between_bandwidth_probes(
        f"GEMV, {args.layers} layers of phi-1.5's fused weights, {args.rounds} alternating rounds of "
        f"{args.passes} passes, {args.threads} threads", table, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
