"""Tests for data.py: label masking by position, BOS/EOS, truncation, batching and resume, JSONL
validation, and the shipped demo dataset. A character-level tokenizer stands in for model.py's
(same interface)."""

import json
import os
import random
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from data import IGNORE_INDEX, Batcher, DataError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CharTokenizer:
    """One token per character (id = 3 + code point), plus "<s>" (BOS) and "</s>" (EOS) written in
    the text, as a real tokenizer parses special tokens. chat_prompt mimics ChatML: it opens with
    BOS and contains EOS."""

    def __init__(self, bos=True, pad_id=0, chat=False):
        self.bos_id = 1 if bos else None
        self.eos_id = 2
        self.pad_id = pad_id
        self.vocab_size = 3 + 0x110000
        self.chat = chat

    def encode(self, text, bos=False, eos=False):
        ids, i = [], 0
        while i < len(text):
            if text.startswith("<s>", i):
                ids.append(1)
                i += 3
            elif text.startswith("</s>", i):
                ids.append(2)
                i += 4
            else:
                ids.append(3 + ord(text[i]))
                i += 1
        if bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        return "".join({1: "<s>", 2: "</s>"}.get(i, chr(i - 3)) if i > 0 else "" for i in ids)

    def chat_prompt(self, user, system=None):
        if not self.chat:
            return None
        return f"<s>user\n{user}</s>\n<s>assistant\n"


def labeled_tokens(batch, b):
    labels = batch["labels"][b]
    return labels[labels != IGNORE_INDEX].tolist()


