from __future__ import annotations

import sys
import types
import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import scipy.sparse
import torch

from embviz import projections
from embviz.cache import cache_dir
from embviz.compressors.base import CompressedEmbedding
from embviz.errors import BadInputError
from embviz.progress import Progress
from embviz.projections import ORIGINAL, pca_map, projection_map, sample_ids, umap_map


def _random(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _variant(matrix: torch.Tensor, rank: int = 3, bias: bool = True) -> CompressedEmbedding:
    _, eigenvectors = torch.linalg.eigh(matrix.double().T @ matrix.double())
    top = eigenvectors[:, -rank:].float()
    return CompressedEmbedding(
        "svd",
        {"rank": rank},
        codes=matrix @ top,
        decoder=top.T.contiguous(),
        decoder_bias=torch.full((matrix.shape[1],), 0.1) if bias else None,
    )


class _FakeUMAP:
    """Stands in for umap.UMAP on precomputed distances: a point's x is its own row (fit) or its nearest
    original row (transform), its y the number of neighbours it was given."""

    calls: ClassVar[list[tuple[str, int]]] = []

    def __init__(self, **params: object) -> None:
        self.params = params

    def fit_transform(self, graph: scipy.sparse.csr_matrix) -> np.ndarray:
        assert self.params["metric"] == "precomputed" and (graph != graph.T).nnz == 0
        indices, distances = self.params["precomputed_knn"]  # type: ignore[misc]
        assert (indices[:, 0] == np.arange(graph.shape[0])).all() and (distances[:, 0] == 0).all()
        self.calls.append(("fit", graph.shape[0]))
        return np.stack([np.arange(graph.shape[0]), np.diff(graph.indptr)], axis=1).astype(np.float64)


def _fake_place(model: _FakeUMAP, indices: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """Stands in for place_in_map: a point's x is its nearest original row, its y how many neighbours."""
    model.calls.append(("transform", len(indices)))
    assert (np.diff(distances, axis=1) >= 0).all()  # nearest first
    return np.stack([indices[:, 0], np.full(len(indices), indices.shape[1])], axis=1).astype(np.float32)


@pytest.fixture
def fake_umap(monkeypatch: pytest.MonkeyPatch) -> type[_FakeUMAP]:
    _FakeUMAP.calls = []
    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=_FakeUMAP))
    monkeypatch.setattr(projections, "place_in_map", _fake_place)
    return _FakeUMAP


# -- PCA ----------------------------------------------------------------------------------------------------
def test_pca_transform_of_the_original_equals_the_fit_coordinates() -> None:
    matrix = _random(200, 12)
    result = pca_map(matrix, {"same": matrix.clone(), "svd": _variant(matrix)})
    assert list(result.coords) == [ORIGINAL, "same", "svd"]
    np.testing.assert_allclose(result.coords["same"], result.coords[ORIGINAL], atol=1e-6)
    assert result.coords["svd"].shape == (200, 2) and result.coords["svd"].dtype == np.float32
    assert not result.sampled and result.note() is None and result.position(17) == 17


def test_pca_is_exact_and_low_rank_variants_project_through_factors() -> None:
    matrix = _random(300, 10) * torch.linspace(3, 0.5, 10)
    coords = pca_map(matrix, {})
    centred = (matrix - matrix.mean(0)).double()
    _, _, vt = torch.linalg.svd(centred, full_matrices=False)
    reference = (centred @ vt[:2].T).numpy()
    np.testing.assert_allclose(np.abs(coords.coords[ORIGINAL]), np.abs(reference), atol=1e-4)

    variant = _variant(matrix)
    dense = CompressedEmbedding("dense", {}, dense=variant.reconstruct())
    result = pca_map(matrix, {"factors": variant, "dense": dense})
    np.testing.assert_allclose(result.coords["factors"], result.coords["dense"], atol=1e-4)


def test_pca_is_deterministic_and_reports_progress() -> None:
    matrix = _random(100, 6)
    stages: list[Progress] = []
    first = pca_map(matrix, {"a": matrix * 2}, progress=stages.append)
    second = pca_map(matrix.clone(), {"a": matrix * 2})
    np.testing.assert_array_equal(first.coords[ORIGINAL], second.coords[ORIGINAL])
    assert stages[-1].done == 1.0


def test_variants_are_checked() -> None:
    matrix = _random(20, 4)
    with pytest.raises(BadInputError, match="shape"):
        pca_map(matrix, {"bad": _random(20, 5)})
    with pytest.raises(BadInputError, match="cannot be called"):
        pca_map(matrix, {ORIGINAL: matrix})


