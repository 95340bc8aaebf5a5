"""Minimal, upstream-ready reproduction: torch's oneDNN (mkldnn) convolution backward corrupts the heap
on AVX2-only x86-64 CPUs for a strided 1×1 convolution whose input has channels-last strides.

Seen with torch 2.13.0 (CPU wheel): on an AMD EPYC without AVX-512 (issue 19), and on an AVX-512 Xeon
limited to AVX2 with the two variables below — "double free or corruption (!prev)", "corrupted
double-linked list", SIGSEGV/SIGABRT inside ``.backward()``. The same loop with ``--contiguous``
(``x.contiguous()``) runs clean, as does the unlimited AVX-512 path.

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python3 tools/repro_onednn_channels_last.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python3 tools/repro_onednn_channels_last.py --contiguous

It prints "ok" at the end; a native crash is the bug. Depends only on torch.
"""

from __future__ import annotations

import argparse
import faulthandler

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contiguous", action="store_true", help="make the input contiguous (the workaround)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    faulthandler.enable()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"mkldnn {torch.backends.mkldnn.is_available()}", flush=True)
    # [n, H, W, C] images permuted to [n, C, H, W]: stride (768, 1, 48, 3) — channels-last in memory
    images = torch.rand(args.batch, 16, 16, 3).permute(0, 3, 1, 2)
    if args.contiguous:
        images = images.contiguous()
    print(f"input shape {tuple(images.shape)} stride {images.stride()}", flush=True)
    conv = torch.nn.Conv2d(3, 8, kernel_size=1, stride=2, bias=False)  # a ResNet downsampling shortcut
    for _ in range(args.steps):
        conv.zero_grad()
        conv(images).sum().backward()
    print("ok")


if __name__ == "__main__":
    main()
