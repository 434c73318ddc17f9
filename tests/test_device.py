"""``--device`` for compress / evaluate / sweep (issue 17, item 4): refused up front when unusable, never part
of a cache key, and on a CUDA machine the same figures as the CPU within float tolerance.

The tests in the first half run everywhere. The ones marked ``needs_cuda`` run only where
``torch.cuda.is_available()``; each compares a fit or an evaluation on ``cuda`` with the same one on the CPU,
computed in separate cache folders (the caches are shared between devices by design, so a second run in the
same folder would only read the first one's result).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from embviz import sources
from embviz.artifacts import artifact_path, compress_cached, load_artifact
from embviz.backbones import Backbone
from embviz.cache import embviz_home, matrix_fingerprint
from embviz.cli import main
from embviz.compressors import (
    AECompressor,
    CompressedEmbedding,
    DirectionVQ,
    MethodSpec,
    Size,
    SVDCompressor,
    all_methods,
    check_device,
    get_method,
    make_compressor,
    reconstruction_quality,
)
from embviz.errors import BadInputError
from embviz.evaluation import evaluate_variant, sweep
from embviz.testing import (
    EXAMPLE_RANK,
    EXAMPLE_RATIO,
    SENTENCES,
    example_compressor,
    example_direction_metric,
    example_inputs,
    example_row_weights,
)

MAX_TOKENS = 256
CUDA = torch.cuda.is_available()
GPU = "cuda"
"""The device the ``needs_cuda`` tests compare with the CPU."""
needs_cuda = pytest.mark.skipif(
    not CUDA,
    reason="needs a CUDA device: compares results on cuda with the CPU's (torch.cuda.is_available())",
)


@pytest.fixture
def text_file(tmp_path: Path) -> str:
    lines = [" ".join(SENTENCES[i : i + 3]) for i in range(len(SENTENCES) - 2)]
    path = tmp_path / "held-out.txt"
    path.write_text("\n".join(lines * 2), encoding="utf-8")
    return str(path)


def _files_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*")) if folder.exists() else []


# -- everywhere: unusable devices are refused before any work -------------------------------------------
UNUSABLE = ["nonsense", "cuda:99"] + ([] if CUDA else ["cuda"])
COMMANDS = {
    "compress": ["compress", "{causal}", "--method", "svd", "--rank", "4"],
    "compress-ae": ["compress", "{causal}", "--method", "ae-paper", "--rank", "4"],
    "compress-quant": ["compress", "{causal}", "--method", "quant-int8"],
    "evaluate": ["evaluate", "{causal}", "--artifact", "{causal}"],
    "sweep": ["sweep", "{causal}", "--methods", "svd,ae-paper", "--ranks", "4"],
    "fit-mlm-head": ["fit-mlm-head", "{causal}"],
}


@pytest.mark.parametrize("device", UNUSABLE)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_unusable_device_is_one_line_exit_2_before_any_model_loads(
    command: str,
    device: str,
    tiny_causal_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_load(*args: object, **kwargs: object) -> Backbone:
        raise AssertionError("a model was loaded before the device was checked")

    monkeypatch.setattr(sources, "load_model", no_load)
    before = _files_under(embviz_home())
    argv = [arg.format(causal=tiny_causal_path) for arg in COMMANDS[command]]
    status = main([*argv, "--device", device, "--json"])
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    assert captured.err.startswith(f"embviz: error: device {device!r} cannot be used here"), captured.err
    assert _files_under(embviz_home()) == before


@pytest.mark.skipif(CUDA, reason="checks the message a machine without CUDA gives")
def test_cuda_without_cuda_says_so() -> None:
    with pytest.raises(
        BadInputError, match=r"device 'cuda' cannot be used here: torch\.cuda\.is_available\(\) is False"
    ):
        check_device("cuda")


def test_a_name_torch_does_not_know_says_what_a_device_name_is() -> None:
    with pytest.raises(BadInputError, match="not a torch device name"):
        check_device("gpu0")
    assert check_device("cpu") == "cpu" and check_device("cpu:0") == "cpu:0"


def test_sweep_on_ray_refuses_another_device(
    tiny_causal_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray tasks ask for CPUs only, so ``--ray`` with a device is refused (the device itself is taken as
    usable here, so the refusal is reached on a machine without one)."""
    import embviz.compressors

    monkeypatch.setattr(embviz.compressors, "check_device", lambda device: device)
    status = main(["sweep", str(tiny_causal_path), "--ray", "--device", "cuda", "--ranks", "4"])
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""
    assert "is not passed to Ray tasks" in captured.err and captured.err.count("\n") == 1


