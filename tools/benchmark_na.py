"""Benchmark the neighbourhood-attention op (visionattn.layers.neighborhood_attention).

CPU (default), fp32, B=1, heads 2, head_dim 32, k=7:
  * forward time of the ``torch`` backend (with and without RPB) vs ``natten.na2d`` (natten's
    CPU path: unfused Flex, no RPB) at 56², 28², 14² and dilation 1, 2. Each time is the best of
    ``--reps`` wall-clock runs, the two ops interleaved so both see the same machine load;
    ratio = natten / torch (no RPB).
  * peak memory of the ``torch`` backend (with RPB) at 64² and 128², forward and forward +
    backward, each in a fresh subprocess: peak resident set size (Linux VmHWM, reset through
    /proc/self/clear_refs) minus the resident size just before the call, with glibc's mmap
    threshold fixed so freed blocks go back to the OS.
``--cuda``: correctness of ``triton`` and ``flex`` against the ``torch`` backend on the GPU
(float64 reference; outputs and q/k/v/rpb gradients), then forward and forward+backward times
(median, triton.testing.do_bench) of triton / flex / natten / torch at 56² and 128², k=7,
in fp16 and bf16.
"""
import argparse
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from visionattn.layers.neighborhood_attention import neighborhood_attention_2d  # noqa: E402

HEADS, HEAD_DIM, KERNEL = 2, 32, 7


def _inputs(batch, size, heads, dim, dtype=torch.float32, device="cpu", grad=False, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(batch, size, size, heads, dim, generator=gen, device=device,
                           dtype=dtype).requires_grad_(grad) for _ in range(3))
    rpb = (torch.randn(heads, 2 * KERNEL - 1, 2 * KERNEL - 1, generator=gen, device=device) * .5
           ).requires_grad_(grad)
    return q, k, v, rpb


def cpu_times(reps):
    import natten
    warnings.filterwarnings("ignore")  # natten's Flex path warns that it is unfused
    print(f"CPU fp32 forward, B=1 heads={HEADS} head_dim={HEAD_DIM} k={KERNEL}, "
          f"threads={torch.get_num_threads()}, best of {reps} (ms)")
    print(f"{'size':>7} {'d':>2} {'torch':>8} {'torch+rpb':>10} {'natten':>9} {'ratio':>7}")
    for size in (56, 28, 14):
        for d in (1, 2):
            q, k, v, rpb = _inputs(1, size, HEADS, HEAD_DIM)
            ops = {"torch": lambda: neighborhood_attention_2d(q, k, v, KERNEL, d, backend="torch"),
                   "rpb": lambda: neighborhood_attention_2d(q, k, v, KERNEL, d, rpb,
                                                            backend="torch"),
                   "natten": lambda: natten.na2d(q, k, v, KERNEL, dilation=d)}
            best = dict.fromkeys(ops, float("inf"))
            with torch.no_grad():
                assert (ops["torch"]() - ops["natten"]()).abs().max() < 1e-5
                for _ in range(reps):
                    for name, op in ops.items():
                        t = time.perf_counter()
                        op()
                        best[name] = min(best[name], time.perf_counter() - t)
            ms = {n: b * 1e3 for n, b in best.items()}
            print(f"{size:>4}x{size:<2} {d:>2} {ms['torch']:>8.2f} {ms['rpb']:>10.2f} "
                  f"{ms['natten']:>9.1f} {ms['natten'] / ms['torch']:>6.0f}x")


def _status_kb(key):
    return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def measure_peak(size, train):
    """Child process: peak RSS increase (MiB) of one torch-backend call with RPB."""
    for s in (16, size):  # warm-up at a tiny size loads kernels and thread pools
        q, k, v, rpb = _inputs(1, s, HEADS, HEAD_DIM, grad=train)
        before = _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        with torch.set_grad_enabled(train):
            out = neighborhood_attention_2d(q, k, v, KERNEL, 1, rpb, backend="torch")
            if train:
                out.sum().backward()
        peak = _status_kb("VmHWM") - before
    print(peak / 1024)


