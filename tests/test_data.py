"""Trajectory data: building (ranking, merging, determinism, malformed rows, errors) and the grain loader
(batch format, truncation counts, y(t) draws, sharding, resume). A tiny word-level tokenizer with a
ChatML-style template is built in-process; one test (marked slow) uses the embedded SmolLM2's tokenizer."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from diffpo_jax.chat import end_of_turn_id, prompt_ids, response_ids
from diffpo_jax.data.__main__ import main
from diffpo_jax.data.loader import BATCH_KEYS, make_loader, worse_choice
from diffpo_jax.data.trajectories import (
    DATA_FILE,
    TrajectoryDataError,
    build,
    record_id,
)
from tests import files

EXAMPLE = Path(__file__).parents[1] / "examples" / "trajectories.jsonl"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_jsonl(path: Path, rows) -> str:
    return str(files.write_jsonl(path, rows))  # build and the CLI take strings


def row(prompt, responses, scores):
    return {"prompt": prompt, "all_generated_responses": responses, "all_rm_scores": scores}


def read_records(out: Path) -> list[dict]:
    from grain.sources import ArrayRecordDataSource

    source = ArrayRecordDataSource([str(out / DATA_FILE)])
    return [json.loads(source[i]) for i in range(len(source))]


@pytest.fixture(scope="module")
def tok():
    """Word-level tokenizer over the example texts; eos (</s>) differs from the end-of-turn token (<|im_end|>)."""
    texts = [line for line in EXAMPLE.read_text().splitlines()] + ["user assistant system"]
    model = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "[UNK]", "</s>", "<|im_start|>", "<|im_end|>"]
    model.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials))
    return PreTrainedTokenizerFast(
        tokenizer_object=model, unk_token="[UNK]", pad_token="<pad>", eos_token="</s>", chat_template=CHATML
    )


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("example") / "data"
    manifest = build([str(EXAMPLE)], out)
    assert manifest["kept"] == 40 and manifest["dropped_rows"]["total"] == manifest["dropped_prompts"]["total"] == 0
    return out


# ------------------------------------------------------------------------------------------------ build


def test_ranking_ties_and_duplicates(tmp_path):
    src = write_jsonl(
        tmp_path / "a.jsonl",
        [
            row("p1", ["mid", "low", "high", "also low"], [0.5, 0.1, 0.9, 0.1]),
            row("p2", ["b", "a", "c"], [2, 2, 1]),  # tie for best: broken by text, "b" > "a"
            row("p3", ["x", "y", "x"], [0.1, 0.3, 0.5]),  # "x" twice: one response, highest score 0.5
            row([{"role": "user", "content": "p4"}], ["u", "v"], [1.0, 0.0]),
        ],
    )
    manifest = build([src], tmp_path / "out")
    records = read_records(tmp_path / "out")
    by_prompt = {json.dumps(r["prompt"], sort_keys=True): r for r in records}
    assert by_prompt['"p1"'] == {
        "id": record_id("p1"),
        "prompt": "p1",
        "best": "high",
        "others": ["also low", "low", "mid"],
    }
    assert (by_prompt['"p2"']["best"], by_prompt['"p2"']["others"]) == ("b", ["c", "a"])
    assert (by_prompt['"p3"']["best"], by_prompt['"p3"']["others"]) == ("x", ["y"])
    messages = [{"role": "user", "content": "p4"}]
    assert by_prompt[json.dumps(messages, sort_keys=True)] == {
        "id": record_id(messages),
        "prompt": messages,
        "best": "u",
        "others": ["v"],
    }
    assert [r["id"] for r in records] == sorted(r["id"] for r in records)
    assert (manifest["kept"], manifest["merged_duplicate_responses"], manifest["best_score_ties"]) == (4, 1, 1)
    assert manifest["responses_per_prompt"] == {"min": 2, "max": 4, "total": 11}


def test_parquet_merge_and_determinism(tmp_path):
    jsonl = write_jsonl(
        tmp_path / "a.jsonl", [row("shared", ["a1", "a2"], [0.2, 0.4]), row("only a", ["q", "r"], [1, 2])]
    )
    rows_b = [row("shared", ["b1", "a2"], [0.9, 0.1]), row("only b", ["s", "t"], [3.0, 1.0])]
    pq.write_table(pa.Table.from_pylist(rows_b), tmp_path / "b.parquet")
    parquet = str(tmp_path / "b.parquet")
    manifest = build([jsonl, parquet], tmp_path / "ab")
    records = {r["prompt"]: r for r in read_records(tmp_path / "ab")}
    assert records["shared"]["best"] == "b1" and records["shared"]["others"] == ["a1", "a2"]  # a2 keeps 0.4
    assert (records["only a"]["best"], records["only b"]["best"]) == ("r", "s")
    assert [s["kind"] for s in manifest["sources"]] == ["jsonl", "parquet"] and manifest["kept"] == 3
    build([jsonl, parquet], tmp_path / "ab2")
    build([parquet, jsonl], tmp_path / "ba")
    data = (tmp_path / "ab" / DATA_FILE).read_bytes()
    assert data == (tmp_path / "ab2" / DATA_FILE).read_bytes() == (tmp_path / "ba" / DATA_FILE).read_bytes()
    assert (tmp_path / "ab" / "manifest.json").read_bytes() == (tmp_path / "ab2" / "manifest.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.jsonl",
        "ab",
        "ab2",
        "b.parquet",
        "ba",
    ]  # no temp dirs left


def test_malformed_rows_counted_with_ids(tmp_path):
    rows = [
        row("good", ["a", "b"], [1, 2]),  # 1
        "[1, 2]",  # 2 not_an_object
        {"prompt": "p", "all_rm_scores": [1, 2]},  # 3 missing_field
        row(7, ["a", "b"], [1, 2]),  # 4 bad_prompt
        row("   ", ["a", "b"], [1, 2]),  # 5 empty_prompt
        row("p", "a b", [1, 2]),  # 6 bad_responses
        row("p", ["a", "b"], 3),  # 7 bad_scores
        row("p", ["a", "b"], [1, "high"]),  # 8 non_numeric_score
        row("p", ["a", "b"], [1, True]),  # 9 non_numeric_score (bool)
        row("p", ["a", "b", "c"], [1, 2]),  # 10 length_mismatch
        row("one", ["a"], [1]),  # 11 fewer_than_2_responses
        row("same", ["a", "a"], [1, 2]),  # 12 fewer_than_2_distinct_responses
        row("good 2", ["a", "b"], [2, 1]),  # 13
    ]
    src = write_jsonl(tmp_path / "bad.jsonl", rows)
    manifest = build([src], tmp_path / "out")
    expect_rows = {
        "not_an_object": [2],
        "missing_field": [3],
        "bad_prompt": [4],
        "empty_prompt": [5],
        "bad_responses": [6],
        "bad_scores": [7],
        "non_numeric_score": [8, 9],
        "length_mismatch": [10],
    }
    assert manifest["dropped_rows"] == {
        "total": 9,
        "reasons": {k: {"count": len(v), "first_ids": [f"{src}:{n}" for n in v]} for k, v in expect_rows.items()},
    }
    assert manifest["dropped_prompts"] == {
        "total": 2,
        "reasons": {
            "fewer_than_2_responses": {"count": 1, "first_ids": [f"{src}:11"]},
            "fewer_than_2_distinct_responses": {"count": 1, "first_ids": [f"{src}:12"]},
        },
    }
    assert manifest["kept"] == 2
    assert manifest["sources"] == [{"source": src, "kind": "jsonl", "rows": 13, "malformed_rows": 9}]


def test_nan_score_is_non_numeric(tmp_path):
    src = tmp_path / "nan.jsonl"
    src.write_text(
        '{"prompt": "p", "all_generated_responses": ["a", "b"], "all_rm_scores": [1, NaN]}\n'
        + json.dumps(row("q", ["a", "b"], [1, 2]))
        + "\n"
    )
    reasons = build([str(src)], tmp_path / "out")["dropped_rows"]["reasons"]
    assert reasons["non_numeric_score"] == {"count": 1, "first_ids": [f"{src}:1"]}


def test_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [row("p", ["a"], [1, 2]), {"prompt": "q"}])
    fields = write_jsonl(tmp_path / "f.jsonl", [{"question": "p", "answers": ["a", "b"], "scores": [1, 2]}])
    dropped = write_jsonl(tmp_path / "one.jsonl", [row("p", ["a"], [1]), row("q", ["a", "a"], [1, 1])])
    broken = write_jsonl(
        tmp_path / "broken.jsonl", [row("p", ["a", "b"], [1, 2]), row("q", ["a", "b"], [1, 2]), '{"p": 1,']
    )
    cases = {
        bad: f"{bad}: no usable rows (2 read, 2 malformed: 1 missing_field (first: {bad}:2),"
        f" 1 length_mismatch (first: {bad}:1))",
        fields: f"{fields}: no usable rows (1 read, 1 malformed: 1 missing_field (first: {fields}:1))",
        dropped: f"{dropped}: nothing usable (2 prompts, all dropped: 1 fewer_than_2_responses (first: {dropped}:1),"
        f" 1 fewer_than_2_distinct_responses (first: {dropped}:2); malformed rows: none)",
        broken: f"{broken}:3: not valid JSON (Expecting property name enclosed in double quotes, column 9)",
        str(tmp_path / "missing.jsonl"): f"{tmp_path / 'missing.jsonl'}: no such file",
        str(
            tmp_path / "notes.txt"
        ): f"{tmp_path}/notes.txt: unsupported file type (expected .jsonl, .json or .parquet)",
    }
    (tmp_path / "notes.txt").write_text("{}")
    (tmp_path / "pq.parquet").write_text("not parquet")
    for src, message in cases.items():
        with pytest.raises(TrajectoryDataError) as e:
            build([src], tmp_path / "out")
        assert str(e.value) == message
        assert main(["build", "--source", src, "--out", str(tmp_path / "out")]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
    with pytest.raises(TrajectoryDataError, match=r"pq.parquet: not a readable parquet file \(ArrowInvalid"):
        build([str(tmp_path / "pq.parquet")], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    good = write_jsonl(tmp_path / "good.jsonl", [row("p", ["a", "b"], [1, 2])])
    assert main(["build", "--source", good, "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'out'}: 1 prompts, 2 responses")
    with pytest.raises(TrajectoryDataError, match="already exists"):
        build([good], tmp_path / "out")
    build([good, dropped], tmp_path / "out", overwrite=True)
    assert len(read_records(tmp_path / "out")) == 1 and not list(tmp_path.glob(".out*"))


# ----------------------------------------------------------------------------------------------- loader


def expected_row(tok, record, worse, P, N):
    """The contract's row, computed without the loader: left-padded prompt, right-padded responses + <|im_end|>."""
    pad, eot = tok.pad_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    p = prompt_ids(tok, record["prompt"])[-P:]
    out = {"prompt": [pad] * (P - len(p)) + p, "prompt_mask": [False] * (P - len(p)) + [True] * len(p)}
    for key, text in (("best", record["best"]), ("worse", worse)):
        r = (response_ids(tok, text) + [eot])[:N]
        out[key], out[f"{key}_mask"] = r + [pad] * (N - len(r)), [True] * len(r) + [False] * (N - len(r))
    return out


