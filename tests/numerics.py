"""How the tests measure numerical error: against the scale of a whole tensor (or of a family
of tensors), never entry by entry, so entries that are zero or tiny in the reference are judged
by the magnitude of the quantity they belong to."""

import numpy as np


def rel_err(got, want, floor: float = 0.0) -> float:
    """max|got - want| / max(max|want|, floor): the worst error relative to the reference's
    largest entry. `floor` is the scale to judge against where the whole reference can vanish
    (a gradient that is exactly zero): its error is then the rounding of the terms it is made
    of, which only their magnitude can measure."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise ValueError(f"shapes differ: {got.shape} vs {want.shape}")
    scale = max(float(np.abs(want).max(initial=0.0)), floor)
    if scale == 0:
        raise ValueError("the reference is all zero and no floor was given: the error has no "
                         "scale to be relative to")
    return float(np.abs(got - want).max(initial=0.0)) / scale


def family_rel_errs(got, want, fraction: float = 0.1) -> list[float]:
    """rel_err of each tensor of a family (the gradients with respect to q, k and v), with the
    floor `fraction` of the family's largest reference entry: a member whose reference is
    far below the others (one query, one key: a constant softmax, so dq = dk = 0 exactly) is
    judged at the scale of the terms it shares with them; a member at least `fraction` of
    the family's scale is judged exactly as by rel_err alone."""
    floor = fraction * max(float(np.abs(np.asarray(w, np.float64)).max()) for w in want)
    return [rel_err(g, w, floor) for g, w in zip(got, want, strict=True)]
