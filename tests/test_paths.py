"""URL paths (gs://...) reach Orbax and the project's writers unchanged, and a run over them equals a local
run. A local directory stands in for the bucket: every etils.epath operation on gs:// is redirected
there (etils' own mock_epath), and Orbax, which would reach GCS through TensorStore, is wrapped to
record the path it is given before working on the same local directory. No network."""

import json
import os
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils.epath import testing as epath_testing

from diffpo_jax.data.trajectories import build
from diffpo_jax.paths import as_path
from diffpo_jax.sources import load_model
from diffpo_jax.training import metrics
from diffpo_jax.training.config import load_config
from diffpo_jax.training.metrics import MetricsLog
from diffpo_jax.training.trainer import train
from diffpo_jax.weights.export import export_checkpoint
from tests.files import write_jsonl
from tests.tiny_run import write_config

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "gs://bucket"
CHANGES = dict(
    num_epochs=2,
    save_every=2,
    max_steps=4,
    keep_checkpoints=2,
    async_checkpoints=False,
    loss={"con_weight": 1.0, "con_positions": "draft", "chunk": 4},
    optimizer={"learning_rate": 3e-3, "warmup_ratio": 0.0},
    eval={"holdout_prompts": 2, "every": 2, "max_rows": 4, "batch_size": 4, "block_size": 4},
)


def test_as_path_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(as_path("gs://bucket/run") / "checkpoints") == "gs://bucket/run/checkpoints"
    assert os.fspath(as_path("s3://b/x")) == "s3://b/x"
    assert os.fspath(as_path("run")) == str(tmp_path / "run")
    assert os.fspath(as_path("~/run")) == os.path.expanduser("~/run")


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """(local dir standing in for gs://bucket, the paths Orbax was given). Also: a fresh cache dir and
    cwd, so a URL turned into a local path (./gs:/bucket/...) would show."""
    store = tmp_path / "store"
    (store / "bucket").mkdir(parents=True)
    given = []

    def local(p):
        s = os.fspath(p)
        return str(store / s[len("gs://") :]) if s.startswith("gs://") else p

    def redirect(fn, path, *args, **kwargs):
        return fn(local(path), *(local(a) if isinstance(a, (str, os.PathLike)) else a for a in args), **kwargs)

    class Manager(ocp.CheckpointManager):
        def __init__(self, directory, *args, **kwargs):
            given.append(os.fspath(directory))
            super().__init__(local(directory), *args, **kwargs)

    class Checkpointer(ocp.StandardCheckpointer):
        def save(self, directory, *args, **kwargs):
            given.append(os.fspath(directory))
            return super().save(local(directory), *args, **kwargs)

        def restore(self, directory, *args, **kwargs):
            given.append(os.fspath(directory))
            return super().restore(local(directory), *args, **kwargs)

    steps = ocp.utils.checkpoint_steps
    monkeypatch.setattr(ocp, "CheckpointManager", Manager)
    monkeypatch.setattr(ocp, "StandardCheckpointer", Checkpointer)
    monkeypatch.setattr(ocp.utils, "checkpoint_steps", lambda d, *a, **k: steps(local(d), *a, **k))
    monkeypatch.setenv("DIFFPO_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    names = [
        "open",
        "copy",
        "rename",
        "exists",
        "glob",
        "walk",
        "isdir",
        "listdir",
        "makedirs",
        "mkdir",
        "remove",
        "replace",
        "rmtree",
        "stat",
    ]
    with epath_testing.mock_epath(**{name: redirect for name in names}):
        yield store / "bucket", given
    assert not list((tmp_path / "cwd").rglob("*")), "a URL became a local path"


