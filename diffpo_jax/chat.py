"""Chat templating: how prompts and responses become token ids (shared by verify, generate, refine, data)."""

from __future__ import annotations

from typing import Any

Messages = list[dict[str, str]]


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
