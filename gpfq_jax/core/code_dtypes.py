"""The integer dtypes of codes: in memory (int8 / int16) and in checkpoints (down to int4)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from gpfq_jax.core.alphabets import Alphabet


def int_dtype(alphabet: Alphabet) -> np.dtype:
    """The in-memory dtype of an alphabet's codes: int8, or int16 when the codes need it."""
    if alphabet.kmin >= -128 and alphabet.kmax <= 127:
        return np.dtype(np.int8)
    return np.dtype(np.int16)


def storage_layout(alphabet: Alphabet) -> tuple[np.dtype, int]:
    """How checkpoints store codes: the smallest signed dtype and a shift added to every code.

    Up to 16 levels fit int4 (XLA on CPU stores but does not compute with it), up to 256 int8,
    else int16. Codes outside the signed range (the "asym" grid's 0..2^b-1) are shifted into it,
    e.g. 0..15 by -8; loading subtracts the shift again.
    """
    for dtype, lo, hi in ((jnp.dtype(jnp.int4), -8, 7), (np.dtype(np.int8), -128, 127)):
        if alphabet.kmax - alphabet.kmin <= hi - lo:
            shift = 0 if (alphabet.kmin >= lo and alphabet.kmax <= hi) else lo - alphabet.kmin
            return dtype, shift
    return np.dtype(np.int16), 0


__all__ = ["int_dtype", "storage_layout"]