# -- sampling and UMAP --------------------------------------------------------------------------------------
def test_sample_ids_are_seeded_and_include_requested_ids() -> None:
    assert sample_ids(10, None, 0).tolist() == list(range(10))
    assert sample_ids(10, 50, 0).tolist() == list(range(10))
    ids = sample_ids(1000, 50, seed=3, include=[999, 5])
    assert {5, 999} <= set(ids.tolist()) and 50 <= len(ids) <= 52
    assert (np.diff(ids) > 0).all()
    np.testing.assert_array_equal(ids, sample_ids(1000, 50, seed=3, include=[999, 5]))
    with pytest.raises(BadInputError):
        sample_ids(10, 5, 0, include=[10])


def test_umap_plumbing_fits_original_and_transforms_each_variant(fake_umap: type[_FakeUMAP]) -> None:
    matrix = _random(400, 8)
    variants = {"same": _variant(matrix, rank=8, bias=False), "ae": matrix * 2}
    result = umap_map(matrix, variants, n_neighbors=5, sample=100, include_ids=[399])
    rows = len(result.ids)
    assert fake_umap.calls == [("fit", rows), ("transform", rows), ("transform", rows)]
    assert result.sampled and 399 in result.ids and result.position(399) is not None
    assert "of 400 tokens" in (result.note() or "")
    np.testing.assert_array_equal(result.coords[ORIGINAL][:, 0], np.arange(rows))
    # an unchanged row's nearest original row is itself (rank 8 of 8 is exact), and it got 5 neighbours
    for name in variants:
        np.testing.assert_array_equal(result.coords[name][:, 0], np.arange(rows))
        assert (result.coords[name][:, 1] == 5).all()
    assert all(c.shape == (rows, 2) and c.dtype == np.float32 for c in result.coords.values())


def test_umap_reuses_a_given_original_neighbour_table(
    fake_umap: type[_FakeUMAP], monkeypatch: pytest.MonkeyPatch
) -> None:
    matrix = _random(120, 6)
    table = projections.nearest_neighbours(matrix, 9)
    monkeypatch.setattr(projections, "nearest_neighbours", lambda *a, **k: pytest.fail("searched again"))
    result = umap_map(matrix, {}, n_neighbors=6, original_neighbours=table)
    assert not result.sampled and result.coords[ORIGINAL].shape == (120, 2)


def test_real_umap_on_a_small_random_matrix() -> None:
    # The costliest fast test: umap's import and numba compile of its layout code, ~12 CPU-seconds.
    matrix = _random(300, 16)
    variants = {"svd": _variant(matrix, rank=8), "same": matrix.clone()}
    result = umap_map(matrix, variants, n_neighbors=10, sample=120, include_ids=[7])
    assert result.sampled and 7 in result.ids and len(result.ids) in (120, 121)
    assert list(result.coords) == [ORIGINAL, "svd", "same"]
    for coords in result.coords.values():
        assert coords.shape == (len(result.ids), 2) and np.isfinite(coords).all()
    # one frame: unchanged rows are placed where the fit put them
    original = result.coords[ORIGINAL]
    extent = np.ptp(original, axis=0).max()
    assert np.median(np.linalg.norm(result.coords["same"] - original, axis=1)) < 0.2 * extent


