"""The direction-loss AutoEncoder (SPEC §2): encoder D -> r and decoder r -> D, both with bias, no activation.

After training the encoder is dropped: the deployed form is the code table Z = enc(E) (V x r) plus the
decoder weight (r x D) and bias (D), i.e. a :class:`CompressedEmbedding` with ``decoder_bias`` set.

Two recipes:

- ``paper``: the original code's recipe: Adam lr 1e-3, batch 32, shuffled rows, 30 epochs, lr halved every
  4 epochs, PyTorch default initialisation, alpha annealed over the first 20 epochs.
- ``fast`` (embviz's default): warm start from the exact rank-r PCA of the training rows (the AE's biases
  hold the mean, so it starts as the best rank-r affine reconstruction in Frobenius norm; labelled "SVD warm
  start"), then Adam lr 1e-3 with batch 1024 and a per-step cosine decay over 6 epochs, alpha annealed over
  the first two thirds of them. On SmolLM2 at rank 64 it reaches the paper recipe's mean cosine and relative
  error in about a tenth of its time.

With ``row_weights`` (``ae-paper-freq``, issue 7) every epoch draws its rows with probability proportional
to their weight (with replacement, as many draws as training rows), the warm start is the weighted PCA, and
checkpoints are selected on the weighted mean cosine: the fit spends its capacity where the text is.

Rows are split once per seed: a fixed 5% of them is held out of training and used for checkpoint
selection (the epoch with the best mean cosine on those rows is kept). Alpha changes once per epoch.
Everything random (initialisation, split, shuffling) derives from ``seed``, so a seed gives identical weights
on the same machine and thread count.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from embviz.compressors.base import CompressedEmbedding, TrainingCancelled, check_device, check_seed
from embviz.compressors.losses import LOSS_NAMES, alpha_schedule, loss_with_weights, resolve_weights
from embviz.compressors.registry import MethodSpec, Size, matrix_scale, register_method
from embviz.compressors.svd import BLOCK_ROWS, row_mean, top_right_singular_vectors
from embviz.compressors.weights import RowWeights
from embviz.errors import BadInputError
from embviz.progress import LOSS, Progress, ProgressCallback, send
from embviz.rng import seeded

VALIDATION_FRACTION = 0.05
REPORTS_PER_EPOCH = 50


@dataclass(frozen=True)
class Recipe:
    """Optimisation settings of an AE fit."""

    epochs: int
    batch_size: int
    lr: float
    schedule: str  # "step": lr * gamma every step_epochs epochs; "cosine": per-step cosine decay to 0
    warm_start: bool
    anneal_epochs: float  # alpha goes from 1.0 to 0.1 over this many epochs
    step_epochs: int = 4
    gamma: float = 0.5


RECIPES: dict[str, Recipe] = {
    "paper": Recipe(epochs=30, batch_size=32, lr=1e-3, schedule="step", warm_start=False, anneal_epochs=20),
    # lr 3e-3: at 1e-3 six epochs barely move the SVD warm start and the rows stay short (norm ratio
    # 0.80 vs 0.84), which perplexity punishes; see `embviz bench --stages ae`.
    "fast": Recipe(epochs=6, batch_size=1024, lr=3e-3, schedule="cosine", warm_start=True, anneal_epochs=4),
}


class _AutoEncoder(nn.Module):
    def __init__(self, hidden: int, rank: int, nonlinear: bool) -> None:
        super().__init__()
        self.encoder = nn.Linear(hidden, rank)
        self.decoder = nn.Linear(rank, hidden)
        self.nonlinear = nonlinear

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        return F.elu(z) if self.nonlinear else z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.decoder(self.encode(x))
        return F.elu(y) if self.nonlinear else y


def _mean_cosine(model: _AutoEncoder, rows: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """Mean cosine between rows and their reconstructions (weighted by ``weights`` when given)."""
    total = 0.0
    with torch.no_grad():
        for start in range(0, rows.shape[0], BLOCK_ROWS):
            block = rows[start : start + BLOCK_ROWS]
            cosines = F.cosine_similarity(model(block), block, dim=1)
            if weights is not None:
                cosines = cosines * weights[start : start + BLOCK_ROWS]
            total += float(cosines.sum())
    norm = float(weights.sum()) if weights is not None else rows.shape[0]
    return total / max(norm, 1e-12)


def split_rows(
    vocab_size: int, seed: int, fraction: float = VALIDATION_FRACTION
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed (train, validation) split of row indices for ``seed``: ``fraction`` of them held out."""
    if vocab_size < 2:
        raise BadInputError("the AutoEncoder needs a matrix with at least 2 rows")
    n_val = min(max(1, round(fraction * vocab_size)), vocab_size - 1)
    order = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))
    return order[n_val:].sort().values, order[:n_val].sort().values


