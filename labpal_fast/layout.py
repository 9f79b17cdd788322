"""Index layouts shared by every backend: one named source for each small device vector.

The direction op returns its partial sums as one fp64 vector, the abandon check a bit set,
the Triton line kernels read the step rule's constants from one packed vector, and a
measurement's record is one fp64 vector on the device until the host reads it. The
positions below are that contract; kernels get them as compile-time constants.
"""
from __future__ import annotations

from enum import IntEnum, IntFlag


class Partial(IntEnum):
    """The direction op's partial sums (fp64, in this order)."""
    DD = 0      # ‖d‖²
    GD = 1      # ⟨ḡ, d⟩        (measurements only)
    WD_DD = 2   # Σ wd·‖d‖²     per segment, summed
    WD_TD = 3   # Σ wd·⟨θ, d⟩
    WD_TT = 4   # Σ wd·‖θ‖²


NPART = len(Partial)


class Abandon(IntFlag):
    """Why a measurement is abandoned after its direction is formed (0: it goes on)."""
    SLOPE = 1   # the directional derivative −⟨ḡ,d⟩/‖d‖ is not negative
    NORM = 2    # ‖d‖ outside direction_norm_range, or not finite
    OVERFLOW = 4  # under loss scaling: the scaled gradient overflowed (alone, not with the others)


ABANDON_REASONS = {
    int(Abandon.SLOPE): "abandoned: directional derivative not negative",
    int(Abandon.NORM): "abandoned: direction norm outside direction_norm_range or not finite",
    int(Abandon.SLOPE | Abandon.NORM):
        "abandoned: directional derivative not negative and direction norm out of range",
    int(Abandon.OVERFLOW):
        "abandoned: gradient not finite under loss scaling (an overflow; a dynamic loss_scale "
        "is halved)",
}


class Const(IntEnum):
    """The step rule's constants, packed in one fp64 device vector for the line kernels."""
    EPS = 0
    NORM_LOW = 1
    NORM_HIGH = 2
    ALPHA = 3       # update_step_adaptation × step_factor (× the step check's factor)
    MAX_STEP = 4    # max_step_size
    CLIP_MAX = 5    # max_grad_norm (0 when clipping is off)
    CLIP_EPS = 6    # added to ‖ḡ‖ in the clipping factor (torch's clip_grad_norm_ adds 1e-6)


NCONST = len(Const)

# A measurement's record on the device: these scalars, then the partials, the per-position
# loss sums and sample counts.
RECORD_SCALARS = ("a", "b", "c", "s_min", "s_new", "eta_new", "s_upd", "eta")
REC_PARTIALS = len(RECORD_SCALARS)
REC_SUMS = REC_PARTIALS + NPART


def record_size(npos: int) -> int:
    return REC_SUMS + 2 * npos
