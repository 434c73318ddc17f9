"""The ``embviz`` command line: the same engine as the app, headless, for sweeps and exports.

Every command prints progress on stderr and, with ``--json``, exactly one JSON object (or array) on stdout.
User errors print one line (``embviz: error: ...``) and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from embviz.errors import EmbvizError
from embviz.progress import Progress, describe
from embviz.threads import ALL, configure_threads

if TYPE_CHECKING:
    from embviz.backbones import Backbone

Command = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[Command, Callable[[argparse.ArgumentParser], None], str]] = {}


class _Arguments:
    """The function that adds a command's arguments, as :func:`command` registers it: still callable, and
    ``@it.runs`` names the command's runner."""

    def __init__(
        self, name: str, add_arguments: Callable[[argparse.ArgumentParser], None], help_text: str
    ) -> None:
        self.name = name
        self.add_arguments = add_arguments
        self.help_text = help_text

    def __call__(self, parser: argparse.ArgumentParser) -> None:
        self.add_arguments(parser)

    def runs(self, run: Command) -> Command:
        _COMMANDS[self.name] = (run, self.add_arguments, self.help_text)
        return run


def command(name: str, help_text: str) -> Callable[[Callable[[argparse.ArgumentParser], None]], _Arguments]:
    """Register ``embviz NAME``: decorate the function that adds its arguments; it names its runner."""

    def register(add_arguments: Callable[[argparse.ArgumentParser], None]) -> _Arguments:
        return _Arguments(name, add_arguments, help_text)

    return register


def emit(payload: Any, as_json: bool, render: Callable[[Any], str] | None = None) -> None:
    """Print ``payload`` as one JSON document, or as human text."""
    if as_json:
        print(json.dumps(payload, default=str))
    else:
        print(render(payload) if render else _render_mapping(payload))


class _ProgressBar:
    """The CLI's progress renderer: :class:`~embviz.progress.Progress` reports drawn as a tqdm bar on stderr.

    A bar opens on the first report and closes (its last line kept, then a newline) once a report says the
    work is finished, so a command that fails before any progress prints only its error. Every report is
    drawn (tqdm rewrites the line with a carriage return; no throttling, so a pipe sees each stage). With
    ``log_prefix`` every new message is also kept as a line above the bar (the benchmark's log), and the
    bar itself is only drawn on a terminal.
    """

    BAR_FORMAT = "{percentage:3.0f}% |{bar:30}| {desc} [{elapsed}]"

    def __init__(self, *, log_prefix: str | None = None) -> None:
        self.log_prefix = log_prefix
        self.bar: Any = None
        self.last_message: str | None = None

    def __call__(self, update: Progress) -> None:
        from tqdm import tqdm

        if self.log_prefix is not None:
            if update.message != self.last_message:
                tqdm.write(f"{self.log_prefix}{update.message}", file=sys.stderr)
            self.last_message = update.message
            if not sys.stderr.isatty():
                return
        if self.bar is None:
            self.bar = tqdm(
                total=update.total,
                initial=update.done,
                desc=describe(update),
                file=sys.stderr,
                bar_format=self.BAR_FORMAT,
                mininterval=0,
                dynamic_ncols=False,
                leave=True,
            )
        else:
            self.bar.total = update.total
            self.bar.n = update.done
            self.bar.set_description_str(describe(update), refresh=False)
            self.bar.refresh()
        if update.finished:
            self.bar.close()
            self.bar = None


def _render_mapping(payload: Any) -> str:
    if isinstance(payload, dict):
        width = max((len(str(k)) for k in payload), default=0)
        return "\n".join(f"{key:<{width}}  {value}" for key, value in payload.items())
    return str(payload)


def _load_backbone(args: argparse.Namespace) -> Backbone:
    from embviz.sources import load_model

    return load_model(args.model, trust_remote_code=getattr(args, "trust_remote_code", False))


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="built-in name (smollm2, minilm), local HF folder, or hub id")
    _add_trust(parser)


def _add_trust(parser: argparse.ArgumentParser) -> None:
    """``--trust-remote-code``, offered by every command that loads a model (off unless given)."""
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the model's own Python code to run (off by default; only for sources you trust)",
    )


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _add_device(parser: argparse.ArgumentParser, what: str) -> None:
    """``--device``: where ``what`` runs (a torch device name; default cpu)."""
    parser.add_argument(
        "--device",
        default="cpu",
        help=f"{what}: a torch device such as cuda or cuda:1 (default cpu); results match the CPU's within "
        "float tolerance and are cached under the same keys",
    )


