"""attention.py's `choose`: each kernel's preconditions checked from static information (backend, GPU
compute capability, dtype, soft-cap, head_dim, sequence lengths), falling back to einsum with a logged
reason instead of raising inside XLA. No GPU needed: backend and capability are injected."""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffpo_jax import attention
from diffpo_jax.attention import attend, choose, cudnn_unfit

GPU = dict(backend="gpu", capability=(9, 0))  # an H100 / H200
FIT = dict(dtype="bfloat16", head_dim=64, softcap=None, packed=False, lengths=(32, 64))  # what cuDNN takes


@pytest.fixture
def logged(caplog):
    """The attention module's log records from here on (its once-per-reason memory cleared first)."""
    attention._log_once.cache_clear()
    caplog.set_level(logging.INFO, logger=attention.__name__)
    return caplog


def test_cudnn_is_picked_where_its_preconditions_hold(logged):
    assert cudnn_unfit(**{k: v for k, v in FIT.items() if k != "packed"}, **GPU) is None
    assert choose("auto", **FIT, **GPU) == "cudnn"
    assert choose("cudnn", **FIT, **GPU) == "cudnn"
    assert choose("auto", **{**FIT, "dtype": "float16"}, backend="gpu", capability="8.0") == "cudnn"  # A100
    assert choose("auto", **{**FIT, "lengths": None}, **GPU) == "cudnn"  # lengths unknown: attend checks them
    assert not logged.records


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(lengths=(31, 31)), r"sequence lengths \(T, S\) = \(31, 31\) are not both even"),
        (dict(lengths=(4, 31)), r"\(4, 31\) are not both even"),
        (dict(capability=(7, 0)), r"compute capability 7.0 is below 8.0"),  # V100
        (dict(capability="7.5"), r"compute capability 7.5 is below 8.0"),  # T4
        (dict(capability="gfx90a"), "no CUDA compute capability"),  # not an NVIDIA GPU
        (dict(softcap=50.0), "cuDNN has no logit soft-cap"),  # Gemma-2
        (dict(dtype="float32"), "dtype float32 is not one of bfloat16, float16"),
        (dict(head_dim=256), "head_dim 256 is not a multiple of 8 at most 128"),
        (dict(head_dim=60), "head_dim 60 is not a multiple of 8"),
        (dict(backend="cpu"), "backend 'cpu' is not a GPU"),
    ],
    ids=["odd", "odd_keys", "sm70", "sm75", "rocm", "softcap", "fp32", "head_dim_256", "head_dim_60", "cpu"],
)
def test_cudnn_off_its_preconditions_falls_back_to_einsum_with_a_reason(logged, change, reason):
    """An explicit request falls back with a warning; "auto" on a GPU says why it did not pick cuDNN (info);
    each distinct reason is logged once, not once per layer."""
    args = {**FIT, **GPU, **change}
    for _ in range(3):  # a model calls choose once per layer
        assert choose("cudnn", **args) == "einsum"
    (record,) = logged.records
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith("attention 'cudnn' falls back to einsum: ")
    assert re.search(reason, record.getMessage())
    assert choose("auto", **args) == "einsum"
    if args["backend"] == "gpu":
        last = logged.records[-1]
        assert last.levelno == logging.INFO and "'auto' falls back to einsum: not cudnn, since " in last.getMessage()
    else:
        assert len(logged.records) == 1  # auto off a GPU: einsum is no fallback, nothing to say


def test_capability_is_read_from_the_first_device_on_gpu_only(monkeypatch):
    """Not injected: the backend from jax.default_backend(), the capability from jax.devices()[0] (read only
    when the backend is a GPU: a CPU device has none)."""
    monkeypatch.setattr(attention, "gpu_capability", lambda: pytest.fail("capability read off a GPU"))
    assert choose("auto", **FIT) == "einsum"  # this machine: CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attention, "gpu_capability", lambda: "9.0")
    assert choose("auto", **FIT) == "cudnn"
    monkeypatch.setattr(attention, "gpu_capability", lambda: "7.0")
    assert choose("auto", **FIT) == "einsum"
    monkeypatch.undo()
    assert attention.gpu_capability() is None  # a CPU device


def test_other_implementations():
    """TPU: splash for packed (training) calls with whole 128-lane head tiles, einsum for decoding; "splash"
    means einsum where the mask is not static; xla has no soft-cap (einsum, logged); unknown names raise."""
    tpu = dict(backend="tpu")
    assert choose("auto", dtype="bfloat16", head_dim=256, softcap=50.0, packed=True, **tpu) == "splash"
    assert choose("auto", dtype="bfloat16", head_dim=256, softcap=50.0, packed=False, **tpu) == "einsum"
    assert choose("auto", dtype="bfloat16", head_dim=64, softcap=None, packed=True, **tpu) == "einsum"
    assert choose("auto", dtype="float32", head_dim=128, softcap=None, packed=True, backend="cpu") == "einsum"
    assert choose("splash", dtype="float32", head_dim=64, softcap=None, packed=True) == "splash"
    assert choose("splash", dtype="float32", head_dim=64, softcap=None, packed=False) == "einsum"
    assert choose("einsum", **FIT, **GPU) == "einsum"
    assert choose("xla", **FIT) == "xla"
    assert choose("xla", **{**FIT, "softcap": 50.0}) == "einsum"
    with pytest.raises(ValueError, match="must be one of"):
        choose("flash", **FIT)


def test_attend_checks_the_lengths_of_its_arrays(logged, monkeypatch):
    """The model chooses before the sequence lengths are at hand; `attend` checks them again from its arrays'
    static shapes: an odd decode block on an sm 9.0 GPU runs einsum (on CPU here) and says why."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attention, "gpu_capability", lambda: "9.0")
    rng = np.random.default_rng(0)
    b, t, s, h, kv, d = 2, 5, 11, 4, 2, 8
    shapes = ((b, t, h, d), (b, s, kv, d), (b, s, kv, d))
    q, keys, values = (jnp.asarray(rng.normal(size=shape), jnp.bfloat16) for shape in shapes)
    allowed = jnp.asarray(rng.random((b, t, s)) < 0.8)
    got = attend(q, keys, values, allowed, scale=d**-0.5, softcap=None, implementation="cudnn")
    ref = attend(q, keys, values, allowed, scale=d**-0.5, softcap=None, implementation="einsum")
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(ref, np.float32))
    assert "attention 'cudnn' falls back to einsum: sequence lengths (T, S) = (5, 11)" in logged.text
    monkeypatch.undo()
    got = attend(
        q.astype(jnp.float32),
        keys.astype(jnp.float32),
        values.astype(jnp.float32),
        allowed,
        scale=d**-0.5,
        softcap=2.0,
        implementation="xla",
    )  # xla with a soft-cap: einsum, not an error
    ref = attend(
        q.astype(jnp.float32),
        keys.astype(jnp.float32),
        values.astype(jnp.float32),
        allowed,
        scale=d**-0.5,
        softcap=2.0,
        implementation="einsum",
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    assert "attention 'xla' falls back to einsum: it has no logit soft-cap" in logged.text
