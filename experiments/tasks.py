"""The task registry: what is trained, each small enough for a CPU.

A `Task` builds a `Problem` for a seed: the model, one epoch of minibatches at a time, the
differentiable minibatch loss, the full training objective and a held-out metric. The
seed varies the model's initialisation, the batch order and the gradient noise; the data
of a task are fixed.
"""

from __future__ import annotations

import functools
import math
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from adaptive_lr import seed as seed_scenario


@dataclass(frozen=True)
class Problem:
    """One task instance, ready to train."""

    model: nn.Module
    steps_per_epoch: int
    epoch_batches: Callable[[], Iterator[Any]]
    """A fresh epoch of minibatches (a new order every call)."""
    batch_loss: Callable[[Any], Tensor]
    """The differentiable loss on one minibatch."""
    training_loss: Callable[[], float]
    """The full training objective, without gradient."""
    heldout_metric: Callable[[], float]
    """The task's held-out metric (see `Task.heldout_metric`)."""


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    target_loss: float
    """`steps_to_target` counts optimizer steps until the minibatch loss is at or below this."""
    heldout_metric: str
    """Name of the held-out metric, e.g. "accuracy"."""
    heldout_higher_is_better: bool
    build: Callable[[int], Problem]


# --- the seed article's network -------------------------------------------------------

SEED_TRAIN_SIZE = 2048
SEED_HELDOUT_SIZE = 1024
SEED_BATCH_SIZE = 64
SEED_DATA_SEED = 0