def _device(args: argparse.Namespace) -> str:
    """``--device``, checked before any model loads: a name torch does not know, or ``cuda`` without a CUDA
    device, is one :class:`~embviz.errors.BadInputError`."""
    from embviz.compressors import check_device

    return check_device(args.device)


# embviz.frequency.WEIGHT_SOURCES, without importing torch here
_WEIGHT_SOURCES = ("general", "wordfreq", "corpora")


def _add_weights(parser: argparse.ArgumentParser) -> None:
    """``--weights``: where frequency-aware methods' row weights come from."""
    parser.add_argument(
        "--weights",
        choices=_WEIGHT_SOURCES,
        default="general",
        help="row weights of frequency-aware methods: general (default: general English word frequencies "
        "plus the token counts of model-generated text, for punctuation and line breaks; never the scored "
        "text), wordfreq (the word frequencies alone) or corpora (token counts in the bundled corpora's "
        "train slices)",
    )


# -- info ----------------------------------------------------------------------------------------------
@command("info", "facts about a backbone: kind, vocabulary, hidden size, tied, embedding parameters")
def _info_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model(parser)
    _add_json(parser)


@_info_arguments.runs
def run_info(args: argparse.Namespace) -> int:
    from embviz.sources import inspect_model

    emit(inspect_model(args.model, trust_remote_code=args.trust_remote_code).to_dict(), args.json)
    return 0


# -- methods -------------------------------------------------------------------------------------------
@command("methods", "list every registered compression method: id, label, family, sizing, what it stores")
def _methods_arguments(parser: argparse.ArgumentParser) -> None:
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON array (one object per method)")
    output.add_argument("--markdown", action="store_true", help="print the Markdown table the README shows")


@_methods_arguments.runs
def run_methods(args: argparse.Namespace) -> int:
    from embviz.compressors import all_methods

    rows = [spec.to_dict() for spec in all_methods()]
    if args.markdown:
        print(methods_markdown(rows))
        return 0

    def render(payload: list[dict[str, Any]]) -> str:
        shown = [
            {
                "id": row["id"],
                "label": row["label"],
                "family": row["family"],
                "sizing": row["sizing"],
                "trains": "yes" if row["trains"] else "no",
                "needs": model_inputs(row),
                "stores": "+".join(row["stores"]),
            }
            for row in payload
        ]
        return _render_table(shown, align_left=True)

    emit(rows, args.json, render)
    return 0


def model_inputs(row: dict[str, Any]) -> str:
    """What a method needs from the model to fit (``embviz methods``'s column): ``row weights`` (token
    frequencies), ``direction metric`` (the model's sensitivity, :mod:`embviz.sensitivity`), or ``-``."""
    needs = [
        name
        for name, needed in (
            ("row weights", row["needs_row_weights"]),
            ("direction metric", row["needs_direction_metric"]),
        )
        if needed
    ]
    return ", ".join(needs) or "-"


def methods_markdown(rows: list[dict[str, Any]]) -> str:
    """The README's method table: id, label, family, sizing, trains, what it needs from the model, stores,
    description."""
    lines = [
        "| id | method | family | sized by | trains | needs from the model | stores | what it does |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [
            f"`{row['id']}`",
            row["label"],
            row["family"],
            row["sizing"],
            "yes" if row["trains"] else "no",
            model_inputs(row),
            ", ".join(row["stores"]),
            row["description"],
        ]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


# -- corpora -------------------------------------------------------------------------------------------
@command("corpora", "list the packaged text sets with their size per split (tokens for a given model)")
def _corpora_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="count tokens with this backbone's tokenizer (default smollm2)", default="smollm2"
    )
    parser.add_argument("--no-tokens", action="store_true", help="skip token counts (words and units only)")
    _add_trust(parser)
    _add_json(parser)


@_corpora_arguments.runs
def run_corpora(args: argparse.Namespace) -> int:
    from embviz.corpora import corpus_stats

    tokenize = None
    if not args.no_tokens:
        tokenizer = _load_backbone(args).tokenizer

        def tokenize(texts: list[str]) -> list[list[int]]:
            return tokenizer(texts, add_special_tokens=False)["input_ids"]

    rows = corpus_stats(tokenize)
    emit(rows, args.json, _render_table)
    return 0


