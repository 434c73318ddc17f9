"""Reliability: concurrent work, crashes, a broken cache, bad input and memory guards, on tiny models.

(The app's side -- sessions at once, URL garbage, a broken cache in the browser -- is in test_app.py;
security in test_security.py.)
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save as save_safetensors

from embviz import resources, sources
from embviz.artifacts import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    compress_cached,
    load_artifact,
    matrix_fingerprint,
    save_artifact,
)
from embviz.backbones import MODES, Backbone
from embviz.cache import cache_dir, cache_problem, embviz_home, sha256_bytes
from embviz.cli import _parse_list, main
from embviz.compressors import (
    AECompressor,
    SVDCompressor,
    TrainingCancelled,
    check_rank,
    get_method,
    make_compressor,
    rank_for_ratio,
    ratio_for_rank,
)
from embviz.corpora import CORPORA, SPLITS, parse_text_spec
from embviz.errors import BadInputError, ResourceError
from embviz.metrics import cross_neighbours, nearest_neighbours, neighbour_table_cached, reconstruction_angles
from embviz.perplexity import build_eval_set, evaluate_perplexity, score_variant
from embviz.predictions import parse_blank, predict_blank
from embviz.projections import projection_map
from embviz.rng import seeded
from embviz.testing import SENTENCES
from embviz.vocab import find_token

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [" ".join(SENTENCES[i : i + 3]) for i in range(len(SENTENCES) - 2)]


def _digest(value: Any) -> Any:
    """A comparable form of a result: tensors and arrays as bytes (NaNs compare equal), recursively."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.numpy().tobytes())
    if isinstance(value, np.ndarray):
        return (value.shape, value.tobytes())
    if isinstance(value, tuple | list):
        return tuple(_digest(item) for item in value)
    return value


# -- 1. no shared mutable state ------------------------------------------------------------------------
@pytest.fixture
def frequent_thread_switches() -> Iterator[None]:
    """Switch threads every microsecond, so unsynchronised shared state shows up as wrong results."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def _mixed_jobs(backbone: Backbone) -> dict[tuple, Callable[[], Any]]:
    """Predictions and perplexity in both modes, neighbours, angles and AE fits, for two variants."""
    embedding = backbone.embedding
    eval_set = build_eval_set(backbone, TEXTS, max_tokens=300)
    variants = {
        "svd": SVDCompressor(8).fit(embedding),
        "ae": AECompressor(8, epochs=1, seed=3).fit(embedding),
    }
    jobs: dict[tuple, Callable[[], Any]] = {}
    for name, compressed in variants.items():
        matrix = compressed.reconstruct()
        for mode in MODES:

            def predict(matrix: torch.Tensor = matrix, mode: str = mode) -> list:
                result = predict_blank(
                    backbone, "The king of ___ lived in a palace.", {"v": matrix}, k=5, mode=mode
                )
                return [(p.token_id, p.probability) for p in result.variants["v"].predictions]

            jobs["predict", name, mode] = predict
            jobs["perplexity", name, mode] = lambda matrix=matrix, mode=mode: (
                score_variant(backbone, eval_set, matrix, mode=mode).perplexity
            )
        jobs["neighbours", name] = lambda compressed=compressed: nearest_neighbours(compressed, 5)
        jobs["angles", name] = lambda compressed=compressed: tuple(
            reconstruction_angles(embedding, compressed)
        )
    for seed in range(4):  # the paper recipe starts from PyTorch's default (global-RNG) initialisation
        jobs["fit", seed] = lambda seed=seed: (
            AECompressor(4, recipe="paper", epochs=1, seed=seed).fit(embedding).codes
        )
    return jobs


def _in_threads(jobs: dict[tuple, Callable[[], Any]]) -> dict[tuple, Any]:
    """Every job in its own thread, all released at once; their digested results."""
    start = threading.Barrier(len(jobs))

    def run(job: Callable[[], Any]) -> Any:
        start.wait()
        return _digest(job())

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {key: pool.submit(run, job) for key, job in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


def test_a_seeded_initialisation_is_not_disturbed_by_another_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The paper recipe starts from PyTorch's default initialisation, drawn from torch's one global
    generator. Another session seeding it between our seeding and our draws (loading a model, fitting)
    would change our weights; it has to wait instead."""
    matrix = _matrix()

    def fit() -> torch.Tensor:
        return AECompressor(3, recipe="paper", epochs=1, batch_size=64, seed=5).fit(matrix).codes

    expected = fit()
    inside, leave = threading.Event(), threading.Event()

    def other_session() -> None:
        with seeded(999):
            inside.set()
            leave.wait()

    other = threading.Thread(target=other_session)
    draw = torch.nn.init.kaiming_uniform_

    def interleaved(*args: Any, **kwargs: Any) -> torch.Tensor:
        if not other.is_alive() and not inside.is_set():  # the first draw: let the other session in now
            other.start()
            inside.wait(timeout=1.0)  # it gets in only if nothing keeps it out
        return draw(*args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", interleaved)
    try:
        fitted = fit()
    finally:
        leave.set()
        other.join()
    assert torch.equal(fitted, expected)


def test_mixed_work_in_threads_gives_exactly_the_serial_results(
    tiny_backbone: Backbone, frequent_thread_switches: None
) -> None:
    jobs = _mixed_jobs(tiny_backbone)
    serial = {key: _digest(job()) for key, job in jobs.items()}
    parallel = _in_threads(jobs)
    assert [key for key in jobs if parallel[key] != serial[key]] == []


# -- 2. crashes and a broken cache ---------------------------------------------------------------------
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "embviz.cli", *args]