def cpu_memory():
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    print("\nCPU peak memory of the torch backend (RPB, k=7, B=1, heads 2, head_dim 32), MiB")
    for train in (False, True):
        peaks = {}
        for size in (64, 128):
            out = subprocess.run([sys.executable, __file__, "--peak", str(size)]
                                 + ["--train"] * train, env=env, capture_output=True,
                                 text=True, check=True)
            peaks[size] = float(out.stdout.split()[-1])
        print(f"  {'fwd+bwd' if train else 'forward'}: 64x64 {peaks[64]:.1f}, "
              f"128x128 {peaks[128]:.1f}, ratio {peaks[128] / peaks[64]:.2f} "
              "(4.00 = linear in tokens)")


def _run(backend, q, k, v, rpb, d=1):
    return neighborhood_attention_2d(q, k, v, KERNEL, d, rpb, backend=backend)


def cuda_check():
    print("GPU correctness vs the torch backend in float64 (max |err| / max |ref|)")
    for size, d, batch in ((56, 2, 2), (13, 1, 3), (24, 8, 1)):  # 24 < 7*8: small-input policy
        q, k, v, rpb = _inputs(batch, size, 2, HEAD_DIM, device="cuda", grad=True)
        grad_out = torch.randn_like(q)

        def grads(backend, cast):
            ins = [t.detach().to(cast).requires_grad_() for t in (q, k, v, rpb)]
            out = _run(backend, *ins, d=d)
            return [out] + list(torch.autograd.grad(out, ins, grad_out.to(cast)))

        ref = grads("torch", torch.float64)
        for backend in ("triton", "flex"):
            try:
                got = grads(backend, torch.float32)
                errs = [((a.double() - b).abs().max() / b.abs().max()).item()
                        for a, b in zip(got, ref)]
                print(f"  {backend:6} {size}x{size} d={d}: out {errs[0]:.1e}  dq {errs[1]:.1e}"
                      f"  dk {errs[2]:.1e}  dv {errs[3]:.1e}  drpb {errs[4]:.1e}")
            except Exception as err:  # report and go on to the timings
                print(f"  {backend:6} {size}x{size} d={d}: FAILED {type(err).__name__}: {err}")


def cuda_times(batch, heads):
    from triton.testing import do_bench
    print(f"\nGPU times (ms, median), B={batch} heads={heads} head_dim={HEAD_DIM} k={KERNEL} d=1: "
          "forward / forward+backward")
    rows = [("triton", True), ("triton", False), ("flex", True), ("natten", False),
            ("torch", True)]
    for dtype in (torch.float16, torch.bfloat16):
        for size in (56, 128):
            q, k, v, rpb = _inputs(batch, size, heads, HEAD_DIM, dtype=dtype, device="cuda",
                                   grad=True)
            grad_out = torch.randn_like(q)
            cells = []
            for backend, with_rpb in rows:
                bias = rpb if with_rpb else None
                wrt = (q, k, v, rpb) if with_rpb else (q, k, v)
                fwd = lambda: _run(backend, q, k, v, bias)
                step = lambda: torch.autograd.grad(fwd(), wrt, grad_out)
                try:
                    cells.append(f"{backend}{'+rpb' if with_rpb else ''} "
                                 f"{do_bench(fwd, return_mode='median'):.3f}/"
                                 f"{do_bench(step, return_mode='median'):.3f}")
                except Exception as err:  # report the failure in its cell
                    cells.append(f"{backend}{'+rpb' if with_rpb else ''} "
                                 f"{type(err).__name__}: {str(err)[:120]}")
                torch.cuda.empty_cache()
            print(f"  {str(dtype)[6:]:8} {size:>3}x{size:<3} " + " | ".join(cells), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cuda", action="store_true", help="GPU checks and timings")
    parser.add_argument("--reps", type=int, default=15, help="CPU timing repetitions")
    parser.add_argument("--batch", type=int, default=4, help="GPU timing batch")
    parser.add_argument("--heads", type=int, default=4, help="GPU timing heads")
    parser.add_argument("--peak", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--train", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak:
        measure_peak(args.peak, args.train)
    elif args.cuda:
        print(torch.cuda.get_device_name(), "torch", torch.__version__)
        cuda_check()
        cuda_times(args.batch, args.heads)
    else:
        cpu_times(args.reps)
        cpu_memory()


if __name__ == "__main__":
    main()