def _render_table(rows: list[dict[str, Any]], *, align_left: bool = False) -> str:
    if not rows:
        return "(no rows)"
    columns = [c for c in rows[0] if c != "description"]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    align = "<" if align_left else ">"
    lines = ["  ".join(f"{c:{align}{widths[c]}}" for c in columns)]
    lines += ["  ".join(f"{r.get(c, '')!s:{align}{widths[c]}}" for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


# -- compress ------------------------------------------------------------------------------------------
@command(
    "compress", "compress a backbone's embedding matrix (SVD, AutoEncoder, quantisation) into an artifact"
)
def _compress_arguments(parser: argparse.ArgumentParser) -> None:
    from embviz.compressors import RECIPES, SIMPLE_LOSSES, method_ids

    methods = method_ids()
    _add_model(parser)
    parser.add_argument(
        "--method",
        choices=["ae", *methods],
        default="ae",
        metavar="METHOD",
        help=f"ae (the AE with --loss) or a method id: {', '.join(methods)} (default ae; "
        "`embviz methods` describes each)",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--rank", type=int, help="latent size r, 1 <= r < hidden size (default 64)")
    size.add_argument(
        "--ratio",
        type=float,
        help="compression ratio > 1: picks the largest rank that meets it (byte-sized methods: bytes)",
    )
    size.add_argument(
        "--bits",
        type=float,
        help="budget in bits per weight (every stored byte x 8 over V*D): the largest size within it "
        "(rank-sized: the largest rank; byte-sized: byte ratio 32/bits; fixed-size: refused when above)",
    )
    parser.add_argument(
        "--by",
        choices=["params", "bytes"],
        default="params",
        help="what --ratio holds equal for methods with quantised codes: parameters (default) or bytes",
    )
    parser.add_argument("--loss", choices=list(SIMPLE_LOSSES), help="AE loss (default paper)")
    parser.add_argument("--recipe", choices=list(RECIPES), help="AE training recipe (default fast)")
    parser.add_argument("--epochs", type=int, help="AE epochs (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    _add_device(
        parser,
        "where the fit computes (AEs, exact SVDs, direction VQ's assignment; quantisers and the randomised "
        "SVD always fit on the CPU)",
    )
    _add_weights(parser)
    _add_json(parser)


def _compress_request(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The method spec and its options from ``compress``'s flags, checked before any model loads."""
    from embviz.compressors import get_method
    from embviz.compressors.budget import check_bits_per_weight, check_ratio
    from embviz.compressors.registry import DEVICE_OPTION
    from embviz.errors import BadInputError

    spec = get_method(f"ae-{args.loss or 'paper'}" if args.method == "ae" else args.method)
    if args.loss is not None and args.method != "ae":
        raise BadInputError("--loss only applies to --method ae; other AE ids name their loss")
    trains = "recipe" in spec.options
    misplaced = [
        flag
        for flag, value in {"--recipe": args.recipe, "--epochs": args.epochs}.items()
        if value is not None
    ]
    if misplaced and not trains:
        raise BadInputError(f"{', '.join(misplaced)} only applies to methods that train (AutoEncoders)")
    if spec.sizing == "fixed" and (args.rank is not None or args.ratio is not None):
        raise BadInputError(f"{spec.id} has a fixed size: it takes neither --rank nor --ratio")
    if spec.sizing == "bytes" and args.ratio is None and args.bits is None:
        raise BadInputError(f"{spec.id} is sized by a byte ratio: give --ratio or --bits")
    if args.ratio is not None:
        check_ratio(args.ratio)
    if args.bits is not None:
        check_bits_per_weight(args.bits)
    if args.rank is not None and args.rank < 1:
        raise BadInputError(f"rank must be at least 1, got {args.rank}")
    options: dict[str, Any] = {DEVICE_OPTION: _device(args)}  # the registry drops it for CPU-only methods
    if trains:
        options.update(recipe=args.recipe or "fast", epochs=args.epochs)
    if "seed" in spec.options:
        options["seed"] = args.seed
    if not spec.takes_device and args.device.split(":")[0] != "cpu":
        print(f"embviz: {spec.id} fits on the CPU; --device {args.device} is not used", file=sys.stderr)
    return spec, options


@_compress_arguments.runs
def run_compress(args: argparse.Namespace) -> int:
    import time

    from embviz.artifacts import compress_cached
    from embviz.compressors import reconstruction_quality

    spec, options = _compress_request(args)
    started = time.perf_counter()
    backbone = _load_backbone(args)
    vocab, hidden = backbone.vocab_size, backbone.hidden_size
    unsized = args.rank is None and args.ratio is None and args.bits is None
    rank = 64 if unsized and spec.sizing == "rank" else args.rank
    size = spec.size(vocab, hidden, rank=rank, ratio=args.ratio, by=args.by, bits=args.bits)
    from embviz.sensitivity import method_inputs

    inputs = method_inputs(backbone, spec, weights=args.weights, progress=_ProgressBar())
    compressor = spec.build(size, **options, **inputs)
    result = compress_cached(backbone.name, backbone.embedding, compressor, progress=_ProgressBar())
    if result.notice:
        print(f"embviz: {result.notice}", file=sys.stderr)
    compressed = result.compressed
    payload = {
        "artifact": str(result.path) if result.path else None,
        "backbone": backbone.name,
        **compressed.facts(),
        **backbone.source_facts(compressed.bits_per_weight),
        "train_seconds": round(compressed.train_seconds, 3),
        **{k: round(v, 6) for k, v in reconstruction_quality(backbone.embedding, compressed).items()},
        "cached": result.cached,
        "notice": result.notice,
        "seconds": round(time.perf_counter() - started, 3),
        "target_bits": size.target_bits,
    }
    emit(payload, args.json)
    return 0


# -- evaluate ------------------------------------------------------------------------------------------
def _add_evaluation_options(parser: argparse.ArgumentParser, *, text: bool = True) -> None:
    """``--mode`` and ``--k`` (and, for perplexity commands, ``--text`` and ``--max-tokens``)."""
    if text:
        parser.add_argument(
            "--text",
            default="bible:test",
            help="held-out text: corpus[:split] or a UTF-8 file (default bible:test)",
        )
        parser.add_argument(
            "--max-tokens",
            type=int,
            help="held-out tokens to score (default: the perplexity protocol's 2048)",
        )
    parser.add_argument(
        "--mode",
        choices=["input", "tied"],
        default="input",
        help="replace the input embedding only (default), or the tied output layer too",
    )
    parser.add_argument("--k", type=int, default=10, help="top-k size (default 10)")


@command(
    "evaluate", "perplexity, neighbour recall@k and angles of a compressed artifact against the original"
)
def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model(parser)
    parser.add_argument("--artifact", required=True, help="artifact folder (from `embviz compress`)")
    _add_evaluation_options(parser)
    parser.add_argument(
        "--no-ablation",
        dest="ablation",
        action="store_false",
        help="skip the direction / length ablation (two perplexity passes of the five a cold run makes)",
    )
    _add_device(parser, "where the perplexity passes run (neighbours and angles stay on the CPU)")
    _add_json(parser)


@_evaluate_arguments.runs
def run_evaluate(args: argparse.Namespace) -> int:
    from embviz.evaluation import evaluate_variant, load_variant

    device = _device(args)
    backbone = _load_backbone(args)
    compressed = load_variant(backbone, args.artifact)
    result = evaluate_variant(
        backbone,
        compressed,
        text=args.text,
        mode=args.mode,
        k=args.k,
        max_tokens=args.max_tokens,
        progress=_ProgressBar(),
        ablation=args.ablation,
        device=device,
    )
    emit({"artifact": args.artifact, **result.to_dict()}, args.json, _render_evaluation)
    return 0


_DIVERGENCE_LABELS = {
    "kl_nats": "KL(original || compressed), nats/token",
    "top1_agreement": "top-1 agreement with original",
    "perplexity_variant_directions": "perplexity (compressed directions, original lengths)",
    "perplexity_variant_lengths": "perplexity (original directions, compressed lengths)",
}


def _render_evaluation(result: dict[str, Any]) -> str:
    perplexity = result["perplexity"]
    flat = {
        "perplexity (original)": round(perplexity["original"], 3),
        "perplexity (compressed)": round(perplexity["compressed"], 3),
        **{
            label: round(result[key], 3 if key.startswith("perplexity") else 4)
            for key, label in _DIVERGENCE_LABELS.items()
            if result.get(key) is not None
        },
        **{
            key: value
            for key, value in result.items()
            if key not in ("perplexity", "protocol", *_DIVERGENCE_LABELS)
        },
    }
    return f"{_render_mapping(flat)}\n\n{result['protocol']}"


# -- sweep ---------------------------------------------------------------------------------------------
def _parse_list(text: str, convert: Callable[[str], Any], flag: str, what: str) -> list[Any]:
    """``"2,4,8"`` -> ``[2.0, 4.0, 8.0]``; anything unparsable is a one-line :class:`BadInputError`."""
    from embviz.errors import BadInputError

    items = [item.strip() for item in text.split(",")]
    try:
        if any(not item for item in items):
            raise ValueError
        return [convert(item) for item in items]
    except ValueError:
        raise BadInputError(f"{flag} takes a comma-separated list of {what}, got {text!r}") from None


_SWEEP_TABLE = (
    "method",
    "rank",
    "ratio",
    "byte_ratio",
    "perplexity",
    "vs_original",
    "frontier",
    "recall_at_k",
    "mean_angle_deg",
    "kl_nats",
    "top1_agreement",
)
_SWEEP_ABLATION = ("perplexity_variant_directions", "perplexity_variant_lengths")


@command("sweep", "compress with several methods at several ratios and evaluate each (perplexity, recall)")
def _sweep_arguments(parser: argparse.ArgumentParser) -> None:
    from embviz.compressors import method_ids

    _add_model(parser)
    parser.add_argument(
        "--methods",
        default="svd,ae-paper",
        help=f"comma-separated method ids among {', '.join(method_ids())} (default svd,ae-paper)",
    )
    parser.add_argument(
        "--ratios", help="comma-separated compression ratios > 1 (default 2,4,8,16 without --ranks)"
    )
    parser.add_argument("--ranks", help="comma-separated latent sizes, evaluated in addition to --ratios")
    parser.add_argument(
        "--bits",
        help="comma-separated budgets in bits per weight, e.g. 8,4,3,2,1 (not with --ratios; --ranks may "
        "come too): each method at the largest size within each budget; fixed-size methods run once at "
        "their own bits; a budget a method cannot meet is skipped with a note",
    )
    parser.add_argument(
        "--recipe", choices=["fast", "paper"], default="fast", help="AE training recipe (default fast)"
    )
    parser.add_argument(
        "--by",
        choices=["params", "bytes"],
        default="params",
        help="what a ratio holds equal for quantised low-rank methods: parameters (default) or bytes",
    )
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="also score every variant's directions with the original lengths and the reverse "
        "(two more perplexity passes per variant on top of three)",
    )
    _add_weights(parser)
    _add_evaluation_options(parser)
    parser.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run each variant as a Ray task (needs `pip install 'embviz[ray]'`): a local cluster without "
        "ADDRESS, else that cluster's (auto, ray://host:port); EMBVIZ_HOME must be shared storage there",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="task slots of the local Ray cluster (default: every usable core, one torch thread each)",
    )
    _add_device(
        parser,
        "where fits that can use one and the perplexity passes run (not with --ray, whose tasks ask for CPUs)",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON array (one object per row)")
    output.add_argument("--csv", action="store_true", help="print CSV with a header row")


@_sweep_arguments.runs
def run_sweep(args: argparse.Namespace) -> int:
    from embviz.evaluation import sweep

    device = _device(args)
    if args.ray is not None and device.split(":")[0] != "cpu":
        from embviz.errors import BadInputError

        raise BadInputError(
            f"--device {device} is not passed to Ray tasks (they ask for CPUs only): drop --ray"
        )
    methods = _parse_list(args.methods, str, "--methods", "method ids")
    ratios = _parse_list(args.ratios, float, "--ratios", "numbers") if args.ratios else None
    ranks = _parse_list(args.ranks, int, "--ranks", "integers") if args.ranks else None
    bits = _parse_list(args.bits, float, "--bits", "numbers") if args.bits else None
    if bits is not None:
        from embviz.compressors import check_bits_per_weight
        from embviz.errors import BadInputError

        if ratios is not None:
            raise BadInputError("give --ratios or --bits, not both")
        bits = [check_bits_per_weight(value) for value in bits]
    settings: dict[str, Any] = {
        "ratios": ratios,
        "ranks": ranks,
        "bits": bits,
        "text": args.text,
        "mode": args.mode,
        "k": args.k,
        "max_tokens": args.max_tokens,
        "recipe": args.recipe,
        "by": args.by,
        "ablation": args.ablation,
        "weights": args.weights,
        "device": device,
    }
    failed = 0
    if args.ray is None:
        if args.workers is not None:
            from embviz.errors import BadInputError

            raise BadInputError("--workers sizes a local Ray cluster: give it with --ray")
        rows = sweep(_load_backbone(args), methods, progress=_ProgressBar(), **settings)
    else:
        from embviz.cluster import ray_sweep
        from embviz.errors import BadInputError

        if getattr(args, "trust_remote_code", False):
            raise BadInputError(
                "--trust-remote-code is not passed to Ray tasks: run that sweep without --ray"
            )
        address = None if args.ray == "local" else args.ray
        result = ray_sweep(
            args.model, methods, address=address, workers=args.workers, progress=_ProgressBar(), **settings
        )
        rows = result.rows
        for failure in result.failures:
            print(f"embviz: task failed: {failure.variant}: {failure.error}", file=sys.stderr)
        failed = len(result.failures)
    records = [row.to_dict() for row in rows]
    if args.csv:
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=list(records[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
    else:
        emit(records, args.json, _render_sweep)
    return 1 if failed else 0


def _render_sweep(rows: list[dict[str, Any]]) -> str:
    columns = _SWEEP_TABLE + tuple(key for key in _SWEEP_ABLATION if rows[0].get(key) is not None)
    if any(row.get("target_bits") is not None for row in rows):
        columns += ("target_bits", "bits_per_weight")
    shown = [
        {
            key: round(row[key], 4 if key == "kl_nats" else 3) if isinstance(row[key], float) else row[key]
            for key in columns
        }
        for row in rows
    ]
    return f"{_render_table(shown)}\n\n{rows[0]['protocol']}"


# -- predict -------------------------------------------------------------------------------------------
@command(
    "predict", "fill in the blank of a sentence with the original and compressed embeddings side by side"
)
def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model(parser)
    parser.add_argument("sentence", help="a sentence with one blank: ___ or [MASK]")
    parser.add_argument(
        "--artifact", action="append", default=[], help="artifact folder of a variant (repeatable)"
    )
    _add_evaluation_options(parser, text=False)
    _add_json(parser)


@_predict_arguments.runs
def run_predict(args: argparse.Namespace) -> int:
    from embviz.evaluation import load_variant, variant_name
    from embviz.predictions import predict_blank, prediction_summary, prediction_table

    backbone = _load_backbone(args)
    variants, artifacts = {}, {}
    for index, path in enumerate(args.artifact, 1):
        compressed = load_variant(backbone, path)
        name = variant_name(compressed)
        name = f"{name} #{index}" if name in variants else name
        variants[name], artifacts[name] = compressed.reconstruct(), path
    result = predict_blank(backbone, args.sentence, variants, k=args.k, mode=args.mode)
    changes = prediction_summary(result)
    payload = {
        **result.to_dict(),
        "artifacts": artifacts,
        "changes": changes,
        "model_note": backbone.note or None,
    }

    def render(_: Any) -> str:
        lines = [_render_table(prediction_table(result)), ""]
        lines += [
            f"{row['variant']}: top-1 {row['top1']!r} "
            + (
                "kept"
                if row["top1 kept"]
                else f"changed (original top-1 {_rank_text(row['original top1 rank'])})"
            )
            + (f"; new: {', '.join(row['new'])}" if row["new"] else "")
            + (f"; lost: {', '.join(row['lost'])}" if row["lost"] else "")
            for row in changes[1:]
        ]
        note = [f"{backbone.name}: {backbone.note}"] if backbone.note else []
        return "\n".join([*lines, *result.notices, *note, result.method])

    emit(payload, args.json, render)
    return 0


def _rank_text(rank: int | None) -> str:
    return "not in the top-k" if rank is None else f"at rank {rank}"


# -- export --------------------------------------------------------------------------------------------
@command("export", "write a Hugging Face model folder whose token embedding is stored compressed")
def _export_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model(parser)
    parser.add_argument(
        "--artifact", required=True, help="artifact folder (or a file in it) from `embviz compress`"
    )
    parser.add_argument("--out", required=True, help="folder to write (must be new or empty)")
    parser.add_argument(
        "--mode",
        choices=["tied", "input"],
        default="tied",
        help="tied (default): the compressed matrix is the output layer too; input: keep the original output layer",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing embviz export at --out")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="load the export back: compare its logits and perplexity on --text with the in-memory variant",
    )
    parser.add_argument(
        "--text", default="bible:test", help="held-out text for --verify (default bible:test)"
    )
    _add_json(parser)


@_export_arguments.runs
def run_export(args: argparse.Namespace) -> int:
    from embviz.evaluation import load_variant
    from embviz.export import artifact_folder, export_compressed, verify_export

    backbone = _load_backbone(args)
    artifact = artifact_folder(args.artifact)
    compressed = load_variant(backbone, artifact)
    result = export_compressed(
        backbone, compressed, args.out, mode=args.mode, overwrite=args.force, artifact=artifact
    )
    for warning in result["warnings"]:
        print(f"embviz: warning: {warning}", file=sys.stderr)
    if args.verify:
        print("embviz: verifying the export (logits and perplexity)...", file=sys.stderr)
        result["verify"] = verify_export(backbone, compressed, args.out, mode=args.mode, text=args.text)
    emit(result, args.json, _render_export)
    return 0


def _render_export(result: dict[str, Any]) -> str:
    from embviz.resources import format_bytes

    shown = {
        "folder": result["folder"],
        "embedding": f"{result['label']} ({result['mode']} mode)",
        "embedding on disk": f"{result['embedding_file_bytes']:,} bytes ({format_bytes(result['embedding_file_bytes'])})",
        "original (float32)": f"{result['original_bytes']:,} bytes ({format_bytes(result['original_bytes'])})",
        "ratio": f"{result['ratio']}x (stored tensors; {result['file_ratio']}x with the file header)",
        "folder size": f"{result['folder_bytes']:,} bytes ({format_bytes(result['folder_bytes'])})",
        "output layer": result["output_head"],
        **result.get("verify", {}),
    }
    return _render_mapping(shown)


# -- fit-mlm-head --------------------------------------------------------------------------------------
@command(
    "fit-mlm-head",
    "fit a masked-LM head (and fine-tune the encoder, embeddings frozen) for minilm or a local BERT folder",
)
def _fit_mlm_head_arguments(parser: argparse.ArgumentParser) -> None:
    from embviz.mlm_head import DEFAULT_SEED, DEFAULT_STEPS, EXPECTED_MINUTES

    parser.add_argument("model", help="minilm (gives the backbone minilm-mlm) or a local BERT-family folder")
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help=f"optimiser steps (default {DEFAULT_STEPS})"
    )
    parser.add_argument(
        "--minutes",
        type=float,
        help=f"wall-clock cap; stops early with a checkpoint that the next run resumes (default: none; "
        f"the default steps take about {EXPECTED_MINUTES} min on 2 CPU cores)",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})"
    )
    parser.add_argument("--force", action="store_true", help="refit even if the same fit is cached")
    parser.add_argument("--device", default="cpu", help="training device, e.g. cuda (default cpu)")
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="bfloat16 autocast: faster on a GPU or a CPU with native bf16, 30-100x slower on other CPUs "
        "(refused there)",
    )
    parser.add_argument(
        "--package",
        action="store_true",
        help="then write the fit into embviz's package (embviz/data/heads/), the copy embviz ships",
    )
    _add_trust(parser)
    _add_json(parser)


@_fit_mlm_head_arguments.runs
def run_fit_mlm_head(args: argparse.Namespace) -> int:
    from embviz.errors import BadInputError
    from embviz.mlm_head import DEFAULT_SOURCE, HeadConfig, fit_mlm_head, native_bf16, package_head
    from embviz.sources import builtin, builtin_names, load_model

    _device(args)
    if args.steps < 1:
        raise BadInputError(f"--steps must be at least 1, got {args.steps}")
    if args.seed < 0:
        raise BadInputError(f"--seed must be a non-negative integer, got {args.seed}")
    if args.bf16 and args.device == "cpu" and not native_bf16():
        raise BadInputError(
            "--bf16: this CPU has no native bfloat16 (AVX512-BF16 or AMX); it would be far slower"
        )
    if args.package and args.model != DEFAULT_SOURCE:
        raise BadInputError(f"--package ships a built-in model's head; {args.model} is not {DEFAULT_SOURCE}")
    result = fit_mlm_head(
        args.model,
        load=load_model,
        config=HeadConfig(steps=args.steps, seed=args.seed, bf16=args.bf16),
        minutes=args.minutes,
        progress=_ProgressBar(),
        force=args.force,
        trust_remote_code=args.trust_remote_code,
        device=args.device,
        base=builtin(args.model).locate if args.model in builtin_names() else None,
    )
    if not result.complete:
        print(
            f"embviz: stopped at step {result.manifest['steps_done']} of {args.steps} (--minutes); "
            "run the same command again to resume",
            file=sys.stderr,
        )
    elif args.package:
        print(f"embviz: wrote {package_head(args.model, base=builtin(args.model).locate())}", file=sys.stderr)

    def render(payload: dict[str, Any]) -> str:
        rows = [{"slice": name, **figures} for name, figures in payload["accuracy"].items()]
        facts = {key: value for key, value in payload.items() if key != "accuracy"}
        return f"{_render_mapping(facts)}\n\n{_render_table(rows)}"

    emit(result.to_dict(), args.json, render)
    return 0


# -- generate-text -------------------------------------------------------------------------------------
@command(
    "generate-text",
    "generate the smollm corpus (everyday English) with the packaged SmolLM2 from the committed prompts",
)
def _generate_text_arguments(parser: argparse.ArgumentParser) -> None:
    from embviz.textgen import GenerationConfig

    defaults = GenerationConfig()
    parser.add_argument("--output", type=Path, help="where to write the corpus text (default: the cache)")
    parser.add_argument(
        "--prompts", type=Path, help="prompts file (default: embviz/data/generation_prompts.txt)"
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help=f"random seed (default {defaults.seed})"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help=f"prompts per batch (default {defaults.batch_size})",
    )
    parser.add_argument("--device", default="cpu", help="generation device, e.g. cuda (default cpu)")
    _add_json(parser)


@_generate_text_arguments.runs
def run_generate_text(args: argparse.Namespace) -> int:
    from embviz.errors import BadInputError
    from embviz.sources import load_model
    from embviz.textgen import GenerationConfig, generate_text

    if args.seed < 0 or args.batch_size < 1:
        raise BadInputError("--seed must be >= 0 and --batch-size >= 1")
    result = generate_text(
        load=load_model,
        config=GenerationConfig(seed=args.seed, batch_size=args.batch_size),
        prompts_file=args.prompts,
        output=args.output,
        progress=_ProgressBar(),
        device=args.device,
    )
    emit(result.to_dict(), args.json, _render_mapping)
    return 0


# -- bench ---------------------------------------------------------------------------------------------
@command(
    "bench", "benchmark the default backbone: loads, AE recipes, neighbour search, maps, latency, memory"
)
def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few minutes: fewer runs, a 3-epoch paper recipe, UMAP on a 5,000-token sample (all reported)",
    )
    parser.add_argument("--model", default="smollm2", help="backbone to measure (default smollm2)")
    parser.add_argument(
        "--stages",
        help="comma-separated subset of: load, ae, fits, knn, maps, latency, memory (the default: all of them), "
        "app (the app in headless Chromium; minutes per run, only when named), scale (synthetic matrices of "
        "today's shapes; hours for the whole grid, only when named), cluster (a 12-variant sweep on local "
        "Ray with 2 workers against the serial sweep, cold caches; needs embviz[ray], only when named)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help="runs per figure (default: 5 cheap / 3 costly; quick 3 / 1; the cluster stage 1)",
    )
    parser.add_argument(
        "--scale-vocabs", help="scale stage: vocabulary sizes (default 30000,64000,128000,256000)"
    )
    parser.add_argument("--scale-hiddens", help="scale stage: widths (default 576,2048,4096)")
    parser.add_argument(
        "--scale-stages",
        help="scale stage: which of svd, ae, vq, neighbours, recall, pca, umap (default all)",
    )
    parser.add_argument(
        "--scale-limit",
        type=float,
        help="scale stage: seconds a stage may take at one shape; one predicted above it is skipped (default 600)",
    )
    parser.add_argument(
        "--scale-points",
        type=Path,
        help="scale stage: append each finished shape's points to this JSON-lines file; shapes already "
        "complete there are reused, so an interrupted grid resumes where it stopped",
    )
    _add_json(parser)