def _subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _artifact_entries() -> list[Path]:
    """Artifact folders (and leftovers, but not lock files) under the cache."""
    root = embviz_home() / "artifacts"
    return sorted(p for p in root.glob("*/*") if not p.name.endswith(".lock")) if root.exists() else []


def test_training_killed_mid_run_leaves_no_artifact(tiny_causal_path: Path) -> None:
    argv = _cli("compress", str(tiny_causal_path), "--rank", "4", "--recipe", "paper", "--epochs", "100000")
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=_subprocess_env())
    watchdog = threading.Timer(600, process.kill)  # never hang the suite, whatever happens
    watchdog.start()
    seen = b""
    try:
        while b"epoch 1/" not in seen and (chunk := process.stderr.read1(256)):  # type: ignore[union-attr]
            seen += chunk
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        watchdog.cancel()
    assert b"epoch 1/100000" in seen, seen.decode(errors="replace")
    assert process.returncode == -signal.SIGKILL
    assert _artifact_entries() == []
    # The lock died with the process: the same configuration is free to build, and is not cached.
    backbone = Backbone.from_pretrained(str(tiny_causal_path))
    compressor = make_compressor("ae-paper", 4, recipe="paper", epochs=100000, seed=1)
    with pytest.raises(TrainingCancelled):
        compress_cached(backbone.name, backbone.embedding, compressor, progress=lambda _: False)


def test_two_processes_asking_for_one_artifact_both_succeed_with_one_build(tiny_causal_path: Path) -> None:
    argv = _cli(
        "compress", str(tiny_causal_path), "--rank", "4", "--recipe", "paper", "--epochs", "2", "--json"
    )
    processes = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_subprocess_env())
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    assert [p.returncode for p in processes] == [0, 0], [err.decode() for _, err in outputs]
    results = [json.loads(out) for out, _ in outputs]
    assert results[0]["artifact"] == results[1]["artifact"]
    assert sorted(result["cached"] for result in results) == [False, True]
    (entry,) = _artifact_entries()
    assert str(entry) == results[0]["artifact"] and load_artifact(entry).rank == 4


def _matrix() -> torch.Tensor:
    return torch.randn(120, 12, generator=torch.Generator().manual_seed(0))


