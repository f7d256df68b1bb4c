"""Local expert compute: SwiGLU FFNs of one device's slots over tokens sorted by slot.

Two kernels, both selectable:

* ``loop``: one GEMM sequence per expert with tokens (gate/up GEMM, activation, down GEMM).
* ``grouped``: all experts in two grouped GEMMs. It uses ``torch._grouped_mm`` where torch has it
  for this device and dtype (the CUTLASS kernel for bf16 on Hopper; torch's own per-group loop on
  CPU), checked at runtime with a probe call; otherwise a padded ``torch.bmm`` over
  [slots, max tokens, hidden].

Inputs: ``x`` [tokens, hidden] sorted by slot, its :class:`Groups` (tokens per slot, prepared
by :meth:`ExpertKernel.groups`), stacked weights ``w13`` [slots, 2·ffn, hidden] and ``w2``
[slots, hidden, ffn]. Output [tokens, hidden].
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from moeplan.errors import InputError

KERNELS = ("grouped", "loop")


def check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise InputError(f"kernel must be grouped or loop, got {kernel!r}", field="kernel")
    return kernel


@lru_cache(maxsize=None)
def grouped_mm_works(device_type: str, device_index: int | None, dtype: torch.dtype) -> bool:
    """True when ``torch._grouped_mm`` exists and runs for this device and dtype (probe call)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    try:
        a = torch.ones(16, 16, dtype=dtype, device=device)
        b = torch.ones(2, 16, 16, dtype=dtype, device=device)
        out = torch._grouped_mm(a, b.transpose(-2, -1), offs=torch.tensor([8, 16], dtype=torch.int32, device=device))
        return bool(torch.all(out == 16).item())
    except (RuntimeError, NotImplementedError):
        return False


def grouped_impl(device: torch.device, dtype: torch.dtype, hidden: int, ffn: int) -> str:
    """Which implementation the grouped kernel uses here: "torch._grouped_mm" or "bmm" (padded)."""
    row_aligned = all(n * torch.empty((), dtype=dtype).element_size() % 16 == 0 for n in (hidden, ffn))
    if row_aligned and grouped_mm_works(device.type, device.index, dtype):
        return "torch._grouped_mm"
    return "bmm"


@dataclass(frozen=True)
class Groups:
    """How slot-sorted rows split into slots: ``counts`` tokens per slot (host ints; None when
    the grouping was built on the device by :meth:`ExpertKernel.sorted_groups`) plus what the
    chosen implementation needs on the device (group ends for ``torch._grouped_mm``; each row's
    slot and position for the padded bmm). Built once per batch, outside any timed kernel."""

    counts: list[int] | None
    offs: torch.Tensor | None = None
    slot_of_row: torch.Tensor | None = None
    pos: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        """Rows of all slots (reads the last group end back from the device when ``counts`` is None)."""
        if self.counts is None:
            return int(self.offs[-1]) if self.offs is not None and len(self.offs) else 0
        return sum(self.counts)


class ExpertKernel:
    """Runs a device's experts over slot-sorted tokens with the chosen kernel."""

    def __init__(self, kernel: str, device: torch.device, dtype: torch.dtype, hidden: int, ffn: int) -> None:
        self.kernel = check_kernel(kernel)
        self.device = device
        self.ffn = ffn
        self.impl = grouped_impl(device, dtype, hidden, ffn) if kernel == "grouped" else "loop"

    def groups(self, counts: list[int]) -> Groups:
        """The grouping of rows for ``counts`` tokens per slot."""
        counts = [int(c) for c in counts]
        if self.impl == "torch._grouped_mm":
            offs = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(self.device)
            return Groups(counts, offs=offs)
        if self.impl == "bmm":
            count_t = torch.tensor(counts, dtype=torch.int64, device=self.device)
            rows = sum(counts)
            slot_of_row = torch.repeat_interleave(torch.arange(len(counts), device=self.device), count_t,
                                                  output_size=rows)
            starts = torch.cumsum(count_t, 0) - count_t
            pos = torch.arange(rows, device=self.device) - starts[slot_of_row]
            return Groups(counts, slot_of_row=slot_of_row, pos=pos)
        return Groups(counts)

    def sorted_groups(self, slot_sorted: torch.Tensor, slots: int) -> Groups:
        """The grouping of rows whose slot ids ``slot_sorted`` [rows] (int64, on the device) are in
        ascending order, over ``slots`` slots. For ``torch._grouped_mm`` the group ends are found on
        the device (a binary search of each slot's last row), so the layer never waits for the
        host and consecutive layers queue up on the GPU; the loop and the padded bmm need the
        counts on the host, which costs one synchronisation, as :meth:`groups` always did."""
        if self.impl == "torch._grouped_mm":
            ids = torch.arange(slots, device=slot_sorted.device, dtype=slot_sorted.dtype)
            return Groups(None, offs=torch.searchsorted(slot_sorted, ids, right=True, out_int32=True))
        return self.groups(torch.bincount(slot_sorted, minlength=slots).tolist())

    def __call__(self, x: torch.Tensor, groups: Groups, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        """SwiGLU of every row of ``x`` [rows, hidden] with its slot's expert."""
        if x.shape[0] == 0:
            return torch.empty_like(x)
        if groups.offs is not None:
            h = torch._grouped_mm(x, w13.transpose(-2, -1), offs=groups.offs)
            return torch._grouped_mm(self._swiglu(h), w2.transpose(-2, -1), offs=groups.offs)
        if groups.slot_of_row is not None and groups.pos is not None:
            padded = x.new_zeros(len(groups.counts), max(groups.counts), x.shape[1])
            padded[groups.slot_of_row, groups.pos] = x
            y = torch.bmm(self._swiglu(torch.bmm(padded, w13.transpose(1, 2))), w2.transpose(1, 2))
            return y[groups.slot_of_row, groups.pos]
        out = torch.empty_like(x)
        start = 0
        for s, c in enumerate(groups.counts):
            if c:
                seg = x[start:start + c]
                out[start:start + c] = self._swiglu(seg @ w13[s].T) @ w2[s].T
                start += c
        return out

    def _swiglu(self, h: torch.Tensor) -> torch.Tensor:
        return F.silu(h[..., :self.ffn]) * h[..., self.ffn:]
