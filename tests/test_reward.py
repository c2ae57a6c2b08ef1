"""Reward models: scores equal transformers' sequence classifiers and the ArmoRM reference; the RM input
(chat template, gating token); data-parallel scoring; loading errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from diffpo_jax.reward.inputs import InputError, conversation_ids, gating_pattern, gating_position
from diffpo_jax.reward.loading import load_reward_model
from diffpo_jax.reward.model import ARMORM_OBJECTIVES, HeadConfig
from diffpo_jax.reward.scorer import Scorer, _forward
from diffpo_jax.sharding import make_mesh
from diffpo_jax.sources import ModelSourceError
from tests import armorm_reference as armo
from tests import tiny

ATOL = 1e-4


def ours(loaded, tokens, mask, gate=None):
    from flax import nnx

    graphdef, state = nnx.split(loaded.model)
    gate = np.zeros(len(tokens), np.int32) if gate is None else np.asarray(gate, np.int32)
    return jax.device_get(
        _forward(graphdef, state, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask), jnp.asarray(gate))
    )


def padded_batch(lengths, width, seed=0, left=False):
    rng = np.random.default_rng(seed)
    tokens, mask = np.zeros((len(lengths), width), np.int64), np.zeros((len(lengths), width), bool)
    for i, n in enumerate(lengths):
        cols = slice(width - n, width) if left else slice(0, n)
        tokens[i, cols], mask[i, cols] = rng.integers(3, tiny.VOCAB, n), True
    return tokens, mask


@pytest.fixture(scope="module", params=["llama-1", "llama-3", "gemma2-1", "gemma2-3"])
def classifier_dir(request, tmp_path_factory):
    family, labels = request.param.split("-")
    config = tiny.gemma2_config() if family == "gemma2" else tiny.llama_config(tie=False)
    config.pad_token_id = 0
    model = tiny.build_classifier(config, int(labels))
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_classifier_scores_equal_transformers(classifier_dir, left):
    folder, reference = classifier_dir
    loaded = load_reward_model(str(folder))
    # 30 tokens: past Gemma-2's sliding window of 8
    tokens, mask = padded_batch([5, 30, 17, 1], 32, left=left)
    with torch.no_grad():
        expect = reference(torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()
    got = ours(loaded, tokens, mask)["logits"]
    assert got.shape == expect.shape == (4, reference.config.num_labels)
    np.testing.assert_allclose(got, expect, atol=ATOL, rtol=0)
    assert np.abs(expect).max() > 0.5  # scores that differ enough for the check to mean something


def test_head_config_from_hf_fields():
    assert (
        HeadConfig.from_hf({"architectures": ["LlamaForSequenceClassification"]}).num_labels == 2
    )  # transformers' default
    assert (
        HeadConfig.from_hf({"architectures": ["Gemma2ForSequenceClassification"], "id2label": {"0": "x"}}).num_labels
        == 1
    )
    armorm = HeadConfig.from_hf(
        {
            "architectures": ["LlamaForRewardModelWithGating"],
            "num_objectives": 19,
            "gating_temperature": 10,
            "gating_hidden_dim": 1024,
            "gating_n_hidden": 3,
        }
    )
    assert armorm.objective_names == ARMORM_OBJECTIVES and ARMORM_OBJECTIVES[9:11] == (
        "ultrafeedback-helpfulness",
        "beavertails-is_safe",
    )


# ------------------------------------------------------------------------------------------ ArmoRM


@pytest.fixture(scope="module")
def llama3_tok():
    return tiny.llama3_tokenizer()


@pytest.fixture(scope="module")
def armorm_dir(tmp_path_factory, llama3_tok):
    config = armo.armorm_config(len(llama3_tok), pad=llama3_tok.pad_token_id)
    model = armo.build_armorm(config, pattern=gating_pattern(llama3_tok))
    folder = tmp_path_factory.mktemp("armorm")
    model.save_pretrained(folder)
    llama3_tok.save_pretrained(folder)
    return folder, model


def test_gating_pattern_is_armorms_on_the_llama3_template(llama3_tok, smol_tokenizer):
    pattern = gating_pattern(llama3_tok)
    assert llama3_tok.decode(pattern) == "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    ids = conversation_ids(
        llama3_tok,
        [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "Is it?"},
        ],
        "Yes.",
    )
    j = gating_position(ids, pattern)
    # the last user turn's <|eot_id|>: what follows is the final assistant header, then the answer
    assert llama3_tok.decode(ids[j:]) == "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nYes.<|eot_id|>"
    smol = smol_tokenizer
    assert smol.decode(gating_pattern(smol)) == "<|im_end|>\n<|im_start|>assistant\n"
    ids = conversation_ids(smol, "Hi", "Hello.")
    assert (
        smol.decode(ids[gating_position(ids, gating_pattern(smol)) :])
        == "<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    )
    with pytest.raises(InputError, match="not in the tokens"):
        gating_position(ids[:5], gating_pattern(smol))


def test_armorm_score_rewards_gating_equal_the_reference(armorm_dir, llama3_tok):
    folder, reference = armorm_dir
    loaded = load_reward_model(str(folder))
    assert loaded.head.kind == "armorm" and loaded.head.num_objectives == 5
    scorer = Scorer(loaded, batch_size=4)
    convs = [
        ("What is the capital of France?", "Paris is."),
        ("The answer?", "The answer is yes."),
        (
            [
                {"role": "user", "content": "What is"},
                {"role": "assistant", "content": "yes"},
                {"role": "user", "content": "Paris?"},
            ],
            "Paris is the capital of France.",
        ),
    ]
    rows = [scorer.row(p, a) for p, a in convs]
    width = max(len(ids) for ids, _ in rows)
    tokens = np.full((len(rows), width), llama3_tok.pad_token_id, np.int64)
    mask = np.zeros(tokens.shape, bool)
    for i, (ids, _) in enumerate(rows):
        tokens[i, : len(ids)], mask[i, : len(ids)] = ids, True
    with torch.no_grad():
        expect = {k: v.numpy() for k, v in reference(torch.tensor(tokens)).items()}
    got = ours(loaded, tokens, mask, [g for _, g in rows])
    for key in ("score", "rewards", "gating"):
        np.testing.assert_allclose(got[key], expect[key], atol=ATOL, rtol=0)
    assert np.ptp(expect["score"]) > 0.1
    scores = scorer.score(rows)  # the batched path: same numbers, objectives named
    np.testing.assert_allclose([s.score for s in scores], expect["score"], atol=ATOL, rtol=0)
    assert list(scores[0].objectives) == [f"objective_{i}" for i in range(5)]


def test_scoring_over_8_devices_equals_one(armorm_dir):
    folder, _ = armorm_dir
    one = Scorer(load_reward_model(str(folder)), batch_size=3)
    mesh = make_mesh((-1, 1, 1), jax.devices()[:8])
    eight = Scorer(load_reward_model(str(folder), mesh=mesh), batch_size=3, mesh=mesh)
    assert eight.batch_size == 8
    rows = [one.row(f"Question {i}?", "The answer is " + "yes " * i) for i in range(11)]
    a, b = one.score(rows), eight.score(rows)
    np.testing.assert_allclose([s.score for s in a], [s.score for s in b], atol=ATOL, rtol=0)
    np.testing.assert_allclose(
        [list(s.objectives.values()) for s in a], [list(s.objectives.values()) for s in b], atol=ATOL
    )


# ------------------------------------------------------------------------------------------ errors


def test_a_causal_lm_is_not_a_reward_model(tiny_llama_dir):
    with pytest.raises(ModelSourceError, match="'LlamaForCausalLM' is not a reward model"):
        load_reward_model(str(tiny_llama_dir))
    with pytest.raises(ModelSourceError, match="not a reward model"):
        load_reward_model(None)


def test_a_reward_model_without_head_weights(tiny_llama_dir, tmp_path):
    folder = tmp_path / "no-head"
    folder.mkdir()
    config = json.loads((tiny_llama_dir / "config.json").read_text()) | {
        "architectures": ["LlamaForSequenceClassification"]
    }
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {k: v for k, v in load_file(tiny_llama_dir / "model.safetensors").items() if k != "lm_head.weight"}
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelSourceError, match="1 tensors missing, e.g. 'score.weight'"):
        load_reward_model(str(folder))


def test_batches_need_a_pad_token(armorm_dir, tmp_path):
    folder, _ = armorm_dir
    loaded = load_reward_model(str(folder))
    loaded.cfg = loaded.cfg.replace(pad_token_id=None)
    loaded.tokenizer = tiny.llama3_tokenizer()
    loaded.tokenizer.pad_token = None
    with pytest.raises(ModelSourceError, match="no pad token .* --batch-size 1"):
        Scorer(loaded, batch_size=2)
    assert Scorer(loaded, batch_size=1).batch_size == 1


RM_PRESETS = [
    "armorm-llama3-8b-v0.1",
    "skywork-reward-llama-3.1-8b-v0.2",
    "skywork-reward-gemma-2-27b-v0.2",
    "grm-gemma2-2b-rewardmodel-ft",
    "fsfairx-llama3-rm-v0.1",
]


@pytest.mark.parametrize("name", RM_PRESETS)
def test_reward_presets_build_with_their_heads(name):
    from flax import nnx

    from diffpo_jax.config import load_preset
    from diffpo_jax.reward.model import abstract_reward_model, reward_weight_specs

    cfg, hf = load_preset(name)
    head = HeadConfig.from_hf(hf, source=name)
    state = nnx.state(abstract_reward_model(cfg, head))
    names = [s.hf_name for s in reward_weight_specs(cfg, head)]
    assert "lm_head.weight" not in names and len(jax.tree.leaves(state)) == len(names)
    if head.kind == "armorm":
        assert head.num_objectives == 19 and "gating.layers.3.bias" in names and "reward_transform_matrix" in names
    else:
        assert head.num_labels == 1 and names[-1] == "score.weight"


def test_length_buckets_are_four_per_octave():
    from diffpo_jax.reward.scorer import length_bucket

    assert [length_bucket(n) for n in (1, 32, 33, 41, 65, 129, 257, 4097)] == [32, 32, 40, 48, 80, 160, 320, 5120]
    assert all(n <= length_bucket(n) <= max(32, 1.25 * n) for n in range(1, 9000))
