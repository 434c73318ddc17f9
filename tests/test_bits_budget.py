"""Budgets in bits per weight (issue 14): one sizing rule in the registry, shared by sweeps, the CLI and the app.

Every stored byte x 8 over V*D (SPEC §2): a rank-sized method gets the largest rank within the budget, a
byte-sized one the byte ratio 32/bits, a fixed-size one its own size (once, as a reference); budgets a
method cannot meet are skipped with a note, invalid ones refused before any work.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from embviz.artifacts import compress_cached
from embviz.backbones import Backbone
from embviz.cli import main
from embviz.compressors import (
    UnreachableBudget,
    check_bits_per_weight,
    get_method,
    method_ids,
    rank_for_bits,
)
from embviz.errors import BadInputError
from embviz.evaluation import SweepPlan, SweepResult, plan_sweep, sweep
from embviz.progress import Progress
from embviz.testing import SENTENCES

SHAPES = [(400, 32), (30522, 384), (49152, 576)]
BUDGETS = [16.0, 8.0, 6.0, 4.5, 4.0, 3.0, 2.0, 1.0, 0.5]
MAX_TOKENS = 256


def _bits(stored_bytes: int, vocab: int, hidden: int) -> float:
    return 8 * stored_bytes / (vocab * hidden)


@pytest.fixture
def text_file(tmp_path: Path) -> str:
    lines = [" ".join(SENTENCES[i : i + 3]) for i in range(len(SENTENCES) - 2)]
    path = tmp_path / "held-out.txt"
    path.write_text("\n".join(lines * 2), encoding="utf-8")
    return str(path)


# -- the sizing rule, per sizing kind --------------------------------------------------------------------
@pytest.mark.parametrize(("vocab", "hidden"), SHAPES)
@pytest.mark.parametrize("method", ["svd", "ae-paper", "svd-int8", "svd-int4", "ae-paper-int8"])
def test_rank_sized_methods_take_the_largest_rank_within_the_budget(
    method: str, vocab: int, hidden: int
) -> None:
    """Float methods count 4 bytes per parameter (the AE's decoder bias too), quantised ones their bytes."""
    spec = get_method(method)
    for budget in BUDGETS:
        try:
            size = spec.size(vocab, hidden, bits=budget)
        except UnreachableBudget as exc:
            assert _bits(spec.bytes_at_rank(vocab, hidden, 1), vocab, hidden) > budget
            assert "less than rank 1" in str(exc) and method in str(exc)
            continue
        assert size.rank is not None and (size.target_bits, size.target_ratio) == (budget, 32 / budget)
        assert _bits(spec.bytes_at_rank(vocab, hidden, size.rank), vocab, hidden) <= budget
        if size.rank < hidden - 1:  # the next rank up is over the budget
            assert _bits(spec.bytes_at_rank(vocab, hidden, size.rank + 1), vocab, hidden) > budget


def test_float_bytes_count_every_parameter_and_the_decoder_bias() -> None:
    vocab, hidden = 49152, 576
    assert get_method("svd").bytes_at_rank(vocab, hidden, 64) == 4 * (vocab * 64 + 64 * hidden)
    assert get_method("ae-paper").bytes_at_rank(vocab, hidden, 64) == 4 * (vocab * 64 + 64 * hidden + hidden)
    assert get_method("svd").size(vocab, hidden, bits=4).rank == 71  # = ratio 8 in parameters
    assert get_method("svd-int8").size(vocab, hidden, bits=4).rank == 279  # more rank in the same bytes


@pytest.mark.parametrize(("vocab", "hidden"), SHAPES)
def test_mixed_rows_get_byte_ratio_32_over_bits_within_their_reach(vocab: int, hidden: int) -> None:
    spec = get_method("quant-mixed")
    assert spec.max_byte_ratio is not None
    least = 32 / spec.max_byte_ratio(vocab, hidden)
    for budget in BUDGETS:
        if budget < least:
            with pytest.raises(UnreachableBudget, match="reaches budgets from"):
                spec.size(vocab, hidden, bits=budget)
        else:
            size = spec.size(vocab, hidden, bits=budget)
            assert (size.rank, size.ratio, size.target_bits) == (None, 32 / budget, budget)
    with pytest.raises(UnreachableBudget):
        spec.size(vocab, hidden, bits=32)  # no byte ratio above 1


@pytest.mark.parametrize(("vocab", "hidden"), SHAPES)
@pytest.mark.parametrize("method", method_ids(sizing="fixed"))
def test_fixed_size_methods_fit_a_budget_at_or_above_their_own_bits(
    method: str, vocab: int, hidden: int
) -> None:
    spec = get_method(method)
    assert spec.fixed_bytes is not None
    own = spec.fixed_bits_per_weight(vocab, hidden)
    assert own == _bits(spec.fixed_bytes(vocab, hidden), vocab, hidden)
    size = spec.size(vocab, hidden, bits=own)
    assert (size.rank, size.target_bits, size.target_ratio) == (None, None, round(32 / own, 4))
    with pytest.raises(UnreachableBudget, match="fixed size"):
        spec.size(vocab, hidden, bits=own * 0.99)
    with pytest.raises(UnreachableBudget):
        spec.size(vocab, hidden, bits=0.5)


def test_gguf_references_are_at_their_quoted_bits() -> None:
    assert get_method("gguf-q8_0").fixed_bits_per_weight(49152, 576) == 8.5
    assert get_method("gguf-q4_0").fixed_bits_per_weight(49152, 576) == 4.5
    assert get_method("quant-int8").fixed_bits_per_weight(49152, 576) > 8  # its fp16 scales count


@pytest.mark.parametrize("bad", [0, -1, 0.0, math.nan, math.inf, "four", None, True, [4]])
def test_invalid_budgets_are_one_clear_error(bad: object) -> None:
    with pytest.raises(BadInputError, match="bits per weight") as info:
        check_bits_per_weight(bad)
    assert not isinstance(info.value, UnreachableBudget)
    if bad is not None:  # bits=None means "not sized by bits"
        with pytest.raises(BadInputError, match="bits per weight"):
            get_method("svd").size(400, 32, bits=bad)  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match="bits per weight"):
        rank_for_bits(400, 32, bad, lambda rank: rank)  # type: ignore[arg-type]


