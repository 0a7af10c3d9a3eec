"""Datasets over indexed files: Megatron's split, pretrain windows (with EOD-reset positions), SFT rows,
blending by weight, and the deterministic sampler (same batches on any dp size, exact resume)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from dataset_fixtures import EOD, write_pretrain, write_sft

from graphllm.data.datasets import PretrainDataset, open_data, split_ranges
from graphllm.data.feed import DatasetFeed
from graphllm.data.indexed import IndexedReader
from graphllm.data.packing import positions_from_starts, sft_row
from graphllm.data.samplers import GlobalSampler, blend_sources
from graphllm.errors import GraphllmError
from graphllm.parallel.engine import Engine
from graphllm.planning.layout import Layout

SEQ = 16


def test_split_is_megatrons_arithmetic() -> None:
    assert split_ranges("949,50,1", 1000) == [(0, 949), (949, 999), (999, 1000)]
    # round(0.5*3)=2, round(0.25*3)=1, round(0.25*3)=1 → ends 2, 3, 4; the excess 1 comes off each end
    assert split_ranges("2,1,1", 3) == [(0, 1), (1, 2), (2, 3)]
    assert split_ranges("98/2", 100) == [(0, 98), (98, 100), (100, 100)]
    for bad in ("a,b", "0,0,0", "1,2,3,4", "-1,2"):
        with pytest.raises(GraphllmError, match="--split"):
            split_ranges(bad, 10)


def test_pretrain_windows_and_eod_reset_positions(tmp_path) -> None:
    docs = write_pretrain(tmp_path / "p", docs=30, lo=3, hi=100)
    reader = IndexedReader(tmp_path / "p")
    ds = PretrainDataset(reader, (2, 25), SEQ, reset=True)
    stream = np.concatenate(docs[2:25])
    assert len(ds) == (len(stream) - 1) // SEQ
    starts = np.cumsum([0] + [len(d) for d in docs[2:25]])
    for i in (0, 1, len(ds) - 1):
        ids, labels, pos = ds.row(i)
        s = i * SEQ
        assert np.array_equal(ids, stream[s:s + SEQ]) and np.array_equal(labels, stream[s + 1:s + SEQ + 1])
        want = [0]  # independent: count up, restart after each EOD (a document boundary) inside the window
        for t in range(1, SEQ):
            want.append(0 if s + t in starts else want[-1] + 1)
        assert pos.tolist() == want
        assert all(ids[t - 1] == EOD for t in range(1, SEQ) if pos[t] == 0)
    plain = PretrainDataset(reader, (2, 25), SEQ, reset=False)
    assert plain.row(3)[2].tolist() == list(range(SEQ))
    assert positions_from_starts(np.array([0, 3, 3, 20]), 6).tolist() == [0, 1, 2, 0, 1, 2]


def test_sft_rows_shift_per_sample_and_pad(tmp_path) -> None:
    ids, labels, pos, cut = sft_row([np.array([5, 6, 7]), np.array([8, 9])], [np.array([-100, 6, 7]),
                                                                                np.array([-100, 9])], 8, pad_id=0)
    assert ids.tolist() == [5, 6, 7, 8, 9, 0, 0, 0]
    assert labels.tolist() == [6, 7, -100, 9, -100, -100, -100, -100]  # no label across the sample boundary
    assert pos.tolist() == [0, 1, 2, 0, 1, 0, 1, 2] and not cut
    assert sft_row([np.arange(10)], [np.arange(10)], 4)[3]  # truncated
    docs = write_sft(tmp_path / "s", [3, 2, 1, 4] * 5, vocab=50, seq_len=SEQ * 2, packed=True)
    splits = open_data([str(tmp_path / "s")], seq_len=SEQ * 2, split="1,0,0", vocab_size=50)
    assert splits.kind == "sft" and splits.packed and len(splits.train) == 20 and splits.valid is None
    r_ids, _, r_pos = splits.train.row(0)
    flat = np.concatenate([s[0] for s in docs[0]])
    assert np.array_equal(r_ids[:len(flat)], flat) and (r_pos == 0).sum() == 3 + 1  # 3 samples + padding


def test_blend_follows_weights_at_every_prefix() -> None:
    src, idx = blend_sources([0.7, 0.2, 0.1], 1000)
    counts = np.stack([np.cumsum(src == d) for d in range(3)], 1)  # [prefix, source]
    ideal = np.arange(1, 1001)[:, None] * np.array([0.7, 0.2, 0.1])
    assert np.abs(counts - ideal).max() < 1.0
    for d in range(3):
        assert np.array_equal(idx[src == d], np.arange((src == d).sum()))  # each source read in order
    assert np.array_equal(blend_sources([7, 2, 1], 1000)[0], src)  # weights are normalised


def test_blended_datasets_from_cli_values(tmp_path) -> None:
    write_pretrain(tmp_path / "a", docs=40, lo=3, hi=50, seed=1)
    write_pretrain(tmp_path / "b", docs=40, lo=50, hi=100, seed=2)
    splits = open_data(["0.75", str(tmp_path / "a"), "0.25", str(tmp_path / "b")], seq_len=SEQ, split="90,10,0",
                       vocab_size=128)
    rows = np.stack([splits.train.row(i)[0] for i in range(len(splits.train))])
    from_a = (rows[:, 0] < 50).mean()
    assert abs(from_a - 0.75) < 0.02 and splits.valid is not None and splits.test is None


def _engine_rows(global_rows: torch.Tensor, dp: int, rank: int) -> torch.Tensor:
    eng = Engine(layout=Layout(dp=dp), st=SimpleNamespace(coords=SimpleNamespace(dp=rank)), named_params={},
                 micro_batch_size=global_rows.shape[0] // dp)
    return eng.local_rows(global_rows)


def test_sampler_is_a_function_of_seed_and_position_on_any_dp() -> None:
    s = GlobalSampler(50, 8, seed=3)
    batches = [s.batch(k) for k in range(20)]  # 160 positions: 3 epochs and a bit
    for e in range(3):
        assert sorted(np.concatenate(batches)[e * 50:(e + 1) * 50].tolist()) == list(range(50))  # each epoch a permutation
    assert not np.array_equal(np.concatenate(batches)[:50], np.concatenate(batches)[50:100])  # reshuffled per epoch
    assert np.array_equal(GlobalSampler(50, 8, seed=3).batch(7), batches[7])
    assert not np.array_equal(GlobalSampler(50, 8, seed=4).batch(7), batches[7])
    resumed = GlobalSampler(50, 8, seed=3)
    consumed = resumed.check_state(s.state(5 * 8), "ckpt")
    assert all(np.array_equal(resumed.batch(k, consumed_at_start=consumed, start_step=5), batches[k])
               for k in range(5, 20))
    glob = torch.from_numpy(batches[4])
    for dp in (1, 2, 4):  # the dp ranks' slices put together are the global batch
        assert torch.equal(torch.cat([_engine_rows(glob, dp, r) for r in range(dp)]), glob)
    with pytest.raises(GraphllmError, match="same --data"):
        GlobalSampler(51, 8, seed=3).check_state(s.state(8), "ckpt")


def test_feed_resumes_exactly_and_validates(tmp_path) -> None:
    write_pretrain(tmp_path / "p", docs=60, lo=3, hi=100)
    splits = open_data([str(tmp_path / "p")], seq_len=SEQ, split="8,2,0", reset=True, vocab_size=128)
    feed = DatasetFeed(splits, global_batch_size=4, seed=0, with_positions=True)
    want = [feed.train_batch(k) for k in range(8)]
    again = DatasetFeed(splits, global_batch_size=4, seed=0, with_positions=True)
    again.resume(feed.state(3), 3, "ckpt")
    for k in range(3, 8):
        assert all(torch.equal(a, b) for a, b in zip(again.train_batch(k), want[k]))
    valid = feed.valid_batches(2)
    assert len(valid) == 2 and valid[0][0].shape == (4, SEQ) and len(valid[0]) == 3


def test_bad_data_is_one_clear_error(tmp_path) -> None:
    write_pretrain(tmp_path / "p", docs=10, lo=3, hi=300)
    with pytest.raises(GraphllmError, match="vocabulary has 100"):
        open_data([str(tmp_path / "p")], seq_len=SEQ, vocab_size=100)
    write_sft(tmp_path / "s", [2, 2], vocab=50, seq_len=64, packed=True)
    with pytest.raises(GraphllmError, match="packed for seq_len 64"):
        open_data([str(tmp_path / "s")], seq_len=SEQ)
    with pytest.raises(GraphllmError, match="mixes dataset kinds"):
        open_data(["1", str(tmp_path / "p"), "1", str(tmp_path / "s")], seq_len=64)
    with pytest.raises(GraphllmError, match="no .*idx"):
        open_data([str(tmp_path / "missing")], seq_len=SEQ)
    with pytest.raises(GraphllmError, match="weight/prefix pairs"):
        open_data(["0.5", str(tmp_path / "p"), "0.5"], seq_len=SEQ)
    (tmp_path / "d_meta.json").write_text(json.dumps({"kind": "pairwise", "packed": False, "seq_len": None}))
    with pytest.raises(GraphllmError, match="is pairwise data, which --task lm does not train on"):
        open_data([str(tmp_path / "d")], seq_len=SEQ)
    write_sft(tmp_path / "m", [1, 1], vocab=50, seq_len=None, packed=False)
    write_sft(tmp_path / "m2", [2], vocab=50, seq_len=None, packed=False)
    (tmp_path / "m_labels_document.bin").write_bytes((tmp_path / "m2_labels_document.bin").read_bytes())
    (tmp_path / "m_labels_document.idx").write_bytes((tmp_path / "m2_labels_document.idx").read_bytes())
    with pytest.raises(GraphllmError, match="differ in sequence lengths"):
        open_data([str(tmp_path / "m")], seq_len=SEQ)