def test_placing_variants_in_a_fitted_umap_equals_its_transform() -> None:
    # place_in_map is umap's transform on precomputed neighbours without its per-row Python loops.
    import umap

    matrix = _random(500, 16)
    variant = matrix + 0.3 * _random(500, 16, seed=1)
    width = 10
    indices, scores = projections.nearest_neighbours(matrix, width - 1)
    knn_indices = np.hstack([np.arange(500)[:, None], indices]).astype(np.int64)
    knn_distances = np.hstack([np.zeros((500, 1), np.float32), 1 - scores.astype(np.float32)]).clip(0, 2)
    graph = scipy.sparse.csr_matrix(
        (knn_distances.ravel(), knn_indices.ravel(), np.arange(0, 500 * width + 1, width)), shape=(500, 500)
    )
    model = umap.UMAP(
        n_neighbors=width, metric="precomputed", random_state=3, transform_seed=3,
        precomputed_knn=(knn_indices, knn_distances),
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit_transform(graph.maximum(graph.T).tocsr())
        found, similarity = projections.cross_neighbours(variant, matrix, width)
        distances = (1 - similarity.astype(np.float32)).clip(0, 2)
        rows = np.arange(0, 500 * width + 1, width)
        expected = model.transform(
            scipy.sparse.csr_matrix((distances.ravel(), found.ravel(), rows), shape=(500, 500))
        )
    placed = projections.place_in_map(model, found, distances)
    assert placed.dtype == np.float32 and placed.shape == (500, 2)
    np.testing.assert_allclose(placed, expected, atol=1e-4 * np.ptp(model.embedding_))
    with pytest.raises(BadInputError):
        projections.place_in_map(model, found[:, :5], distances[:, :5])


# -- cache --------------------------------------------------------------------------------------------------
def _map_files() -> list[Path]:
    return sorted(cache_dir("maps").glob("*.npz"))


def test_projection_map_is_cached_by_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    matrix = _random(150, 6)
    variants = {"svd": _variant(matrix)}
    first = projection_map("pca", matrix, variants, backbone_name="tiny")
    assert not first.from_cache and len(_map_files()) == 1

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("recomputed instead of loading the cache")

    monkeypatch.setattr(projections, "pca_map", fail)
    second = projection_map("pca", matrix, variants, backbone_name="tiny")
    assert second.from_cache and list(second.coords) == list(first.coords)
    for name in first.coords:
        np.testing.assert_array_equal(first.coords[name], second.coords[name])
    np.testing.assert_array_equal(first.ids, second.ids)
    with pytest.raises(AssertionError, match="recomputed"):  # another variant is another entry
        projection_map("pca", matrix, {"svd": _variant(matrix, rank=2)}, backbone_name="tiny")


def test_sampled_umap_cache_key_ignores_focus_tokens_already_sampled(fake_umap: type[_FakeUMAP]) -> None:
    matrix = _random(300, 6)
    base = sample_ids(300, 40, 42)
    inside, outside = int(base[3]), int(np.setdiff1d(np.arange(300), base)[0])
    projection_map("umap", matrix, {}, sample=40, seed=42, include_ids=[inside])
    projection_map("umap", matrix, {}, sample=40, seed=42, include_ids=[int(base[5])])
    assert len(_map_files()) == 1
    third = projection_map("umap", matrix, {}, sample=40, seed=42, include_ids=[outside])
    assert len(_map_files()) == 2 and outside in third.ids


def test_corrupt_map_cache_is_recomputed() -> None:
    matrix = _random(80, 5)
    first = projection_map("pca", matrix, {"x": matrix * 0.5})
    (path,) = _map_files()
    path.write_bytes(b"\x00garbage")
    again = projection_map("pca", matrix, {"x": matrix * 0.5})
    assert not again.from_cache
    np.testing.assert_array_equal(first.coords["x"], again.coords["x"])
    assert projection_map("pca", matrix, {"x": matrix * 0.5}).from_cache


def test_a_map_computed_in_a_child_process_equals_the_one_computed_here() -> None:
    matrix = _random(200, 12)
    variants = {"svd": _variant(matrix, rank=4)}
    updates: list[Progress] = []
    here = umap_map(matrix, variants, n_neighbors=8)
    child = projection_map("umap", matrix, variants, n_neighbors=8, in_child=True, progress=updates.append)
    assert not child.from_cache and list(child.coords) == list(here.coords) and child.params == here.params
    for name in here.coords:
        np.testing.assert_allclose(child.coords[name], here.coords[name], rtol=1e-5, atol=1e-5)
    assert updates and updates[-1].fraction == 1.0 and "map ready" in updates[-1].message
    assert projection_map("umap", matrix, variants, n_neighbors=8).from_cache  # cached here, as usual


def test_a_child_map_checks_its_parameters_here_and_reports_its_errors() -> None:
    with pytest.raises(BadInputError, match="bad parameters"):
        projections.map_in_child("umap", _random(50, 4), {}, n_neighbours=5)
    with pytest.raises(BadInputError, match="needs more than 15 tokens"):  # raised in the child
        projections.map_in_child("umap", _random(10, 4), {})


def test_unknown_map_method() -> None:
    with pytest.raises(BadInputError, match="unknown map method"):
        projection_map("tsne", _random(10, 3), {})  # type: ignore[arg-type]


def test_a_cluster_that_moves_together_is_not_displaced_but_a_token_that_leaves_it_is() -> None:
    from embviz.projections import neighbourhood_displacement, rows_of

    original = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [10.0, 10.0], [11.0, 10.0], [10.0, 11.0]])
    neighbours = np.array([[1, 2], [0, 2], [0, 1], [4, 5], [3, 5], [3, 4]])
    shifted = original + np.array([5.0, -3.0])  # everything moves together
    np.testing.assert_allclose(neighbourhood_displacement(original, shifted, neighbours), 0, atol=1e-12)
    pulled = original.copy()
    pulled[3] += np.array([4.0, 0.0])  # token 3 leaves its neighbours
    moved = neighbourhood_displacement(original, pulled, neighbours)
    assert moved[3] == pytest.approx(4.0) and np.argmax(moved) == 3
    assert moved[0] == pytest.approx(0.0) and moved[4] == pytest.approx(2.0)  # its neighbours see it go
    alone = neighbourhood_displacement(original, pulled, np.array([[-1, -1]] * 6))
    assert np.isnan(alone).all(), "no drawn neighbour: no displacement to report"
    np.testing.assert_array_equal(rows_of(np.array([5, 7, 9]), np.array([[7, 8], [9, 5]])), [[1, -1], [2, 0]])