def _replace_weights(path: Path, data: bytes) -> None:
    """Swap in other weights *and* update the manifest's hash of them, so the first check passes."""
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    (path / WEIGHTS_FILE).write_bytes(data)
    (path / MANIFEST_FILE).write_text(json.dumps({**manifest, "weights_sha256": sha256_bytes(data)}))


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as handle:
        return handle.metadata()


TAMPERING: dict[str, Callable[[Path], bytes]] = {
    "zeros": lambda path: bytes(64),
    "huge header length": lambda path: (2**62).to_bytes(8, "little") + b"{}",
    "other shapes": lambda path: save_safetensors(
        {"codes": torch.zeros(120, 2), "decoder": torch.zeros(2, 12)}, metadata=_metadata(path)
    ),
    "float64": lambda path: save_safetensors(
        {
            "codes": torch.zeros(120, 3, dtype=torch.float64),
            "decoder": torch.zeros(3, 12, dtype=torch.float64),
        },
        metadata=_metadata(path),
    ),
}


@pytest.mark.parametrize("damage", list(TAMPERING))
def test_consistently_rehashed_tampering_is_still_detected_and_rebuilt(damage: str) -> None:
    matrix = _matrix()
    first = compress_cached("tiny", matrix, SVDCompressor(3))
    _replace_weights(first.path, TAMPERING[damage](first.path))
    with pytest.raises(ArtifactError):
        load_artifact(first.path)
    rebuilt = compress_cached("tiny", matrix, SVDCompressor(3))
    assert not rebuilt.cached and rebuilt.notice.startswith("cached artifact was corrupt")
    assert torch.equal(load_artifact(rebuilt.path).codes, first.compressed.codes)