def write_lines(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


# --- masking, BOS and EOS -------------------------------------------------------------------------

@pytest.mark.parametrize("chat", [False, True])
def test_prompt_tokens_never_carry_labels(chat):
    tok = CharTokenizer(chat=chat)
    records = [{"prompt": "Word: owl\nCategory:", "completion": " bird"},
               {"instruction": "Name the category.", "input": "owl", "output": "bird"},
               {"instruction": "Say hi.", "output": "hi"}]
    for record in records:
        prompt_text, target_text = data.render(record, tok, chat)
        ids, mask = data.encode_example(record, tok, max_len=512, chat=chat)
        n_prompt = len(ids) - len(tok.encode(target_text)) - 1  # BOS + prompt tokens
        assert ids[:n_prompt] == (([1] if not prompt_text.startswith("<s>") else [])
                                  + tok.encode(prompt_text))
        assert not any(mask[:n_prompt]) and all(mask[n_prompt:])
        batch = data.collate([(ids, mask)], tok.pad_id)
        # labels exist exactly for the completion tokens + EOS, nothing from the prompt
        assert labeled_tokens(batch, 0) == tok.encode(target_text) + [tok.eos_id]
        assert (batch["labels"][0, :n_prompt - 1] == IGNORE_INDEX).all()


def test_prompt_tokens_equal_to_eos_still_carry_no_label():
    # the chat prompt contains "</s>" (= EOS id) inside the prompt: masking is by position, not by
    # value
    tok = CharTokenizer(chat=True)
    ids, mask = data.encode_example({"prompt": "hi", "completion": "yo"}, tok, max_len=512,
                                    chat=True)
    assert tok.eos_id in ids[:-3]
    batch = data.collate([(ids, mask)], tok.pad_id)
    assert labeled_tokens(batch, 0) == tok.encode("yo") + [tok.eos_id]


def test_eos_appended_to_completion_and_is_a_target():
    tok = CharTokenizer()
    for record in [{"prompt": "a", "completion": "bc"}, {"text": "bc"},
                   {"instruction": "a", "output": "bc"}]:
        ids, mask = data.encode_example(record, tok, max_len=512)
        assert ids[-1] == tok.eos_id and mask[-1]
        assert ids[-3:-1] == tok.encode("bc") and mask[-3] and mask[-2]
        assert ids.count(tok.eos_id) == 1


def test_text_records_target_every_token_after_bos():
    tok = CharTokenizer()
    ids, mask = data.encode_example({"text": "hello"}, tok, max_len=512)
    assert ids == [1] + tok.encode("hello") + [2]
    assert mask == [False] + [True] * 6


def test_exactly_one_bos():
    plain, chat, no_bos = CharTokenizer(), CharTokenizer(chat=True), CharTokenizer(bos=False)
    record = {"prompt": "p", "completion": "c"}
    assert data.encode_example(record, plain, 512)[0].count(1) == 1
    assert data.encode_example(record, plain, 512)[0][0] == 1
    # the chat prompt already opens with BOS: no second one in front of it
    ids, _ = data.encode_example(record, chat, 512, chat=True)
    assert ids[:2] != [1, 1] and ids[0] == 1
    # a text that starts with the BOS string gets no extra BOS
    assert data.encode_example({"text": "<s>abc"}, plain, 512)[0][:2] == [1, 3 + ord("a")]
    # a tokenizer without BOS gets none, and its first token is not a target
    ids, mask = data.encode_example({"text": "abc"}, no_bos, 512)
    assert 1 not in ids and mask[0] is False and all(mask[1:])
    candidates, _ = data.encode_choices({"question": "q", "choices": ["a", "b"], "answer": 0},
                                        chat, 512, chat=True)
    assert all(ids[:2] != [1, 1] for ids, _ in candidates)


def test_chat_wraps_the_prompt_and_a_tokenizer_without_template_is_an_error():
    record = {"prompt": "Word: owl\nCategory:", "completion": " bird"}
    with pytest.raises(DataError, match="no chat template"):
        data.render(record, CharTokenizer(chat=False), chat=True)
    assert data.render(record, CharTokenizer(chat=True), chat=False)[0] == "Word: owl\nCategory:"
    wrapped = data.render(record, CharTokenizer(chat=True), chat=True)[0]
    assert wrapped == "<s>user\nWord: owl\nCategory:</s>\n<s>assistant\n"


def test_instruction_template_omits_empty_input():
    tok = CharTokenizer()
    with_input, _ = data.render({"instruction": "Do it.", "input": "x", "output": "y"}, tok)
    without, _ = data.render({"instruction": "Do it.", "input": "", "output": "y"}, tok)
    assert "### Input:\nx" in with_input and "Input" not in without
    assert without == data.render({"instruction": "Do it.", "output": "y"}, tok)[0]
    assert with_input.endswith("### Response:\n") and without.endswith("### Response:\n")


# --- collate --------------------------------------------------------------------------------------

def test_labels_are_next_token_by_position():
    rng = random.Random(0)
    tok = CharTokenizer()
    examples = []
    for _ in range(6):
        prompt = "".join(rng.choice("abc") for _ in range(rng.randint(0, 6)))
        completion = "".join(rng.choice("xyz") for _ in range(rng.randint(1, 6)))
        examples.append(data.encode_example({"prompt": prompt, "completion": completion}, tok, 512))
    batch = data.collate(examples, tok.pad_id)
    T = max(len(ids) for ids, _ in examples) - 1
    assert batch["input_ids"].shape == batch["labels"].shape == (len(examples), T)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    for b, (ids, mask) in enumerate(examples):
        for t in range(T):
            expected_input = ids[t] if t < len(ids) - 1 else tok.pad_id
            expected_label = ids[t + 1] if t + 1 < len(ids) and mask[t + 1] else IGNORE_INDEX
            assert batch["input_ids"][b, t].item() == expected_input
            assert batch["labels"][b, t].item() == expected_label


@pytest.mark.parametrize("pad_id", [0, 2, 3 + ord("x")])  # 2 = EOS, 3+ord("x") = a completion token
def test_padding_never_carries_labels_even_when_pad_id_is_a_real_token(pad_id):
    tok = CharTokenizer(pad_id=pad_id)
    short = data.encode_example({"prompt": "a", "completion": "x"}, tok, 512)
    long = data.encode_example({"prompt": "abcdef", "completion": "xxxxxx"}, tok, 512)
    batch = data.collate([short, long], tok.pad_id)
    n_real = len(short[0]) - 1
    assert (batch["input_ids"][0, n_real:] == pad_id).all()
    assert (batch["labels"][0, n_real:] == IGNORE_INDEX).all()
    assert labeled_tokens(batch, 0) == [3 + ord("x"), tok.eos_id]
    assert labeled_tokens(batch, 1) == [3 + ord("x")] * 6 + [tok.eos_id]
    assert data.count_label_tokens(batch) == 2 + 7


# --- truncation -----------------------------------------------------------------------------------

def test_truncation_warns_once_with_count_and_drops_examples_without_targets():
    tok = CharTokenizer()
    records = [{"prompt": "ab", "completion": "cd"},          # 6 tokens: fits
               {"prompt": "ab", "completion": "cdefgh"},      # 10 tokens: cut, keeps targets
               {"prompt": "abcdefgh", "completion": "x"},     # all targets cut away: dropped
               {"prompt": "abcdefghij", "completion": "y"}]   # dropped
    with pytest.warns(UserWarning) as caught:
        examples = data.encode_dataset(records, tok, max_len=6, name="toy")
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "toy" in message and "3 of 4" in message and "2 had no target" in message
    assert len(examples) == 2
    assert all(len(ids) <= 6 for ids, _ in examples)
    assert examples[1][0] == [1] + tok.encode("abcde")  # cut from the right: the EOS is gone
    with pytest.raises(DataError, match="max_len"), pytest.warns(UserWarning):
        data.encode_dataset(records[2:], tok, max_len=6)


def test_no_warning_when_nothing_is_truncated():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.encode_dataset([{"text": "abc"}], CharTokenizer(), max_len=5)


# --- multiple choice ------------------------------------------------------------------------------

def test_choice_tokens_are_the_only_targets_and_answer_may_be_text():
    tok = CharTokenizer()
    record = {"question": "Q?", "choices": [" yes", " no"], "answer": " no"}
    candidates, answer = data.encode_choices(record, tok, max_len=512)
    assert answer == 1
    for (ids, mask), choice in zip(candidates, record["choices"]):
        assert ids == [1] + tok.encode("Q?") + tok.encode(choice)
        assert mask == [False] * 3 + [True] * len(choice)


def test_long_choice_question_is_cut_from_the_left_keeping_every_choice_token():
    tok = CharTokenizer()
    record = {"question": "0123456789", "choices": ["ab", "abc"], "answer": 0}
    with pytest.warns(UserWarning):
        candidates, _ = data.encode_choices(record, tok, max_len=6)
    for (ids, mask), choice in zip(candidates, record["choices"]):
        assert len(ids) == 6 and ids[0] == 1
        assert ids[-len(choice):] == tok.encode(choice) and sum(mask) == len(choice)


# --- batcher --------------------------------------------------------------------------------------

def toy_examples(n):
    tok = CharTokenizer()
    return [data.encode_example({"prompt": "p" * (i % 3),
                                 "completion": chr(97 + i % 26) * (1 + i % 4)}, tok, 64)
            for i in range(n)]


def take(batcher, k):
    return [next(batcher) for _ in range(k)]


def same_batches(xs, ys):
    return len(xs) == len(ys) and all(torch.equal(x["input_ids"], y["input_ids"]) and
                                      torch.equal(x["labels"], y["labels"]) for x, y in zip(xs, ys))


def test_batcher_is_deterministic_for_a_seed_and_differs_across_seeds():
    examples = toy_examples(23)
    a, b, c = (Batcher(examples, 4, 0, seed=1), Batcher(examples, 4, 0, seed=1),
               Batcher(examples, 4, 0, seed=2))
    xs, ys, zs = take(a, 12), take(b, 12), take(c, 12)
    assert same_batches(xs, ys)
    assert not same_batches(xs, zs)
    # each epoch is a different permutation, and within an epoch no example repeats
    assert a.epoch_order(0) != a.epoch_order(1)
    assert sorted(a.epoch_order(0)) == list(range(23))


def test_batcher_resume_from_saved_cursor_reproduces_remaining_batches(tmp_path):
    # 5 steps per epoch at batch 4: resume points inside and across epochs
    examples = toy_examples(23)
    for k in (0, 3, 5, 7, 11):
        reference = Batcher(examples, 4, 0, seed=7)
        expected = take(reference, 20)
        first = Batcher(examples, 4, 0, seed=7)
        take(first, k)
        state = first.state_dict()
        # the cursor survives a checkpoint round trip that refuses arbitrary objects
        torch.save(state, tmp_path / "cursor.pt")
        state = torch.load(tmp_path / "cursor.pt", weights_only=True)
        resumed = Batcher(examples, 4, 0, seed=7)
        resumed.load_state_dict(state)
        assert same_batches(take(resumed, 20 - k), expected[k:]), (
            f"resume after {k} batches diverged")


def test_batcher_refuses_a_cursor_from_different_settings():
    examples = toy_examples(23)
    state = Batcher(examples, 4, 0, seed=7).state_dict()
    with pytest.raises(DataError, match="batch_size"):
        Batcher(examples, 2, 0, seed=7).load_state_dict(state)
    with pytest.raises(DataError, match="num_examples"):
        Batcher(examples[:20], 4, 0, seed=7).load_state_dict(state)


def test_batcher_ranks_get_disjoint_full_batches_covering_the_global_batch():
    examples = toy_examples(23)
    ranks = [Batcher(examples, 3, 0, seed=5, rank=r, world_size=2) for r in range(2)]
    single = Batcher(examples, 6, 0, seed=5)
    for _ in range(7):
        parts = [next(r) for r in ranks]
        whole = next(single)
        assert all(p["input_ids"].shape[0] == 3 for p in parts)
        assert data.count_label_tokens(whole) == sum(data.count_label_tokens(p) for p in parts)


def test_batcher_needs_at_least_one_full_step():
    with pytest.raises(DataError, match="fewer than one step"):
        Batcher(toy_examples(3), 4, 0)


# --- JSONL validation -----------------------------------------------------------------------------

def test_malformed_json_line_raises_data_error_naming_the_line(tmp_path):
    path = write_lines(tmp_path, ['{"text": "ok"}', '', '{"text": "broken"', '{"text": "ok"}'])
    with pytest.raises(DataError, match=r"line 3: not valid JSON") as err:
        data.load_jsonl(path)
    assert path in str(err.value) and "\n" not in str(err.value)


def test_empty_file_raises_data_error(tmp_path):
    for content in ["", "\n  \n"]:
        path = tmp_path / "empty.jsonl"
        path.write_text(content)
        with pytest.raises(DataError, match="no records"):
            data.load_jsonl(str(path))
    with pytest.raises(DataError, match="no such file"):
        data.load_jsonl(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a"}', "missing key 'completion'"),
    ('{"prompt": "a", "completion": 5}', "'completion' must be a string"),
    ('{"text": ""}', "'text' is empty"),
    ('{"question": "q", "choices": ["a"], "answer": 0}', "at least 2"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "out of range"),
    ('{"question": "q", "choices": ["a", "b"], "answer": "c"}', "not one of the choices"),
    ('{"question": "q", "choices": ["a", "b"], "answer": true}', "must be an index"),
    ('["text"]', "expected a JSON object"),
    ('{"foo": 1}', "match no format"),
])
def test_bad_records_raise_data_error_naming_the_line_and_key(tmp_path, line, message):
    path = write_lines(tmp_path, ['{"prompt": "x", "completion": "y"}'] * 2 + [line])
    with pytest.raises(DataError, match="line 3") as err:
        data.load_jsonl(path)
    assert message in str(err.value)