def test_batches_follow_the_contract(tok, example_dir):
    records = read_records(example_dir)
    P, N = 14, 24
    loader = make_loader(
        example_dir,
        tok,
        global_batch_size=6,
        prompt_len=P,
        response_len=N,
        seed=3,
        num_epochs=2,
        shard_index=0,
        shard_count=1,
    )
    assert (loader.num_records, loader.steps_per_epoch, loader.skipped_per_epoch, loader.num_batches) == (40, 6, 4, 12)
    batches = list(loader)
    assert len(batches) == 12
    truncated = {"prompt_truncated": 0, "best_truncated": 0, "worse_truncated": 0}
    for step, batch in enumerate(batches):
        assert sorted(batch) == sorted(BATCH_KEYS)
        for key, width in (("prompt", P), ("best", N), ("worse", N)):
            assert batch[key].dtype == np.int32 and batch[f"{key}_mask"].dtype == np.bool_
            assert batch[key].shape == batch[f"{key}_mask"].shape == (6, width)
        epoch = step // 6
        for i in range(6):
            index = loader.record_index(epoch, (step % 6) * 6 + i)
            record = records[index]
            worse = record["others"][worse_choice(3, epoch, index, len(record["others"]))]
            expect = expected_row(tok, record, worse, P, N)
            for key in BATCH_KEYS:
                assert batch[key][i].tolist() == expect[key], (step, i, key)
            truncated["prompt_truncated"] += len(prompt_ids(tok, record["prompt"])) > P
            truncated["best_truncated"] += len(response_ids(tok, record["best"])) + 1 > N
            truncated["worse_truncated"] += len(response_ids(tok, worse)) + 1 > N
    assert loader.stats == {"rows": 72, **truncated}
    assert all(0 < n < 72 for n in truncated.values())  # rows both cut and padded, in every field
    assert end_of_turn_id(tok) != tok.eos_token_id  # the end-of-turn token comes from the template, not eos
    with pytest.raises(StopIteration):
        next(loader)