class AECompressor:
    """The linear (optionally ELU) AutoEncoder trained with one of the losses of :mod:`losses`."""

    def __init__(
        self,
        rank: int,
        loss: str = "paper",
        recipe: str = "fast",
        epochs: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        seed: int = 1,
        nonlinear: bool = False,
        warm_start: bool | None = None,
        loss_weights: Mapping[str, float] | None = None,
        device: str = "cpu",
        row_weights: RowWeights | None = None,
    ) -> None:
        if loss not in LOSS_NAMES:
            raise BadInputError(f"unknown loss {loss!r}; choose one of {', '.join(LOSS_NAMES)}")
        if recipe not in RECIPES:
            raise BadInputError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        for name, value in (("epochs", epochs), ("batch_size", batch_size)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise BadInputError(f"{name} must be a positive integer, got {value!r}")
        if lr is not None and not (isinstance(lr, int | float) and 0 < lr < math.inf):
            raise BadInputError(f"learning rate must be a positive number, got {lr!r}")
        self.rank = rank
        self.loss = loss
        self.loss_weights = resolve_weights(loss, loss_weights)
        self.recipe_name = recipe
        self.seed = check_seed(seed)
        self.nonlinear = nonlinear
        self.device = check_device(device)
        self.row_weights = row_weights
        base = RECIPES[recipe]
        overrides: dict[str, Any] = {}
        if epochs is not None:
            overrides["epochs"] = epochs
            if recipe == "fast":  # the fast recipe anneals alpha over the first two thirds of its epochs
                overrides["anneal_epochs"] = base.anneal_epochs * epochs / base.epochs
        if batch_size is not None:
            overrides["batch_size"] = batch_size
        if lr is not None:
            overrides["lr"] = float(lr)
        if warm_start is not None:
            overrides["warm_start"] = bool(warm_start)
        self.recipe = replace(base, **overrides)

    @property
    def method(self) -> str:
        suffixes = ("-elu" if self.nonlinear else "") + ("-freq" if self.row_weights is not None else "")
        return f"ae-{self.loss}{suffixes}"

    @property
    def label(self) -> str:
        kind = "non-linear (ELU) AE" if self.nonlinear else "AE"
        extras = [f"{self.recipe_name} recipe"] + (["SVD warm start"] if self.recipe.warm_start else [])
        if self.row_weights is not None:
            extras.append("frequency-weighted rows")
        return f"{kind}, {self.loss} loss ({', '.join(extras)})"

    def get_config(self) -> dict[str, Any]:
        """Constructor parameters, resolved recipe and loss weights, ``method`` and ``label``.

        ``device`` is left out: it changes where the fit runs, not what it computes.
        """
        return {
            "method": self.method,
            "label": self.label,
            "rank": self.rank,
            "loss": self.loss,
            "loss_weights": self.loss_weights.as_dict(),
            "recipe": self.recipe_name,
            **asdict(self.recipe),
            "seed": self.seed,
            "nonlinear": self.nonlinear,
            "validation_fraction": VALIDATION_FRACTION,
            "selection": "best validation mean cosine",
        } | ({"row_weights": self.row_weights.describe()} if self.row_weights is not None else {})

    def _build(
        self, matrix: torch.Tensor, train_rows: torch.Tensor, weights: torch.Tensor | None
    ) -> _AutoEncoder:
        with seeded(self.seed):
            model = _AutoEncoder(matrix.shape[1], self.rank, self.nonlinear)
        if self.recipe.warm_start:  # over the training rows, gathered block by block (no V x D copy)
            mean = row_mean(matrix, train_rows, weights)
            basis, _ = top_right_singular_vectors(
                matrix, self.rank, center=mean, weights=weights, rows=train_rows
            )
            with torch.no_grad():
                model.encoder.weight.copy_(basis.T)
                model.encoder.bias.copy_(-(mean @ basis))
                model.decoder.weight.copy_(basis)
                model.decoder.bias.copy_(mean)
        return model

    def _scheduler(
        self, optimizer: torch.optim.Optimizer, steps: int
    ) -> torch.optim.lr_scheduler.LRScheduler:
        recipe = self.recipe
        if recipe.schedule == "step":  # stepped once per epoch
            return torch.optim.lr_scheduler.StepLR(
                optimizer, step_size=recipe.step_epochs, gamma=recipe.gamma
            )
        total = recipe.epochs * steps  # stepped once per batch
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / total))
        )

    @staticmethod
    def _draw_rows(count: int, weights: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        """One epoch's row order: a permutation, or ``count`` draws proportional to ``weights``."""
        if weights is None:
            return torch.randperm(count, generator=generator)
        return torch.multinomial(weights.cpu(), count, replacement=True, generator=generator)

    def fit(self, embedding: torch.Tensor, progress: ProgressCallback | None = None) -> CompressedEmbedding:
        """Train on ``embedding`` (V x D) and return the deployed codes + decoder.

        Raises:
            TrainingCancelled: ``progress`` returned ``False``; the fit stops at the end of that epoch.
        """
        started = time.perf_counter()
        vocab, hidden = embedding.shape
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or not 1 <= self.rank <= hidden:
            raise BadInputError(f"rank must be between 1 and {hidden}, got {self.rank!r}")
        matrix = embedding.detach().to(device=self.device, dtype=torch.float32)
        # Batches are gathered from the matrix by row index: no copy of the training rows (the matrix may
        # be most of the memory there is); the small validation split is copied.
        train_idx, val_idx = (rows.to(self.device) for rows in split_rows(vocab, self.seed))
        val = matrix[val_idx]
        train_weights = val_weights = None
        if self.row_weights is not None:
            weights = self.row_weights.check(vocab).to(torch.float32).to(self.device)
            train_weights, val_weights = weights[train_idx], weights[val_idx]
        model = self._build(matrix, train_idx, train_weights).to(self.device)
        loss_fn = loss_with_weights(self.loss_weights)
        recipe = self.recipe
        batch = min(recipe.batch_size, train_idx.shape[0])
        steps = math.ceil(train_idx.shape[0] / batch)
        report_every = math.ceil(steps / REPORTS_PER_EPOCH)
        optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
        scheduler = self._scheduler(optimizer, steps)
        shuffler = torch.Generator().manual_seed(self.seed)
        best_cosine, best_state = -math.inf, _clone_state(model)
        history: list[dict[str, Any]] = []
        cancelled = False

        for epoch in range(1, recipe.epochs + 1):
            epoch_started = time.perf_counter()
            alpha = alpha_schedule(epoch - 1, recipe.anneal_epochs)
            lr = optimizer.param_groups[0]["lr"]
            order = train_idx[self._draw_rows(train_idx.shape[0], train_weights, shuffler).to(self.device)]
            loss_sum = torch.zeros((), device=self.device)
            term_sums: dict[str, torch.Tensor] = {}
            model.train()
            for step in range(1, steps + 1):
                x = matrix[order[(step - 1) * batch : step * batch]]
                loss, terms = loss_fn(model(x), x, alpha)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if recipe.schedule == "cosine":
                    scheduler.step()
                loss_sum += loss.detach()
                for name, value in terms.items():
                    term_sums[name] = term_sums.get(name, 0) + value
                if progress is not None and step % report_every == 0 and step < steps:
                    report = _fit_progress(
                        epoch, recipe.epochs, step, steps, *_means(loss_sum, term_sums, step),
                        time.perf_counter() - started,
                    )  # fmt: skip
                    cancelled |= not send(progress, report)
            if recipe.schedule == "step":
                scheduler.step()
            model.eval()
            val_cosine = _mean_cosine(model, val, val_weights)
            if val_cosine > best_cosine:
                best_cosine, best_state = val_cosine, _clone_state(model)
            mean_loss, mean_terms = _means(loss_sum, term_sums, steps)
            history.append(
                {
                    "epoch": epoch,
                    "loss": mean_loss,
                    "terms": mean_terms,
                    "alpha": alpha,
                    "lr": lr,
                    "val_mean_cosine": val_cosine,
                    "seconds": time.perf_counter() - epoch_started,
                }
            )
            if progress is not None:
                report = _fit_progress(
                    epoch, recipe.epochs, steps, steps, mean_loss, mean_terms,
                    time.perf_counter() - started, epoch_end=True,
                )  # fmt: skip
                cancelled |= not send(progress, report)
            if cancelled:
                raise TrainingCancelled(f"training cancelled after epoch {epoch} of {recipe.epochs}")

        model.load_state_dict(best_state)
        best_epoch = max(history, key=lambda h: h["val_mean_cosine"])["epoch"]
        for record in history:
            record["selected"] = record["epoch"] == best_epoch
        with torch.no_grad():
            codes = torch.cat([model.encode(matrix[s : s + BLOCK_ROWS]) for s in range(0, vocab, BLOCK_ROWS)])
        return CompressedEmbedding(
            method=self.method,
            config=self.get_config(),
            codes=codes.cpu().contiguous(),
            decoder=model.decoder.weight.detach().T.cpu().contiguous(),
            decoder_bias=model.decoder.bias.detach().cpu().clone(),
            decoder_activation="elu" if self.nonlinear else None,
            history=history,
            train_seconds=time.perf_counter() - started,
        )


def _fit_progress(
    epoch: int,
    epochs: int,
    step: int,
    steps: int,
    loss: float,
    terms: dict[str, float],
    elapsed_s: float,
    epoch_end: bool = False,
) -> Progress:
    """A fit's report: steps done over all epochs, the running loss and loss terms as metrics."""
    return Progress(
        done=(epoch - 1) * steps + step,
        total=epochs * steps,
        message=f"epoch {epoch}/{epochs} · step {step}/{steps}",
        metrics={LOSS: loss, **terms},
        epoch=epoch,
        epochs=epochs,
        epoch_end=epoch_end,
        elapsed_s=elapsed_s,
    )


def _clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _means(
    loss_sum: torch.Tensor, term_sums: dict[str, torch.Tensor], count: int
) -> tuple[float, dict[str, float]]:
    return float(loss_sum) / count, {name: float(value) / count for name, value in term_sums.items()}


# -- registration ------------------------------------------------------------------------------------------
SIMPLE_LOSSES = ("paper", "cosine", "mse")
"""The AE losses offered by name (``ae-<loss>``); the free-weights loss also needs ``loss_weights``."""
TRAINING_OPTIONS = ("recipe", "epochs", "batch_size", "lr", "seed", "warm_start", "device")
"""The options every AE method takes (``device`` changes where it trains, not what it computes)."""
TRAINING_CONFIG = ("recipe", "epochs", "batch_size", "lr", "seed", "warm_start")

# Measured on one core of the reference machine (SmolLM2's 49,152 x 576 matrix, torch 2.13 CPU): an epoch
# costs about (1.5 + r/500) s per reference matrix of rows plus 1.4 ms per optimiser step, and the SVD warm
# start about 1 s (fast recipe, rank 64: 10.5 s; rank 128: 11.3 s; paper recipe: 3.7 s per epoch).
_EPOCH_SECONDS, _EPOCH_SECONDS_PER_RANK, _STEP_SECONDS, _WARM_START_SECONDS = 1.5, 1 / 500, 1.4e-3, 1.0


def expected_training_seconds(
    vocab_size: int, hidden_size: int, size: Size, options: Mapping[str, Any]
) -> float:
    """About how long the AE trains at ``size`` with ``options`` (recipe, epochs, batch size, warm start)."""
    recipe = RECIPES[str(options.get("recipe") or "fast")]
    epochs = int(options.get("epochs") or recipe.epochs)
    batch = int(options.get("batch_size") or recipe.batch_size)
    warm = bool(options.get("warm_start", recipe.warm_start))
    scale = matrix_scale(vocab_size, hidden_size)
    rank = size.rank or 1
    epoch = (
        scale * (_EPOCH_SECONDS + rank * _EPOCH_SECONDS_PER_RANK)
        + math.ceil(vocab_size / batch) * _STEP_SECONDS
    )
    return epochs * epoch + (scale * _WARM_START_SECONDS if warm else 0.0)


def fit_memory(vocab_size: int, hidden_size: int, rank: int | None) -> int:
    """Bytes an AE fit holds beyond the V x D float32 matrix: the validation rows' copy (the training rows
    are gathered a batch at a time), float64 row blocks and the D x D Gram matrix of the warm start, the codes
    and a batch's activations and gradients, with a tenth of the matrix and 64 MiB for the allocator's slack."""
    matrix = 4 * vocab_size * hidden_size
    rank = rank or hidden_size
    validation = math.ceil(VALIDATION_FRACTION * vocab_size) * hidden_size * 4
    blocks = 3 * 8 * BLOCK_ROWS * hidden_size + 4 * 8 * hidden_size * hidden_size
    batch = 8 * 4 * 4096 * hidden_size
    return validation + blocks + 3 * 4 * vocab_size * rank + batch + matrix // 10 + 64 * 2**20


def _ae_method(
    method_id: str,
    label: str,
    loss: str,
    description: str,
    *,
    nonlinear: bool = False,
    weighted_rows: bool = False,
) -> MethodSpec:
    """Register the AE with ``loss`` (linear unless ``nonlinear``; frequency-weighted rows if asked)."""
    extra = ("loss_weights",) if loss == "weighted" else ()

    def build(rank: int, ratio: float | None, row_weights: RowWeights | None, **options: Any) -> AECompressor:
        return AECompressor(rank, loss=loss, nonlinear=nonlinear, row_weights=row_weights, **options)

    return register_method(
        MethodSpec(
            id=method_id,
            label=label,
            family="autoencoder",
            sizing="rank",
            factory=build,
            stores=("codes", "decoder", "decoder_bias"),
            trains=True,
            needs_row_weights=weighted_rows,
            options=TRAINING_OPTIONS + extra,
            config_keys=TRAINING_CONFIG + extra,
            decoder_bias=True,
            description=description,
            fit_seconds=expected_training_seconds,
            fit_memory=fit_memory,
        )
    )


AE_PAPER = _ae_method(
    "ae-paper",
    "AE, paper loss",
    "paper",
    "Linear AutoEncoder with the paper's loss: cosine plus a small annealed |error|^alpha term.",
)
AE_COSINE = _ae_method(
    "ae-cosine", "AE, cosine loss", "cosine", "Linear AutoEncoder trained on direction (cosine) alone."
)
AE_MSE = _ae_method(
    "ae-mse",
    "AE, MSE loss",
    "mse",
    "Linear AutoEncoder trained on Euclidean error: the control for direction.",
)
AE_WEIGHTED = _ae_method(
    "ae-weighted",
    "AE, free-weights loss",
    "weighted",
    "Linear AutoEncoder with user-chosen weights of the cosine, |error|^alpha and MSE terms (loss_weights).",
)
AE_PAPER_ELU = _ae_method(
    "ae-paper-elu",
    "non-linear (ELU) AE, paper loss",
    "paper",
    "The paper's non-linear variant: ELU after the encoder and the decoder.",
    nonlinear=True,
)
AE_PAPER_FREQ = _ae_method(
    "ae-paper-freq",
    "AE, paper loss, frequency-weighted rows",
    "paper",
    "The paper-loss AE with rows drawn and weighted by token frequency.",
    weighted_rows=True,
)
