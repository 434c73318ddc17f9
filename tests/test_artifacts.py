from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from embviz.artifacts import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    compress_cached,
    load_artifact,
    matrix_fingerprint,
    read_manifest,
    save_artifact,
)
from embviz.compressors import (
    AECompressor,
    CompressedEmbedding,
    ProgressCallback,
    SVDCompressor,
    TrainingCancelled,
)


def _matrix(rows: int = 120, cols: int = 12) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))


class CountingSVD(SVDCompressor):
    """An SVD compressor that counts its fits."""

    fits = 0

    def fit(self, embedding: torch.Tensor, progress: ProgressCallback | None = None) -> CompressedEmbedding:
        type(self).fits += 1
        return super().fit(embedding, progress)


@pytest.fixture
def counting() -> type[CountingSVD]:
    CountingSVD.fits = 0
    return CountingSVD


def _assert_same(a: CompressedEmbedding, b: CompressedEmbedding, *, refit: bool = False) -> None:
    """Equal tensors and metadata (a refit differs only in its timings)."""
    for name in ("codes", "decoder", "decoder_bias", "dense"):
        left, right = getattr(a, name), getattr(b, name)
        assert (left is None and right is None) or torch.equal(left, right)
    assert (a.method, a.config) == (b.method, b.config)
    assert refit or (a.history, a.train_seconds) == (b.history, b.train_seconds)
    assert (a.stored_bytes, a.decoder_activation, a.label) == (b.stored_bytes, b.decoder_activation, b.label)


@pytest.mark.parametrize(
    "compressed",
    [
        SVDCompressor(3).fit(_matrix()),
        AECompressor(3, epochs=1, batch_size=32, nonlinear=True).fit(_matrix()),
        CompressedEmbedding("int8", {"bits": 8}, dense=_matrix(), stored_bytes=120 * 12 + 4 * 120),
    ],
    ids=["svd", "ae", "dense"],
)
def test_artifacts_round_trip_exactly(tmp_path: Path, compressed: CompressedEmbedding) -> None:
    fingerprint = matrix_fingerprint(_matrix())
    manifest = save_artifact(tmp_path / "a", compressed, "tiny", fingerprint)
    _assert_same(load_artifact(tmp_path / "a", expected_fingerprint=fingerprint), compressed)
    assert manifest == read_manifest(tmp_path / "a")
    expected = {"backbone", "method", "config", "rank", "ratio", "params", "bytes", "seed", "versions"}
    expected |= {"history", "train_seconds", "fingerprint", "weights_sha256"}
    assert expected <= set(manifest)
    assert set(manifest["versions"]) == {"embviz", "torch", "transformers"}
    assert manifest["params"] == compressed.params and manifest["bytes"] == compressed.bytes


def test_fingerprint_depends_on_content_and_shape_and_tracks_in_place_edits() -> None:
    matrix = _matrix()
    first = matrix_fingerprint(matrix)
    assert first == matrix_fingerprint(matrix.clone()) == matrix_fingerprint(matrix.detach())
    assert first != matrix_fingerprint(matrix.reshape(60, 24))
    assert first == matrix_fingerprint(matrix.double())  # hashed as float32
    matrix[0, 0] += 1
    assert matrix_fingerprint(matrix) != first


def test_cache_builds_once_then_loads(counting: type[CountingSVD]) -> None:
    matrix = _matrix()
    first = compress_cached("tiny", matrix, counting(3))
    second = compress_cached("tiny", matrix, counting(3))
    assert (first.cached, second.cached, counting.fits) == (False, True, 1)
    assert first.path == second.path and first.path.name.startswith("svd-r3-")
    assert first.notice is None and second.notice is None
    _assert_same(first.compressed, second.compressed)
    assert compress_cached("tiny", matrix, counting(4)).cached is False  # another config, another entry
    assert compress_cached("other/model", matrix, counting(3)).cached is False
    assert compress_cached("tiny", matrix * 2, counting(3)).cached is False


def test_concurrent_requests_build_once(counting: type[CountingSVD]) -> None:
    matrix = _matrix()
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(compress_cached("tiny", matrix, counting(3))))]
    threads.append(
        threading.Thread(target=lambda: results.append(compress_cached("tiny", matrix, counting(3))))
    )
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counting.fits == 1 and sorted(r.cached for r in results) == [False, True]


def _truncate_weights(path: Path) -> None:
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])


def _edit_manifest(path: Path) -> None:
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["train_seconds"] = 0.0
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


def _break_json(path: Path) -> None:
    (path / MANIFEST_FILE).write_text("{not json")


def _remove_weights(path: Path) -> None:
    (path / WEIGHTS_FILE).unlink()


@pytest.mark.parametrize("damage", [_truncate_weights, _edit_manifest, _break_json, _remove_weights])
def test_corrupt_entries_are_detected_and_rebuilt(damage: Any, counting: type[CountingSVD]) -> None:
    matrix = _matrix()
    first = compress_cached("tiny", matrix, counting(3))
    damage(first.path)
    with pytest.raises(ArtifactError):
        load_artifact(first.path)
    rebuilt = compress_cached("tiny", matrix, counting(3))
    assert (rebuilt.cached, counting.fits) == (False, 2)
    assert rebuilt.notice.startswith("cached artifact was corrupt (") and rebuilt.notice.endswith(
        "); rebuilt"
    )
    _assert_same(load_artifact(rebuilt.path), first.compressed, refit=True)
    assert compress_cached("tiny", matrix, counting(3)).cached is True


def test_a_mismatched_fingerprint_is_refused_and_rebuilt(counting: type[CountingSVD]) -> None:
    matrix = _matrix()
    first = compress_cached("tiny", matrix, counting(3))
    with pytest.raises(ArtifactError, match="different embedding matrix"):
        load_artifact(first.path, expected_fingerprint="0" * 64)
    # An artifact of another matrix sitting under this configuration's key is not reused.
    other = _matrix() + 1
    save_artifact(first.path, SVDCompressor(3).fit(other), "tiny", matrix_fingerprint(other))
    rebuilt = compress_cached("tiny", matrix, counting(3))
    assert not rebuilt.cached and "different embedding matrix" in rebuilt.notice
    _assert_same(rebuilt.compressed, first.compressed, refit=True)


def test_cancelled_training_leaves_no_artifact(tmp_path: Path) -> None:
    with pytest.raises(TrainingCancelled):
        compress_cached("tiny", _matrix(), AECompressor(3, epochs=2, batch_size=32), progress=lambda _: False)
    root = Path(os.environ["EMBVIZ_HOME"]) / "artifacts" / "tiny"
    assert not [p for p in root.iterdir() if not p.name.endswith(".lock")]


def test_an_unusable_cache_still_compresses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("EMBVIZ_HOME", str(blocker))
    result = compress_cached("tiny", _matrix(), SVDCompressor(3))
    assert result.path is None and not result.cached and "cache unusable" in result.notice
    assert result.compressed.rank == 3


def test_backbone_paths_become_safe_folder_names() -> None:
    result = compress_cached("/some/where/../tiny model", _matrix(), SVDCompressor(2))
    artifacts = Path(os.environ["EMBVIZ_HOME"]) / "artifacts"
    assert result.path.parent.parent == artifacts and result.path.parent.name.startswith("tiny_model-")
