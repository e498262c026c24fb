"""Sobol' quasi-random points in pure numpy (Joe & Kuo direction numbers), optionally scrambled.

A Sobol' point ``i`` in dimension ``j`` is ``x_ij = XOR_k (b_k(i) v_jk) / 2^B`` over the bits ``b_k`` of ``i``,
with direction numbers ``v_jk = m_jk 2^(B - 1 - k)``; dimension 0 has every ``m = 1`` (van der Corput), the
others the initial ``m`` and primitive polynomial of Joe & Kuo's ``new-joe-kuo-6.21201`` table (the one
``scipy.stats.qmc.Sobol`` uses) and the recurrence
``m_k = 2 a_1 m_{k-1} ^ 4 a_2 m_{k-2} ^ ... ^ 2^(s-1) a_(s-1) m_(k-s+1) ^ 2^s m_(k-s) ^ m_(k-s)``.
Points are made in Gray-code order (``x_i = x_(i-1) ^ v_(ctz(i))``), as scipy makes them, so the
unscrambled points are scipy's. Scrambling (Owen-type, as scipy's ``scramble=True``): a random
lower-triangular binary matrix with a unit diagonal per dimension multiplies every direction number's bits
(linear matrix scrambling), then a random B-bit digital shift is XORed into every point; each dimension
stays equidistributed over every block of 2^m points.
"""

from __future__ import annotations

import numpy as np

BITS = 30
#: dimensions 2..64 of new-joe-kuo-6.21201: "polynomial:m_1,...,m_s" (s = the polynomial's degree)
_TABLE = (
    "3:1 7:1,3 11:1,3,1 13:1,1,1 19:1,1,3,3 25:1,3,5,13 37:1,1,5,5,17 41:1,1,5,5,5 47:1,1,7,11,19 55:1,1,5,1,1 "
    "59:1,1,1,3,11 61:1,3,5,5,31 67:1,3,3,9,7,49 91:1,1,1,15,21,21 97:1,3,1,13,27,49 103:1,1,1,15,7,5 "
    "109:1,3,1,15,13,25 115:1,1,5,5,19,61 131:1,3,7,11,23,15,103 137:1,3,7,13,13,15,69 143:1,1,3,13,7,35,63 "
    "145:1,3,5,9,1,25,53 157:1,3,1,13,9,35,107 167:1,3,1,5,27,61,31 171:1,1,5,11,19,41,61 185:1,3,5,3,3,13,69 "
    "191:1,1,7,13,1,19,1 193:1,3,7,5,13,19,59 203:1,1,3,9,25,29,41 211:1,3,5,13,23,1,55 213:1,3,7,3,13,59,17 "
    "229:1,3,1,3,5,53,69 239:1,1,5,5,23,33,13 241:1,1,7,7,1,61,123 247:1,1,7,9,13,61,49 253:1,3,3,5,3,55,33 "
    "285:1,3,1,15,31,13,49,245 299:1,3,5,15,31,59,63,97 301:1,3,1,11,11,11,77,249 333:1,3,1,11,27,43,71,9 "
    "351:1,1,7,15,21,11,81,45 355:1,3,7,3,25,31,65,79 357:1,3,1,1,19,11,3,205 361:1,1,5,9,19,21,29,157 "
    "369:1,3,7,11,1,33,89,185 391:1,3,3,3,15,9,79,71 397:1,3,7,11,15,39,119,27 425:1,1,3,1,11,31,97,225 "
    "451:1,1,1,3,23,43,57,177 463:1,3,7,7,17,17,37,71 487:1,3,1,5,27,63,123,213 501:1,1,3,5,11,43,53,133 "
    "529:1,3,5,5,29,17,47,173,479 539:1,3,3,11,3,1,109,9,69 545:1,1,1,5,17,39,23,5,343 "
    "557:1,3,1,5,25,15,31,103,499 563:1,1,1,11,11,17,63,105,183 601:1,1,5,11,9,29,97,231,363 "
    "607:1,1,5,15,19,45,41,7,383 617:1,3,7,7,31,19,83,137,221 623:1,1,1,3,23,15,111,223,83 "
    "631:1,1,5,13,31,15,55,25,161 637:1,1,3,13,25,47,39,87,257")
MAX_DIMENSIONS = 64


def direction_numbers(d: int) -> np.ndarray:
    """``v_jk`` [d, BITS] (int64) of the first ``d`` dimensions (module doc)."""
    if not 1 <= d <= MAX_DIMENSIONS:
        raise ValueError(f"Sobol' points in 1..{MAX_DIMENSIONS} dimensions, got {d}")
    v = np.zeros((d, BITS), np.int64)
    v[0] = 1 << np.arange(BITS - 1, -1, -1, dtype=np.int64)
    for j, entry in enumerate(_TABLE.split()[: d - 1], start=1):
        poly_text, m_text = entry.split(":")
        poly, m = int(poly_text), [int(t) for t in m_text.split(",")]
        s = poly.bit_length() - 1
        a = [(poly >> (s - i)) & 1 for i in range(1, s)]  # a_1 .. a_(s-1): the inner coefficients, x^(s-1) first
        for k in range(s, BITS):
            new = m[k - s] ^ (m[k - s] << s)
            for i, ai in enumerate(a, start=1):
                if ai:
                    new ^= m[k - i] << i
            m.append(new)
        v[j] = [m[k] << (BITS - 1 - k) for k in range(BITS)]
    return v


def _scramble(v: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(direction numbers after linear matrix scrambling, digital shift) for one draw of ``rng``."""
    d = v.shape[0]
    ltm = np.tril(rng.integers(0, 2, (d, BITS, BITS), dtype=np.int64), -1) + np.eye(BITS, dtype=np.int64)
    shifts = np.arange(BITS - 1, -1, -1, dtype=np.int64)
    bits = (v[:, :, None] >> shifts[None, None, :]) & 1  # [d, k, bit], most significant first
    scrambled = np.einsum("jab,jkb->jka", ltm, bits) & 1  # row a of L times each direction number's bits
    out = (scrambled << shifts[None, None, :]).sum(axis=2)
    return out, rng.integers(0, 1 << BITS, d, dtype=np.int64)


def sobol(n: int, d: int, scramble: bool = True, seed: int = 0) -> np.ndarray:
    """The first ``n`` Sobol' points in ``d`` dimensions, float64 [n, d] in [0, 1) (module doc)."""
    if int(n) < 1:
        raise ValueError(f"need at least one point, got n={n}")
    v = direction_numbers(int(d))
    x = np.zeros(int(d), np.int64)
    if scramble:
        v, x = _scramble(v, np.random.default_rng(int(seed)))
    out = np.empty((int(n), int(d)), np.int64)
    out[0] = x
    for i in range(1, int(n)):
        c = ((i & -i).bit_length() - 1)  # trailing zeros of i: the bit that flips in Gray-code order
        x = x ^ v[:, c]
        out[i] = x
    return out.astype(np.float64) / float(1 << BITS)


__all__ = ["MAX_DIMENSIONS", "direction_numbers", "sobol"]
