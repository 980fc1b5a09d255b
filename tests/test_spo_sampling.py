"""SPO sampling is a pure function of (seed, epoch, row index, side, sample number): resume is exact, DataLoader
workers and evaluation do not disturb it, and nothing depends on what was drawn before."""

from __future__ import annotations

import pickle
import random

import pytest
import torch

from prefalign.spo import SPOCollator, draw_degree

K = 4


def _row(row_index: int) -> dict:
    versions = lambda side: [[100 + 10 * d + (side == "rejected")] * (4 - d) for d in range(1, K)]  # noqa: E731
    return {
        "row_index": row_index, "prompt_input_ids": [1, 2], "chosen_input_ids": [3, 4, 5, 6],
        "rejected_input_ids": [7, 8, 9, 10], "spo_chosen_ids": versions("chosen"), "spo_rejected_ids": versions("rejected"),
    }


ROWS = [_row(i) for i in range(300)]


def _by_response(collator: SPOCollator, rows: list[dict], batch_size: int = 8) -> dict[tuple[int, str], list[int]]:
    """{(row_index, side): degrees} from `draw`, batch by batch (each row's chosen samples, then rejected)."""
    out = {}
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        degrees = collator.draw(batch)[2].tolist()
        for row in batch:
            for side in ("chosen", "rejected"):
                out[(row["row_index"], side)], degrees = degrees[: collator.samples], degrees[collator.samples :]
        assert not degrees
    return out


def test_draws_depend_only_on_seed_epoch_row_side_and_sample():
    reference = _by_response(SPOCollator(0, degrees=K, samples=2, seed=7), ROWS)
    busy = SPOCollator(0, degrees=K, samples=2, seed=7)
    for _ in range(3):  # earlier draws, of these rows and others, change nothing
        _by_response(busy, ROWS[::-1] + [_row(i) for i in range(1000, 1050)], batch_size=5)
    shuffled = ROWS[:]
    random.Random(0).shuffle(shuffled)
    assert _by_response(busy, shuffled, batch_size=3) == reference
    assert _by_response(pickle.loads(pickle.dumps(busy)), ROWS[150:] + ROWS[:150]) == reference
    assert reference[(5, "rejected")] == [draw_degree(7, 0, 5, "rejected", j, K) for j in range(2)]
    other_seed = _by_response(SPOCollator(0, degrees=K, samples=2, seed=8), ROWS)
    assert other_seed != reference


def test_draws_are_uniform_and_sources_point_at_the_right_rows():
    collator = SPOCollator(0, degrees=K, samples=1, seed=0)
    degrees = torch.tensor([d for ds in _by_response(collator, ROWS).values() for d in ds])
    counts = torch.bincount(degrees, minlength=K) / len(degrees)
    assert ((counts > 0.18) & (counts < 0.32)).all(), counts  # 600 draws, 1/4 each
    batch = ROWS[:6]
    extras, source, degree = collator.draw(batch)
    n_extra = 0
    for s, d in zip(source.tolist(), degree.tolist()):
        if d == 0:
            assert s < 2 * len(batch)
        else:
            assert s == 2 * len(batch) + n_extra
            n_extra += 1
    assert sum(map(len, extras)) == n_extra


def test_each_epoch_draws_afresh_and_resume_is_exact():
    collator = SPOCollator(0, degrees=K, samples=1, seed=3)
    assert collator.epoch == 0
    epochs = []
    for epoch in range(3):
        collator.set_epoch(epoch)
        epochs.append(_by_response(collator, ROWS))
    for a, b in [(0, 1), (1, 2), (0, 2)]:
        same = sum(epochs[a][k] == epochs[b][k] for k in epochs[a]) / len(epochs[a])
        assert 0.15 < same < 0.35, same  # independent draws agree 1/K of the time
    # A run resumed mid-epoch 1 with a fresh collator draws what the uninterrupted run drew.
    resumed = SPOCollator(0, degrees=K, samples=1, seed=3)
    resumed.set_epoch(1)
    tail = _by_response(resumed, ROWS[120:])
    assert tail == {k: v for k, v in epochs[1].items() if k[0] >= 120}
    with pytest.raises(ValueError):
        collator.set_epoch(-1)
    with pytest.raises(ValueError):
        collator.set_epoch(1.5)


def test_evaluation_draws_leave_training_draws_alone():
    train = SPOCollator(0, degrees=K, samples=2, seed=1)
    train.set_epoch(2)
    before = _by_response(train, ROWS)
    evaluation = train.for_evaluation()
    assert evaluation.evaluation and not train.evaluation
    eval_draws = _by_response(evaluation, ROWS)
    assert _by_response(train, ROWS) == before  # evaluating in between changed nothing
    same = sum(eval_draws[k] == before[k] for k in before) / len(before)
    assert same < 0.2, same  # its own stream (two samples agree 1/16 of the time)
    evaluation.set_epoch(5)  # every evaluation scores the same samples
    assert _by_response(evaluation, ROWS) == eval_draws
    assert _by_response(SPOCollator(0, degrees=K, samples=2, seed=1, evaluation=True), ROWS) == eval_draws


def test_dataloader_workers_draw_what_the_main_process_draws():
    collator = SPOCollator(0, degrees=K, samples=1, seed=5)
    collator.set_epoch(1)
    rows = ROWS[:48]

    def loader(workers):
        dl = torch.utils.data.DataLoader(rows, batch_size=4, num_workers=workers, collate_fn=lambda b: collator.draw(b)[2])
        return torch.cat(list(dl)).tolist()

    main = loader(0)
    assert loader(2) == main
    assert main == [d for k, ds in _by_response(collator, rows, batch_size=4).items() for d in ds]
