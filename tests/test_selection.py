"""Variant names (``svd@128``, ``quant-mixed@8x``, ``vq-direction@1b``) and expected fit times."""

from __future__ import annotations

import re

import pytest

from embviz.compressors import (
    RECIPES,
    Size,
    get_method,
    method_ids,
    parse_variant,
    ratio_for_rank,
)
from embviz.compressors.registry import REFERENCE_WEIGHTS, matrix_scale
from embviz.errors import BadInputError

V, D = 49_152, 576


@pytest.mark.parametrize(
    ("text", "rank", "ratio", "bits", "name"),
    [
        ("svd", None, None, None, "svd"),
        (" svd@128 ", 128, None, None, "svd@128"),
        ("svd@r64", 64, None, None, "svd@64"),
        ("quant-mixed@8x", None, 8.0, None, "quant-mixed@8x"),
        ("quant-mixed@7.5x", None, 7.5, None, "quant-mixed@7.5x"),
        ("vq-direction@1b", None, None, 1.0, "vq-direction@1b"),
        ("vq-direction@0.5bits", None, None, 0.5, "vq-direction@0.5b"),
        ("ae-paper@2bit", None, None, 2.0, "ae-paper@2b"),
    ],
)
def test_names_parse_to_a_method_and_one_size(
    text: str, rank: int | None, ratio: float | None, bits: float | None, name: str
) -> None:
    request = parse_variant(text)
    assert (request.rank, request.ratio, request.bits) == (rank, ratio, bits)
    assert request.name == name
    assert parse_variant(request.name) == request, "the canonical name parses back to the same request"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nonsense", "unknown method 'nonsense'"),
        ("svd@", "give a size after @"),
        ("svd@big", "must be a rank (128 or r128), a byte ratio (8x) or bits per weight (2b)"),
        ("svd@-3", "must be a rank"),
    ],
)
def test_bad_names_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(BadInputError, match=re.escape(message)):
        parse_variant(text)


def test_every_method_resolves_a_default_size_through_the_one_sizing_rule() -> None:
    for method in method_ids():
        spec = get_method(method)
        size = parse_variant(method).size(V, D, 64)
        if spec.sizing == "rank":
            assert size == Size(rank=64)
        elif spec.sizing == "bytes":  # the bytes of float32 rank-64 factors
            assert size.ratio == pytest.approx(ratio_for_rank(V, D, 64), rel=1e-3)
        else:
            assert size.rank is None and size.ratio is None


def test_sizes_in_names_match_the_registry_rule() -> None:
    assert parse_variant("svd@4x").size(V, D, 64) == get_method("svd").size(V, D, ratio=4.0, by="bytes")
    assert parse_variant("svd@2b").size(V, D, 64) == get_method("svd").size(V, D, bits=2.0)
    with pytest.raises(BadInputError, match="fixed size"):
        parse_variant("quant-int8@64").size(V, D, 64)
    with pytest.raises(BadInputError, match=r"name a size, e\.g\. quant-mixed@4x"):
        parse_variant("quant-mixed").size(V, D, 4)  # rank 4's bytes: beyond what mixed rows reach


def test_expected_fit_times_follow_the_measurements_and_scale_with_the_matrix() -> None:
    ae = get_method("ae-paper")
    fast = ae.expected_seconds(V, D, Size(rank=64), recipe="fast")
    paper = ae.expected_seconds(V, D, Size(rank=64), recipe="paper")
    assert 8 < fast < 15 < 90 < paper < 150  # measured on one core: 10.5 s and 111 s
    assert ae.expected_seconds(V, D, Size(rank=128)) > fast
    assert ae.expected_seconds(V, D, Size(rank=64), epochs=RECIPES["fast"].epochs * 2) > 1.8 * fast
    assert get_method("ae-paper-int8").expected_seconds(V, D, Size(rank=64)) == pytest.approx(fast)
    assert get_method("svd").expected_seconds(V, D, Size(rank=64)) < 3
    vq = get_method("vq-direction")
    seconds = {bits: vq.expected_seconds(V, D, vq.size(V, D, bits=bits)) for bits in (0.5, 1.0, 2.0, 4.0)}
    assert (
        seconds[0.5] < 15 < seconds[1.0] < seconds[2.0] < 60 < 200 < seconds[4.0]
    )  # measured 11/22/43/305 s
    tiny = 1000 * 32
    assert matrix_scale(1000, 32) == tiny / REFERENCE_WEIGHTS
    assert all(
        get_method(m).expected_seconds(1000, 32, parse_variant(m).size(1000, 32, 8)) < 2 for m in method_ids()
    ), "a tiny model fits everything at once"
