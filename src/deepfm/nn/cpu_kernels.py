"""Fused CPU kernels of the training step, with PyTorch references that give the same bits.

Two things dominate a DeepFM-D step on CPU once the matmuls are done (BENCHMARKS.md, "Training
speed"): the element-wise passes around each hidden layer (ReLU, the dropout mask, its scaling,
and their backward) and the scatter of the embedding gradient. Here each is one pass:

* :func:`dropout` and :func:`relu_dropout` — inverted dropout (after a ReLU: both in one pass),
  forward and backward one pass each. The mask comes from a counter-based random stream
  (splitmix64's mixer over word indices, two 32-bit draws per word) keyed by one number drawn
  from PyTorch's generator per call: every thread can draw any element, no mask is stored (the
  backward recomputes it from the key, or reads ``out > 0`` after a ReLU), and
  ``torch.manual_seed`` fixes the result as before. PyTorch's own CPU masks come from one
  Mersenne Twister, one thread: 8 ms per 4096x400 activation, the fused pass 1.2–1.6 ms.
* :func:`gather_rows` — ``weight[ids]`` whose backward scatters the rows' gradients into a
  zeroed table in index order (``index_add_``'s order), each thread owning a range of rows.

The kernels are C (``cpu_kernels.c``), compiled on first use with the system's C compiler into
``$DEEPFM_CACHE`` (default ``~/.cache/deepfm``) and loaded with :mod:`ctypes`. Where there is no
compiler, the build fails, or ``DEEPFM_CPU_KERNELS=0``, the PyTorch references below run instead
with identical results (tests compare them bit for bit), only slower.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
#: splitmix64's constants (the C source holds the same)
GOLDEN = 0x9E3779B97F4A7C15
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
LANES = 2  # 32-bit draws per 64-bit word
DRAWS = 1 << 32


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 that holds it (PyTorch has no uint64 arithmetic)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (``>>`` on int64 is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def random_words(key: int, words: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Words ``0 … words-1`` of the stream ``key`` (int64 bit patterns): ``mix(key + (w+1)·φ)``."""
    z = torch.arange(1, words + 1, dtype=torch.int64, device=device)
    z.mul_(_signed(GOLDEN)).add_(_signed(key))
    z.bitwise_xor_(_shift_right(z, 30)).mul_(_signed(MIX1))
    z.bitwise_xor_(_shift_right(z, 27)).mul_(_signed(MIX2))
    return z.bitwise_xor_(_shift_right(z, 31))


def keep_cut(p: float) -> tuple[int, float]:
    """(cut, scale) for drop rate ``p``: a unit is kept when its signed 32-bit draw (uniform on
    -2^31 … 2^31-1) is ≥ ``cut``, i.e. with probability ``1 - round(p·2^32)/2^32`` (p within
    2^-33 of the asked one), and kept units are scaled by the inverse of that probability
    (``1/(1-p)`` to float32 precision)."""
    dropped = round(p * DRAWS)
    return dropped - DRAWS // 2, DRAWS / (DRAWS - dropped) if dropped < DRAWS else 0.0


