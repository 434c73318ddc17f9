"""The contract every registered compression method keeps (in the spirit of scikit-learn's common checks).

Parametrised over the method registry, so a newly registered method is checked with no edit here: on the
tiny models it compresses, stores, reloads bit-identically, counts its bytes exactly as the artifact file
holds them, rebuilds from its configuration, exports and loads back with identical logits, and rejects
sizes it does not take with one clear error. A toy method registered only inside this file then shows up
in the CLI, the sweep and the app with no other file touched.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from embviz.artifacts import (
    WEIGHTS_FILE,
    compress_cached,
    decode_tensors,
    encode_tensors,
    load_artifact,
    read_manifest,
)
from embviz.backbones import Backbone
from embviz.cli import main
from embviz.compressors import (
    CompressedEmbedding,
    MethodSpec,
    all_methods,
    compressor_from_config,
    get_method,
    method_ids,
    registered,
)
from embviz.errors import BadInputError
from embviz.evaluation import sweep
from embviz.export import export_compressed, load_compressed
from embviz.testing import SENTENCES, example_compressor, example_inputs

METHOD_IDS = [spec.id for spec in all_methods()]


_FITTED: dict[tuple[str, str], tuple[CompressedEmbedding, Path | None]] = {}


def fitted(spec: MethodSpec, backbone: Backbone) -> tuple[CompressedEmbedding, Path | None]:
    """The method's example variant of ``backbone``, through the artifact cache (fitted once per test run)."""
    key = (spec.id, backbone.name)
    if key not in _FITTED:
        compressor = example_compressor(spec, backbone.vocab_size, backbone.hidden_size)
        result = compress_cached(backbone.name, backbone.embedding, compressor)
        _FITTED[key] = (result.compressed, result.path)
    return _FITTED[key]


@pytest.fixture(scope="module")
def contract_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("contract-home")


@pytest.fixture
def home(contract_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EMBVIZ_HOME", str(contract_home))
    return contract_home


def _file_tensor_bytes(path: Path) -> dict[str, int]:
    with safe_open(path, "pt") as handle:
        return {name: handle.get_tensor(name).nbytes for name in handle.keys()}  # noqa: SIM118


# -- the contract ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHOD_IDS)
def test_compresses_stores_and_reloads_bit_identically(
    method: str, tiny_backbone: Backbone, home: Path
) -> None:
    spec = get_method(method)
    compressed, path = fitted(spec, tiny_backbone)
    assert compressed.method == spec.id
    assert compressed.shape == tuple(tiny_backbone.embedding.shape)
    assert torch.isfinite(compressed.reconstruct()).all()
    assert path is not None and (path / WEIGHTS_FILE).exists()
    loaded = load_artifact(path)
    assert loaded.method == compressed.method and loaded.config == compressed.config
    assert torch.equal(loaded.reconstruct(), compressed.reconstruct())
    for name in spec.stores:
        assert torch.equal(getattr(loaded, name), getattr(compressed, name)), name


@pytest.mark.parametrize("method", METHOD_IDS)
def test_stores_what_it_declares_and_counts_its_bytes_exactly(
    method: str, tiny_causal: Backbone, home: Path
) -> None:
    spec = get_method(method)
    compressed, path = fitted(spec, tiny_causal)
    assert path is not None
    held = _file_tensor_bytes(path / WEIGHTS_FILE)
    assert set(held) == set(spec.stores)
    assert sum(held.values()) == compressed.bytes
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["bytes"] == compressed.bytes
    if spec.sizing == "fixed":
        assert spec.fixed_bytes is not None
        assert compressed.bytes == spec.fixed_bytes(*compressed.shape)
    if spec.bytes_for_rank is not None:
        assert compressed.rank is not None
        assert compressed.bytes == spec.bytes_for_rank(*compressed.shape, compressed.rank)


@pytest.mark.parametrize("method", METHOD_IDS)
def test_rebuilds_from_its_configuration(method: str, tiny_causal: Backbone) -> None:
    spec = get_method(method)
    compressor = example_compressor(spec, tiny_causal.vocab_size, tiny_causal.hidden_size)
    assert compressor.method == spec.id
    inputs = example_inputs(spec, tiny_causal.vocab_size, tiny_causal.hidden_size)
    config = compressor.get_config()
    assert compressor_from_config(config, **inputs).get_config() == config
    assert json.loads(json.dumps(config)) == config  # JSON-ready, as manifests need


@pytest.mark.parametrize("method", METHOD_IDS)
def test_exports_and_loads_back_with_identical_logits(
    method: str, tiny_backbone: Backbone, home: Path, tmp_path: Path
) -> None:
    compressed, _ = fitted(get_method(method), tiny_backbone)
    mode = "tied" if tiny_backbone.tied else "input"
    export_compressed(tiny_backbone, compressed, tmp_path / "export", mode=mode)
    loaded = load_compressed(tmp_path / "export")
    ids = tiny_backbone.tokenizer(SENTENCES[:2], return_tensors="pt", padding=True)["input_ids"]
    expected = tiny_backbone.logits(ids, embedding=compressed.reconstruct(), mode=mode)
    assert torch.equal(loaded.logits(ids), expected)


@pytest.mark.parametrize("method", METHOD_IDS)
def test_rejects_sizes_it_does_not_take_with_one_clear_error(method: str) -> None:
    spec = get_method(method)
    vocab, hidden = 500, 32
    bad: list[dict[str, Any]]
    if spec.sizing == "rank":
        bad = [
            {"rank": 0},
            {"rank": hidden},
            {"ratio": 0.5},
            {"ratio": float("nan")},
            {},
            {"rank": 2, "ratio": 4.0},
        ]
    elif spec.sizing == "bytes":
        bad = [{"rank": 4}, {}, {"ratio": 0.5}, {"ratio": 10_000.0}]
    else:
        bad = [{"rank": 4}, {"ratio": 4.0}]
    for size in bad:
        with pytest.raises(BadInputError) as caught:
            spec.size(vocab, hidden, **size)
        message = str(caught.value)
        assert "\n" not in message and len(message) < 300, message


def test_the_cli_refuses_a_bad_size_before_loading_the_model(capsys: pytest.CaptureFixture[str]) -> None:
    # A model that does not exist: the size errors must come first.
    for flags, expected in (
        (["--method", "quant-int8", "--rank", "4"], "fixed size"),
        (["--method", "quant-mixed"], "byte ratio"),
        (["--method", "svd", "--rank", "0"], "rank must be"),
        (["--method", "svd", "--ratio", "0.5"], "ratio must be above 1"),
    ):
        assert main(["compress", "/no/such/model", *flags]) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err


def test_methods_command_lists_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["id"] for row in rows] == list(method_ids())
    assert {"id", "label", "family", "sizing", "trains", "stores"} <= set(rows[0])
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    assert all(spec.id in text for spec in all_methods())


