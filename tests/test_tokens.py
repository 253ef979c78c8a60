"""Chat rendering and padding, the token-level blocks every stage shares."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoTokenizer

from smoothkd.tokens import chat_ids, pad_batch, pad_id


def test_chat_ids_are_the_template_text_without_added_special_tokens(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    messages = [{"role": "user", "content": "Name a colour."}]
    ids = chat_ids(tok, messages, add_generation_prompt=True)
    assert tok.decode(ids) == "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # written once, by the template
    with_answer = chat_ids(tok, messages + [{"role": "assistant", "content": "Blue."}], add_generation_prompt=False)
    assert with_answer[: len(ids)] == ids


def test_pad_id_falls_back_to_eos_then_zero(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert pad_id(tok) == tok.convert_tokens_to_ids("<|endoftext|>")
    tok.pad_token = None
    assert pad_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")
    tok.eos_token = None
    assert pad_id(tok) == 0


def test_pad_batch_right_keeps_positions_and_left_aligns_the_ends():
    rows = [[5, 6, 7], np.array([8], dtype=np.int64), []]
    ids, mask = pad_batch(rows, pad=9)
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9], [9, 9, 9]] and ids.dtype == torch.long
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    ids, mask = pad_batch(rows, pad=9, left=True)
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8], [9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
