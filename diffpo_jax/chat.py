"""Chat templating: how prompts and responses become token ids (shared by verify, generate, refine, data)."""

from __future__ import annotations

from typing import Any

Messages = list[dict[str, str]]
_PROBE = "\x02response\x03"


def as_messages(prompt: str | Messages) -> Messages:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def prompt_ids(tokenizer: Any, prompt: str | Messages) -> list[int]:
    """The model's chat template over `prompt`, ending with the assistant turn's opening."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template")
    return list(
        tokenizer.apply_chat_template(as_messages(prompt), add_generation_prompt=True, tokenize=True, return_dict=False)
    )


def response_ids(tokenizer: Any, text: str) -> list[int]:
    """A response's tokens as they follow the prompt (no special tokens added)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_of_turn_id(tokenizer: Any) -> int:
    """The token the chat template puts right after an assistant message (e.g. <|im_end|>,
    <end_of_turn>, <|eot_id|>); the tokenizer's eos id when the template puts no added token there.
    Training appends it to every response, and decoding stops on it, so both agree by construction."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}], tokenize=False
    )
    after = tokenizer(text[text.rindex(_PROBE) + len(_PROBE) :], add_special_tokens=False)["input_ids"]
    added = set(tokenizer.get_added_vocab().values())
    if after and after[0] in added:
        return int(after[0])
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither an end-of-turn token in its chat template nor an eos id")
    return int(tokenizer.eos_token_id)


def pad_id(tokenizer: Any, end_of_turn: int) -> int:
    """The id that fills rows past their end, in training batches and in decoding alike (so a model
    trained on a pad tail sees the same one when it refines): the tokenizer's pad id, else the
    end-of-turn id (`end_of_turn_id`)."""
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn)
