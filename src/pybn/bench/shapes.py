"""The benchmark's shapes, their layouts and the targets pybn is held to."""

from __future__ import annotations

from dataclasses import dataclass
from math import prod


@dataclass(frozen=True)
class Shape:
    """One benchmark shape.

    ``logical`` is the NCHW (or N, C) shape the layer sees; ``channels_last``
    stores the same data as NHWC with ``axis=-1`` (torch gets the NCHW-logical
    tensor in ``torch.channels_last`` memory format).
    """

    name: str
    logical: tuple[int, ...]
    channels_last: bool = False
    out: bool = False            # time pybn (and torch's out= variant) with preallocated outputs
    target_kind: str = "bound"   # "bound": % of bound; "torch": ratio torch/pybn
    target: float = 80.0
    note: str = ""

    @property
    def array_shape(self) -> tuple[int, ...]:
        if self.channels_last:
            n, c, *spatial = self.logical
            return (n, *spatial, c)
        return tuple(self.logical)

    @property
    def axis(self) -> int:
        return -1 if self.channels_last else 1

    @property
    def channels(self) -> int:
        return self.logical[1]

    @property
    def size(self) -> int:
        return prod(self.logical)

    @property
    def nbytes(self) -> int:
        return 4 * self.size

    @property
    def layout(self) -> str:
        if len(self.logical) == 2:
            return "NC"
        return "NHWC" if self.channels_last else "NCHW"

    def describe(self) -> str:
        dims = "x".join(str(d) for d in self.array_shape)
        return f"{dims} {self.layout} axis={self.axis} ({self.nbytes / 1e6:.1f} MB)"

    def target_text(self) -> str:
        if self.target_kind == "bound":
            return f">={self.target:.0f}% bound"
        return f">={self.target:.1f}x torch"


SHAPES = (
    Shape("A", (32, 64, 56, 56), target_kind="bound", target=80.0,
          note="ResNet-sized activation, NCHW"),
    Shape("A'", (32, 64, 56, 56), channels_last=True, target_kind="bound", target=80.0,
          note="the same data channels-last"),
    Shape("B", (256, 1024), target_kind="torch", target=1.3,
          note="BatchNorm1d after a Linear"),
    Shape("M", (32, 256, 14, 14), target_kind="torch", target=1.3,
          note="a ResNet 14x14 stage: x and y fit the L3 together"),
    Shape("L", (64, 128, 56, 56), out=True, target_kind="bound", target=85.0,
          note="past the L3 cache, NCHW, preallocated outputs"),
    Shape("L'", (64, 128, 56, 56), channels_last=True, out=True, target_kind="bound", target=85.0,
          note="the same data channels-last, preallocated outputs"),
    Shape("T", (1, 64, 8, 8), target_kind="torch", target=1.0,
          note="tiny: call overhead"),
)

SHAPE = {s.name: s for s in SHAPES}

_ALIASES: dict[str, Shape] = {}
for _s in SHAPES:
    _key = _s.name.lower()
    _ALIASES[_key] = _s
    if _key.endswith("'"):
        base = _key[:-1]
        for suffix in ("_cl", "cl", "-cl", "p", "_nhwc", "nhwc"):
            _ALIASES[base + suffix] = _s


def shape_names() -> list[str]:
    return [s.name for s in SHAPES]


def parse_shapes(spec: str | None) -> list[Shape]:
    """``"A,A',L"`` -> shapes, in the order given. ``A_cl`` / ``Acl`` alias ``A'``."""
    if not spec:
        return list(SHAPES)
    out: list[Shape] = []
    for token in spec.split(","):
        token = token.strip().strip('"')
        if not token:
            continue
        shape = _ALIASES.get(token.lower())
        if shape is None:
            raise ValueError(
                f"unknown shape {token!r}; choose from {', '.join(shape_names())} "
                "(A_cl / L_cl also name A' / L')")
        if shape not in out:
            out.append(shape)
    if not out:
        raise ValueError("--shapes selected no shape")
    return out