def test_one_format_per_file(tmp_path):
    path = write_lines(tmp_path, ['{"text": "a"}', '{"prompt": "x", "completion": "y"}'])
    with pytest.raises(DataError,
                       match="line 2: a prompt_completion record in a file of text records"):
        data.load_jsonl(path)


# --- the shipped demo dataset ---------------------------------------------------------------------

def demo_word(prompt):
    # "Word: owl\nCategory:" -> "owl"
    assert prompt.startswith("Word: ") and prompt.endswith("\nCategory:"), prompt
    return prompt[len("Word: "):-len("\nCategory:")]


def test_shipped_demo_files_parse_and_train_val_words_are_disjoint():
    folder = os.path.join(REPO, "data")
    train = data.load_jsonl(os.path.join(folder, "wordnet_train.jsonl"))
    val = data.load_jsonl(os.path.join(folder, "wordnet_val.jsonl"))
    choice = data.load_jsonl(os.path.join(folder, "wordnet_val_choice.jsonl"))
    assert data.dataset_format(train) == data.dataset_format(val) == "prompt_completion"
    assert data.dataset_format(choice) == "choice"
    assert len(train) >= 1000 and len(val) >= 100 and len(choice) >= 100
    train_words = {demo_word(r["prompt"]) for r in train}
    val_words = {demo_word(r["prompt"]) for r in val}
    choice_words = {demo_word(r["question"]) for r in choice}
    assert len(train_words) == len(train) and len(val_words) == len(val)  # no word twice
    assert not train_words & val_words
    assert choice_words <= val_words
    # every multiple-choice answer is the category the val file gives for that word; the choices
    # are distinct
    val_answer = {demo_word(r["prompt"]): r["completion"] for r in val}
    for r in choice:
        assert len(set(r["choices"])) == len(r["choices"]) == 4
        assert r["choices"][data.answer_index(r)] == val_answer[demo_word(r["question"])]
    # the categories of val all appear in train (the task is learnable from the train file)
    assert {r["completion"] for r in val} <= {r["completion"] for r in train}


