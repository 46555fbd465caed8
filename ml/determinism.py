"""Repeatable CPU runs: the same command gives the same CSV, on this machine and on another.

Why two runs of one command differed (issue 12): within one process and one thread count,
training here is already bit-for-bit repeatable (every epoch re-seeds torch's generator and the
loader's; checked at 32 and 64 px with 1 and 2 threads). What changes the numbers is

- the **thread count**: a reduction split over 1 or 2 threads adds in another order, so a run
  with another ``torch.get_num_threads()`` (another machine, ``OMP_NUM_THREADS``, a test's
  fixture) drifts from the first epoch on, and training amplifies the drift;
- the **instruction set** the kernels dispatch to: torch (ATen), oneDNN (convolutions) and MKL
  (matrix products) pick AVX-512 or AVX2 code by the CPU they find, and those round differently.
  The project's sessions do not always land on the same CPU model, so two runs of the same
  command on two days could differ although nothing in the code did.

:func:`make_deterministic` pins both: a fixed thread count, and the AVX2 code paths (which every
x86-64 CPU of the last decade has) through the libraries' own switches, which take effect when
set before the first kernel runs. It also turns on ``torch.use_deterministic_algorithms`` (an
error, instead of a silent difference, if a non-deterministic kernel is ever reached; on a GPU
it needs ``CUBLAS_WORKSPACE_CONFIG``, set here too). The cost: AVX2 kernels on an AVX-512 CPU.
"""

from __future__ import annotations

import os

import torch

# The libraries' documented switches: ATen's dispatch, oneDNN's ISA cap, MKL's conditional
# numerical reproducibility, and cuBLAS's fixed workspace (for deterministic GPU matmuls).
PORTABLE_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2",
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
}
DEFAULT_THREADS = 2


def make_deterministic(threads: int = DEFAULT_THREADS) -> dict[str, object]:
    """Pin the thread count and the kernels' instruction set; call before any torch work in
    the process. Returns what it set (to record beside the results)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    for key, value in PORTABLE_ENV.items():
        os.environ.setdefault(key, value)
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        raise RuntimeError(
            f"torch already dispatches to {capability} kernels: call make_deterministic "
            "before any torch work in the process"
        )
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    return {
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **{k: os.environ[k] for k in PORTABLE_ENV},
    }