def test_the_readme_method_table_is_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    shown = readme.split("<!-- methods:start -->\n", 1)[1].split("<!-- methods:end -->", 1)[0]
    assert main(["methods", "--markdown"]) == 0
    assert shown.strip() == capsys.readouterr().out.strip(), "run `embviz methods --markdown` into the README"


# -- a method added in one place -----------------------------------------------------------------------------
class LeadingCoordinates:
    """A toy closed-form compressor: keep each row's first r coordinates (codes), decode with [I | 0]."""

    method = "toy-leading"

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def get_config(self) -> dict[str, Any]:
        return {"method": self.method, "label": "toy: leading coordinates", "rank": self.rank}

    def fit(self, embedding: torch.Tensor, progress: Any = None) -> CompressedEmbedding:
        hidden = embedding.shape[1]
        if not 1 <= self.rank < hidden:
            raise BadInputError(f"rank must be between 1 and {hidden - 1}")
        decoder = torch.eye(self.rank, hidden)
        codes = embedding[:, : self.rank].detach().clone().contiguous()
        return CompressedEmbedding(method=self.method, config=self.get_config(), codes=codes, decoder=decoder)


TOY = MethodSpec(
    id="toy-leading",
    label="toy: leading coordinates",
    family="toy",
    sizing="rank",
    factory=lambda rank, ratio, row_weights: LeadingCoordinates(rank),
    stores=("codes", "decoder"),
    description="Keeps the first r coordinates of every row (a test of registration).",
)


def test_a_method_registered_in_one_place_reaches_the_cli_the_sweep_and_the_app(
    tiny_causal: Backbone,
    tiny_causal_path: Path,
    home: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert "toy-leading" not in method_ids()
    with registered(TOY):
        # CLI: listed in the help, compresses, and is described by `embviz methods`.
        with pytest.raises(SystemExit):
            main(["compress", "--help"])
        # argparse wraps long help at hyphens ("toy-\n   leading"): undo the wrapping before looking
        assert "toy-leading" in re.sub(r"-\s+", "-", capsys.readouterr().out)
        assert (
            main(["compress", str(tiny_causal_path), "--method", "toy-leading", "--ratio", "4", "--json"])
            == 0
        )
        payload = json.loads(capsys.readouterr().out)
        assert payload["method"] == "toy-leading" and payload["rank"] >= 1
        assert main(["methods", "--json"]) == 0
        assert "toy-leading" in [row["id"] for row in json.loads(capsys.readouterr().out)]
        # The sweep sizes it by the shared budget rule and scores it.
        rows = [row.to_dict() if hasattr(row, "to_dict") else row for row in sweep(
            tiny_causal, ["svd", "toy-leading"], ratios=[4.0], max_tokens=64
        )]  # fmt: skip
        toy = next(row for row in rows if row["method"] == "toy-leading")
        svd = next(row for row in rows if row["method"] == "svd")
        assert toy["rank"] == svd["rank"] and toy["perplexity"] > 0
        # The app's method lists read the registry.
        from streamlit.testing.v1 import AppTest

        monkeypatch.setenv("EMBVIZ_BACKBONE", str(tiny_causal_path))
        app = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=120)
        app.run()
        app.switch_page("pages/size.py").run()
        options = [option for widget in app.multiselect for option in widget.options]
        assert any("toy: leading coordinates" in str(option) for option in options), options
    assert "toy-leading" not in method_ids()


def test_an_artifact_holds_exactly_what_its_method_stores(tiny_causal: Backbone, home: Path) -> None:
    compressed, path = fitted(get_method("quant-int8"), tiny_causal)
    assert path is not None
    manifest = read_manifest(path)
    tensors = encode_tensors(compressed)
    assert decode_tensors(dict(manifest), dict(tensors)).method == "quant-int8"
    with pytest.raises(ValueError, match="svd stores codes, decoder"):
        decode_tensors({**manifest, "method": "svd"}, dict(tensors))


@pytest.mark.parametrize("method", method_ids())
def test_model_inputs_asks_only_for_what_the_method_needs(method: str) -> None:
    spec = get_method(method)
    asked: list[str] = []

    def provider(name: str) -> Any:
        def provide() -> str:
            asked.append(name)
            return name

        return provide

    inputs = spec.model_inputs(
        row_weights=provider("row_weights"), direction_metric=provider("direction_metric")
    )
    needed = [
        name
        for name, needs in (
            ("row_weights", spec.needs_row_weights),
            ("direction_metric", spec.needs_direction_metric),
        )
        if needs
    ]
    assert asked == needed and inputs == {name: name for name in needed}
