from __future__ import annotations

import pytest
import torch

from embviz.compressors import AECompressor, TrainingCancelled
from embviz.progress import LOSS, Progress, describe, format_metrics, nested, quiet, send, throttled


def test_fraction_is_clamped_and_an_empty_task_is_done() -> None:
    assert Progress(1, 4).fraction == 0.25 and not Progress(1, 4).finished
    assert Progress(5, 4).fraction == 1.0 and Progress(4, 4).finished
    assert Progress(-1, 4).fraction == 0.0
    assert Progress(0, 0).fraction == 1.0


def test_metrics_split_into_loss_and_terms_and_read_as_words() -> None:
    update = Progress(3, 10, "epoch 1/2 · step 3/5", {LOSS: 0.5, "cosine": 0.25}, epoch=1, epochs=2)
    assert update.loss == 0.5 and update.terms == {"cosine": 0.25}
    assert format_metrics(update) == "loss 0.5 · cosine 0.25"
    assert describe(update) == "epoch 1/2 · step 3/5 · loss 0.5 · cosine 0.25"
    assert describe(Progress(1, 1, "done")) == "done" and Progress(1, 1).loss is None


def test_nested_maps_a_sub_task_into_the_parents_range() -> None:
    seen: list[Progress] = []
    child = nested(seen.append, 2, 4, 10, "[job] ")
    child(Progress(1, 4, "half way there", {LOSS: 1.0}, epoch=1, epochs=2))
    assert seen[-1].done == 2.5 and seen[-1].total == 10
    assert seen[-1].message == "[job] half way there" and seen[-1].loss == 1.0 and seen[-1].epochs == 2
    grandchild = nested(child, 0, 1, 1)  # nesting composes
    grandchild(Progress(1, 1, "done"))
    assert seen[-1].done == 4 and seen[-1].message == "[job] done"
    assert nested(None, 0, 1, 1)(Progress(1, 1)) is None  # no parent: nothing to tell


def test_send_reports_cancellation_and_a_parent_cancels_through_nesting() -> None:
    assert send(None, Progress(0, 1)) and send(quiet, Progress(0, 1))
    assert not send(lambda _: False, Progress(0, 1))
    with pytest.raises(TrainingCancelled):
        AECompressor(2, epochs=3, batch_size=256).fit(
            torch.randn(200, 8), progress=nested(lambda _: False, 0, 1, 1)
        )


def test_throttled_passes_a_few_reports_a_second_and_every_ending() -> None:
    now = [0.0]
    shown: list[float] = []
    answers = iter([None, False, None, None, None])

    def show(update: Progress) -> bool | None:
        shown.append(update.done)
        return next(answers)

    report = throttled(show, interval_s=0.25, clock=lambda: now[0])
    for time_s, done in ((0.0, 1), (0.1, 2), (0.2, 3), (0.3, 4), (0.35, 5)):
        now[0] = time_s
        report(Progress(done, 10))
    assert shown == [1, 4]  # 0.1, 0.2 and 0.35 s came too soon after a shown report
    assert report(Progress(6, 10)) is False  # passed over: the last shown answer (a cancel) stands
    assert report(Progress(7, 10, epoch=1, epochs=2, epoch_end=True)) is None  # an epoch's end always shows
    assert report(Progress(10, 10)) is None and shown == [1, 4, 7, 10]  # so does the end of the task