def _seed_problem(init: str, seed: int) -> Problem:
    # One draw split in two: `seed_data` draws its teacher from the same seed, so a
    # held-out set drawn with another seed would be a different task.
    inputs, labels = seed_scenario.seed_data(SEED_TRAIN_SIZE + SEED_HELDOUT_SIZE, seed=SEED_DATA_SEED)
    train_x, train_y = inputs[:SEED_TRAIN_SIZE], labels[:SEED_TRAIN_SIZE]
    heldout_x, heldout_y = inputs[SEED_TRAIN_SIZE:], labels[SEED_TRAIN_SIZE:]
    model = seed_scenario.seed_network(init=init, generator_seed=seed)
    generator = torch.Generator().manual_seed(seed)

    def epoch_batches() -> Iterator[Tensor]:
        order = torch.randperm(SEED_TRAIN_SIZE, generator=generator)
        for start in range(0, SEED_TRAIN_SIZE, SEED_BATCH_SIZE):
            yield order[start : start + SEED_BATCH_SIZE]

    def batch_loss(batch: Tensor) -> Tensor:
        return F.cross_entropy(model(train_x[batch]), train_y[batch])

    return Problem(
        model=model,
        steps_per_epoch=-(-SEED_TRAIN_SIZE // SEED_BATCH_SIZE),
        epoch_batches=epoch_batches,
        batch_loss=batch_loss,
        training_loss=lambda: seed_scenario.evaluate(model, train_x, train_y)[0],
        heldout_metric=lambda: seed_scenario.evaluate(model, heldout_x, heldout_y)[1],
    )


# --- the noisy quadratic -------------------------------------------------------------

QUADRATIC_DIMENSION = 50
QUADRATIC_EIGENVALUES = torch.logspace(-2, 0, QUADRATIC_DIMENSION, dtype=torch.float64)
"""Spectrum of A: log-spaced in [0.01, 1] (condition number 100, lambda_max = 1)."""
QUADRATIC_GRADIENT_NOISE = 0.1
"""Standard deviation of the additive Gaussian noise on each gradient coordinate."""
QUADRATIC_STEPS_PER_EPOCH = 100


class _QuadraticPoint(nn.Module):
    def __init__(self, start: Tensor) -> None:
        super().__init__()
        self.x = nn.Parameter(start.clone())


def _quadratic_problem(seed: int) -> Problem:
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(QUADRATIC_DIMENSION, generator=generator, dtype=torch.float64)
    model = _QuadraticPoint(start)
    eigenvalues = QUADRATIC_EIGENVALUES

    def objective() -> Tensor:
        return 0.5 * (eigenvalues * model.x**2).sum()

    def epoch_batches() -> Iterator[Tensor]:
        for _ in range(QUADRATIC_STEPS_PER_EPOCH):
            yield QUADRATIC_GRADIENT_NOISE * torch.randn(
                QUADRATIC_DIMENSION, generator=generator, dtype=torch.float64
            )

    def batch_loss(noise: Tensor) -> Tensor:
        # Value f(x), gradient A x + noise: the noise is in the gradient only, so the loss
        # the optimizer sees (and `steps_to_target`) is the exact objective.
        perturbation = (noise * model.x).sum()
        return objective() + perturbation - perturbation.detach()

    def training_loss() -> float:
        with torch.no_grad():
            return objective().item()

    def distance_to_optimum() -> float:
        with torch.no_grad():
            return model.x.norm().item()

    return Problem(
        model=model,
        steps_per_epoch=QUADRATIC_STEPS_PER_EPOCH,
        epoch_batches=epoch_batches,
        batch_loss=batch_loss,
        training_loss=training_loss,
        heldout_metric=distance_to_optimum,
    )


# --- shared helpers for the tasks below ----------------------------------------------


def _seeded_module(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    """`make()` under `torch.manual_seed(seed)`: the weights are a function of the seed
    alone, and the caller's global RNG state is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def _shuffled_batches(size: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    order = torch.randperm(size, generator=generator)
    for start in range(0, size, batch_size):
        yield order[start : start + batch_size]


def _classification_problem(
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    heldout: tuple[Tensor, Tensor],
    batch_size: int,
    seed: int,
) -> Problem:
    """Cross-entropy on integer labels; held-out metric: accuracy."""
    train_x, train_y = train
    heldout_x, heldout_y = heldout
    generator = torch.Generator().manual_seed(seed)

    def training_loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(model(train_x), train_y).item()

    def accuracy() -> float:
        with torch.no_grad():
            return (model(heldout_x).argmax(dim=1) == heldout_y).float().mean().item()

    return Problem(
        model=model,
        steps_per_epoch=-(-len(train_y) // batch_size),
        epoch_batches=lambda: _shuffled_batches(len(train_y), batch_size, generator),
        batch_loss=lambda batch: F.cross_entropy(model(train_x[batch]), train_y[batch]),
        training_loss=training_loss,
        heldout_metric=accuracy,
    )


# --- the seed article's LSTM example, repaired ----------------------------------------
#
# The seed's Keras example cannot run: `LSTM(20, input_shape=(8,))` declares a 1-D input,
# while an LSTM needs (time steps, features) per example; it is fed two 3-number lists;
# its targets [[7, 8, 9], [10, 11, 12]] are neither one-hot rows nor class indices for
# `categorical_crossentropy` over a 3-way softmax. Repaired here: each example is a
# sequence of 8 time steps (the seed's `input_size = 8`) of 3-number vectors (its 3-number
# lists), shape (batch, 8, 3); the label is an integer class in {0, 1, 2} and the loss is
# cross-entropy on logits (what `sparse_categorical_crossentropy` does), so no one-hot
# encoding can mismatch. Hidden size 20 and 3 outputs as in the seed. The seed's
# `activation='relu'` is dropped: `nn.LSTM` has the standard tanh cell only.

LSTM_SEQUENCE_LENGTH = 8
LSTM_FEATURES = 3
LSTM_HIDDEN_SIZE = 20
LSTM_CLASSES = 3
LSTM_TRAIN_SIZE = 2048
LSTM_HELDOUT_SIZE = 1024
LSTM_BATCH_SIZE = 64
LSTM_DATA_SEED = 1


class SeedLSTM(nn.Module):
    """LSTM(3 -> 20) over the sequence, then Linear(20 -> 3) on the last hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(LSTM_FEATURES, LSTM_HIDDEN_SIZE, batch_first=True)
        self.head = nn.Linear(LSTM_HIDDEN_SIZE, LSTM_CLASSES)

    def forward(self, sequences: Tensor) -> Tensor:
        """(batch, 8, 3) sequences -> (batch, 3) logits."""
        _, (hidden, _) = self.lstm(sequences)
        return self.head(hidden[-1])


def lstm_data(n: int, *, seed: int = LSTM_DATA_SEED) -> tuple[Tensor, Tensor]:
    """X ~ N(0, 1) of shape (n, 8, 3); y = the feature (0, 1 or 2) that holds the largest
    value anywhere in the sequence, so the model must carry a running maximum through time.
    The three classes are equally likely by symmetry."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, LSTM_SEQUENCE_LENGTH, LSTM_FEATURES, generator=generator)
    return inputs, inputs.amax(dim=1).argmax(dim=1)


def _lstm_problem(seed: int) -> Problem:
    inputs, labels = lstm_data(LSTM_TRAIN_SIZE + LSTM_HELDOUT_SIZE)
    split = LSTM_TRAIN_SIZE
    return _classification_problem(
        _seeded_module(seed, SeedLSTM),
        (inputs[:split], labels[:split]),
        (inputs[split:], labels[split:]),
        LSTM_BATCH_SIZE,
        seed,
    )


# --- a deep vanilla RNN on the adding problem ----------------------------------------

RNN_SEQUENCE_LENGTH = 50
RNN_HIDDEN_SIZE = 32
RNN_LAYERS = 2
RNN_RECURRENT_GAIN = 1.2
"""Each recurrent matrix W_hh starts as this multiple of a random orthogonal matrix, so
every singular value is 1.2 > 1: Pascanu et al.'s necessary condition for exploding
gradients (largest singular value above 1/gamma, gamma = 1 the bound on tanh')."""
RNN_TRAIN_SIZE = 8192
RNN_HELDOUT_SIZE = 1024
RNN_BATCH_SIZE = 64
RNN_DATA_SEED = 2


class AddingRNN(nn.Module):
    """Two stacked tanh RNN layers (2 -> 32 -> 32), then Linear(32 -> 1) on the last step."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, RNN_HIDDEN_SIZE, num_layers=RNN_LAYERS, nonlinearity="tanh", batch_first=True)
        for layer in range(RNN_LAYERS):
            nn.init.orthogonal_(getattr(self.rnn, f"weight_hh_l{layer}"), gain=RNN_RECURRENT_GAIN)
        self.head = nn.Linear(RNN_HIDDEN_SIZE, 1)

    def forward(self, sequences: Tensor) -> Tensor:
        """(batch, 50, 2) sequences -> (batch,) predictions."""
        outputs, _ = self.rnn(sequences)
        return self.head(outputs[:, -1]).squeeze(-1)


def adding_data(n: int, *, seed: int = RNN_DATA_SEED) -> tuple[Tensor, Tensor]:
    """The adding problem (Hochreiter and Schmidhuber 1997): channel 0 holds U(0, 1) values,
    channel 1 marks one step in the first half and one in the second; the target is the sum
    of the two marked values. Predicting the mean, 1, scores MSE 1/6."""
    generator = torch.Generator().manual_seed(seed)
    half = RNN_SEQUENCE_LENGTH // 2
    values = torch.rand(n, RNN_SEQUENCE_LENGTH, generator=generator)
    first = torch.randint(0, half, (n,), generator=generator)
    second = torch.randint(half, RNN_SEQUENCE_LENGTH, (n,), generator=generator)
    markers = torch.zeros(n, RNN_SEQUENCE_LENGTH)
    rows = torch.arange(n)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    return torch.stack([values, markers], dim=-1), (values * markers).sum(dim=1)


def _rnn_problem(seed: int) -> Problem:
    inputs, targets = adding_data(RNN_TRAIN_SIZE + RNN_HELDOUT_SIZE)
    train_x, train_y = inputs[:RNN_TRAIN_SIZE], targets[:RNN_TRAIN_SIZE]
    heldout_x, heldout_y = inputs[RNN_TRAIN_SIZE:], targets[RNN_TRAIN_SIZE:]
    model = _seeded_module(seed, AddingRNN)
    generator = torch.Generator().manual_seed(seed)

    def mse(inputs: Tensor, targets: Tensor) -> float:
        with torch.no_grad():
            return F.mse_loss(model(inputs), targets).item()

    return Problem(
        model=model,
        steps_per_epoch=-(-RNN_TRAIN_SIZE // RNN_BATCH_SIZE),
        epoch_batches=lambda: _shuffled_batches(RNN_TRAIN_SIZE, RNN_BATCH_SIZE, generator),
        batch_loss=lambda batch: F.mse_loss(model(train_x[batch]), train_y[batch]),
        training_loss=lambda: mse(train_x, train_y),
        heldout_metric=lambda: mse(heldout_x, heldout_y),
    )


# --- a small CNN on scikit-learn's digits --------------------------------------------

DIGITS_HELDOUT_SIZE = 500
DIGITS_BATCH_SIZE = 64
DIGITS_SPLIT_SEED = 3


@functools.cache
def digits_data() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1797 8x8 digit images (pixel values 0..16, scaled to [0, 1]) as
    (1797, 1, 8, 8) floats, and their labels 0..9; bundled with the package, no download."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(digits.target, dtype=torch.int64)


def digits_cnn() -> nn.Sequential:
    """Conv(1 -> 16, 3x3) ReLU, Conv(16 -> 32, 3x3) ReLU, 2x2 max-pool, Linear(512 -> 10)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def _digits_problem(seed: int) -> Problem:
    images, labels = digits_data()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    train, heldout = order[DIGITS_HELDOUT_SIZE:], order[:DIGITS_HELDOUT_SIZE]
    return _classification_problem(
        _seeded_module(seed, digits_cnn),
        (images[train], labels[train]),
        (images[heldout], labels[heldout]),
        DIGITS_BATCH_SIZE,
        seed,
    )


# --- a character-level transformer on the standard library's source ------------------

CORPUS_MODULES = (
    "bisect",
    "contextlib",
    "copy",
    "dataclasses",
    "fractions",
    "functools",
    "heapq",
    "random",
    "statistics",
    "textwrap",
)
"""Standard-library modules whose source files, `<stdlib>/<name>.py` in this order, make up
the corpus (`<stdlib>` is `sysconfig.get_paths()["stdlib"]`)."""
CORPUS_CHARACTERS = 200_000
CORPUS_HELDOUT_FRACTION = 0.1
"""The last 10% of the corpus is held out; the first 90% is trained on."""
TRANSFORMER_CONTEXT = 64
TRANSFORMER_WIDTH = 64
TRANSFORMER_HEADS = 4
TRANSFORMER_LAYERS = 2
TRANSFORMER_BATCH_SIZE = 32
TRANSFORMER_STEPS_PER_EPOCH = 50
TRANSFORMER_TRAINING_WINDOWS = 256
"""`training_loss` is the mean over this many fixed training windows, not the whole split."""


@functools.cache
def stdlib_corpus() -> str:
    """The source of `CORPUS_MODULES` concatenated in order, first 200,000 characters.

    Deterministic for a given Python version; another version ships other sources, so the
    corpus (and the numbers measured on it) depend on the Python version.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((stdlib / f"{name}.py").read_text(encoding="utf-8") for name in CORPUS_MODULES)
    return text[:CORPUS_CHARACTERS]


def _encoded_corpus() -> tuple[Tensor, int]:
    text = stdlib_corpus()
    vocabulary = sorted(set(text))
    index = {character: i for i, character in enumerate(vocabulary)}
    return torch.tensor([index[character] for character in text], dtype=torch.int64), len(vocabulary)


class CharTransformer(nn.Module):
    """A causal (decoder-only) transformer: token and learned position embeddings, 2 pre-norm
    encoder layers (width 64, 4 heads, feed-forward 256, no dropout) under a causal mask, a
    final layer norm and a linear read-out to the vocabulary."""

    def __init__(self, vocabulary_size: int) -> None:
        super().__init__()
        self.token = nn.Embedding(vocabulary_size, TRANSFORMER_WIDTH)
        self.position = nn.Embedding(TRANSFORMER_CONTEXT, TRANSFORMER_WIDTH)
        layer = nn.TransformerEncoderLayer(
            TRANSFORMER_WIDTH,
            TRANSFORMER_HEADS,
            dim_feedforward=4 * TRANSFORMER_WIDTH,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, TRANSFORMER_LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(TRANSFORMER_WIDTH)
        self.readout = nn.Linear(TRANSFORMER_WIDTH, vocabulary_size)
        self.register_buffer(
            "causal_mask",
            nn.Transformer.generate_square_subsequent_mask(TRANSFORMER_CONTEXT),
            persistent=False,
        )

    def forward(self, tokens: Tensor) -> Tensor:
        """(batch, length <= 64) token ids -> (batch, length, vocabulary) next-token logits."""
        length = tokens.shape[1]
        hidden = self.token(tokens) + self.position(torch.arange(length, device=tokens.device))
        mask = self.causal_mask[:length, :length]
        return self.readout(self.norm(self.blocks(hidden, mask=mask, is_causal=True)))


def _transformer_problem(seed: int) -> Problem:
    tokens, vocabulary_size = _encoded_corpus()
    split = int(len(tokens) * (1 - CORPUS_HELDOUT_FRACTION))
    train, heldout = tokens[:split], tokens[split:]
    window = TRANSFORMER_CONTEXT + 1
    model = _seeded_module(seed, lambda: CharTransformer(vocabulary_size))
    generator = torch.Generator().manual_seed(seed)

    def windows(text: Tensor, starts: Tensor) -> Tensor:
        return text[starts.unsqueeze(1) + torch.arange(window)]

    def loss(batch: Tensor) -> Tensor:
        """Mean next-character cross-entropy in nats over a (batch, 65) window batch."""
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    def epoch_batches() -> Iterator[Tensor]:
        for _ in range(TRANSFORMER_STEPS_PER_EPOCH):
            starts = torch.randint(0, len(train) - window + 1, (TRANSFORMER_BATCH_SIZE,), generator=generator)
            yield windows(train, starts)

    # Fixed evaluation windows: evenly spaced over the training split; the whole held-out
    # split cut into consecutive windows.
    training_windows = windows(
        train, torch.linspace(0, len(train) - window, TRANSFORMER_TRAINING_WINDOWS).long()
    )
    heldout_windows = windows(heldout, torch.arange(0, len(heldout) - window + 1, window - 1))

    def evaluate(batch: Tensor) -> float:
        with torch.no_grad():
            return loss(batch).item()

    return Problem(
        model=model,
        steps_per_epoch=TRANSFORMER_STEPS_PER_EPOCH,
        epoch_batches=epoch_batches,
        batch_loss=loss,
        training_loss=lambda: evaluate(training_windows),
        heldout_metric=lambda: evaluate(heldout_windows) / math.log(2),
    )


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="seed_he",
            description="the seed's 10-layer ReLU network (8 -> 20 x9 -> 3), He initialisation",
            target_loss=0.3,
            heldout_metric="accuracy",
            heldout_higher_is_better=True,
            build=lambda seed: _seed_problem("he", seed),
        ),
        Task(
            name="seed_default",
            description="the seed's network with PyTorch's default init (gradients vanish)",
            target_loss=0.3,
            heldout_metric="accuracy",
            heldout_higher_is_better=True,
            build=lambda seed: _seed_problem("default", seed),
        ),
        Task(
            name="seed_lstm",
            description=(
                "the seed article's Keras LSTM example, repaired so it runs: LSTM(3 -> 20) over "
                "sequences of 8 steps of 3 numbers, Linear(20 -> 3), integer labels with "
                "cross-entropy; label = the feature holding the sequence's largest value; 2048 "
                "train / 1024 held-out; in the study because it is the seed's own example"
            ),
            target_loss=0.3,
            heldout_metric="accuracy",
            heldout_higher_is_better=True,
            build=_lstm_problem,
        ),
        Task(
            name="rnn_long_range",
            description=(
                "the adding problem, length 50, on a 2-layer tanh RNN (hidden 32) whose recurrent "
                "matrices start as 1.2 x orthogonal; MSE, predicting the mean scores 1/6; 8192 "
                "train / 1024 held-out; in the study as the classic exploding-gradient setting "
                "(Pascanu, Mikolov and Bengio 2013): bare SGD's gradient norm grows 10^6-fold "
                "in six steps at lr 1"
            ),
            target_loss=0.1,
            heldout_metric="heldout_mse",
            heldout_higher_is_better=False,
            build=_rnn_problem,
        ),
        Task(
            name="digits_cnn",
            description=(
                "a small CNN (conv 16, conv 32, max-pool, linear; 9.9k parameters) on "
                "scikit-learn's 8x8 digits, 1297 train / 500 held-out images; in the study as "
                "real data that ships with scikit-learn (no download)"
            ),
            target_loss=0.1,
            heldout_metric="accuracy",
            heldout_higher_is_better=True,
            build=_digits_problem,
        ),
        Task(
            name="char_transformer",
            description=(
                "a character-level causal transformer LM (2 pre-norm layers, width 64, 4 heads, "
                "context 64, no dropout) on the Python standard library's own source: "
                "<stdlib>/{bisect,contextlib,copy,dataclasses,fractions,functools,heapq,random,"
                "statistics,textwrap}.py concatenated in that order, first 200,000 characters "
                "(depends on the Python version), last 10% held out; batch 32, 50 steps per "
                "epoch; held-out metric in bits per character; in the study as a small "
                "transformer on real text"
            ),
            target_loss=2.0,
            heldout_metric="heldout_bits_per_char",
            heldout_higher_is_better=False,
            build=_transformer_problem,
        ),
        Task(
            name="noisy_quadratic",
            description=(
                "f(x) = x'Ax/2, d = 50, eigenvalues log-spaced in [0.01, 1], additive gradient "
                "noise N(0, 0.1^2 I), x0 ~ N(0, I); heavy-ball SGD with momentum 0.9 is stable "
                "for lr < 2(1 + 0.9)/lambda_max = 3.8, plain GD for lr < 2"
            ),
            target_loss=0.1,
            heldout_metric="distance_to_optimum",
            heldout_higher_is_better=False,
            build=_quadratic_problem,
        ),
    )
}
