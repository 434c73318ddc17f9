"""The method registry: one :class:`MethodSpec` per compression method, registered by its own module.

Everything that offers methods (the CLI's choices and sizing, the sweep plan, the app's lists and train
buttons, artifacts, exports, ``embviz methods`` and the tests) reads this registry instead of parsing
method ids. Adding a method is one module that implements a :class:`~embviz.compressors.base.Compressor`
and calls :func:`register_method` (the way ``peft`` registers each tuner); packages outside embviz can
register theirs through the ``embviz.methods`` entry-point group (each entry point is a module to import).

How a method is sized (``MethodSpec.sizing``):

* ``rank`` -- a latent size r, or a compression ratio that becomes the largest r meeting it (in
  parameters, or in bytes for quantised codes with ``by="bytes"``);
* ``fixed`` -- the method's own size (e.g. int8 rows); it takes neither a rank nor a ratio;
* ``bytes`` -- a byte ratio against float32 storage (e.g. mixed-precision rows); no rank.

Any method can also be sized by a budget in **bits per weight** (``size(..., bits=B)``, SPEC §2: every stored
byte x 8 over V*D): a rank-sized method gets the largest rank whose stored bytes fit ``B * V * D / 8``
(float32 parameters, decoder bias included, or :attr:`MethodSpec.bytes_for_rank` for quantised codes), a
byte-sized one the byte ratio ``32 / B``, and a fixed-size one its own size when that is within ``B``. A
budget a method cannot meet raises :class:`~embviz.compressors.budget.UnreachableBudget` (a
:class:`~embviz.errors.BadInputError`), which a sweep turns into a note.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Literal

import torch

from embviz.compressors.base import Compressor, check_device
from embviz.compressors.budget import (
    UnreachableBudget,
    check_bits_per_weight,
    check_rank,
    check_ratio,
    fits_bits,
    low_rank_params,
    rank_for_bits,
    rank_for_byte_ratio,
    rank_for_ratio,
)
from embviz.compressors.weights import DirectionMetric, RowWeights
from embviz.errors import BadInputError

Sizing = Literal["rank", "fixed", "bytes"]
SIZINGS: tuple[Sizing, ...] = ("rank", "fixed", "bytes")
RatioBasis = Literal["params", "bytes"]
RATIO_BASES: tuple[RatioBasis, ...] = ("params", "bytes")
"""What a ratio holds equal for a rank-sized method with quantised codes: parameters or bytes."""
ENTRY_POINT_GROUP = "embviz.methods"
REFERENCE_WEIGHTS = 49_152 * 576
"""The weights of the matrix fit times are measured on (SmolLM2-135M's token embedding)."""
QUICK_FIT_SECONDS = 2.0
"""Expected fit time of a closed-form method on the reference matrix when its spec does not say."""
DEVICE_OPTION = "device"
"""The option every method accepts in :meth:`MethodSpec.build`: the torch device a fit computes on (``cpu``,
``cuda``, ``cuda:1``). A method that lists it among its :attr:`~MethodSpec.options` fits there (results back
on the CPU); the others fit on the CPU and ignore it. It changes where, not what: it is never part of a
configuration, so never of a cache key."""


def matrix_scale(vocab_size: int, hidden_size: int) -> float:
    """The size of a V x D matrix relative to the reference one (fit times scale about linearly with it)."""
    return vocab_size * hidden_size / REFERENCE_WEIGHTS


Factory = Callable[..., Compressor]
"""``factory(rank, ratio, row_weights, **options) -> Compressor``; ``rank``/``ratio`` per the sizing."""
Decoder = Callable[
    [dict[str, Any], dict[str, torch.Tensor], tuple[int, int], int | None], dict[str, torch.Tensor]
]
"""``decode(config, stored, (V, D), rank) -> {name: float32 tensor}``: turns an artifact's stored tensors
(quantised codes, scales, ...) into the float ``codes`` or ``dense`` a
:class:`~embviz.compressors.base.CompressedEmbedding` holds. Raises ValueError / KeyError when they do not fit."""


@dataclass(frozen=True)
class Size:
    """A method's size, resolved from a rank or a ratio: what its factory gets and what a sweep reports."""

    rank: int | None = None
    ratio: float | None = None
    """The byte ratio a ``bytes``-sized method is built with (None otherwise)."""
    target_ratio: float | None = None
    """The ratio asked for (a fixed-size method: its own byte ratio against float32; a budget in bits per
    weight: the byte ratio ``32 / bits``); None for a rank."""
    target_bits: float | None = None
    """The budget in bits per weight asked for (None when sized by a rank or a ratio, and for a fixed size)."""


@dataclass(frozen=True)
class MethodSpec:
    """Everything the rest of embviz needs to know about one compression method.

    Attributes:
        id: the method id (``svd``, ``ae-paper``, ``quant-int8``, ...), as compressors report it.
        label: a short human label.
        family: what kind of method it is (``svd``, ``autoencoder``, ``row quantisation``, ...).
        sizing: ``rank``, ``fixed`` or ``bytes`` (see the module docstring).
        factory: builds the compressor: ``factory(rank, ratio, row_weights, **options)``.
        stores: the tensors its artifacts hold (names of :class:`CompressedEmbedding` fields).
        trains: whether fitting is iterative training (the app shows progress and may ask first).
        needs_row_weights: whether it needs token frequencies (:class:`RowWeights`).
        needs_direction_metric: whether it needs the model's direction metric (:class:`DirectionMetric`),
            passed to its factory as the keyword ``direction_metric``.
        options: the constructor options it accepts (``seed``, ``recipe``, ``epochs``, ...); ``device``
            among them means it fits on the device it is given (see :data:`DEVICE_OPTION`).
        config_keys: the keys of its ``get_config()`` that rebuild it (:meth:`from_config`).
        decoder_bias: whether its decoder has a bias, which the parameter budget counts.
        code_bits: the width of its quantised codes, for rank-sized methods sized by bytes.
        bytes_for_rank: stored bytes at a rank, ``(V, D, r) -> bytes`` (quantised rank-sized methods).
        fixed_bytes: stored bytes of a V x D matrix, ``(V, D) -> bytes`` (``fixed`` sizing).
        max_byte_ratio: the largest byte ratio it reaches for a V x D matrix (``bytes`` sizing), from (V, D).
        rebuild: ``(config, **overrides) -> Compressor`` where :attr:`config_keys` cannot say it (nested
            configurations, e.g. a quantised method over a base method).
        decode: how its stored quantised tensors become float ``codes`` / ``dense`` on load (a
            :data:`Decoder`); needed by every method that stores ``qcodes``.
        description: one sentence for ``embviz methods`` and the README.
        fit_seconds: expected seconds to fit, ``(V, D, size, options) -> seconds`` on one core of the
            reference machine (the app trains by itself below a threshold and asks first above it); None:
            :data:`QUICK_FIT_SECONDS` scaled by the matrix size.
        fit_memory: bytes a fit holds beyond the V x D matrix, ``(V, D, rank) -> bytes`` (checked before
            fitting); None: :meth:`memory_to_fit`'s default of two more float32 copies of the matrix.
    """

    id: str
    label: str
    family: str
    sizing: Sizing
    factory: Factory
    stores: tuple[str, ...]
    trains: bool = False
    needs_row_weights: bool = False
    needs_direction_metric: bool = False
    options: tuple[str, ...] = ()
    config_keys: tuple[str, ...] = ()
    decoder_bias: bool = False
    code_bits: int | None = None
    bytes_for_rank: Callable[[int, int, int], int] | None = field(default=None, repr=False)
    fixed_bytes: Callable[[int, int], int] | None = field(default=None, repr=False)
    max_byte_ratio: Callable[[int, int], float] | None = field(default=None, repr=False)
    rebuild: Callable[..., Compressor] | None = field(default=None, repr=False)
    decode: Decoder | None = field(default=None, repr=False)
    description: str = ""
    fit_seconds: Callable[[int, int, Size, Mapping[str, Any]], float] | None = field(default=None, repr=False)
    fit_memory: Callable[[int, int, int | None], int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.id or self.id != self.id.strip() or "," in self.id:
            raise ValueError(f"a method id must be a non-empty name without commas, got {self.id!r}")
        if self.sizing not in SIZINGS:
            raise ValueError(f"sizing must be one of {SIZINGS}, got {self.sizing!r}")
        if self.sizing == "fixed" and self.fixed_bytes is None:
            raise ValueError(f"{self.id}: a fixed-size method states its bytes (fixed_bytes)")
        if self.sizing == "rank" and self.code_bits is not None and self.bytes_for_rank is None:
            raise ValueError(f"{self.id}: a method with quantised codes states its bytes (bytes_for_rank)")
        if "qcodes" in self.stores and self.decode is None:
            raise ValueError(
                f"{self.id}: a method that stores quantised codes says how to decode them (decode)"
            )

    # -- sizing ------------------------------------------------------------------------------------------
    def size(
        self,
        vocab_size: int,
        hidden_size: int,
        *,
        rank: int | None = None,
        ratio: float | None = None,
        by: str = "params",
        bits: float | None = None,
    ) -> Size:
        """Resolve a rank, a ratio or a budget in bits per weight (``bits``) into this method's size for a
        V x D matrix (the one sizing rule; for ``bits`` see :meth:`size_for_bits`).

        Raises:
            BadInputError: a size the method does not take (a rank for a fixed-size method, neither for a
                rank-sized one, ...), or one out of range.
            UnreachableBudget: a valid ``bits`` budget this method cannot meet.
        """
        if by not in RATIO_BASES:
            raise BadInputError(f"a ratio holds {' or '.join(RATIO_BASES)} equal, not {by!r}")
        if sum(value is not None for value in (rank, ratio, bits)) > 1:
            raise BadInputError(f"{self.id}: give one of a rank, a ratio or bits per weight")
        if bits is not None:
            return self.size_for_bits(vocab_size, hidden_size, bits)
        if self.sizing == "fixed":
            if rank is not None or ratio is not None:
                raise BadInputError(f"{self.id} has a fixed size: it takes neither a rank nor a ratio")
            assert self.fixed_bytes is not None
            own = 4 * vocab_size * hidden_size / self.fixed_bytes(vocab_size, hidden_size)
            return Size(target_ratio=round(own, 4))
        if self.sizing == "bytes":
            if rank is not None:
                raise BadInputError(f"{self.id} is sized by a byte ratio, not a rank: give a ratio")
            if ratio is None:
                raise BadInputError(f"{self.id} is sized by a byte ratio: give a ratio")
            ratio = check_ratio(ratio)
            reach = self.max_byte_ratio(vocab_size, hidden_size) if self.max_byte_ratio else None
            if reach is not None and ratio > reach:
                raise BadInputError(
                    f"ratio {ratio:g} is beyond what {self.id} reaches for a {vocab_size} x {hidden_size} matrix "
                    f"(at most {reach:.2f}x)"
                )
            return Size(ratio=ratio, target_ratio=ratio)
        if ratio is not None:
            if self.bytes_for_rank is not None and by == "bytes":
                return Size(rank=self.rank_for_byte_ratio(vocab_size, hidden_size, ratio), target_ratio=ratio)
            chosen = rank_for_ratio(vocab_size, hidden_size, ratio, decoder_bias=self.decoder_bias)
            return Size(rank=chosen, target_ratio=float(ratio))
        if rank is None:
            raise BadInputError(f"{self.id} needs a rank or a ratio")
        return Size(rank=check_rank(rank, hidden_size))

    def bytes_at_rank(self, vocab_size: int, hidden_size: int, rank: int) -> int:
        """Stored bytes of a rank-sized method at ``rank``: :attr:`bytes_for_rank` for quantised codes, else
        4 bytes per float32 parameter (codes, decoder and any decoder bias)."""
        if self.bytes_for_rank is not None:
            return self.bytes_for_rank(vocab_size, hidden_size, rank)
        return 4 * low_rank_params(vocab_size, hidden_size, rank, decoder_bias=self.decoder_bias)

    def fixed_bits_per_weight(self, vocab_size: int, hidden_size: int) -> float | None:
        """The bits per weight a fixed-size method stores a V x D matrix in (None for other sizings)."""
        if self.fixed_bytes is None or self.sizing != "fixed":
            return None
        return 8 * self.fixed_bytes(vocab_size, hidden_size) / (vocab_size * hidden_size)

    def size_for_bits(self, vocab_size: int, hidden_size: int, bits: float) -> Size:
        """The largest size of this method whose stored bits per weight are at most ``bits`` (SPEC §2).

        * rank-sized: the largest rank r < D with ``8 * bytes_at_rank(r) <= bits * V * D``;
        * byte-sized: byte ratio ``32 / bits`` against float32 (when the method reaches it);
        * fixed-size: its own size, when its own bits per weight are within ``bits``.

        The result's ``target_bits`` is ``bits`` (None for a fixed size, which is not sized by it) and its
        ``target_ratio`` the byte ratio ``32 / bits`` (a fixed size: its own byte ratio).

        Raises:
            BadInputError: ``bits`` is not a number above 0.
            UnreachableBudget: the method cannot meet ``bits`` (below rank 1, beyond the smallest byte size
                it reaches, or a fixed size above the budget); the message says what it needs.
        """
        bits = check_bits_per_weight(bits)
        if self.sizing == "fixed":
            own = self.fixed_bits_per_weight(vocab_size, hidden_size)
            assert own is not None and self.fixed_bytes is not None
            if not fits_bits(self.fixed_bytes(vocab_size, hidden_size), vocab_size, hidden_size, bits):
                raise UnreachableBudget(
                    f"{self.id} has a fixed size of {own:.3g} bits per weight, above the budget of {bits:g}"
                )
            return Size(target_ratio=round(32 / own, 4))
        if self.sizing == "bytes":
            reach = self.max_byte_ratio(vocab_size, hidden_size) if self.max_byte_ratio else None
            if bits >= 32 or (reach is not None and 32 / bits > reach):
                span = f"from {32 / reach:.3g} to just under" if reach is not None else "just under"
                raise UnreachableBudget(
                    f"{self.id} reaches budgets {span} 32 bits per weight for a {vocab_size} x {hidden_size} "
                    "matrix, "
                    f"not {bits:g}"
                )
            return Size(ratio=32 / bits, target_ratio=32 / bits, target_bits=bits)
        try:
            chosen = rank_for_bits(
                vocab_size, hidden_size, bits, lambda rank: self.bytes_at_rank(vocab_size, hidden_size, rank)
            )
        except UnreachableBudget as exc:
            raise UnreachableBudget(f"{self.id}: {exc}") from None
        return Size(rank=chosen, target_ratio=32 / bits, target_bits=bits)

    def rank_for_byte_ratio(self, vocab_size: int, hidden_size: int, ratio: float) -> int:
        """The largest rank whose stored bytes meet byte ratio ``ratio`` against float32 E."""
        bytes_for_rank = self.bytes_for_rank
        if bytes_for_rank is None:
            raise BadInputError(f"{self.id} is not sized by bytes")
        return rank_for_byte_ratio(
            vocab_size, hidden_size, ratio, lambda rank: bytes_for_rank(vocab_size, hidden_size, rank)
        )

    def memory_to_fit(self, vocab_size: int, hidden_size: int, rank: int | None = None) -> int:
        """Bytes fitting this method holds beyond the V x D float32 matrix itself (:attr:`fit_memory`; by
        default two more float32 copies of it: working rows and the result)."""
        if self.fit_memory is not None:
            return int(self.fit_memory(vocab_size, hidden_size, rank))
        return 2 * 4 * vocab_size * hidden_size

    def expected_seconds(self, vocab_size: int, hidden_size: int, size: Size, **options: Any) -> float:
        """About how long fitting this method at ``size`` takes (one core of the reference machine: an
        AMD EPYC core; see :attr:`fit_seconds`). An estimate for deciding whether to ask first, not a promise."""
        if self.fit_seconds is not None:
            return float(self.fit_seconds(vocab_size, hidden_size, size, options))
        return QUICK_FIT_SECONDS * matrix_scale(vocab_size, hidden_size)

    # -- building ----------------------------------------------------------------------------------------
    @property
    def takes_device(self) -> bool:
        """Whether fitting runs on the device it is given (:data:`DEVICE_OPTION` is among its options);
        a method that does not fits on the CPU whatever the device."""
        return DEVICE_OPTION in self.options

    def build(
        self,
        size: Size,
        *,
        row_weights: RowWeights | None = None,
        direction_metric: DirectionMetric | None = None,
        **options: Any,
    ) -> Compressor:
        """The compressor at ``size`` (from :meth:`size`), with ``options`` among :attr:`options`.

        ``device`` is accepted by every method (:data:`DEVICE_OPTION`): it is validated, then passed on to a
        method that :attr:`takes_device` and dropped for the others, which fit on the CPU.

        Raises:
            BadInputError: missing or unexpected row weights or direction metric, an option the method
                does not take, or a device this machine cannot compute on.
        """
        device = options.pop(DEVICE_OPTION, None)
        if device is not None:
            device = check_device(device)
            if self.takes_device:
                options[DEVICE_OPTION] = device
        if self.needs_row_weights and row_weights is None:
            raise BadInputError(f"method {self.id!r} is frequency-aware: it needs row weights (token counts)")
        if not self.needs_row_weights and row_weights is not None:
            raise BadInputError(f"method {self.id!r} does not take row weights")
        if self.needs_direction_metric and direction_metric is None:
            raise BadInputError(f"method {self.id!r} needs the model's direction metric (embviz.sensitivity)")
        if not self.needs_direction_metric and direction_metric is not None:
            raise BadInputError(f"method {self.id!r} does not take a direction metric")
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            accepted = ", ".join(self.options) or "none"
            raise BadInputError(
                f"bad option for method {self.id!r}: {', '.join(unknown)} (it takes: {accepted})"
            )
        if direction_metric is not None:
            options["direction_metric"] = direction_metric
        try:
            return self.factory(size.rank, size.ratio, row_weights, **options)
        except TypeError as exc:
            raise BadInputError(f"bad option for method {self.id!r}: {exc}") from exc

    def from_config(self, config: dict[str, Any], **overrides: Any) -> Compressor:
        """Rebuild the compressor that produced ``config`` (a ``get_config()`` result).

        Frequency-aware methods need their ``row_weights`` (and a method that measures directions its
        ``direction_metric``) passed again in ``overrides``.
        """
        if self.rebuild is not None:
            return self.rebuild(config, **overrides)
        options = {key: config[key] for key in self.config_keys if key in config}
        options.update(overrides)
        row_weights = options.pop("row_weights", None)
        direction_metric = options.pop("direction_metric", None)
        size = Size(rank=config.get("rank"), ratio=config.get("ratio") if self.sizing == "bytes" else None)
        return self.build(size, row_weights=row_weights, direction_metric=direction_metric, **options)

    def model_inputs(
        self,
        *,
        row_weights: Callable[[], RowWeights],
        direction_metric: Callable[[], DirectionMetric],
    ) -> dict[str, Any]:
        """What this method needs from the model to fit, as keyword arguments of :meth:`build`: each provider
        is called only when the method needs what it gives (token frequencies, the direction metric)."""
        inputs: dict[str, Any] = {}
        if self.needs_row_weights:
            inputs["row_weights"] = row_weights()
        if self.needs_direction_metric:
            inputs["direction_metric"] = direction_metric()
        return inputs

    def to_dict(self) -> dict[str, Any]:
        """What ``embviz methods --json`` prints for this method."""
        return {
            "id": self.id,
            "label": self.label,
            "family": self.family,
            "sizing": self.sizing,
            "trains": self.trains,
            "needs_row_weights": self.needs_row_weights,
            "needs_direction_metric": self.needs_direction_metric,
            "stores": list(self.stores),
            "options": list(self.options),
            "code_bits": self.code_bits,
            "description": self.description,
        }


# -- the registry ------------------------------------------------------------------------------------------
_REGISTRY: dict[str, MethodSpec] = {}
_LOCK = threading.Lock()
_PLUGINS_LOADED = False


def register_method(spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
    """Add ``spec`` to the registry (its module calls this at import); returns it.

    Raises:
        ValueError: the id is taken (unless ``replace``).
    """
    with _LOCK:
        if spec.id in _REGISTRY and not replace:
            raise ValueError(f"method {spec.id!r} is already registered")
        _REGISTRY[spec.id] = spec
    return spec


def unregister_method(method_id: str) -> None:
    """Remove a method (tests and plugins that register one for a while)."""
    with _LOCK:
        _REGISTRY.pop(method_id, None)


@contextlib.contextmanager
def registered(spec: MethodSpec) -> Iterator[MethodSpec]:
    """Register ``spec`` for the duration of a ``with`` block."""
    register_method(spec)
    try:
        yield spec
    finally:
        unregister_method(spec.id)


def _load_plugins() -> None:
    """Import the modules named in the ``embviz.methods`` entry-point group once (they register)."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()


def all_methods() -> tuple[MethodSpec, ...]:
    """Every registered method, in registration order."""
    _load_plugins()
    with _LOCK:
        return tuple(_REGISTRY.values())


def method_ids(
    *,
    sizing: Sizing | None = None,
    trains: bool | None = None,
    needs_row_weights: bool | None = None,
    family: str | None = None,
) -> tuple[str, ...]:
    """Registered method ids, optionally only those with the given properties."""
    return tuple(
        spec.id
        for spec in all_methods()
        if (sizing is None or spec.sizing == sizing)
        and (trains is None or spec.trains == trains)
        and (needs_row_weights is None or spec.needs_row_weights == needs_row_weights)
        and (family is None or spec.family == family)
    )


def get_method(method_id: str) -> MethodSpec:
    """The spec of a registered method.

    Raises:
        BadInputError: no such method (the message lists the registered ones).
    """
    _load_plugins()
    spec = _REGISTRY.get(method_id)
    if spec is None:
        raise BadInputError(f"unknown method {method_id!r}; choose one of {', '.join(method_ids())}")
    return spec


def find_method(method_id: str) -> MethodSpec | None:
    """The spec of a registered method, or None (e.g. an artifact of a plugin that is not installed)."""
    _load_plugins()
    return _REGISTRY.get(method_id)


def method_label(method_id: str) -> str:
    """The human label of a method id (the id itself for an unregistered one, e.g. ``uncompressed``)."""
    spec = find_method(method_id)
    return spec.label if spec is not None else method_id