def _scale_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The scale stage's settings from ``--scale-*`` (validated before anything runs)."""
    from embviz.errors import BadInputError
    from embviz.scaling import SCALE_STAGES

    chosen: dict[str, Any] = {}
    for flag, field_name in (("scale_vocabs", "scale_vocabs"), ("scale_hiddens", "scale_hiddens")):
        text = getattr(args, flag)
        if text:
            values = tuple(_parse_list(text, int, "--" + flag.replace("_", "-"), "whole numbers"))
            if any(value < 2 for value in values):
                raise BadInputError(f"--{flag.replace('_', '-')} takes sizes of at least 2, got {text}")
            chosen[field_name] = values
    if args.scale_stages:
        stages = tuple(_parse_list(args.scale_stages, str, "--scale-stages", "stage names"))
        unknown = [stage for stage in stages if stage not in SCALE_STAGES]
        if unknown:
            raise BadInputError(
                f"unknown scale stage {', '.join(unknown)}; choose from {', '.join(SCALE_STAGES)}"
            )
        chosen["scale_stages"] = stages
    if args.scale_limit is not None:
        if not args.scale_limit > 0:
            raise BadInputError(f"--scale-limit must be above 0 seconds, got {args.scale_limit:g}")
        chosen["scale_limit_s"] = args.scale_limit
    if args.scale_points is not None:
        if args.scale_points.is_dir():
            raise BadInputError(f"--scale-points takes a file, got the folder {args.scale_points}")
        chosen["scale_points"] = args.scale_points
    return chosen


@_bench_arguments.runs
def run_bench(args: argparse.Namespace) -> int:
    from embviz.bench import BenchSettings, render
    from embviz.bench import run_bench as bench
    from embviz.errors import BadInputError

    if args.repeats is not None and args.repeats < 1:
        raise BadInputError(f"--repeats must be at least 1, got {args.repeats}")
    stages = _parse_list(args.stages, str, "--stages", "stage names") if args.stages else None
    settings = BenchSettings.for_mode(quick=args.quick, model=args.model, repeats=args.repeats)
    settings = replace(settings, **_scale_settings(args))
    command_line = "embviz " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "embviz bench"

    result = bench(settings, stages, command=command_line, progress=_ProgressBar(log_prefix="embviz bench: "))
    emit(result, args.json, render)
    return 1 if result["errors"] else 0


# -- entry point ---------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other embviz error (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"embviz: error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from embviz.version import __version__

    parser = _Parser(prog="embviz", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"embviz {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (run, add_arguments, help_text) in _COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="embviz: %(message)s",
        stream=sys.stderr,
    )
    try:
        configure_threads(ALL)
        return args.run(args)
    except EmbvizError as error:
        print(f"embviz: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("embviz: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