def keep_mask(key: int, n: int, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """The kernel's dropout decisions for elements ``0 … n-1`` (bool ``[n]``, True = kept)."""
    cut, _ = keep_cut(p)
    if cut >= DRAWS // 2:  # p = 1
        return torch.zeros(n, dtype=torch.bool, device=device)
    words = random_words(key, -(-n // LANES), device)
    return words.view(torch.int32)[:n] >= cut  # little-endian lanes: lane j = bits 32j…32j+31


def draw_key() -> int:
    """A 63-bit stream key from PyTorch's default generator (seeded by ``torch.manual_seed``)."""
    return int(torch.empty((), dtype=torch.int64).random_())


# -- the compiled library ---------------------------------------------------------------------


def _flags() -> list[str]:
    flags = ["-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off"]
    flags += ["-fno-trapping-math"]  # lets selects vectorise; results are unchanged
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def cache_dir() -> Path:
    root = os.environ.get("DEEPFM_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "deepfm"
    )
    return Path(root) / "kernels"


def _build(compiler: str) -> Path:
    """Compile the kernels (once per source, flags and compiler; atomic: built under a
    temporary name, then renamed, so concurrent processes never load a partial file)."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    flags = _flags()
    digest = hashlib.sha256(
        "\0".join([SOURCE.read_text(), version, *flags, platform.machine()]).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"cpu_kernels-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run(
            [compiler, *flags, str(SOURCE), "-o", str(built)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        os.replace(built, target)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (then the PyTorch references run). Built at most once per
    process; a failure warns once and is not retried."""
    if os.environ.get("DEEPFM_CPU_KERNELS", "1") == "0" or sys.byteorder != "little":
        return None
    compiler = _compiler()
    if compiler is None:
        warnings.warn(
            "no C compiler found (set CC): the CPU training step runs its PyTorch fallback",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        warnings.warn(
            f"the CPU kernels could not be built ({str(detail).strip()[:500]}): the training "
            "step runs its PyTorch fallback",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    pointer, n, f32, u64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_uint64
    for name in ("dropout_apply", "relu_dropout_forward"):
        getattr(lib, name).argtypes = [pointer, pointer, n, u64, n, f32]
    lib.relu_dropout_backward.argtypes = [pointer, pointer, pointer, n, f32]
    for name in ("scatter_rows_i32", "scatter_rows_i64"):
        getattr(lib, name).argtypes = [pointer, pointer, n, n, pointer, n]
    for name in ("dropout_apply", "relu_dropout_forward", "relu_dropout_backward"):
        getattr(lib, name).restype = None
    return lib


def _usable(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The library when every tensor is a contiguous CPU float32/int tensor it can take."""
    if not all(t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        return None
    return library()


# -- dropout, and ReLU + dropout ----------------------------------------------------------------


def _float_kernel(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    return _usable(*tensors) if all(t.dtype == torch.float32 for t in tensors) else None


def _apply_mask(x: torch.Tensor, key: int, p: float) -> torch.Tensor:
    """``x · scale`` where the stream ``key`` keeps an element, else 0 (forward and backward
    of dropout: the mask is recomputed from the key, never stored)."""
    cut, scale = keep_cut(p)
    x = x.contiguous()
    lib = _float_kernel(x)
    if lib is None:
        keep = keep_mask(key, x.numel(), p, x.device).view(x.shape)
        return torch.where(keep, x * scale, 0.0)
    out = torch.empty_like(x)
    lib.dropout_apply(x.data_ptr(), out.data_ptr(), x.numel(), key, cut, scale)
    return out


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, key: int) -> torch.Tensor:
        ctx.p, ctx.key = p, key
        return _apply_mask(x, key, p)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _apply_mask(grad, ctx.key, ctx.p), None, None


class _ReluDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, p: float, key: int) -> torch.Tensor:
        cut, scale = keep_cut(p)
        y = y.contiguous()
        lib = _float_kernel(y)
        if lib is None:
            keep = keep_mask(key, y.numel(), p, y.device).view(y.shape)
            out = torch.where(keep, torch.relu(y) * scale, 0.0)
        else:
            out = torch.empty_like(y)
            lib.relu_dropout_forward(y.data_ptr(), out.data_ptr(), y.numel(), key, cut, scale)
        ctx.save_for_backward(out)  # out > 0: kept and active (the next layer keeps it anyway)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (out,) = ctx.saved_tensors
        grad = grad.contiguous()
        lib = _float_kernel(grad, out)
        if lib is None:
            return torch.where(out > 0, grad * ctx.scale, 0.0), None, None
        grad_in = torch.empty_like(grad)
        lib.relu_dropout_backward(
            grad.data_ptr(), out.data_ptr(), grad_in.data_ptr(), grad.numel(), ctx.scale
        )
        return grad_in, None, None


def dropout(x: torch.Tensor, p: float, key: int | None = None) -> torch.Tensor:
    """Inverted dropout in training: each element kept with probability ``1 - p`` (quantised
    to 2^-32, see :func:`keep_cut`) and scaled by its inverse. ``key`` picks the random stream
    (default: drawn from PyTorch's generator)."""
    return _Dropout.apply(x, p, draw_key() if key is None else key)


def relu_dropout(y: torch.Tensor, p: float, key: int | None = None) -> torch.Tensor:
    """``dropout(relu(y), p)`` (the same stream as :func:`dropout` for the same key) in one
    pass forward and one backward."""
    return _ReluDropout.apply(y, p, draw_key() if key is None else key)


# -- row gather with a scatter backward -------------------------------------------------------


def scatter_add_rows(ids: torch.Tensor, rows: torch.Tensor, table_rows: int) -> torch.Tensor:
    """``zeros(table_rows, dim).index_add_(0, ids, rows)``: ``ids [n]``, ``rows [n, dim]`` ->
    ``[table_rows, dim]``, each row summed in index order (one threaded pass on CPU)."""
    rows = rows.contiguous()
    dim = rows.shape[1]
    lib = _float_kernel(rows) and _usable(ids)
    if lib is None or ids.dtype not in (torch.int32, torch.int64):
        return rows.new_zeros(table_rows, dim).index_add_(0, ids, rows)
    scatter = lib.scatter_rows_i32 if ids.dtype == torch.int32 else lib.scatter_rows_i64
    table = rows.new_empty(table_rows, dim)
    scatter(ids.data_ptr(), rows.data_ptr(), ids.numel(), dim, table.data_ptr(), table_rows)
    return table


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        ctx.save_for_backward(flat)
        ctx.table_rows = weight.shape[0]
        return weight.index_select(0, flat)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        return scatter_add_rows(ids, grad, ctx.table_rows), None


def gather_rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``weight[ids.reshape(-1)]``: ``[rows, dim]``, ``ids [*] -> [numel, dim]``; the backward
    is a dense ``[rows, dim]`` gradient summed in index order."""
    return _GatherRows.apply(weight, ids)