def test_metrics_in_a_bucket_are_written_in_parts_at_most_every_interval(tmp_path, monkeypatch):
    """metrics.jsonl in a bucket (issue 29) is not rewritten whole at each line (O(steps^2) bytes, and
    more than GCS's one write per second per object) but into parts, each written at most once per flush
    interval: O(steps / interval) writes, O(steps) bytes; a reopening merges what a killed run left, and
    after close() the object holds every line. A local dir counts what goes into the fake bucket; a
    fake clock advances 1 s per step."""
    monkeypatch.setattr(metrics, "PART_LINES", 100)
    store = tmp_path / "store"
    (store / "bucket" / "run").mkdir(parents=True)
    now, writes = [0.0], []  # (object, time, characters)

    def local(p):
        s = os.fspath(p)
        return str(store / s[len("gs://") :]) if s.startswith("gs://") else p

    def redirect(fn, path, *args, **kwargs):
        return fn(local(path), *args, **kwargs)

    class Counted:
        def __init__(self, f, name):
            self.f, self.name = f, name

        def write(self, data):
            writes.append((self.name, now[0], len(data)))
            return self.f.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def open_(fn, path, mode="r"):
        f = fn(local(path), mode)
        return Counted(f, os.fspath(path).rsplit("/", 1)[1]) if mode[0] in "wa" else f

    def glob(fn, pattern):  # the bucket's names, not the local dir's
        return [BUCKET + p[len(str(store / "bucket")) :] for p in fn(local(pattern))]

    def line(step, loss=1.0):
        return json.dumps({"step": step, "loss": loss, "note": "x" * 40})

    run_dir, obj = as_path(f"{BUCKET}/run"), store / "bucket" / "run"
    # a run killed at step 7 after a checkpoint at step 5: its newest lines were in a part
    (obj / "metrics.jsonl").write_text("".join(line(i, 0.0) + "\n" for i in range(1, 6)))
    (obj / "metrics.jsonl.part-000000004").write_text("".join(line(i) + "\n" for i in range(4, 8)))
    with epath_testing.mock_epath(open=open_, glob=glob, **{n: redirect for n in ("exists", "remove", "stat")}):
        log = MetricsLog(run_dir, start_step=5, tensorboard=False, flush_every_s=30, clock=lambda: now[0])
        assert (obj / "metrics.jsonl").read_text().splitlines() == [
            line(1, 0.0),
            line(2, 0.0),
            line(3, 0.0),
            line(4),
            line(5),
        ]  # a part's line wins
        assert sorted(p.name for p in obj.iterdir()) == ["metrics.jsonl"]
        del writes[:]
        n = 2000
        for step in range(6, 6 + n):
            now[0] += 1.0
            log.write(json.loads(line(step)))
        parts = sorted(p.name for p in obj.iterdir() if p.name != "metrics.jsonl")
        assert n / 130 < len(parts) <= n / 100 and parts[0] == "metrics.jsonl.part-000000006"  # ~100 lines each
        log.flush()  # what the trainer does at a checkpoint: every line in the bucket now
        in_bucket = [x for p in ["metrics.jsonl", *parts] for x in (obj / p).read_text().splitlines()]
        assert in_bucket == [line(1, 0.0), line(2, 0.0), line(3, 0.0)] + [line(i) for i in range(4, 6 + n)]
        log.close()
        log.close()
    assert sorted(p.name for p in obj.iterdir()) == ["metrics.jsonl"]
    lines = (obj / "metrics.jsonl").read_text()
    assert lines.splitlines() == in_bucket
    size = len(lines)
    assert len(writes) <= n / 30 + 2  # one per 30 s, flush(), close(): not one per line
    for name in {w[0] for w in writes}:
        times = [t for w, t, _ in writes if w == name]
        assert all(b - a >= 30 for a, b in zip(times, times[1:-1])), name  # the last: flush() or close()
    # each part is written ~100 / 30 times, then metrics.jsonl once: a fixed multiple of the file, where
    # rewriting it whole every 30 s would upload n / 60 ~ 33 times it
    assert sum(w[2] for w in writes) < 6 * size