def test_a_tokenizer_without_pad_pads_with_end_of_turn_in_training_and_decoding(tok, example_dir):
    """Training's pad tail is what the decoder pads with (chat.pad_id): without a pad token, the
    end-of-turn token, not eos (the loader once used eos, so a model trained there saw another tail)."""
    import copy

    from diffpo_jax.chat import pad_id

    no_pad = copy.deepcopy(tok)
    no_pad.pad_token = None
    eot = end_of_turn_id(no_pad)
    assert no_pad.pad_token_id is None and eot != no_pad.eos_token_id
    batch = next(make_loader(example_dir, no_pad, global_batch_size=8, prompt_len=72, response_len=72, seed=0))
    assert pad_id(no_pad, eot) == eot
    assert set(batch["best"][~batch["best_mask"]].tolist()) == {eot}  # after each response's own end-of-turn
    assert set(batch["prompt"][~batch["prompt_mask"]].tolist()) == {eot}


def test_worse_draws_are_seeded_and_cover_all_others(tok, example_dir):
    assert worse_choice(0, 1, 2, 4) == worse_choice(0, 1, 2, 4)
    assert {worse_choice(0, epoch, 7, 4) for epoch in range(40)} == {0, 1, 2, 3}
    assert [worse_choice(0, e, 7, 4) for e in range(20)] != [worse_choice(1, e, 7, 4) for e in range(20)]
    records = read_records(example_dir)
    loader = make_loader(
        example_dir,
        tok,
        global_batch_size=40,
        prompt_len=64,
        response_len=64,
        num_epochs=12,
        shard_index=0,
        shard_count=1,
    )
    others = [[expected_row(tok, r, o, 64, 64)["worse"] for o in r["others"]] for r in records]
    seen: dict[int, set] = {}
    for epoch, batch in enumerate(loader):
        for i in range(40):
            index = loader.record_index(epoch, i)
            drawn = others[index].index(batch["worse"][i].tolist())
            assert drawn == worse_choice(0, epoch, index, len(others[index]))
            seen.setdefault(index, set()).add(drawn)
    assert len(seen) == 40 and all(seen[i] == set(range(len(records[i]["others"]))) for i in seen)