def test_a_size_takes_one_of_rank_ratio_or_bits() -> None:
    with pytest.raises(BadInputError, match="one of"):
        get_method("svd").size(400, 32, rank=4, bits=4)
    with pytest.raises(BadInputError, match="one of"):
        get_method("svd").size(400, 32, ratio=4, bits=4)


# -- the sweep plan -------------------------------------------------------------------------------------
def test_plan_sizes_every_kind_and_notes_what_it_skips(tiny_causal: Backbone) -> None:
    vocab, hidden = tiny_causal.vocab_size, tiny_causal.hidden_size
    methods = ["svd", "svd-int8", "quant-mixed", "quant-int4", "gguf-q4_0"]
    plan = plan_sweep(tiny_causal, methods, None, [5], "fast", bits=[4.0, 2.0, 0.5])
    assert isinstance(plan, SweepPlan) and isinstance(plan, list)
    got = [(job.method, job.compressor.get_config()["rank"], job.target_bits) for job in plan]
    assert got == [
        ("svd", get_method("svd").size(vocab, hidden, bits=4).rank, 4.0),
        ("svd", get_method("svd").size(vocab, hidden, bits=2).rank, 2.0),
        ("svd", 5, None),  # --ranks may come with --bits
        ("svd-int8", get_method("svd-int8").size(vocab, hidden, bits=4).rank, 4.0),
        ("svd-int8", get_method("svd-int8").size(vocab, hidden, bits=2).rank, 2.0),
        ("svd-int8", 5, None),
        ("quant-mixed", None, 4.0),  # 2 and 0.5 bits are below what mixed rows reach for 32 columns
        ("quant-int4", None, None),  # fixed sizes run once, as references
        ("gguf-q4_0", None, None),
    ]
    mixed = [job for job in plan if job.method == "quant-mixed"]
    assert mixed[0].compressor.get_config()["ratio"] == 8.0
    notes = "\n".join(plan.notes)
    assert "skipped svd at 0.5 bits per weight" in notes and "skipped svd-int8 at 0.5" in notes
    assert "skipped quant-mixed at 2 bits" in notes and "skipped quant-mixed at 0.5 bits" in notes
    assert "quant-int4 has a fixed size of 4.5 bits per weight, above the budgets of 4, 2, 0.5" in notes
    assert "skipped svd at 4" not in notes


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bits": [4.0, 0.0]}, "above 0"),
        ({"bits": [-2.0]}, "above 0"),
        ({"bits": [math.nan]}, "above 0"),
        ({"bits": ["x"]}, "number above 0"),
        ({"bits": []}, "no budget"),
        ({"bits": [4.0], "ratios": [2.0]}, "not both"),
        ({"bits": [0.01]}, "no method meets any of the budgets"),
    ],
)
def test_bad_budgets_are_refused_before_any_work(
    tiny_causal: Backbone, text_file: str, options: dict, message: str
) -> None:
    steps: list[Progress] = []
    with pytest.raises(BadInputError, match=message):
        sweep(tiny_causal, ["svd", "svd-int8"], text=text_file, progress=steps.append, **options)
    assert steps == []