def test_tensorboard_is_off_for_a_url_run_dir(bucket, tmp_path):
    """An event file in a bucket would be uploaded whole at each flush (O(steps^2) bytes): a URL run dir
    gets no TensorBoard, and a note says so (the trainer prints it); a local run dir keeps it."""
    store, _ = bucket
    (store / "run").mkdir()  # the trainer makes the run dir first
    log = MetricsLog(as_path(f"{BUCKET}/run"), start_step=0, tensorboard=True)
    log.write({"step": 1, "loss": 1.0})
    log.close()
    assert log.note == (
        "tensorboard: off for a URL run dir (gs://bucket/run: its event files would be uploaded whole at each "
        "flush); metrics.jsonl holds the same scalars"
    )
    assert sorted(p.name for p in (store / "run").iterdir()) == ["metrics.jsonl"]
    (tmp_path / "local").mkdir()
    local = MetricsLog(tmp_path / "local", start_step=0, tensorboard=True)
    local.write({"step": 1, "loss": 1.0})
    local.close()
    assert local.note is None and list((tmp_path / "local" / "tensorboard").glob("events.out.tfevents.*"))


def test_decoding_clis_read_and_write_urls_as_local_files(bucket, tiny_init_dir, tmp_path):
    """generate, refine and score with --input/--output/--report in a bucket (issue 29: argparse's Path made
    `gs://b/x` a local ./gs:/b/x): each writes there, nothing under the cwd (the fixture checks), the same
    bytes as in a local folder, and no partial or shared-check file is left."""
    from diffpo_jax import generate, refine, score
    from diffpo_jax.sources import load_model

    store, _ = bucket
    loaded = load_model(str(tiny_init_dir))
    rewards = tmp_path / "rewards.py"
    rewards.write_text("def length(prompts, completions):\n    return [float(len(c)) for c in completions]\n")
    prompts = "".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(["Hi.", "Name a fruit.", "Why?"]))
    (tmp_path / "local").mkdir()
    for folder in (store, tmp_path / "local"):
        (folder / "in.jsonl").write_text(prompts)
    for base in (BUCKET, str(tmp_path / "local")):
        generate.run(
            generate.parse_args(
                [
                    "--input",
                    f"{base}/in.jsonl",
                    "--output",
                    f"{base}/drafts.jsonl",
                    "--temperature",
                    "0",
                    "--max-new-tokens",
                    "4",
                    "--sort-window",
                    "2",
                ]
            ),
            loaded,
        )
        refine.run(
            refine.parse_args(
                [
                    "--input",
                    f"{base}/drafts.jsonl",
                    "--output",
                    f"{base}/refined.jsonl",
                    "--max-new-tokens",
                    "4",
                    "--block-size",
                    "4",
                ]
            ),
            loaded,
        )
        assert (
            score.main(
                [
                    "--reward",
                    f"{rewards}:length",
                    "--input",
                    f"{base}/refined.jsonl",
                    "--output",
                    f"{base}/scored.jsonl",
                    "--report",
                    f"{base}/report.md",
                ]
            )
            == 0
        )
    outputs = ["drafts.jsonl", "refined.jsonl", "scored.jsonl"]  # each with the .done of its run
    names = sorted(["in.jsonl", "report.md", *outputs, *(name + ".done" for name in outputs)])
    assert sorted(p.name for p in store.iterdir()) == sorted(p.name for p in (tmp_path / "local").iterdir()) == names
    for name in outputs:
        assert (store / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    assert [json.loads(x)["id"] for x in (store / "scored.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert not list(Path.cwd().iterdir())  # no ./gs: folder


def test_resumable_output_in_a_bucket_grows_by_parts(bucket, tmp_path):
    """An object cannot be appended to: in a bucket the partial file grows by part objects, one per
    flush_every_s at most; a rerun reads and merges them, and OUT is the bytes a local folder gets."""
    from diffpo_jax.records.formats import read_records
    from diffpo_jax.records.output import ResumableOutput

    store, _ = bucket
    write_jsonl(tmp_path / "in.jsonl", ({"prompt": str(i)} for i in range(4)))
    records, now = read_records(tmp_path / "in.jsonl", "jsonl", with_drafts=False), [0.0]

    def opened(where):
        return ResumableOutput(where, "jsonl", records, {"x": 1}, flush_every_s=10, clock=lambda: now[0])

    out = opened(f"{BUCKET}/out.jsonl")
    assert [p.name for p in store.iterdir()] == ["out.jsonl.partial"]
    out.append(0, {"n": 0})
    assert [p.name for p in store.iterdir()] == ["out.jsonl.partial"]  # kept: the last write was < 10 s ago
    assert len((store / "out.jsonl.partial").read_text().splitlines()) == 1  # the header: never appended to
    now[0] = 11.0
    out.append(1, {"n": 1})
    assert sorted(p.name for p in store.iterdir()) == ["out.jsonl.partial", "out.jsonl.partial.part-000000"]
    out.append(2, {"n": 2})  # killed before the next part: record 2 is redone
    out = opened(f"{BUCKET}/out.jsonl")
    assert out.todo == [2, 3] and out.done == {0: {"n": 0}, 1: {"n": 1}}
    assert [p.name for p in store.iterdir()] == ["out.jsonl.partial"]  # the part merged in
    for i in out.todo:
        out.append(i, {"n": i})
    assert out.finish() == [{"n": i} for i in range(4)]
    local = opened(tmp_path / "out.jsonl")
    for i in range(4):
        local.append(i, {"n": i})
    local.finish()
    assert sorted(p.name for p in store.iterdir()) == ["out.jsonl", "out.jsonl.done"]
    assert (store / "out.jsonl").read_bytes() == (tmp_path / "out.jsonl").read_bytes()


@pytest.mark.slow
def test_train_load_and_export_over_urls_equal_local(bucket, tiny_init_dir, tmp_path):
    store, given = bucket
    examples = str(ROOT / "examples" / "trajectories.jsonl")
    build([examples], f"{BUCKET}/data")  # the dataset in the bucket (array_record written locally, copied)
    build([examples], tmp_path / "data")
    assert (store / "data" / "manifest.json").read_bytes() == (tmp_path / "data" / "manifest.json").read_bytes()

    runs = {}
    for where, out, data in (
        ("url", f"{BUCKET}/run", f"{BUCKET}/data"),
        ("local", tmp_path / "run", tmp_path / "data"),
    ):
        config_file = write_config(tmp_path / "tiny-test.yaml", tiny_init_dir, data, **CHANGES)
        cfg = load_config(config_file, [f"output_dir={out}"])
        runs[where] = train(cfg, log=lambda _: None)
    assert os.fspath(runs["url"].run_dir) == f"{BUCKET}/run"
    assert f"{BUCKET}/run/checkpoints" in given  # Orbax got the URL itself
    url_lines = (store / "run" / "metrics.jsonl").read_text().splitlines()
    local_lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    drop = ("step_time_s", "tokens_per_s", "eval_seconds")
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k not in drop} for x in lines]
    assert strip(url_lines) == strip(local_lines)
    assert [m["step"] for m in strip(url_lines)] == [0, 1, 2, 3, 4]
    assert [m["step"] for m in strip(url_lines) if "eval_ar" in m] == [0, 2, 4]
    for name in ("config.json", "tokenizer.json", "train_config.json", "eval_ids.json"):
        assert (store / "run" / name).is_file(), name
    assert sorted(p.name for p in (store / "run" / "checkpoints").iterdir()) == ["2", "4"]

    from_url, from_local = load_model(f"{BUCKET}/run"), load_model(str(tmp_path / "run"))
    assert f"{BUCKET}/run/checkpoints/4/params" in given
    assert from_url.tokenizer.chat_template == from_local.tokenizer.chat_template
    for a, b in zip(*(jax_leaves(m) for m in (from_url, from_local))):
        np.testing.assert_array_equal(a, b)

    export_checkpoint(f"{BUCKET}/run", f"{BUCKET}/hf")
    export_checkpoint(tmp_path / "run", tmp_path / "hf")
    local_files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert sorted(p.name for p in (store / "hf").iterdir()) == local_files and "model.safetensors" in local_files
    for name in local_files:
        assert (store / "hf" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes(), name
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"  # a run dir's default


def jax_leaves(loaded):
    import jax
    from flax import nnx

    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(loaded.model))]
