"""What a reward model reads: its own tokenizer's chat template over [user prompt (or messages), answer].

As the RM model cards do: `apply_chat_template(messages + [assistant answer], tokenize=True)`, no
generation prompt. ArmoRM's gating token is the first token of the LAST occurrence of the text its
template puts between a user message and the assistant's answer (on Llama-3,
`<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n` = ArmoRM's own token pattern); the pattern
is derived from the template, so other templates (SmolLM2's `<|im_end|>\\n<|im_start|>assistant\\n`) work.
"""

from __future__ import annotations

from typing import Any

from diffpo_jax.chat import Messages, as_messages

# Probe turns like real ones (words: the tokens at the boundaries split as they do for real answers).
_USER, _ANSWER = "Quelle heure est-il", "Midi pile"


class InputError(ValueError):
    """An answer the reward model cannot score as given; str() is the problem (the caller adds where)."""


def conversation_ids(tokenizer: Any, prompt: str | Messages, answer: str) -> list[int]:
    """Token ids of the conversation `prompt` followed by the assistant's `answer`."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("the reward model's tokenizer has no chat template")
    messages = list(as_messages(prompt)) + [{"role": "assistant", "content": answer}]
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))


def gating_pattern(tokenizer: Any) -> list[int]:
    """The tokens the chat template puts between a user message and the assistant answer, as they are
    tokenized in a conversation (not alone: a byte-level tokenizer may split "\\n\\n" differently there)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _USER}, {"role": "assistant", "content": _ANSWER}], tokenize=False
    )
    begin = text.rindex(_ANSWER)
    end_user = text.rindex(_USER, 0, begin) + len(_USER)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [i for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if a >= end_user and b <= begin]
    if not ids:
        raise InputError("the chat template puts nothing between the user message and the answer (no gating token)")
    return ids


def gating_position(ids: list[int], pattern: list[int]) -> int:
    """Where the last occurrence of `pattern` in `ids` starts (ArmoRM's `find_token_for_gating`)."""
    n = len(pattern)
    for j in range(len(ids) - n, -1, -1):
        if ids[j : j + n] == pattern:
            return j
    raise InputError(f"the assistant-turn opening {pattern} of the chat template is not in the tokens")