def test_shards_are_disjoint_and_in_step(tok, example_dir):
    # 40 records, global batches of 6 (3 rows per process on 2): 6 steps, 36 records an epoch, 4 skipped.
    kwargs = dict(global_batch_size=6, prompt_len=8, response_len=8, num_epochs=3)
    loaders = [make_loader(example_dir, tok, **kwargs, shard_index=k, shard_count=2) for k in range(2)]
    assert [(lo.num_records, lo.steps_per_epoch, lo.skipped_per_epoch) for lo in loaders] == [(40, 6, 4)] * 2
    per_epoch = [[{lo.record_index(e, r) for r in range(18)} for e in range(3)] for lo in loaders]
    for e in range(3):
        assert len(per_epoch[0][e]) == len(per_epoch[1][e]) == 18 and not per_epoch[0][e] & per_epoch[1][e]
    assert len({frozenset(per_epoch[0][e] | per_epoch[1][e]) for e in range(3)}) > 1  # skipped subsets vary
    # The global batch does not depend on the process count: one process serves both halves, in order.
    single = make_loader(example_dir, tok, **kwargs, shard_index=0, shard_count=1)
    halves = [list(lo) for lo in loaders]
    whole = list(single)
    assert [len(h) for h in halves] == [18, 18] and len(whole) == 18
    for step, batch in enumerate(whole):
        for k in BATCH_KEYS:
            assert np.array_equal(batch[k], np.concatenate([halves[0][step][k], halves[1][step][k]]))
    with pytest.raises(ValueError, match="not a positive multiple of 2 shards"):
        make_loader(example_dir, tok, global_batch_size=5, prompt_len=8, shard_index=0, shard_count=2)


