"""Naming a compressed variant in one short string: a method id and, optionally, its size.

The app's variant picker and its URL (``?cmp=svd&cmp=ae-paper&cmp=quant-mixed@4b``) use these names:

* ``svd`` -- a registered method at the default size: a rank-sized method at the given default rank, a
  byte-sized one at the byte ratio of float32 rank-r factors (the same bytes as SVD at that rank), a
  fixed-size one at its own size;
* ``svd@128`` or ``svd@r128`` -- rank 128;
* ``quant-mixed@8x`` -- 8x fewer bytes than float32 (a rank-sized method: the largest rank that meets it);
* ``vq-direction@1b`` (or ``@1bit``, ``@1bits``) -- a budget of 1 bit per weight (SPEC §2).

Every size goes through :meth:`MethodSpec.size <embviz.compressors.registry.MethodSpec.size>`, the one
sizing rule, so a name means the same size in the app, the CLI and a sweep.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from embviz.compressors.budget import ratio_for_rank
from embviz.compressors.registry import MethodSpec, Size, get_method
from embviz.errors import BadInputError

__all__ = ["VariantRequest", "parse_variant"]

_SIZE = re.compile(
    r"^(?:r?(?P<rank>\d+)|(?P<ratio>\d+(?:\.\d+)?)x|(?P<bits>\d*\.?\d+)\s*(?:b|bit|bits))$", re.IGNORECASE
)


@dataclass(frozen=True)
class VariantRequest:
    """A method and the size asked for (at most one of rank, byte ratio, bits per weight)."""

    method: str
    rank: int | None = None
    ratio: float | None = None
    bits: float | None = None

    @property
    def spec(self) -> MethodSpec:
        return get_method(self.method)

    @property
    def name(self) -> str:
        """The canonical short name (``svd``, ``svd@128``, ``quant-mixed@8x``, ``vq-direction@1b``)."""
        if self.rank is not None:
            return f"{self.method}@{self.rank}"
        if self.ratio is not None:
            return f"{self.method}@{self.ratio:g}x"
        if self.bits is not None:
            return f"{self.method}@{self.bits:g}b"
        return self.method

    def size(self, vocab_size: int, hidden_size: int, default_rank: int) -> Size:
        """The method's size for a V x D matrix (see the module docstring for the default).

        Raises:
            BadInputError: a size the method does not take or cannot reach (the message says which).
        """
        spec = self.spec
        if self.rank is not None:
            return spec.size(vocab_size, hidden_size, rank=self.rank)
        if self.ratio is not None:
            return spec.size(vocab_size, hidden_size, ratio=self.ratio, by="bytes")
        if self.bits is not None:
            return spec.size(vocab_size, hidden_size, bits=self.bits)
        if spec.sizing == "rank":
            return spec.size(vocab_size, hidden_size, rank=default_rank)
        if spec.sizing == "bytes":
            ratio = round(ratio_for_rank(vocab_size, hidden_size, default_rank), 3)
            try:
                return spec.size(vocab_size, hidden_size, ratio=ratio)
            except BadInputError as exc:
                raise BadInputError(
                    f"{exc}: {self.method} at the bytes of rank {default_rank} is out of its reach; "
                    f"name a size, e.g. {self.method}@4x"
                ) from None
        return spec.size(vocab_size, hidden_size)


def parse_variant(text: str) -> VariantRequest:
    """Parse a variant name (``svd``, ``svd@128``, ``quant-mixed@8x``, ``vq-direction@1b``).

    Raises:
        BadInputError: an unknown method, or a size that is not a rank, a ratio or bits per weight.
    """
    method, _, size = text.strip().partition("@")
    method = method.strip()
    get_method(method)  # unknown ids raise with the list of methods
    size = size.strip()
    if not size:
        if "@" in text:
            raise BadInputError(
                f"{text!r}: give a size after @ (e.g. {method}@128, {method}@8x, {method}@2b)"
            )
        return VariantRequest(method)
    match = _SIZE.match(size)
    if match is None:
        raise BadInputError(
            f"{text!r}: the size after @ must be a rank (128 or r128), a byte ratio (8x) or bits per weight "
            f"(2b), not {size!r}"
        )
    if match["rank"] is not None:
        return VariantRequest(method, rank=int(match["rank"]))
    if match["ratio"] is not None:
        return VariantRequest(method, ratio=float(match["ratio"]))
    return VariantRequest(method, bits=float(match["bits"]))
