"""Round-to-nearest (RTN): every weight to its nearest level, independently of the data."""

from __future__ import annotations

import jax

from gpfq_jax.core.alphabets import Alphabet, round_to_codes


def rtn_codes(
    w: jax.Array,
    delta: jax.Array,
    alphabet: Alphabet,
    uniform: jax.Array | None = None,
    *,
    zero_point: jax.Array | None = None,
) -> jax.Array:
    """Round each weight to the nearest level (stochastically with ``uniform``): (N, N_out).

    ``delta`` (and the "asym" grid's ``zero_point``) broadcast against ``w``: (N_out,) per
    channel or (N, N_out) per feature row (group-wise steps).
    """
    return round_to_codes(w, delta, alphabet, uniform, zero_point)


__all__ = ["rtn_codes"]
