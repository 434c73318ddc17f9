"""The parameter-budget rule shared by every method (SPEC §2).

Compression ratio CR = V*D / (V*r + r*D [+ D for a decoder bias]). Methods are always compared at equal
parameters; quantised ones at equal bytes, or at equal **bits per weight** (every stored byte x 8 over V*D):
:func:`rank_for_bits` is the largest rank within a budget in bits per weight.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

from embviz.errors import BadInputError


def _whole(value: object) -> bool:
    """Whether ``value`` is an integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


_MAX_SIDE = 10**12


def check_shape(vocab_size: int, hidden_size: int) -> None:
    """A V x D matrix that the budget rule applies to: 1 <= V and 2 <= D, both integers (and not absurd)."""
    if not (_whole(vocab_size) and _whole(hidden_size)) or not (
        1 <= vocab_size <= _MAX_SIDE and 2 <= hidden_size <= _MAX_SIDE
    ):
        raise BadInputError(
            f"a {vocab_size!r} x {hidden_size!r} matrix cannot be compressed (needs >= 1 row and >= 2 columns)"
        )


def low_rank_params(vocab_size: int, hidden_size: int, rank: int, *, decoder_bias: bool = False) -> int:
    """Parameters of a rank-``rank`` factorisation: codes (V x r) + decoder (r x D) [+ bias (D)]."""
    return vocab_size * rank + rank * hidden_size + (hidden_size if decoder_bias else 0)


def ratio_for_rank(vocab_size: int, hidden_size: int, rank: int, *, decoder_bias: bool = False) -> float:
    """Compression ratio of a rank-``rank`` factorisation of a V x D matrix."""
    return (
        vocab_size * hidden_size / low_rank_params(vocab_size, hidden_size, rank, decoder_bias=decoder_bias)
    )


def check_ratio(ratio: object) -> float:
    """Validate a compression ratio: a finite number above 1 (returned as float)."""
    return _number_above(ratio, 1.0, "compression ratio must be above 1")


def _number_above(value: object, floor: float, rule: str) -> float:
    """``value`` as a finite float above ``floor``, else :class:`BadInputError` stating ``rule``."""
    try:
        number = float(value)  # type: ignore[arg-type]  # any input: what float() refuses is caught below
    except (TypeError, ValueError, OverflowError):
        raise BadInputError(f"{rule}, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number) or number <= floor:
        raise BadInputError(f"{rule}, got {value!r}")
    return number


def rank_for_ratio(vocab_size: int, hidden_size: int, ratio: float, *, decoder_bias: bool = False) -> int:
    """The largest rank whose compression ratio is at least ``ratio``.

    For BERT-base (V=30522, D=768) ratios 2.5 / 5 / 10 give r = 299 / 149 / 74.

    Raises:
        BadInputError: ``ratio`` <= 1, or so large that not even rank 1 fits.
    """
    check_shape(vocab_size, hidden_size)
    ratio = check_ratio(ratio)
    budget = vocab_size * hidden_size / ratio - (hidden_size if decoder_bias else 0)
    rank = math.floor(budget / (vocab_size + hidden_size) + 1e-9)
    if rank < 1:
        raise BadInputError(
            f"ratio {ratio} leaves less than rank 1 for a {vocab_size} x {hidden_size} matrix"
        )
    return min(rank, hidden_size - 1)


def check_rank(rank: int, hidden_size: int) -> int:
    """Validate a latent size: 1 <= rank < hidden size (rank = D is no compression)."""
    if not _whole(rank):
        raise BadInputError(f"rank must be an integer, got {rank!r}")
    if not _whole(hidden_size):
        raise BadInputError(f"the hidden size must be an integer, got {hidden_size!r}")
    if not 1 <= rank < hidden_size:
        raise BadInputError(
            f"rank must be between 1 and {hidden_size - 1} (the hidden size is {hidden_size}), got {rank}"
        )
    return int(rank)


def rank_for_byte_ratio(
    vocab_size: int, hidden_size: int, ratio: float, bytes_for_rank: Callable[[int], int]
) -> int:
    """The largest rank whose stored bytes (``bytes_for_rank(r)``) are at most ``4*V*D / ratio``.

    That is the byte budget of a float32 method at parameter ratio ``ratio``, so a quantised low-rank method
    at a sweep ratio is compared with its float base at equal bytes (SPEC §2).

    Raises:
        BadInputError: ``ratio`` <= 1 or not a number, or not even rank 1 fits.
    """
    check_shape(vocab_size, hidden_size)
    budget = 4 * vocab_size * hidden_size / check_ratio(ratio)
    rank = 0
    while rank + 1 < hidden_size and bytes_for_rank(rank + 1) <= budget:
        rank += 1
    if rank < 1:
        raise BadInputError(
            f"ratio {ratio} leaves less than rank 1 for a {vocab_size} x {hidden_size} matrix"
        )
    return rank


class UnreachableBudget(BadInputError):
    """A valid budget in bits per weight that a method cannot meet (a sweep skips it with a note)."""


def check_bits_per_weight(bits: object) -> float:
    """Validate a budget in bits per weight (stored bits over V*D): a finite number above 0 (as float)."""
    return _number_above(bits, 0.0, "a budget in bits per weight must be a number above 0")


def fits_bits(stored_bytes: float, vocab_size: int, hidden_size: int, bits: float) -> bool:
    """Whether ``stored_bytes`` for a V x D matrix are at most ``bits`` per weight (``8*bytes <= bits*V*D``,
    up to float rounding: a budget given as a size's own ``8*bytes / (V*D)`` fits that size)."""
    return 8 * stored_bytes <= bits * vocab_size * hidden_size * (1 + 1e-12)


def rank_for_bits(
    vocab_size: int, hidden_size: int, bits: float, bytes_for_rank: Callable[[int], int]
) -> int:
    """The largest rank (below the hidden size) whose stored bytes ``bytes_for_rank(r)`` fit ``bits`` per
    weight, i.e. at most ``bits * V * D / 8`` bytes (bytes grow with the rank).

    Raises:
        BadInputError: ``bits`` is not a number above 0.
        UnreachableBudget: not even rank 1 fits.
    """
    check_shape(vocab_size, hidden_size)
    bits = check_bits_per_weight(bits)
    low, high = 0, hidden_size - 1  # the answer lies in [low, high]; rank 0 stands for "none fits"
    while low < high:
        middle = (low + high + 1) // 2
        if fits_bits(bytes_for_rank(middle), vocab_size, hidden_size, bits):
            low = middle
        else:
            high = middle - 1
    if low < 1:
        least = 8 * bytes_for_rank(1) / (vocab_size * hidden_size)
        raise UnreachableBudget(
            f"{bits:g} bits per weight leaves less than rank 1 for a {vocab_size} x {hidden_size} matrix "
            f"(rank 1 takes {least:.3g})"
        )
    return low
