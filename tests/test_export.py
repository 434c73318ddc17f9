"""Exports: ``embviz export`` / :func:`embviz.export.export_compressed` and :func:`embviz.load_compressed`."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import embviz
from embviz.artifacts import WEIGHTS_FILE, compress_cached
from embviz.backbones import Backbone
from embviz.cli import main
from embviz.compressors import CompressedEmbedding, get_method, make_compressor, method_ids
from embviz.errors import BadInputError, EmbvizError
from embviz.evaluation import evaluate_variant
from embviz.export import (
    EMBEDDING_FILE,
    EXPORT_MANIFEST,
    MODEL_FILE,
    ExportError,
    export_compressed,
    load_compressed,
    verify_export,
)
from embviz.perplexity import build_eval_set, score_variant
from embviz.sources import inspect_model, load_model
from embviz.testing import SENTENCES, example_compressor

RANK = 8
METHODS = method_ids()
_VARIANTS: dict[tuple[int, str], CompressedEmbedding] = {}


@pytest.fixture(scope="module")
def biased_masked(tiny_masked: Backbone) -> Backbone:
    """The tiny masked model with a non-zero MLM output bias (shared by two names), so losing it shows."""
    model = copy.deepcopy(tiny_masked.model)
    with torch.no_grad():
        model.cls.predictions.bias.copy_(torch.linspace(-1.0, 1.0, model.cls.predictions.bias.numel()))
    assert model.cls.predictions.decoder.bias.data_ptr() == model.cls.predictions.bias.data_ptr()
    return Backbone(tiny_masked.name, model, tiny_masked.tokenizer, "masked", source=tiny_masked.source)


@pytest.fixture(params=["causal", "masked"])
def backbone(request: pytest.FixtureRequest) -> Backbone:
    return request.getfixturevalue("tiny_causal" if request.param == "causal" else "biased_masked")


def _variant(backbone: Backbone, name: str) -> CompressedEmbedding:
    key = (id(backbone), name)
    if key not in _VARIANTS:
        spec = get_method(name)
        compressor = example_compressor(spec, backbone.vocab_size, backbone.hidden_size, rank=RANK, ratio=6.0)
        _VARIANTS[key] = compressor.fit(backbone.embedding)
    return _VARIANTS[key]


def _ids(backbone: Backbone) -> torch.Tensor:
    text = [SENTENCES[0], SENTENCES[5]]
    return backbone.tokenizer(text, return_tensors="pt", padding=True)["input_ids"]


def facts_key(out: Path, key: str) -> Any:
    return json.loads((out / EXPORT_MANIFEST).read_text())[key]


def _header_bytes(path: Path) -> int:
    with open(path, "rb") as handle:
        return 8 + struct.unpack("<Q", handle.read(8))[0]


# -- round trip --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["tied", "input"])
@pytest.mark.parametrize("name", METHODS)
def test_export_load_gives_identical_logits(backbone: Backbone, name: str, mode: str, tmp_path: Path) -> None:
    compressed = _variant(backbone, name)
    out = tmp_path / "export"
    facts = export_compressed(backbone, compressed, out, mode=mode)  # type: ignore[arg-type]
    loaded = load_compressed(out)
    ids = _ids(backbone)
    expected = backbone.logits(ids, embedding=compressed.reconstruct(), mode=mode)  # type: ignore[arg-type]
    assert torch.equal(loaded.logits(ids), expected)
    assert torch.equal(loaded.embedding, compressed.reconstruct())
    # The embedding file holds exactly the bytes the method states, plus the safetensors header.
    embedding_file = out / EMBEDDING_FILE
    assert facts["embedding_bytes"] == compressed.bytes == facts["stated_bytes"]
    assert embedding_file.stat().st_size - _header_bytes(embedding_file) == compressed.bytes
    assert facts["ratio"] == pytest.approx(compressed.byte_ratio, rel=1e-4)
    # Tied: no V x D matrix in the model file. Input: the original output matrix, stored once, untied.
    with safe_open(out / MODEL_FILE, "pt") as handle:
        matrices = [key for key in handle.keys() if handle.get_slice(key).get_shape() == [*compressed.shape]]  # noqa: SIM118
    output = loaded.model.get_output_embeddings().weight
    if mode == "tied":
        assert loaded.tied and matrices == []
        assert facts["warnings"] == []
    else:
        assert not loaded.tied and torch.equal(output, backbone.embedding)
        assert len(matrices) == 1 and matrices[0] != facts_key(out, "input_key")
        assert facts["warnings"] and "saves nothing" in facts["warnings"][0]
    manifest = json.loads((out / EXPORT_MANIFEST).read_text())
    assert (manifest["method"], manifest["mode"], manifest["rank"]) == (
        compressed.method,
        mode,
        compressed.rank,
    )
    assert manifest["embviz_version"] == embviz.__version__
    assert manifest["source_model"] == backbone.name
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {EXPORT_MANIFEST}


def test_quantised_codes_are_stored_as_integers(tiny_causal: Backbone, tmp_path: Path) -> None:
    for name, dtypes in {
        "quant-int8": {"qcodes": torch.int8, "qscales": torch.float16},
        "quant-int4": {"qcodes": torch.uint8, "qscales": torch.float16},
        "svd-int8": {"qcodes": torch.int8, "qscales": torch.float16, "decoder": torch.float16},
    }.items():
        export_compressed(tiny_causal, _variant(tiny_causal, name), tmp_path / name)
        with safe_open(tmp_path / name / EMBEDDING_FILE, "pt") as handle:
            assert {key: handle.get_tensor(key).dtype for key in handle.keys()} == dtypes  # noqa: SIM118


def test_load_model_and_package_level_loader(tiny_causal: Backbone, tmp_path: Path) -> None:
    out = tmp_path / "export"
    export_compressed(tiny_causal, _variant(tiny_causal, "svd"), out)
    ids = _ids(tiny_causal)
    via_backbone = load_model(str(out))
    via_package = embviz.load_compressed(out)
    assert embviz.load_compressed is load_compressed
    assert torch.equal(via_backbone.logits(ids), via_package.logits(ids))
    assert via_backbone.name == str(out) and "embviz export" in via_backbone.source
    info = inspect_model(str(out))
    assert (info.vocab_size, info.hidden_size, info.tied) == (*tiny_causal.embedding.shape, True)


def test_untied_model_exports_input_mode_only(tiny_causal: Backbone, tmp_path: Path) -> None:
    model = copy.deepcopy(tiny_causal.model)
    model.lm_head.weight = torch.nn.Parameter(tiny_causal.embedding.clone() * 0.5, requires_grad=False)
    model.config.tie_word_embeddings = False
    untied = Backbone("untied", model, tiny_causal.tokenizer, "causal")
    assert not untied.tied
    compressed = _variant(tiny_causal, "svd")
    with pytest.raises(BadInputError, match="use mode 'input'"):
        export_compressed(untied, compressed, tmp_path / "tied")
    export_compressed(untied, compressed, tmp_path / "input", mode="input")
    loaded = load_compressed(tmp_path / "input")
    ids = _ids(tiny_causal)
    assert torch.equal(loaded.logits(ids), untied.logits(ids, embedding=compressed.reconstruct()))


@pytest.mark.parametrize("mode", ["tied", "input"])
def test_export_perplexity_equals_the_variants(
    tiny_causal: Backbone, mode: str, tmp_path: Path, text_file: str
) -> None:
    compressed = _variant(tiny_causal, "svd-int8")
    out = tmp_path / "export"
    export_compressed(tiny_causal, compressed, out, mode=mode)  # type: ignore[arg-type]
    reported = evaluate_variant(tiny_causal, compressed, text=text_file, mode=mode, max_tokens=256)  # type: ignore[arg-type]
    loaded = load_compressed(out)
    texts = Path(text_file).read_text(encoding="utf-8").splitlines()
    exported = score_variant(loaded, build_eval_set(loaded, texts, max_tokens=256))
    assert exported.perplexity == reported.perplexity
    check = verify_export(tiny_causal, compressed, out, mode=mode, text=text_file, max_tokens=256)  # type: ignore[arg-type]
    assert check["identical_logits"] and check["max_abs_logit_diff"] == 0.0
    assert check["perplexity_export"] == check["perplexity_variant"] == reported.perplexity


# -- corruption and tampering ----------------------------------------------------------------------------
@pytest.fixture
def exported(tiny_causal: Backbone, tmp_path: Path) -> Path:
    out = tmp_path / "export"
    export_compressed(tiny_causal, _variant(tiny_causal, "quant-int8"), out)
    return out


def _flip_byte(path: Path, offset: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda out: _flip_byte(out / EMBEDDING_FILE), "does not match its recorded hash"),
        (lambda out: _flip_byte(out / MODEL_FILE), "does not match its recorded hash"),
        (
            lambda out: (out / MODEL_FILE).write_bytes((out / MODEL_FILE).read_bytes()[:100]),
            "does not match its recorded hash",
        ),
        (
            lambda out: (out / "config.json").write_text(
                (out / "config.json").read_text().replace('"hidden_act"', '"hidden_act_x"')
            ),
            "config.json of the export",
        ),
        (lambda out: (out / EXPORT_MANIFEST).write_text("{not json"), "does not parse"),
        (lambda out: (out / EXPORT_MANIFEST).unlink(), "embviz_export.json missing"),
        (lambda out: (out / "pytorch_model.bin").write_bytes(b"pickle"), "does not list: pytorch_model.bin"),
        (lambda out: (out / EMBEDDING_FILE).unlink(), "cannot be read"),
    ],
)
def test_tampered_export_is_refused(exported: Path, tamper: Any, message: str) -> None:
    tamper(exported)
    with pytest.raises(ExportError, match=message):
        load_compressed(exported)
    with pytest.raises(EmbvizError, match=message):
        load_model(str(exported))


def _edit_manifest(out: Path, **changes: Any) -> None:
    manifest = json.loads((out / EXPORT_MANIFEST).read_text())
    manifest.update(changes)
    (out / EXPORT_MANIFEST).write_text(json.dumps(manifest))


def test_edited_manifest_is_refused(exported: Path) -> None:
    _edit_manifest(exported, label="int2 rows", mode="input")
    with pytest.raises(ExportError, match="modified after the export was written"):
        load_compressed(exported)


def test_manifest_naming_a_file_outside_is_refused(exported: Path) -> None:
    manifest = json.loads((exported / EXPORT_MANIFEST).read_text())
    _edit_manifest(exported, files={**manifest["files"], "../outside": {"sha256": "0", "bytes": 1}})
    with pytest.raises(ExportError, match="outside the folder"):
        load_compressed(exported)


def test_not_an_export(tmp_path: Path, tiny_causal_path: Path) -> None:
    with pytest.raises(ExportError, match="not a folder"):
        load_compressed(tmp_path / "nothing")
    with pytest.raises(ExportError, match="missing"):
        load_compressed(tiny_causal_path)


# -- target folder ---------------------------------------------------------------------------------------
def test_target_rules(tiny_causal: Backbone, tmp_path: Path) -> None:
    compressed = _variant(tiny_causal, "svd")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ExportError, match="not empty"):
            export_compressed(tiny_causal, compressed, busy, overwrite=overwrite)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    export_compressed(tiny_causal, compressed, tmp_path / "empty")
    with pytest.raises(ExportError, match="--force"):
        export_compressed(tiny_causal, compressed, tmp_path / "empty")
    export_compressed(tiny_causal, _variant(tiny_causal, "quant-int4"), tmp_path / "empty", overwrite=True)
    assert json.loads((tmp_path / "empty" / EXPORT_MANIFEST).read_text())["method"] == "quant-int4"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        export_compressed(tiny_causal, compressed, tmp_path / "file")
    with pytest.raises(ExportError, match="cannot write"):
        export_compressed(tiny_causal, compressed, tmp_path / "file" / "below")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "empty", "file"]  # no temporaries left


# -- CLI ---------------------------------------------------------------------------------------------------
@pytest.fixture
def text_file(tmp_path: Path) -> str:
    lines = [" ".join(SENTENCES[i : i + 3]) for i in range(len(SENTENCES) - 2)]
    path = tmp_path / "held-out.txt"
    path.write_text("\n".join(lines * 2), encoding="utf-8")
    return str(path)


def _artifact(backbone: Backbone, method: str = "svd-int8", rank: int | None = RANK) -> Path:
    result = compress_cached(backbone.name, backbone.embedding, make_compressor(method, rank))
    assert result.path is not None
    return result.path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_cli_round_trip(
    tiny_causal_path: Path, tiny_causal: Backbone, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    artifact = _artifact(tiny_causal)
    out = tmp_path / "export"
    status, stdout, err = _run(
        capsys,
        "export",
        str(tiny_causal_path),
        "--artifact",
        str(artifact / WEIGHTS_FILE),
        "--out",
        str(out),
        "--json",
    )
    assert status == 0, err
    result = json.loads(stdout)
    assert result["folder"] == str(out) and result["mode"] == "tied" and result["warnings"] == []
    assert result["embedding_bytes"] == result["stated_bytes"] < result["original_bytes"]
    assert result["folder_bytes"] == sum(p.stat().st_size for p in out.iterdir())
    status, stdout, _ = _run(capsys, "info", str(out), "--json")
    assert status == 0 and json.loads(stdout)["tied"] is True
    status, stdout, err = _run(
        capsys, "predict", str(out), "The king of ___ lived in a great palace.", "--k", "3", "--json"
    )
    assert status == 0, err
    # Human output, input mode: the warning about the untied output head goes to stderr.
    status, stdout, err = _run(
        capsys,
        "export",
        str(tiny_causal_path),
        "--artifact",
        str(artifact),
        "--out",
        str(tmp_path / "in"),
        "--mode",
        "input",
    )
    assert status == 0 and "ratio" in stdout and "folder size" in stdout
    assert "warning: input mode keeps the original" in err


def test_cli_verify(
    tiny_causal_path: Path,
    tiny_causal: Backbone,
    tmp_path: Path,
    text_file: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    artifact = _artifact(tiny_causal, "quant-int4", None)
    argv = ["export", str(tiny_causal_path), "--artifact", str(artifact), "--out", str(tmp_path / "e")]
    status, stdout, err = _run(capsys, *argv, "--verify", "--text", text_file, "--json")
    assert status == 0, err
    check = json.loads(stdout)["verify"]
    assert check["identical_logits"] and check["perplexity_equal"]
    assert check["perplexity_export"] == check["perplexity_variant"]


def test_cli_bad_inputs(
    tiny_causal_path: Path,
    tiny_causal: Backbone,
    tiny_masked: Backbone,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    artifact = _artifact(tiny_causal)
    model = str(tiny_causal_path)

    def refused(*argv: str, match: str) -> None:
        status, stdout, err = _run(capsys, "export", *argv)
        assert status == 2 and stdout == "", err
        assert err.startswith("embviz: error:") and err.count("\n") == 1 and match in err, err

    out = str(tmp_path / "out")
    refused("no-such-model", "--artifact", str(artifact), "--out", out, match="unknown model")
    refused(model, "--artifact", str(tmp_path / "missing"), "--out", out, match="no artifact")
    foreign = _artifact(tiny_masked, "svd", RANK)
    refused(model, "--artifact", str(foreign), "--out", out, match="different embedding matrix")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for path in artifact.iterdir():
        (corrupt / path.name).write_bytes(path.read_bytes())
    _flip_byte(corrupt / WEIGHTS_FILE)
    refused(model, "--artifact", str(corrupt), "--out", out, match="do not match their recorded hash")
    assert not Path(out).exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    refused(model, "--artifact", str(artifact), "--out", str(busy), match="--force")
    refused(model, "--artifact", str(artifact), "--out", str(busy), "--force", match="not an embviz export")
    assert (busy / "notes.txt").read_text() == "keep me"
    (tmp_path / "a-file").write_text("x")
    refused(model, "--artifact", str(artifact), "--out", str(tmp_path / "a-file" / "x"), match="cannot write")
    assert _run(capsys, "export", model, "--artifact", str(artifact), "--out", out)[0] == 0
    refused(model, "--artifact", str(artifact), "--out", out, match="--force")
    assert _run(capsys, "export", model, "--artifact", str(artifact), "--out", out, "--force")[0] == 0
