"""Chat-template parity with transformers' ``apply_chat_template``: token ids and ``assistant_masks``.

Four template styles written here (ChatML, Llama-3-, Zephyr-, Mistral-style), each with and without a system
prompt, multi-turn, with and without ``add_generation_prompt``; generation-block variants for the masks.
"""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from lmforge.core.tokenizer import Tokenizer  # noqa: E402
from lmforge.data.chat import CHATML_TEMPLATE, ChatFormat, ChatTemplateError  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<|begin_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

LLAMA3 = ("{{ bos_token }}{% for m in messages %}"
          "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}"
          "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
          "{% else %}{{ m['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
ZEPHYR = ("{% for message in messages %}\n{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}\n"
          "{% endfor %}\n{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
# Mistral-style: the system prompt folded into the first user turn, roles checked with raise_exception
MISTRAL = ("{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\n\n' %}"
           "{% set loop_messages = messages[1:] %}{% else %}{% set sys = '' %}{% set loop_messages = messages %}"
           "{% endif %}{{ bos_token }}{% for message in loop_messages %}"
           "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{% if loop.first %}{{ '[INST] ' + sys + message['content'] + ' [/INST]' }}"
           "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
           "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}")
# ChatML without generation blocks: masks by prefix rendering
CHATML_PLAIN = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                "{% endif %}")

STYLES = {  # name -> (template, bos, eos)
    "chatml": (CHATML_TEMPLATE, None, "<|im_end|>"),
    "chatml_plain": (CHATML_PLAIN, None, "<|im_end|>"),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
    "zephyr": (ZEPHYR, None, "</s>"),
    "mistral": (MISTRAL, "<s>", "</s>"),
}

TURNS = [{"role": "user", "content": "Where does Mira live?"},
         {"role": "assistant", "content": "Mira lives in Tovel, by the river."},
         {"role": "user", "content": "And her brother?"},
         {"role": "assistant", "content": " He lives in  Arden. "}]
SYSTEM = [{"role": "system", "content": "You answer briefly."}]
CONVERSATIONS = {"no_system": TURNS, "system": SYSTEM + TURNS, "one_turn": TURNS[:2]}


@pytest.fixture(scope="module")
def base_tokenizer():
    text = " ".join(m["content"] for m in SYSTEM + TURNS) * 3 + " user assistant system INST"
    return Tokenizer.train([text, "the quick brown fox jumps over the lazy dog"], vocab_size=300,
                           special_tokens=SPECIALS)


def _pair(base: Tokenizer, style: str, tmp_path):
    template, bos, eos = STYLES[style]
    tok = Tokenizer(base.hf, bos_token=bos, eos_token=eos, pad_token="<|pad|>", chat_template=template,
                    guess_roles=False)
    tok.save(tmp_path / style)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / style))
    return Tokenizer.load(tmp_path / style), hf


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
def test_ids_and_masks_equal_transformers(base_tokenizer, style, conv, tmp_path):
    if style == "mistral" and conv == "system":
        conv = "system"  # folded into the first user turn: still parity
    tok, hf = _pair(base_tokenizer, style, tmp_path)
    fmt = ChatFormat(tok)
    messages = CONVERSATIONS[conv]
    enc = fmt.encode(messages)
    ref = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=fmt.masking == "generation")
    assert enc.ids == list(ref["input_ids"])
    if fmt.masking == "generation":
        assert enc.mask == list(ref["assistant_masks"])
    assert sum(enc.mask) > 0
    # the generation prompt (what a chat continues from) equals transformers' too
    prompt = messages[:-1]
    ref_prompt = hf.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert fmt.prompt_ids(prompt) == list(ref_prompt["input_ids"])


@pytest.mark.parametrize("style", list(STYLES))
def test_supervised_text_is_each_reply_and_its_end_of_turn(base_tokenizer, style, tmp_path):
    tok, _ = _pair(base_tokenizer, style, tmp_path)
    fmt = ChatFormat(tok)
    enc = fmt.encode(SYSTEM + TURNS)
    eot = fmt.end_of_turn()
    assert eot == tok.token_to_id(STYLES[style][2])
    supervised = [t for t, m in zip(enc.ids, enc.mask) if m]
    assert supervised.count(eot) == 2  # both turns end, and are supervised
    text = tok.decode(supervised)
    for reply in ("Mira lives in Tovel, by the river.", "He lives in  Arden."):
        assert reply in text
    for prompt in ("Where does Mira live", "And her brother", "You answer briefly"):
        assert prompt not in text


def test_prefix_masks_equal_generation_masks(base_tokenizer, tmp_path):
    """The same ChatML rendered with and without generation blocks: prefix masking finds the same tokens."""
    gen, _ = _pair(base_tokenizer, "chatml", tmp_path)
    plain, _ = _pair(base_tokenizer, "chatml_plain", tmp_path)
    a, b = ChatFormat(gen).encode(SYSTEM + TURNS), ChatFormat(plain).encode(SYSTEM + TURNS)
    assert ChatFormat(plain).masking == "prefix"
    assert a.ids == b.ids and a.mask == b.mask


def test_template_rewriting_earlier_turns_is_refused(base_tokenizer):
    # drops the content of every assistant turn but the last (as templates that strip earlier reasoning do)
    rewriting = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
                 "{% if m['role'] == 'assistant' and not loop.last %}{{ '...' }}{% else %}{{ m['content'] }}{% endif %}"
                 "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    tok = Tokenizer(base_tokenizer.hf, eos_token="<|im_end|>", chat_template=rewriting)
    with pytest.raises(ChatTemplateError, match=r"data.jsonl:3: .*earlier turns differently.*generation"):
        ChatFormat(tok).encode(TURNS, where="data.jsonl:3")


def test_template_that_raises_is_one_line(base_tokenizer):
    tok = Tokenizer(base_tokenizer.hf, bos_token="<s>", eos_token="</s>", chat_template=MISTRAL)
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match=r"^x.jsonl:7: the chat template raised: Conversation roles") as e:
        ChatFormat(tok).encode(bad, where="x.jsonl:7")
    assert "\n" not in str(e.value)


def test_globals_and_filters(base_tokenizer):
    tmpl = ("{{ strftime_now('%Y') }}|{{ messages | tojson }}|{% for m in messages %}{% if loop.index > 1 %}"
            "{% break %}{% endif %}{{ m['content'] }}{% endfor %}")
    tok = Tokenizer(base_tokenizer.hf, chat_template=tmpl)
    text, _ = ChatFormat(tok).render([{"role": "user", "content": "<a>é"}, {"role": "user", "content": "b"}])
    year, js, first = text.split("|")
    assert year.isdigit() and len(year) == 4
    assert js == '[{"role": "user", "content": "<a>é"}, {"role": "user", "content": "b"}]'  # no HTML escaping
    assert first == "<a>é"