# --- data as people have it: extra keys, JSON arrays, chat records --------------------------------

def test_extra_keys_are_ignored_with_one_warning_per_file_listing_them(tmp_path):
    lines = ['{"id": 1, "prompt": "a", "completion": "b"}',
             '{"id": 2, "source": "x", "prompt": "c", "completion": "d"}']
    with pytest.warns(UserWarning) as caught:
        records = data.load_jsonl(write_lines(tmp_path, lines))
    assert len(caught) == 1 and "'id', 'source'" in str(caught[0].message)
    assert data.dataset_format(records) == "prompt_completion"
    assert data.encode_example(records[0], CharTokenizer(), 64) == \
        data.encode_example({"prompt": "a", "completion": "b"}, CharTokenizer(), 64)
    # Alpaca's records carry a rendered "text" beside instruction/input/output: read as
    # instruction records, "text" ignored
    alpaca = ['{"instruction": "Name it.", "input": "", "output": "owl", "text": "### ..."}'] * 2
    with pytest.warns(UserWarning, match="'text'") as caught:
        records = data.load_jsonl(write_lines(tmp_path, alpaca, "alpaca.jsonl"))
    assert len(caught) == 1 and data.dataset_format(records) == "instruction"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # no extra key: no warning
        data.load_jsonl(write_lines(tmp_path, ['{"text": "a"}'], "plain.jsonl"))