def test_state_round_trip_continues_the_stream(tok, example_dir):
    kwargs = dict(global_batch_size=8, prompt_len=16, response_len=12, seed=5, num_epochs=3)
    reference = make_loader(example_dir, tok, **kwargs, shard_index=1, shard_count=2)
    stream = list(reference)
    assert len(stream) == 15  # 40 records, global batches of 8: 5 steps an epoch
    first = make_loader(example_dir, tok, **kwargs, shard_index=1, shard_count=2)
    head = [next(first) for _ in range(7)]
    state = json.loads(json.dumps(first.get_state()))
    resumed = make_loader(example_dir, tok, **kwargs, shard_index=1, shard_count=2)
    resumed.set_state(state)
    tail = list(resumed)
    assert len(head) + len(tail) == len(stream)
    for got, want in zip(head + tail, stream):
        assert all(np.array_equal(got[k], want[k]) for k in BATCH_KEYS)
    assert resumed.stats == reference.stats
    # The state of a 2-process run resumes in a 1-process run at the same global batch.
    alone = make_loader(example_dir, tok, **kwargs, shard_index=0, shard_count=1)
    alone.set_state(state)
    assert np.array_equal(next(alone)["best"][4:], stream[7]["best"])
    with pytest.raises(ValueError, match="loader state is for"):
        make_loader(example_dir, tok, **{**kwargs, "seed": 6}).set_state(state)


@pytest.mark.slow
def test_smollm2_tokenizer(smollm2, example_dir):
    tok = smollm2.tokenizer  # the session's SmolLM2 (the suite loads it anyway)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tok) == eot
    loader = make_loader(
        example_dir, tok, global_batch_size=4, prompt_len=96, response_len=48, shard_index=0, shard_count=1
    )
    batch = next(loader)
    record = read_records(example_dir)[loader.record_index(0, 0)]
    worse = record["others"][worse_choice(0, 0, loader.record_index(0, 0), len(record["others"]))]
    expect = expected_row(tok, record, worse, 96, 48)
    assert all(batch[k][0].tolist() == expect[k] for k in BATCH_KEYS)
    assert batch["best"][0][batch["best_mask"][0].sum() - 1] == eot


def test_hub_source_split_and_ids(tmp_path, monkeypatch):
    import datasets

    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return [row("p", ["a", "b"], [1, 2]), row("q", ["a"], [1])]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    manifest = build(["org/scored:test_prefs", "org/scored"], tmp_path / "out")
    assert calls == [("org/scored", "test_prefs"), ("org/scored", "train")]
    assert [s["kind"] for s in manifest["sources"]] == ["hub", "hub"]
    # q: one response in each source, the same text: 2 responses, 1 distinct; its id is its first row
    dropped = manifest["dropped_prompts"]["reasons"]["fewer_than_2_distinct_responses"]
    assert dropped == {"count": 1, "first_ids": ["org/scored:test_prefs:1"]}
    assert manifest["kept"] == 1 and manifest["merged_duplicate_responses"] == 3