def test_sweep_by_bits_stays_within_each_budget(tiny_causal: Backbone, text_file: str) -> None:
    methods = ["svd", "svd-int8", "quant-mixed", "quant-int8"]
    rows = sweep(tiny_causal, methods, bits=[4, 1], text=text_file, max_tokens=MAX_TOKENS)
    assert isinstance(rows, SweepResult)
    assert any("skipped svd at 1 bits per weight" in note for note in rows.notes)
    budgeted = [row for row in rows if row.target_bits is not None]
    assert {(row.method, row.target_bits) for row in budgeted} == {
        ("svd", 4),
        ("svd-int8", 4),
        ("svd-int8", 1),
        ("quant-mixed", 4),
    }
    for row in budgeted:
        assert row.bits_per_weight <= row.target_bits + 1e-9  # the stored result, not just the plan
        assert row.bits_per_weight == pytest.approx(8 * row.bytes / tiny_causal.embedding.numel(), abs=1e-4)
    [int8] = [row for row in rows if row.method == "quant-int8"]
    assert int8.target_bits is None and int8.bits_per_weight == 8.5
    assert rows[0].method == "uncompressed" and rows[0].target_bits is None


def test_stored_bytes_of_a_fit_match_the_sizing_rule(tiny_causal: Backbone) -> None:
    vocab, hidden = tiny_causal.vocab_size, tiny_causal.hidden_size
    for method in ("svd", "svd-int8", "ae-paper"):
        spec = get_method(method)
        size = spec.size(vocab, hidden, bits=3)
        options = {"recipe": "fast", "epochs": 1} if spec.trains else {}
        compressed = compress_cached(
            tiny_causal.name, tiny_causal.embedding, spec.build(size, **options)
        ).compressed
        assert compressed.bytes == spec.bytes_at_rank(vocab, hidden, size.rank or 0)
        assert compressed.bits_per_weight <= 3


# -- the CLI --------------------------------------------------------------------------------------------
def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_cli_sweep_bits_rows_carry_target_bits(
    tiny_causal_path: Path,
    text_file: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    argv = ["sweep", str(tiny_causal_path), "--methods", "svd,svd-int8,gguf-q4_0", "--bits", "4,1"]
    status, out, _ = _run(capsys, *argv, "--max-tokens", str(MAX_TOKENS), "--text", text_file, "--json")
    assert status == 0
    rows = json.loads(out)
    assert list(rows[0])[-1] == "target_bits"
    assert [(row["method"], row["target_bits"]) for row in rows] == [
        ("uncompressed", None),
        ("svd", 4.0),  # rank 1 takes 1.08 bits per weight here: svd at 1 bit is skipped
        ("svd-int8", 4.0),
        ("svd-int8", 1.0),
        ("gguf-q4_0", None),
    ]
    assert all(row["bits_per_weight"] <= row["target_bits"] for row in rows if row["target_bits"])
    assert "skipped svd at 1 bits per weight" in caplog.text  # a warning: on stderr outside pytest
    status, out, _ = _run(capsys, *argv, "--max-tokens", str(MAX_TOKENS), "--text", text_file)
    assert status == 0 and "target_bits" in out.splitlines()[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--bits", "4,0"], "above 0"),
        (["--bits", "4,nan"], "above 0"),
        (["--bits", "four"], "--bits takes a comma-separated list of numbers"),
        (["--bits", "4", "--ratios", "2"], "not both"),
    ],
)
def test_cli_sweep_refuses_bad_budgets_in_one_line(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = _run(capsys, "sweep", "no-such-model-is-loaded", "--methods", "svd", *extra)
    assert status == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_compress_bits(tiny_causal_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(
        capsys, "compress", str(tiny_causal_path), "--method", "svd", "--bits", "4", "--json"
    )
    assert status == 0
    result = json.loads(out)
    assert (result["rank"], result["target_bits"]) == (3, 4.0) and result["bits_per_weight"] <= 4
    status, out, _ = _run(
        capsys, "compress", str(tiny_causal_path), "--method", "svd-int8", "--bits", "3", "--json"
    )
    assert status == 0 and json.loads(out)["bits_per_weight"] <= 3
    status, _, err = _run(capsys, "compress", str(tiny_causal_path), "--method", "quant-int8", "--bits", "4")
    assert status == 2 and "fixed size of 8.5 bits per weight" in err
    status, _, err = _run(capsys, "compress", "no-such-model-is-loaded", "--method", "svd", "--bits", "-1")
    assert status == 2 and "above 0" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "x", "--method", "svd", "--bits", "4", "--rank", "3"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