def test_json_array_file_loads_the_records_a_jsonl_file_would(tmp_path):
    records = [{"instruction": "Say hi.", "input": "", "output": "hi"},
               {"instruction": "Count.", "input": "1, 2", "output": "3"}]
    as_array = tmp_path / "alpaca_data.json"
    as_array.write_text(json.dumps(records, indent=4))
    as_lines = write_lines(tmp_path, [json.dumps(r) for r in records])
    assert data.load_jsonl(str(as_array)) == data.load_jsonl(as_lines) == records
    as_array.write_text(json.dumps([records[0], {"output": "x"}]))
    with pytest.raises(DataError, match="record 2: missing key 'instruction'"):
        data.load_jsonl(str(as_array))
    as_array.write_text('[{"text": "a"},')
    with pytest.raises(DataError, match="not a valid JSON array"):
        data.load_jsonl(str(as_array))


@pytest.mark.parametrize("line, message", [
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no message has role 'assistant'"),
    ('{"messages": [{"role": "user", "content": ["hi"]}]}', "messages[0] must be an object"),
])
def test_bad_chat_records_are_named(tmp_path, line, message):
    with pytest.raises(DataError, match="line 1") as err:
        data.load_jsonl(write_lines(tmp_path, [line]))
    assert message in str(err.value)


def test_count_input_tokens_leaves_padding_out():
    examples = [([1, 5, 6, 7], [False, False, True, True]), ([1, 8], [False, True])]
    batch = data.collate(examples, pad_id=0)
    assert batch["input_ids"].numel() == 6 and data.count_input_tokens(batch) == 3 + 1


def test_validation_fraction_is_held_out_of_training_and_the_same_for_a_seed():
    records = [{"text": str(i)} for i in range(40)]
    train, val = data.split_validation(records, 0.1, seed=3)
    assert len(val) == 4 and len(train) == 36
    assert sorted(r["text"] for r in train + val) == sorted(r["text"] for r in records)
    assert data.split_validation(records, 0.1, seed=3) == (train, val)
    assert data.split_validation(records, 0.1, seed=4)[1] != val


CONVERSATION = [{"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris"},
                {"role": "user", "content": "And of Italy?"},
                {"role": "assistant", "content": "Rome, of course."}]


def target_runs(ids, mask):
    """The contiguous runs of target tokens, as lists of ids."""
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs, current = runs + [current], []
    return runs + ([current] if current else [])


@pytest.mark.smollm2
@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:]])
def test_chat_records_are_the_templates_tokens_with_labels_on_assistant_turns_only(
        smollm2_dir, messages):
    """ids are exactly transformers' apply_chat_template tokens (with or without a system
    message: the template inserts SmolLM2's default one); the labelled tokens are, turn by turn,
    the assistant's content and its closing <|im_end|> (EOS), nothing else."""
    from transformers import AutoTokenizer
    from tokenizer import load_tokenizer
    tok, hf = load_tokenizer(smollm2_dir), AutoTokenizer.from_pretrained(smollm2_dir)
    ids, mask = data.encode_example({"messages": messages}, tok, max_len=512)
    assert ids == list(hf.apply_chat_template(messages, tokenize=True)["input_ids"])
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert target_runs(ids, mask) == [hf.encode(a + "<|im_end|>") for a in answers]
    batch = data.collate([(ids, mask)], tok.pad_id)
    assert labeled_tokens(batch, 0) == [t for run in target_runs(ids, mask) for t in run]


