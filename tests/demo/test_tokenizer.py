"""The demo's character-level tokenizer and its chat template."""

from __future__ import annotations

from pathlib import Path

from megatron_opd.demo.tokenizer import CHARS, IM_END, PAD, build_tokenizer, save_tokenizer


def test_round_trip_and_vocabulary() -> None:
    tok = build_tokenizer()
    assert len(tok) % 8 == 0
    assert tok.eos_token == IM_END and tok.pad_token == PAD and tok.eos_token_id != tok.pad_token_id
    for text in ("37+48=", "\\boxed{185}", "12-7*3=(4)", CHARS):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)  # one token per character
        assert tok.decode(ids) == text
    ids = tok("\\boxed{85}" + IM_END)["input_ids"]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "\\boxed{85}"


def test_chat_template_renders_qwen_style() -> None:
    tok = build_tokenizer()
    messages = [{"role": "user", "content": "37+48="}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\n37+48=<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert len(ids) == 14  # role names are single tokens: prompts stay short
    assert tok.decode(ids) == text
    full = [*messages, {"role": "assistant", "content": "\\boxed{85}"}]
    assert tok.apply_chat_template(full, tokenize=False).endswith("<|im_start|>assistant\n\\boxed{85}<|im_end|>\n")


def test_saved_directory_loads_with_auto_tokenizer(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from megatron_opd.data import check_tokenizers, load_tokenizer
    from megatron_opd.data.templates import encode_prompts, render_chat, resolve_chat_template

    save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    ref = build_tokenizer()
    assert len(tok) == len(ref) and tok.get_vocab() == ref.get_vocab()
    messages = [{"role": "user", "content": "5+17="}]
    expected = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    # the data pipeline's path (thinking off, as the demo config runs) gives the same prompt ids
    loaded = load_tokenizer(tmp_path)
    text = render_chat(loaded, messages, resolve_chat_template(loaded, None), enable_thinking=False)
    assert encode_prompts(loaded, [text]) == [list(expected["input_ids"])]
    (cmp,) = check_tokenizers(loaded, {"default": tok})
    assert cmp.compatible