# -- everywhere: the device is never part of what is cached -----------------------------------------------
def _example_size(spec: MethodSpec, vocab: int, hidden: int) -> Size:
    """The size :func:`embviz.testing.example_compressor` gives ``spec``."""
    if spec.sizing == "rank":
        return spec.size(vocab, hidden, rank=EXAMPLE_RANK)
    if spec.sizing == "bytes":
        return spec.size(vocab, hidden, ratio=EXAMPLE_RATIO)
    return spec.size(vocab, hidden)


@pytest.mark.parametrize("method", [spec.id for spec in all_methods()])
def test_every_method_accepts_a_device_and_keeps_it_out_of_its_configuration(
    method: str, tiny_causal: Backbone
) -> None:
    spec = get_method(method)
    vocab, hidden = tiny_causal.vocab_size, tiny_causal.hidden_size
    size = _example_size(spec, vocab, hidden)
    options: dict[str, Any] = {"epochs": 1, "batch_size": 64} if "epochs" in spec.options else {}
    options.update(example_inputs(spec, vocab, hidden))
    plain = example_compressor(spec, vocab, hidden)
    on_cpu = spec.build(size, device="cpu", **options)
    config = plain.get_config()
    assert on_cpu.get_config() == config and "device" not in json.dumps(config)
    with pytest.raises(BadInputError, match="device 'nonsense' cannot be used"):
        spec.build(size, device="nonsense", **options)  # checked even where it would not be used
    fingerprint = matrix_fingerprint(tiny_causal.embedding)
    key = artifact_path(tiny_causal.name, fingerprint, plain)
    held = getattr(plain, "base", plain)  # a quantised low-rank method fits its base compressor
    if spec.takes_device:
        held.device = "cuda:3"  # where it would fit; nothing runs here
        assert plain.get_config() == config
        assert artifact_path(tiny_causal.name, fingerprint, plain) == key
    else:  # dropped by the registry: the compressor fits on the CPU
        assert getattr(held, "device", "cpu") == "cpu"


def test_the_methods_that_fit_on_a_device() -> None:
    on_device = {spec.id for spec in all_methods() if spec.takes_device}
    assert {"svd", "svd-freq", "svd-int8", "ae-paper", "ae-paper-int8", "vq-direction"} <= on_device
    assert not on_device & {"svd-randomized", "quant-int8", "quant-int4", "quant-mixed", "gguf-q8_0"}


