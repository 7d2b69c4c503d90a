"""Length-grouped training batches for variable-length examples: far less padding than random batches, every
example still read once per epoch, and the stream is a pure function of (seed, position), so a resumed run reads
exactly what the uninterrupted one would: the loop reads the stream only through take(position, count), and
resumes by position."""

from __future__ import annotations

import numpy as np
import pytest

from ftk.data.examples import Example, ExampleSource, collate
from ftk.data.sampler import BlockStream, LengthGroupedStream


def skewed_examples(n: int, seed: int = 0):
    """Lengths like real instruction/classification data: log-normal, mostly short, a long tail."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(3.3, 0.9, n).astype(int), 3, 256)
    return [Example(input_ids=list(range(1, int(k) + 1)), label=int(i % 2)) for i, k in enumerate(lengths)]


def pad_tokens_per_epoch(source: ExampleSource, stream, micro: int, epochs: int = 2):
    """Pad and real tokens of the micro-batches the loop would build, read from collate's attention masks."""
    pad = real = 0
    for start in range(0, epochs * source.n_train - micro + 1, micro):
        mask = source.train_batch(stream.take(start, micro))["attention_mask"]
        real += int(mask.sum())
        pad += int(mask.numel() - mask.sum())
    return pad / epochs, real / epochs


def test_grouping_cuts_padding_compute():
    examples = skewed_examples(1000)
    source = ExampleSource(examples, [], pad_id=0)
    micro = 16
    grouped = source.stream(seed=3, batch_size=micro)
    assert isinstance(grouped, LengthGroupedStream)
    pad_g, real_g = pad_tokens_per_epoch(source, grouped, micro)
    pad_r, real_r = pad_tokens_per_epoch(source, BlockStream(source.n_train, 3), micro)
    assert real_g == pytest.approx(real_r, rel=0.02)  # the same examples are read, only grouped differently
    share_g, share_r = pad_g / (pad_g + real_g), pad_r / (pad_r + real_r)
    # Random batches of this mix are mostly padding (about 70%); grouped ones (sorted up to a +-15% length
    # jitter, see LengthGroupedStream) carry under a quarter, and a fraction of the pad tokens.
    assert share_r > 0.5 and share_g < 0.25, (share_g, share_r)
    assert pad_g < pad_r / 4


@pytest.mark.parametrize("n,group", [(1000, 16), (997, 8), (30, 8), (5, 8), (64, 1)])
def test_every_epoch_reads_each_example_once_and_groups_stay_aligned(n, group):
    lengths = np.random.default_rng(1).integers(1, 200, n)
    stream = LengthGroupedStream(lengths, seed=0, group=group)
    for epoch in range(4):
        assert sorted(stream.take(epoch * n, n).tolist()) == list(range(n))
    if n >= 4 * group * 2:
        # Aligned groups (as the loop reads them) are far narrower in length than the whole spread, in every
        # epoch, also when n is not a multiple of the group (the epoch boundary falls mid-group).
        spreads = [np.ptp(lengths[stream.take(s, group)]) for s in range(0, 4 * n - group, group)]
        assert np.median(spreads) < 0.2 * np.ptp(lengths)


def test_stream_is_a_pure_function_of_seed_and_position():
    lengths = np.random.default_rng(2).integers(1, 300, 503)
    a = LengthGroupedStream(lengths, seed=7, group=8)
    read_in_order = np.concatenate([a.take(s, 8) for s in range(0, 3 * 503, 8)])
    # A fresh stream (a resumed process) asked for any position gives what the running one gave there.
    for start in (0, 8, 496, 504, 1000, 1496):
        assert (LengthGroupedStream(lengths, seed=7, group=8).take(start, 8) == read_in_order[start:start + 8]).all()
    assert not (LengthGroupedStream(lengths, seed=8, group=8).take(0, 503) == a.take(0, 503)).all()
    # Epochs differ from each other (reshuffled, not the same grouping repeated).
    assert not (a.take(0, 503) == a.take(503, 503)).all()


def test_longest_group_comes_first():
    lengths = np.random.default_rng(3).integers(1, 1000, 800)
    stream = LengthGroupedStream(lengths, seed=0, group=8)
    assert lengths[stream.take(0, 8)].max() == lengths.max()


def test_off_switch_and_single_example_batches_keep_the_uniform_order():
    examples = skewed_examples(50)
    assert isinstance(ExampleSource(examples, [], 0, group_by_length=False).stream(0, 8), BlockStream)
    # One example per micro-batch has no padding to save: the uniform stream, unchanged.
    assert isinstance(ExampleSource(skewed_examples(500), [], 0).stream(0, 1), BlockStream)
    # Fewer than 50 micro-batches of examples: random batches (grouping would sort the whole epoch).
    assert isinstance(ExampleSource(examples, [], 0).stream(0, 8), BlockStream)
    assert isinstance(ExampleSource(skewed_examples(399), [], 0).stream(0, 8), BlockStream)
    assert isinstance(ExampleSource(skewed_examples(400), [], 0).stream(0, 8), LengthGroupedStream)


def test_collate_of_a_grouped_batch_is_the_same_examples():
    examples = skewed_examples(600)
    source = ExampleSource(examples, [], pad_id=0)
    idx = source.stream(0, 8).take(0, 8)
    batch = source.train_batch(idx)
    assert batch["input_ids"].shape == collate([examples[i] for i in idx], 0)["input_ids"].shape
    assert batch["labels"].tolist() == [examples[i].label for i in idx]


def test_micro_batches_sliced_from_a_global_group_stay_short_of_padding():
    # The loop groups by its global batch (16 here) and each of 2 processes x 2 accumulation steps reads a
    # micro-batch of 4 consecutive positions: those slices are as tightly grouped as the group they come from.
    examples = skewed_examples(2000)
    source = ExampleSource(examples, [], pad_id=0)
    grouped = source.stream(seed=5, batch_size=16)
    pad_g, real_g = pad_tokens_per_epoch(source, grouped, 4)
    pad_r, real_r = pad_tokens_per_epoch(source, BlockStream(source.n_train, 5), 4)
    assert pad_g / (pad_g + real_g) < 0.2 and pad_g < pad_r / 3