@pytest.mark.smollm2
def test_chat_labels_equal_transformers_assistant_mask(smollm2_dir, tmp_path):
    """A template that marks the assistant's text with {% generation %} lets transformers compute
    the assistant-token mask itself: an independent oracle for our positions."""
    import shutil
    from transformers import AutoTokenizer
    from tokenizer import load_tokenizer
    tcfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    plain = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    marked = ("{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}"
              "{% generation %}{{message['content'] + '<|im_end|>'}}{% endgeneration %}{{'\n'}}"
              "{% else %}" + plain + "{% endif %}")
    assert plain in tcfg["chat_template"]
    tcfg["chat_template"] = tcfg["chat_template"].replace(plain, marked)
    shutil.copy(smollm2_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tcfg))
    tok, hf = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    ids, mask = data.encode_example({"messages": CONVERSATION}, tok, max_len=512)
    want = hf.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    assert ids == list(want["input_ids"])
    assert mask == [bool(m) for m in want["assistant_masks"]] and sum(mask) > 5


@pytest.mark.smollm2
def test_chat_without_a_template_is_an_error_not_a_plain_prompt(smollm2_dir, tmp_path):
    import shutil
    from fileio import CheckpointError
    from tokenizer import load_tokenizer
    tcfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    del tcfg["chat_template"]
    shutil.copy(smollm2_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tcfg))
    tok = load_tokenizer(tmp_path)
    for record, chat in (({"messages": CONVERSATION}, False),
                         ({"prompt": "Capital of France?", "completion": " Paris"}, True)):
        with pytest.raises(CheckpointError, match="no chat template"):
            data.encode_example(record, tok, 512, chat=chat)


# Llama 2's rule, in a template small enough to read: roles alternate, user first
ALTERNATING_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


def tokenizer_with_template(smollm2_dir, folder, template):
    """SmolLM2's tokenizer with another chat template."""
    import shutil
    from tokenizer import load_tokenizer
    tcfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    tcfg["chat_template"] = template
    folder.mkdir(exist_ok=True)
    shutil.copy(smollm2_dir / "tokenizer.json", folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg))
    return load_tokenizer(folder)


@pytest.mark.smollm2
def test_a_conversation_the_chat_template_refuses_is_a_data_error_naming_it(smollm2_dir,
                                                                            tmp_path):
    """The template's raise_exception(message) is one DataError line: the data's name, the
    record (by its first words) and the template's message."""
    tok = tokenizer_with_template(smollm2_dir, tmp_path / "tok", ALTERNATING_TEMPLATE)
    good = {"messages": [{"role": "user", "content": "Capital of France?"},
                         {"role": "assistant", "content": "Paris"}]}
    bad = {"messages": [{"role": "user", "content": "Capital of Spain?"},
                        {"role": "user", "content": "And of Italy?"},
                        {"role": "assistant", "content": "Madrid, Rome"}]}
    assert data.encode_dataset([good], tok, 64, name="chat.jsonl")         # the template works
    with pytest.raises(DataError) as e:
        data.encode_dataset([good, bad], tok, 64, name="chat.jsonl")
    msg = str(e.value)
    assert msg.startswith("chat.jsonl: the record starting 'Capital of Spain?': the chat template")
    assert "(Conversation roles must alternate user/assistant/user/assistant/...)" in msg
    assert "\n" not in msg


@pytest.mark.smollm2
def test_a_question_the_chat_template_refuses_is_a_data_error_naming_it(smollm2_dir, tmp_path):
    """Multiple choice with chat: the question's prompt goes through the template too."""
    tok = tokenizer_with_template(smollm2_dir, tmp_path / "tok",
                                  "{{ raise_exception('a system message is required') }}")
    record = {"question": "Which is a colour?", "choices": ["red", "dog"], "answer": 0}
    with pytest.raises(DataError, match="the record starting 'Which is a colour[?]': the chat "
                                        "template .* refuses it [(]a system message is required"):
        data.encode_choices(record, tok, 64, chat=True)