def test_compress_with_device_cpu_is_the_same_artifact(
    tiny_causal_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = []
    for extra in ([], ["--device", "cpu"], ["--device", "cpu:0"]):
        assert (
            main(["compress", str(tiny_causal_path), "--method", "svd", "--rank", "6", *extra, "--json"]) == 0
        )
        runs.append(json.loads(capsys.readouterr().out))
    assert runs[0]["artifact"] == runs[1]["artifact"] == runs[2]["artifact"]
    assert (runs[0]["cached"], runs[1]["cached"], runs[2]["cached"]) == (False, True, True)
    assert (
        main(["compress", str(tiny_causal_path), "--method", "quant-int8", "--device", "cpu", "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["method"] == "quant-int8"


def test_evaluate_with_device_cpu_reads_the_same_cached_perplexities(
    tiny_causal: Backbone, text_file: str
) -> None:
    compressed = compress_cached(tiny_causal.name, tiny_causal.embedding, SVDCompressor(6)).compressed
    first = evaluate_variant(tiny_causal, compressed, text=text_file, max_tokens=MAX_TOKENS, ablation=False)
    again = evaluate_variant(
        tiny_causal, compressed, text=text_file, max_tokens=MAX_TOKENS, ablation=False, device="cpu"
    )
    assert not first.perplexity_cached and again.perplexity_cached
    assert (again.perplexity, again.original_perplexity, again.kl_nats) == (
        first.perplexity,
        first.original_perplexity,
        first.kl_nats,
    )


def test_placing_a_backbone_where_it_already_is_moves_nothing(tiny_causal: Backbone) -> None:
    weight = tiny_causal.embedding
    with tiny_causal.placed_on("cpu") as where:
        assert where == torch.device("cpu") and tiny_causal.embedding.data_ptr() == weight.data_ptr()
    assert tiny_causal.embedding.data_ptr() == weight.data_ptr()


# -- on a CUDA machine: the same results as the CPU's ------------------------------------------------------
def _use_home(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    monkeypatch.setenv("EMBVIZ_HOME", str(folder))


def _assert_cpu(compressed: CompressedEmbedding) -> None:
    for name in ("codes", "decoder", "decoder_bias", "dense", "qcodes", "qscales", "qbits"):
        tensor = getattr(compressed, name)
        assert tensor is None or tensor.device.type == "cpu", name


@needs_cuda
@pytest.mark.parametrize("weighted", [False, True])
def test_svd_on_cuda_matches_the_cpu(tiny_causal: Backbone, weighted: bool) -> None:
    """float64 Gram matrix and eigh on either device: the codes agree to ~1e-6 (rtol 1e-4 leaves room)."""
    weights = example_row_weights(tiny_causal.vocab_size) if weighted else None
    cpu = SVDCompressor(8, row_weights=weights).fit(tiny_causal.embedding)
    cuda = SVDCompressor(8, row_weights=weights, device=GPU).fit(tiny_causal.embedding)
    _assert_cpu(cuda)
    assert cuda.config == cpu.config
    torch.testing.assert_close(cuda.decoder, cpu.decoder, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cuda.codes, cpu.codes, rtol=1e-4, atol=1e-5)


@needs_cuda
def test_compress_svd_on_cuda_saves_a_cpu_artifact_matching_the_cpu_fit(
    tiny_causal_path: Path, tiny_causal: Backbone, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["compress", str(tiny_causal_path), "--method", "svd", "--rank", "8", "--json"]
    assert main([*argv, "--device", GPU]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["cached"] is False
    saved = load_artifact(Path(result["artifact"]))
    _assert_cpu(saved)
    cpu = SVDCompressor(8).fit(tiny_causal.embedding)
    torch.testing.assert_close(saved.reconstruct(), cpu.reconstruct(), rtol=1e-4, atol=1e-5)
    assert main(argv) == 0  # the CPU asks for the same configuration: the cuda fit answers it
    assert json.loads(capsys.readouterr().out)["artifact"] == result["artifact"]


@needs_cuda
def test_ae_fast_recipe_on_cuda_matches_the_cpu_within_training_tolerance(tiny_causal: Backbone) -> None:
    """Same seed, same initial weights and row order (both drawn on the CPU), but cuBLAS sums in another
    order than the CPU's BLAS and Adam carries those last-bit differences through every step, so the weights
    are not bit-equal: compare what the fit is for (reconstruction quality) at 1e-3, not the tensors."""
    cpu = AECompressor(8, recipe="fast").fit(tiny_causal.embedding)
    cuda = AECompressor(8, recipe="fast", device=GPU).fit(tiny_causal.embedding)
    _assert_cpu(cuda)
    assert cuda.config == cpu.config
    on_cpu = reconstruction_quality(tiny_causal.embedding, cpu)
    on_cuda = reconstruction_quality(tiny_causal.embedding, cuda)
    assert on_cuda["mean_cosine"] == pytest.approx(on_cpu["mean_cosine"], abs=1e-3)
    assert on_cuda["relative_error"] == pytest.approx(on_cpu["relative_error"], rel=1e-2, abs=1e-3)


@needs_cuda
def test_direction_vq_on_cuda_matches_the_cpu(tiny_causal: Backbone) -> None:
    """Codebooks are trained by faiss on the CPU either way; only the assignment moves. Distances rounded
    differently may flip a practically tied row, so compare the codes by share and the rows within 1e-3."""
    weights = example_row_weights(tiny_causal.vocab_size)
    metric = example_direction_metric(tiny_causal.hidden_size)
    cpu = DirectionVQ(8.0, weights, metric).fit(tiny_causal.embedding)
    cuda = DirectionVQ(8.0, weights, metric, device=GPU).fit(tiny_causal.embedding)
    _assert_cpu(cuda)
    assert cpu.qscales is not None and cuda.qscales is not None and torch.equal(cuda.qscales, cpu.qscales)
    assert cpu.qcodes is not None and cuda.qcodes is not None
    assert (cuda.qcodes != cpu.qcodes).float().mean() < 0.01
    quality = {
        name: reconstruction_quality(tiny_causal.embedding, c) for name, c in (("cpu", cpu), (GPU, cuda))
    }
    assert quality[GPU]["mean_cosine"] == pytest.approx(quality["cpu"]["mean_cosine"], abs=1e-3)


@needs_cuda
@pytest.mark.parametrize("mode", ["input", "tied"])
def test_evaluate_on_cuda_matches_the_cpu(
    tiny_backbone: Backbone, text_file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """The same artifact scored on each device, each in its own cache folder: perplexities rtol 1e-4."""
    compressed = SVDCompressor(8).fit(tiny_backbone.embedding)
    weight = tiny_backbone.embedding.clone()
    results = {}
    for device in ("cpu", GPU):
        _use_home(monkeypatch, tmp_path / device)
        results[device] = evaluate_variant(
            tiny_backbone, compressed, text=text_file, mode=mode, max_tokens=MAX_TOKENS, device=device
        )
        assert not results[device].perplexity_cached
    assert tiny_backbone.device.type == "cpu" and torch.equal(tiny_backbone.embedding, weight)
    cpu, cuda = results["cpu"], results[GPU]
    assert cuda.tokens_scored == cpu.tokens_scored
    for name in (
        "original_perplexity",
        "perplexity",
        "perplexity_variant_directions",
        "perplexity_variant_lengths",
    ):
        assert getattr(cuda, name) == pytest.approx(getattr(cpu, name), rel=1e-4), name
    assert cuda.kl_nats == pytest.approx(cpu.kl_nats, rel=1e-3, abs=1e-6)
    assert cuda.top1_agreement == pytest.approx(cpu.top1_agreement, abs=2 / cpu.tokens_scored)
    assert (cuda.recall_at_k, cuda.mean_angle_deg) == (cpu.recall_at_k, cpu.mean_angle_deg)  # CPU-side


@needs_cuda
def test_cli_evaluate_on_cuda_matches_the_cpu(
    tiny_causal_path: Path,
    tiny_causal: Backbone,
    text_file: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    artifact = compress_cached(tiny_causal.name, tiny_causal.embedding, make_compressor("svd", 8)).path
    argv = ["evaluate", str(tiny_causal_path), "--artifact", str(artifact), "--text", text_file, "--json"]
    figures = {}
    for device in ("cpu", GPU):
        _use_home(monkeypatch, tmp_path / device)
        assert main([*argv, "--device", device]) == 0
        figures[device] = json.loads(capsys.readouterr().out)["perplexity"]
    for key in ("original", "compressed"):
        assert figures[GPU][key] == pytest.approx(figures["cpu"][key], rel=1e-4)


@needs_cuda
def test_a_two_variant_sweep_on_cuda_matches_the_cpu(
    tiny_causal: Backbone, text_file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SVD rows at rtol 1e-4; the AE row (trained on each device, see the AE test) at 1e-2."""
    rows = {}
    for device in ("cpu", GPU):
        _use_home(monkeypatch, tmp_path / device)
        rows[device] = sweep(
            tiny_causal, ["svd", "ae-paper"], ranks=[8], text=text_file, max_tokens=MAX_TOKENS, device=device
        )
        assert not any(row.cached for row in rows[device])
    assert tiny_causal.device.type == "cpu"
    cpu, cuda = rows["cpu"], rows[GPU]
    assert [row.method for row in cuda] == [row.method for row in cpu] == ["uncompressed", "svd", "ae-paper"]
    for before, after in zip(cpu, cuda, strict=True):
        tolerance = 1e-2 if after.method == "ae-paper" else 1e-4
        assert after.perplexity == pytest.approx(before.perplexity, rel=tolerance), after.method
        assert after.mean_cosine == pytest.approx(before.mean_cosine, abs=10 * tolerance), after.method
        assert (after.rank, after.bytes) == (before.rank, before.bytes)
