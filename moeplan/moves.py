"""Move: one step of turning a placement into another, the one type a Plan, the incremental
re-placement solver, the elastic scheduler and the live runtime share.

Kinds:

* ``transfer``: expert ``expert`` of MoE layer ``layer`` is copied from slot ``src_slot`` of
  device ``src`` into slot ``dst_slot`` of device ``dst`` (``nbytes`` cross the link);
* ``local_copy``: the same inside one device (``src == dst``, no bytes cross);
* ``bring_up``: a joining device ``dst`` receives the non-expert weights (``nbytes``) from
  ``src``; ``layer``, ``expert`` and the slots are −1.

Moves of one ``round`` may run concurrently; rounds run in order. ``evacuation``: no device that
stays held the expert (it had to leave a device being removed). Device indices are the plan's:
in a scaling step, the old devices then the joining ones.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from moeplan.errors import InputError
from moeplan.io import Fields

if TYPE_CHECKING:
    from moeplan.plan import Placement

MOVE_KINDS = ("transfer", "local_copy", "bring_up")


@dataclass(frozen=True)
class Move:
    """See the module docstring. Bytes in ``nbytes``."""

    kind: str
    layer: int
    expert: int
    src: int
    src_slot: int
    dst: int
    dst_slot: int
    nbytes: float = 0.0
    round: int = 0
    evacuation: bool = False

    @classmethod
    def of_expert(cls, layer: int, expert: int, src: int, src_slot: int, dst: int, dst_slot: int, nbytes: float = 0.0,
               round: int = 0, evacuation: bool = False) -> "Move":
        """An expert copy: a transfer, or a local copy when ``src == dst`` (then no bytes)."""
        local = src == dst
        return cls("local_copy" if local else "transfer", int(layer), int(expert), int(src), int(src_slot), int(dst),
                   int(dst_slot), 0.0 if local else float(nbytes), int(round), bool(evacuation))

    @property
    def is_transfer(self) -> bool:
        return self.kind == "transfer"

    def validate(self, devices: int, slots: int, layers: int, experts: int, source: str, index: int) -> "Move":
        """Raise InputError unless the move fits a cluster of ``devices`` over ``layers`` MoE
        layers of ``experts`` experts, writing into one of the ``slots`` slots per device of the
        placement it leads to (``devices`` counts joining devices too). The source slot belongs to
        the placement the moves start from, which :func:`check_moves` checks against."""
        def bad(fld: str, message: str) -> InputError:
            return InputError(message, source=source, field=f"moves[{index}].{fld}")

        if self.kind not in MOVE_KINDS:
            raise bad("kind", f"unknown kind {self.kind!r}; use one of {', '.join(MOVE_KINDS)}")
        for name in ("src", "dst"):
            if not 0 <= getattr(self, name) < devices:
                raise bad(name, f"device {getattr(self, name)} outside 0..{devices - 1}")
        if self.nbytes < 0 or self.round < 0:
            raise bad("bytes" if self.nbytes < 0 else "round", "must be ≥ 0")
        if self.kind == "bring_up":
            return self
        if (self.src == self.dst) != (self.kind == "local_copy"):
            raise bad("kind", f"a {self.kind} from device {self.src} to {self.dst}")
        if not 0 <= self.layer < layers:
            raise bad("layer", f"MoE layer {self.layer} outside 0..{layers - 1}")
        if not 0 <= self.expert < experts:
            raise bad("expert", f"expert {self.expert} outside 0..{experts - 1}")
        if self.src_slot < 0:
            raise bad("src_slot", f"slot {self.src_slot} is negative")
        if not 0 <= self.dst_slot < slots:
            raise bad("slot", f"slot {self.dst_slot} outside 0..{slots - 1}")
        return self

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "round": self.round, "src": self.src, "dst": self.dst,
                             "bytes": self.nbytes}
        if self.kind != "bring_up":
            d.update(layer=self.layer, expert=self.expert, src_slot=self.src_slot, slot=self.dst_slot,
                     evacuation=self.evacuation)
        return d

    @classmethod
    def from_dict(cls, data: Any, source: str, index: int) -> "Move":
        f = Fields(data, source, f"moves[{index}].")
        kind = f.str("kind", "transfer", choices=MOVE_KINDS)
        if kind == "bring_up":
            return cls(kind, -1, -1, f.int("src", minimum=0), -1, f.int("dst", minimum=0), -1,
                       f.float("bytes", 0.0, minimum=0.0), f.int("round", 0, minimum=0))
        return cls(kind, f.int("layer", minimum=0), f.int("expert", minimum=0), f.int("src", minimum=0),
                   f.int("src_slot", minimum=0), f.int("dst", minimum=0), f.int("slot", minimum=0),
                   f.float("bytes", 0.0, minimum=0.0), f.int("round", 0, minimum=0), f.bool("evacuation", False))


def diff_moves(old: "Placement", new: "Placement", expert_bytes: float,
               layers: Sequence[int] | None = None) -> tuple[Move, ...]:
    """The moves that turn ``old`` into ``new`` (on ``layers``, default all), reading every
    source from ``old`` — what a runtime that stages copies and commits at once can execute.

    A slot whose expert is unchanged stays; a slot whose expert its device already holds in
    ``old`` is a local copy; every other slot is a transfer from a device holding the expert in
    ``old``: one on the destination's node first, then the one with the fewest sends so far, then
    the lowest index. Devices are numbered as in ``old`` then, beyond it, as in ``new`` (joining
    devices hold nothing in ``old``). All moves are round 0."""
    moves: list[Move] = []
    sends = np.zeros(max(old.num_devices, new.num_devices), dtype=np.int64)
    per = new.devices_per_node
    for layer in (range(new.num_layers) if layers is None else layers):
        before, after = old.slot_expert[layer], new.slot_expert[layer]
        for dst in range(new.num_devices):
            held = before[dst] if dst < old.num_devices else np.zeros(0, dtype=before.dtype)
            for slot, expert in enumerate(after[dst]):
                if slot < held.size and held[slot] == expert:
                    continue
                own = np.flatnonzero(held == expert)
                if own.size:
                    moves.append(Move.of_expert(layer, expert, dst, own[0], dst, slot))
                    continue
                holders = np.argwhere(before == expert)
                key = np.lexsort((holders[:, 0], sends[holders[:, 0]], holders[:, 0] // per != dst // per))
                src, src_slot = holders[key[0]]
                sends[src] += 1
                moves.append(Move.of_expert(layer, expert, src, src_slot, dst, slot, expert_bytes))
    return tuple(moves)


def check_moves(old: "Placement", new: "Placement", moves: Sequence[Move], source: str = "plan") -> None:
    """Raise InputError unless ``moves`` (sources read from ``old``) turn ``old`` into ``new``:
    every source slot holds its expert in ``old`` and, applied, the moves leave exactly ``new``
    (slots a move does not touch keep what ``old`` had there)."""
    shape = new.slot_expert.shape
    result = np.full(shape, -1, dtype=np.int64)
    keep_d, keep_s = min(old.num_devices, shape[1]), min(old.slots_per_device, shape[2])
    result[:, :keep_d, :keep_s] = old.slot_expert[:, :keep_d, :keep_s]
    for i, m in enumerate(moves):
        if m.kind == "bring_up":
            continue
        if not (m.src < old.num_devices and m.src_slot < old.slots_per_device
                and old.slot_expert[m.layer, m.src, m.src_slot] == m.expert):
            raise InputError(f"move {i} reads expert {m.expert} of layer {m.layer} from device {m.src} slot "
                             f"{m.src_slot}, which does not hold it in the running placement", source=source,
                             field=f"moves[{i}]", fix="apply the plan to the placement it was solved from")
        result[m.layer, m.dst, m.dst_slot] = m.expert
    if not np.array_equal(result, new.slot_expert):
        layer, dev, slot = (int(v) for v in np.argwhere(result != new.slot_expert)[0])
        raise InputError(f"the moves leave expert {result[layer, dev, slot]} in layer {layer}, device {dev}, slot "
                         f"{slot}, the plan's placement has {new.slot_expert[layer, dev, slot]} there",
                         source=source, field="moves", fix="apply the plan to the placement it was solved from")