def test_the_cli_rebuilds_a_truncated_artifact_with_a_notice(
    tiny_causal_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["compress", str(tiny_causal_path), "--method", "svd", "--rank", "4", "--json"]
    assert main(argv) == 0
    path = Path(json.loads(capsys.readouterr().out)["artifact"])
    weights = path / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert _notices(captured.err) == [f"embviz: {json.loads(captured.out)['notice']}"]
    assert "cached artifact was corrupt" in captured.err and "Traceback" not in captured.err
    assert json.loads(captured.out)["cached"] is False and load_artifact(path).rank == 4


def _notices(stderr: str) -> list[str]:
    """The message lines of a command's stderr (progress bars aside)."""
    return [line for line in stderr.splitlines() if line.startswith("embviz:")]


def test_a_half_written_save_left_by_a_crash_is_cleared() -> None:
    matrix = _matrix()
    first = compress_cached("tiny", matrix, SVDCompressor(3))
    stale = first.path.parent / f".{first.path.name}.abc123.tmp"
    stale.mkdir()
    (stale / WEIGHTS_FILE).write_bytes(b"half")
    assert compress_cached("tiny", matrix, SVDCompressor(3)).cached
    assert not stale.exists()


def _neighbour_entry(matrix: torch.Tensor) -> Any:
    return _digest(neighbour_table_cached("m", "fp", matrix, 4))


def _map_entry(matrix: torch.Tensor) -> Any:
    return _digest(list(projection_map("pca", matrix, {"half": matrix * 0.5}).coords.values()))


@pytest.mark.parametrize(("folder", "entry"), [("neighbours", _neighbour_entry), ("maps", _map_entry)])
def test_truncated_neighbour_and_map_entries_are_recomputed(folder: str, entry: Callable) -> None:
    matrix = _matrix()
    first = entry(matrix)
    (path,) = cache_dir(folder).glob("*.npz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert entry(matrix) == first
    with np.load(path, allow_pickle=False) as rewritten:  # whole again
        assert rewritten.files


@pytest.fixture
def unusable_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``EMBVIZ_HOME`` that cannot be written: a read-only folder or, where that does not stop writes (root
    ignores permissions), a path under a regular file (ENOTDIR for everyone)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
    except PermissionError:
        home = folder
    else:
        (folder / "probe").unlink()
        (tmp_path / "a-file").write_text("not a folder")
        home = tmp_path / "a-file" / "cache"
    monkeypatch.setenv("EMBVIZ_HOME", str(home))
    yield home
    folder.chmod(0o755)


def _files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []


def test_every_cache_degrades_to_computing_without_it(
    unusable_home: Path, tiny_causal: Backbone, caplog: pytest.LogCaptureFixture
) -> None:
    matrix = _matrix()
    assert "not usable" in cache_problem() or "read-only" in cache_problem()
    with caplog.at_level(logging.WARNING, logger="embviz.cache"):
        table = neighbour_table_cached("m", None, matrix, 4)
        assert _digest((table.indices, table.scores)) == _digest(nearest_neighbours(matrix, 4))
        assert not projection_map("pca", matrix, {"half": matrix * 0.5}).from_cache
        half = {"half": tiny_causal.embedding * 0.5}
        report = evaluate_perplexity(tiny_causal, TEXTS, half, max_tokens=200, variant_keys={"half": "h"})
        assert not any(result.cached for result in report.results.values())
        artifact = compress_cached("tiny", matrix, SVDCompressor(3))
    assert artifact.path is None and "cache unusable" in artifact.notice
    notices = [r.getMessage() for r in caplog.records if "computing without caching" in r.getMessage()]
    assert len(notices) == 1, "one notice, not one per cache"
    assert _files_under(unusable_home) == []


def test_the_cli_compresses_and_evaluates_without_a_cache(
    unusable_home: Path,
    tiny_causal: Backbone,
    tiny_causal_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    compressed = SVDCompressor(4).fit(tiny_causal.embedding)
    artifact = tmp_path / "artifact"
    save_artifact(artifact, compressed, tiny_causal.name, matrix_fingerprint(tiny_causal.embedding))
    text = tmp_path / "held-out.txt"
    text.write_text("\n".join(TEXTS), encoding="utf-8")
    assert main(["compress", str(tiny_causal_path), "--method", "svd", "--rank", "4", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["artifact"] is None
    [notice] = _notices(captured.err)
    assert notice.startswith("embviz: artifact cache unusable") and "result not saved" in notice
    argv = ["evaluate", str(tiny_causal_path), "--artifact", str(artifact), "--text", str(text), "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["recall_at_k"] > 0
    assert _files_under(unusable_home) == []


def test_smollm2_converts_into_a_temporary_folder_without_a_cache(
    unusable_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "package"
    package.mkdir()
    (package / "model.gguf").write_bytes(b"GGUF" + bytes(60))
    conversions: list[Path] = []

    def convert(gguf: Path, target: Path) -> None:
        conversions.append(target)
        target.mkdir(parents=True)
        (target / "embviz.json").write_text("{}")

    monkeypatch.setattr(sources, "_package_dir", lambda name: package)
    monkeypatch.setattr(sources, "_convert_gguf", convert)
    monkeypatch.setattr(sources, "_UNCACHED", {})
    first, second = sources._smollm2_folder(), sources._smollm2_folder()
    assert first == second == conversions[0] and len(conversions) == 1
    assert (first / "embviz.json").exists() and not first.is_relative_to(unusable_home)


# -- 3. bad input --------------------------------------------------------------------------------------
BAD_CLI = [
    (["compress", "{causal}", "--ratio", "nan"], "ratio must be above 1"),
    (["compress", "{causal}", "--ratio", "inf"], "ratio must be above 1"),
    (["compress", "{causal}", "--rank", "abc"], "invalid int value"),
    (["compress", "{causal}", "--rank", "4", "--rank", "4", "--ratio", "2"], "not allowed with"),
    (["compress", "{causal}", "--rank", "4", "--device", "nonsense"], "device 'nonsense' cannot be used"),
    (["compress", "{causal}", "--rank", "4", "--device", "meta"], "device 'meta' cannot be used"),
    (["compress", "{causal}", "--rank", "4", "--seed", str(2**64)], "seed must be"),
    (["compress", "{causal}", "--rank", "4", "--seed", "-1"], "seed must be"),
    (["compress", "{tmp}/no-model"], "unknown model"),
    (["compress", "{tmp}"], "cannot load model"),
    (["evaluate", "{causal}", "--artifact", "{artifact}", "--text", "{empty}"], "has no text"),
    (["evaluate", "{causal}", "--artifact", "{artifact}", "--text", "{binary}"], "looks binary"),
    (["evaluate", "{causal}", "--artifact", "{artifact}", "--text", "{latin1}"], "not UTF-8"),
    (["evaluate", "{causal}", "--artifact", "{artifact}", "--text", "shakespeare:dev"], "unknown split"),
    (["evaluate", "{causal}", "--artifact", "{empty}"], "this is a file"),
    (["evaluate", "{causal}", "--artifact", "{artifact}", "--k", "0"], "k must be"),
    (
        ["evaluate", "{causal}", "--artifact", "{artifact}", "--text", "{good}", "--max-tokens", "1"],
        "max_tokens",
    ),
    (["predict", "{causal}", "a ___ b", "--k", "100000"], "k must be between 1 and"),
    (["predict", "{tmp}/no-model", "a ___ b"], "unknown model"),
    (["corpora", "--model", "{tmp}/no-model"], "unknown model"),
    (["sweep", "{causal}", "--ratios", "nan"], "ratio must be above 1"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_CLI, ids=[" ".join(a[:1] + a[2:]) for a, _ in BAD_CLI])
def test_bad_cli_input_is_one_line_exit_2_and_writes_nothing(
    argv: list[str],
    message: str,
    tiny_causal: Backbone,
    tiny_causal_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    artifact = compress_cached(tiny_causal.name, tiny_causal.embedding, SVDCompressor(4)).path
    files = {"empty.txt": b" \n\n", "binary.txt": b"\x00\x01abc", "latin1.txt": "café".encode("latin-1")}
    files["good.txt"] = "\n".join(TEXTS).encode()
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    places = {"causal": str(tiny_causal_path), "tmp": str(tmp_path), "artifact": str(artifact)}
    places |= {name.split(".")[0]: str(tmp_path / name) for name in files}
    before = _files_under(embviz_home())
    try:
        status = main([arg.format(**places) for arg in argv])
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""
    assert captured.err.startswith("embviz: error:") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err and "Traceback" not in captured.err
    assert _files_under(embviz_home()) == before


# Property-based: every parser either returns something valid or raises BadInputError, nothing else.
@given(st.text(max_size=40))
def test_text_specs_parse_or_are_refused(spec: str) -> None:
    try:
        name, split = parse_text_spec(spec)
    except BadInputError as error:
        assert str(error)
    else:
        assert name in CORPORA and split in SPLITS and spec.startswith(name)


@given(st.text(max_size=80), st.one_of(st.none(), st.text(max_size=8)))
def test_blanks_parse_or_are_refused(sentence: str, mask_token: str | None) -> None:
    try:
        blank = parse_blank(sentence, mask_token)
    except BadInputError as error:
        assert "blank" in str(error)
    else:
        assert blank.text() == sentence and blank.marker


TOKENS = ["[PAD]", "the", "Ġthe", "king", "Ġparis", "##s", "▁word", "²", "١٢"]


@given(st.one_of(st.text(max_size=30), st.from_regex(r"\A#[0-9²³¹٠-٩]{0,30}\Z")))
def test_token_lookups_find_a_row_or_are_refused(query: str) -> None:
    try:
        token_id = find_token(TOKENS, query)
    except BadInputError as error:
        assert str(error)
    else:
        assert 0 <= token_id < len(TOKENS)


@given(st.text(max_size=40), st.sampled_from([float, int, str]))
def test_cli_lists_parse_or_are_refused(text: str, convert: Callable[[str], Any]) -> None:
    try:
        items = _parse_list(text, convert, "--ratios", "things")
    except BadInputError as error:
        assert str(error).startswith("--ratios takes a comma-separated list")
    else:
        assert len(items) == text.count(",") + 1 and all(isinstance(item, convert) for item in items)


anything = st.one_of(
    st.integers(min_value=-(10**15), max_value=10**15),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=5),
)
sizes = st.one_of(st.integers(min_value=-5, max_value=10**7), anything)


@given(sizes, sizes, anything, st.booleans())
def test_ratios_give_a_valid_rank_or_are_refused(vocab: Any, hidden: Any, ratio: Any, bias: bool) -> None:
    try:
        rank = rank_for_ratio(vocab, hidden, ratio, decoder_bias=bias)
    except BadInputError as error:
        assert str(error)
    else:
        assert isinstance(rank, int) and 1 <= rank < hidden
        achieved = ratio_for_rank(vocab, hidden, rank, decoder_bias=bias)
        assert achieved >= float(ratio) * (1 - 1e-9) or rank == hidden - 1


@given(anything, sizes)
def test_ranks_are_valid_or_refused(rank: Any, hidden: Any) -> None:
    try:
        checked = check_rank(rank, hidden)
    except BadInputError as error:
        assert str(error)
    else:
        assert isinstance(checked, int) and 1 <= checked < hidden


# -- 4. memory guards ----------------------------------------------------------------------------------
@pytest.fixture
def little_memory(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Pretend only ``n`` bytes are available."""
    return lambda available: monkeypatch.setattr(resources, "available_memory", lambda: available)


def test_available_memory_is_read_from_the_system() -> None:
    available = resources.available_memory()
    assert available is None or available > 0


def test_model_estimates_come_from_the_safetensors_headers(
    tiny_causal: Backbone, tiny_causal_path: Path
) -> None:
    parameters = resources.safetensors_parameters(tiny_causal_path.glob("*.safetensors"))
    assert parameters == tiny_causal.info().total_params
    assert resources.folder_model_memory(tiny_causal_path) == resources.model_memory(parameters)
    assert resources.model_memory(parameters) == pytest.approx(parameters * 4 * 1.3, abs=1)
    assert resources.config_parameters(tiny_causal.model.config) > 0


def test_a_model_that_does_not_fit_is_refused_with_the_estimate(
    tiny_causal_path: Path, little_memory: Callable[[int], None], capsys: pytest.CaptureFixture[str]
) -> None:
    little_memory(1000)
    estimate = resources.format_bytes(resources.folder_model_memory(tiny_causal_path))
    with pytest.raises(
        ResourceError, match=rf"needs about {estimate} of memory, but only 1000 B is available"
    ):
        Backbone.from_pretrained(str(tiny_causal_path))
    # `info` reads only config and headers, so it still answers; a command that loads the model refuses
    assert main(["info", str(tiny_causal_path)]) == 0
    capsys.readouterr()
    assert main(["compress", str(tiny_causal_path), "--method", "svd", "--rank", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("embviz: error: loading") and estimate in err and err.count("\n") == 1


def test_a_smollm2_conversion_that_does_not_fit_is_refused(
    tmp_path: Path, little_memory: Callable[[int], None]
) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(bytes(4096))
    little_memory(1000)
    with pytest.raises(ResourceError, match=r"converting model\.gguf"):
        sources._convert_gguf(gguf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_fit_that_does_not_fit_in_memory_is_refused_before_any_work(
    little_memory: Callable[[int], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    matrix = _matrix()
    compressor = SVDCompressor(3)
    needed = get_method("svd").memory_to_fit(120, 12, 3)
    assert needed > 0
    fitted: list[bool] = []
    fit = SVDCompressor.fit
    monkeypatch.setattr(SVDCompressor, "fit", lambda self, *a, **k: fitted.append(True) or fit(self, *a, **k))
    little_memory(needed - 1)
    with pytest.raises(ResourceError, match=r"fitting SVD \(exact\) on a 120 x 12 matrix needs about"):
        compress_cached("m", matrix, compressor)
    assert not fitted and not list(embviz_home().rglob("manifest.json"))  # nothing ran, nothing written
    little_memory(needed)
    assert compress_cached("m", matrix, compressor).compressed.rank == 3 and fitted


def test_two_jobs_at_once_cannot_both_pass_a_check_only_one_fits(
    little_memory: Callable[[int], None],
) -> None:
    little_memory(1000)
    with resources.reserve_memory("the first job", 600):
        assert resources.reserved_memory() == 600
        with (
            pytest.raises(
                ResourceError, match=r"the second job needs about 600 B .* only 400 B .*held by work"
            ),
            resources.reserve_memory("the second job", 600),
        ):
            pytest.fail("both jobs ran")
        with pytest.raises(ResourceError, match="a fit needs about 500 B"):
            resources.check_memory("a fit", 500)
        with resources.reserve_memory("a small job", 400):
            assert resources.reserved_memory() == 1000
    assert resources.reserved_memory() == 0  # released, also after a refusal
    with resources.reserve_memory("the second job", 600):
        pass


def test_a_running_neighbour_search_holds_its_memory_until_it_ends(
    little_memory: Callable[[int], None],
) -> None:
    matrix = _matrix()
    own = resources.neighbour_memory(120, 12, 120, 4, 4096, separate_keys=False)
    little_memory(own)
    seen: list[int] = []  # what is reserved whenever the search reports progress
    assert nearest_neighbours(matrix, 4, progress=lambda update: seen.append(resources.reserved_memory()))[
        0
    ].shape == (
        120,
        4,
    )
    assert seen and set(seen) == {own} and resources.reserved_memory() == 0


def test_a_neighbour_search_that_does_not_fit_is_refused(little_memory: Callable[[int], None]) -> None:
    matrix = _matrix()
    compressed = SVDCompressor(3).fit(matrix)
    # The queries are the keys in a table of the matrix's own neighbours; a cross search holds both.
    own = resources.neighbour_memory(120, 12, 120, 4, 4096, separate_keys=False)
    cross = resources.neighbour_memory(120, 12, 120, 4, 4096)
    assert cross > own
    little_memory(own - 1)
    for search in (
        lambda: nearest_neighbours(matrix, 4),
        lambda: cross_neighbours(compressed, matrix, 4, method="dense"),
        lambda: neighbour_table_cached("m", "fp", matrix, 4),
    ):
        with pytest.raises(ResourceError, match="nearest neighbours of 120 tokens"):
            search()
    assert list((embviz_home() / "neighbours").rglob("*.npz")) == []  # no table written
    little_memory(own)
    assert nearest_neighbours(matrix, 4)[0].shape == (120, 4)
    with pytest.raises(ResourceError, match="nearest neighbours of 120 tokens"):
        cross_neighbours(compressed, matrix, 4, method="dense")
    # An approximate index holds its own copy of the keys: refused where the exact search fits.
    with pytest.raises(ResourceError, match="nearest neighbours of 120 tokens"):
        nearest_neighbours(matrix, 4, search="approximate")


def test_freezing_keeps_what_is_alive_and_collects_garbage_first() -> None:
    import gc
    import weakref

    class Node:
        def __init__(self) -> None:
            self.other: Node | None = None

    garbage, kept = Node(), Node()
    garbage.other, kept.other = garbage, kept  # two cycles: one dropped below, one still referenced
    dropped = weakref.ref(garbage)
    del garbage
    try:
        frozen = resources.freeze_long_lived_objects()
        assert dropped() is None  # the unreachable cycle was collected, not frozen
        assert frozen == gc.get_freeze_count() > 0
        assert not any(obj is kept for obj in gc.get_objects())  # the live one is frozen: no longer tracked
        assert gc.is_tracked(kept)
    finally:
        gc.unfreeze()  # the rest of the test session collects as before
    assert any(obj is kept for obj in gc.get_objects())
