"""
Dataset formats and batching, shared by train.py and eval.py.

A dataset is a JSONL file (one JSON object per line) or a JSON file holding an array of
objects, all records in the same format:

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
        chat: rendered with the checkpoint's own chat template; loss on the assistant turns only
    {"text": "..."}
        language modelling: every token after BOS is a target
    {"prompt": "...", "completion": "..."}
        loss on the completion (+ EOS) only
    {"instruction": "...", "input": "...", "output": "..."}
        rendered with INSTRUCTION_TEMPLATE; loss on output (+ EOS); "input" may be "" or missing
    {"question": "...", "choices": ["...", ...], "answer": 2}
        multiple choice for eval; answer is an index into choices or the text of the right choice

A record's format is the first in FORMAT_ORDER whose required keys it has; other keys (an "id",
the "text" column of the Alpaca data beside its instruction/input/output) are ignored, with one
warning per file that lists them.

An encoded example is a pair (ids, target_mask) of equal length. target_mask[i] is True iff ids[i]
is a token the model must predict from ids[:i], so BOS and every prompt token are False. Prompt
and completion are tokenized separately and concatenated, so where the completion starts is known
by position, never guessed from token values.

collate() turns examples into next-token training tensors, again purely by position:

    ids          =  BOS   p1    p2    c1    c2    EOS   (p = prompt tokens, c = completion tokens)
    target_mask  =  F     F     F     T     T     T
    input_ids    =  BOS   p1    p2    c1    c2          (last token dropped: nothing follows it)
    labels       = -100  -100   c1    c2    EOS

labels[t] = ids[t+1] if target_mask[t+1] else -100, so the model's logits at position t are
scored against labels[:, t] (no shift left to do), and padding positions get -100 whatever value
pad_id has.
"""

import json
import warnings

import torch

from tokenizer import ChatTemplateError

# label value meaning "no loss here" (the default ignore_index of F.cross_entropy)
IGNORE_INDEX = -100

# format name -> (required keys, optional keys)
FORMATS = {
    "text": ({"text"}, set()),
    "prompt_completion": ({"prompt", "completion"}, set()),
    "instruction": ({"instruction", "output"}, {"input"}),
    "choice": ({"question", "choices", "answer"}, set()),
    "chat": ({"messages"}, set()),
}
# which format a record with the keys of several is read as: the most specific first (Alpaca's
# records hold "text" beside instruction/input/output)
FORMAT_ORDER = ("chat", "choice", "instruction", "prompt_completion", "text")

# A small fixed Alpaca-style template for {"instruction","input","output"} records when no chat
# format is used.
INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
INSTRUCTION_WITH_INPUT_TEMPLATE = ("### Instruction:\n{instruction}\n\n"
                                   "### Input:\n{input}\n\n### Response:\n")


class DataError(ValueError):
    """An expected problem with a dataset; the message is one line saying where and what to do."""


# -----------------------------------------------------------------------------
# reading and validating JSONL

def record_format(record):
    """Name of the format of one record ("chat", "choice", "instruction", "prompt_completion",
    "text"): the first of FORMAT_ORDER whose required keys the record has (ignored_keys names the
    others). Raises DataError (without a location; load_jsonl adds it) if no format's keys are
    there or a value has the wrong type."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    keys = set(record)
    for name in FORMAT_ORDER:
        if FORMATS[name][0] <= keys:
            _check_types(name, record)
            return name
    # no match: explain against the format whose required keys overlap most
    name, (required, optional) = max(FORMATS.items(), key=lambda kv: len(kv[1][0] & keys))
    expected = ", ".join(sorted(required | optional))
    if not required & keys:
        raise DataError(f"keys {sorted(keys)} match no format; use messages | text | prompt, "
                        f"completion | instruction, input, output | question, choices, answer")
    raise DataError(f"missing key {sorted(required - keys)[0]!r} "
                    f"(keys for this format: {expected})")


def ignored_keys(record, fmt):
    """The keys of a record that its format does not read."""
    required, optional = FORMATS[fmt]
    return set(record) - required - optional


def _check_types(name, record):
    def need_str(key, nonempty):
        value = record[key]
        if not isinstance(value, str):
            raise DataError(f"{key!r} must be a string, got {type(value).__name__}")
        if nonempty and not value:
            raise DataError(f"{key!r} is empty; give it some text or remove the line")

    if name == "text":
        need_str("text", nonempty=True)
    elif name == "prompt_completion":
        need_str("prompt", nonempty=False)
        need_str("completion", nonempty=True)
    elif name == "instruction":
        need_str("instruction", nonempty=True)
        need_str("output", nonempty=True)
        if "input" in record:
            need_str("input", nonempty=False)
    elif name == "chat":
        _check_messages(record["messages"])
    elif name == "choice":
        need_str("question", nonempty=False)
        choices = record["choices"]
        if not (isinstance(choices, list) and len(choices) >= 2
                and all(isinstance(c, str) and c for c in choices)):
            raise DataError("'choices' must be a list of at least 2 non-empty strings")
        answer_index(record)  # raises if the answer is not one of the choices


def _check_messages(messages):
    if not (isinstance(messages, list) and messages):
        raise DataError("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise DataError(f"messages[{i}] must be an object with a string 'role' and a string "
                            f"'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("no message has role 'assistant': there is nothing to learn; "
                        "add the assistant's answer")


def answer_index(record):
    """Index of the right choice of a multiple-choice record ("answer" is an index or the choice's
    text)."""
    answer, choices = record["answer"], record["choices"]
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(choices):
            raise DataError(f"'answer' {answer} is out of range for {len(choices)} choices "
                            f"(indices start at 0)")
        return answer
    if isinstance(answer, str):
        if answer not in choices:
            raise DataError(f"'answer' {answer!r} is not one of the choices; "
                            f"give its index or its exact text")
        return choices.index(answer)
    raise DataError(f"'answer' must be an index or the text of a choice, "
                    f"got {type(answer).__name__}")


def load_jsonl(path):
    """Read and validate a dataset -> list of record dicts, all of one format (see record_format).

    A JSONL file (blank lines are skipped) or, when the file's text starts with "[", a JSON array
    of records (alpaca_data.json). Every problem is a DataError naming the file and line (or
    record). Keys the format does not read are ignored, with one warning for the file."""
    try:
        with open(path, encoding="utf-8") as f:
            content = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; check the data path") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a directory, not a data file; give the .jsonl file in "
                        f"it") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); "
                        f"save the file as UTF-8") from None
    records, first_format, first_where, ignored = [], None, None, set()
    for where, record in _raw_records(path, content):
        try:
            fmt = record_format(record)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        if first_format is None:
            first_format, first_where = fmt, where.rpartition(", ")[2]
        elif fmt != first_format:
            raise DataError(f"{where}: a {fmt} record in a file of {first_format} records "
                            f"({first_where}); use one format per file")
        ignored |= ignored_keys(record, fmt)
        records.append(record)
    if not records:
        raise DataError(f"{path}: no records (the file is empty or blank); "
                        f"write one JSON object per line")
    if ignored:
        warnings.warn(f"{path}: ignored key(s) {', '.join(map(repr, sorted(ignored)))}, which "
                      f"{first_format} records do not use", stacklevel=2)
    return records


def _raw_records(path, content):
    """(location, parsed JSON value) of every record of a JSONL text or a JSON array text."""
    if content.lstrip().startswith("["):
        try:
            array = json.loads(content)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not a valid JSON array ({e.msg} at line {e.lineno}, "
                            f"column {e.colno}); fix the file, or write one JSON object per "
                            f"line") from None
        return [(f"{path}, record {i}", record) for i, record in enumerate(array, start=1)]
    out = []
    for line_number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}, line {line_number}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {line_number}: not valid JSON ({e.msg} at column "
                            f"{e.colno}); fix or remove the line") from None
    return out


# the field whose text starts a record of each format, to name the record in an error
FIRST_TEXT = {"text": "text", "prompt_completion": "prompt", "instruction": "instruction",
              "choice": "question"}


def record_excerpt(record, width=40):
    """The start of a record's first text (a chat record's first message), to name the record in
    an error once it has left its file (a line number no longer holds after a split)."""
    fmt = record_format(record)
    text = record["messages"][0]["content"] if fmt == "chat" else record[FIRST_TEXT[fmt]]
    return repr(text if len(text) <= width else text[:width] + "...")


def dataset_format(records):
    """Format name shared by all records of a dataset loaded with load_jsonl."""
    return record_format(records[0])


# -----------------------------------------------------------------------------
# rendering and tokenizing

def render(record, tok, chat=False):
    """(prompt_text, target_text) of a record: the text the model is given and the text it must
    produce. For "text" records the prompt is empty; for "choice" records the target is the right
    choice; for "chat" records the conversation up to its last assistant turn and that turn's
    content. With chat=True the prompt is wrapped in the checkpoint's chat template
    (tok.chat_prompt); a tokenizer without one is an error, not a silent plain prompt."""
    fmt = record_format(record)
    if fmt == "text":
        return "", record["text"]
    if fmt == "chat":
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return (tok.apply_chat_template(messages[:last], add_generation_prompt=True),
                messages[last]["content"])
    if fmt == "prompt_completion":
        user, target = record["prompt"], record["completion"]
        plain = user
    elif fmt == "instruction":
        extra = record.get("input", "")
        user = record["instruction"] + (f"\n\n{extra}" if extra else "")
        template = INSTRUCTION_WITH_INPUT_TEMPLATE if extra else INSTRUCTION_TEMPLATE
        plain = template.format(instruction=record["instruction"], input=extra)
        target = record["output"]
    else:  # choice
        user, target = record["question"], record["choices"][answer_index(record)]
        plain = user
    if not chat:
        return plain, target
    wrapped = tok.chat_prompt(user)
    if wrapped is None:
        raise DataError("chat=True but the tokenizer has no chat template; drop --chat")
    return wrapped, target


def _prepend_bos(ids, mask, tok):
    # exactly one BOS: add it unless the text already starts with it (e.g. a chat prompt that
    # opens with BOS)
    if tok.bos_id is not None and ids[:1] != [tok.bos_id]:
        return [tok.bos_id] + ids, [False] + mask
    return ids, mask


def encode_example(record, tok, max_len=None, chat=False):
    """record -> (ids, target_mask), two lists of the same length.

    ids = [BOS] + tokens(prompt) + tokens(target) + [EOS]; target_mask is True on the target
    tokens and EOS (the model must learn to stop). BOS only if tok.bos_id is not None.
    target_mask[0] is always False: the first token has nothing before it to be predicted from.
    With max_len the pair is cut to max_len tokens from the right, silently (so the EOS may be
    lost, and all targets may be); encode_dataset counts and reports that.
    "chat" records go to encode_chat (the template closes each turn: no EOS is added)."""
    try:
        if record_format(record) == "chat":
            ids, mask = encode_chat(record["messages"], tok)
            return (ids[:max_len], mask[:max_len]) if max_len is not None else (ids, mask)
        prompt_text, target_text = render(record, tok, chat)
    except ChatTemplateError as e:
        raise DataError(f"the record starting {record_excerpt(record)}: {e}") from None
    prompt_ids = tok.encode(prompt_text) if prompt_text else []
    target_ids = tok.encode(target_text) + [tok.eos_id]
    ids = prompt_ids + target_ids
    mask = [False] * len(prompt_ids) + [True] * len(target_ids)
    ids, mask = _prepend_bos(ids, mask, tok)
    mask[0] = False
    if max_len is not None:
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask


def assistant_spans(messages, tok):
    """(text, [(start, end), ...]): a conversation as the chat template writes it, and the
    character spans of the assistant turns in it, the only text that carries a loss.

    Assistant turn i is what the template adds between messages[:i] rendered with the opening of
    an assistant turn (add_generation_prompt) and messages[:i + 1]: its content and the end of
    its turn, up to and including the last EOS in it (for SmolLM2 "Paris<|im_end|>", without the
    newline that follows). This needs a template that renders a prefix of a conversation as a
    prefix of the whole; one that does not is an error naming the turn."""
    text = tok.apply_chat_template(messages)
    eos = tok.special_tokens.get("eos_token")
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:i], add_generation_prompt=True)
        through = tok.apply_chat_template(messages[:i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError(f"the chat template writes the conversation before assistant turn "
                            f"messages[{i}] differently once more follows, so the turn cannot be "
                            f"located; use prompt/completion records with --chat instead")
        start, end = len(before), len(through)
        if eos and (k := through.rfind(eos, start)) >= 0:
            end = k + len(eos)
        spans.append((start, end))
    return text, spans


def encode_chat(messages, tok):
    """A chat conversation -> (ids, target_mask): the template's text tokenized as one string,
    so the ids are those the checkpoint's chat format produces, and target_mask True on the tokens
    that start inside an assistant span (assistant_spans): masked by position, never by value."""
    text, spans = assistant_spans(messages, tok)
    ids, offsets = tok.encode_with_offsets(text)
    mask = [any(a <= start < b for a, b in spans) for start, _ in offsets]
    ids, mask = _prepend_bos(ids, mask, tok)
    mask[0] = False
    return ids, mask


def encode_dataset(records, tok, max_len, chat=False, name="dataset"):
    """Encode every record with encode_example, cutting each to max_len tokens.
    Warns once (with counts) if any example was truncated; drops examples with no target left."""
    examples, n_truncated, n_dropped = [], 0, 0
    for record in records:
        try:
            ids, mask = encode_example(record, tok, None, chat)
        except DataError as e:
            raise DataError(f"{name}: {e}") from None
        if len(ids) > max_len:
            n_truncated += 1
            ids, mask = ids[:max_len], mask[:max_len]
        if not any(mask):
            n_dropped += 1
            continue
        examples.append((ids, mask))
    if n_truncated:
        warnings.warn(f"{name}: {n_truncated} of {len(records)} examples are longer than "
                      f"max_len={max_len} tokens and were cut from the right; {n_dropped} had no "
                      f"target token left and were dropped (raise max_len or shorten the examples)",
                      stacklevel=2)
    if not examples:
        raise DataError(f"{name}: no example has a target token within max_len={max_len}; "
                        f"raise max_len")
    return examples


def encode_choices(record, tok, max_len, chat=False):
    """Multiple-choice record -> ([(ids, target_mask) for each choice], index of the right choice).

    Each candidate is [BOS] + tokens(question) + tokens(choice), with the choice tokens as targets
    and no EOS (the usual log-likelihood scoring: sum of log p(choice tokens | question)). If a
    candidate is longer than max_len, the question is cut from the left (after BOS) so that every
    choice token is still scored."""
    try:
        prompt_text, _ = render(record, tok, chat)
    except ChatTemplateError as e:
        raise DataError(f"the record starting {record_excerpt(record)}: {e}") from None
    prompt_ids = tok.encode(prompt_text) if prompt_text else []
    candidates = []
    for choice in record["choices"]:
        choice_ids = tok.encode(choice)
        ids, mask = _prepend_bos(prompt_ids + choice_ids,
                                 [False] * len(prompt_ids) + [True] * len(choice_ids), tok)
        if len(ids) > max_len:
            head = 1 if tok.bos_id is not None else 0  # keep the BOS
            if len(choice_ids) + head >= max_len:
                raise DataError(f"choice {choice[:40]!r} alone is {len(choice_ids)} tokens, "
                                f"not less than max_len={max_len}; raise max_len")
            keep = max_len - head
            ids, mask = ids[:head] + ids[-keep:], mask[:head] + mask[-keep:]
            warnings.warn(f"multiple-choice questions longer than max_len={max_len} "
                          f"are cut from the left")
        mask[0] = False
        candidates.append((ids, mask))
    return candidates, answer_index(record)


# -----------------------------------------------------------------------------
# batching

def collate(examples, pad_id):
    """List of (ids, target_mask) -> {"input_ids": LongTensor [B, T], "labels": LongTensor [B, T],
    "attention_mask": LongTensor [B, T], 1 where an example's token is, 0 on padding}.

    T = (longest example in the batch) - 1: the last token of an example is never an input, since
    nothing follows it. Row b holds ids[:-1] then pad_id; labels[b, t] = ids[t + 1] where
    target_mask[t + 1], else -100 (prompt, padding, and anything past the example). Logits at
    position t are compared with labels[:, t]. Right padding is safe with a causal model: real
    tokens never attend to the padding after them."""
    if not examples:
        raise DataError("collate got an empty list of examples")
    B = len(examples)
    T = max(len(ids) for ids, _ in examples) - 1
    if T < 1:
        raise DataError("every example in the batch is a single token; "
                        "there is nothing to predict")
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    for b, (ids, mask) in enumerate(examples):
        if len(ids) != len(mask):
            raise DataError(f"example {b}: {len(ids)} ids but {len(mask)} target_mask entries")
        n = len(ids) - 1
        next_ids = torch.tensor(ids[1:], dtype=torch.long)  # (n,)
        is_target = torch.tensor(mask[1:], dtype=torch.bool)  # (n,)
        input_ids[b, :n] = torch.tensor(ids[:-1], dtype=torch.long)
        labels[b, :n] = torch.where(is_target, next_ids, IGNORE_INDEX)
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def count_label_tokens(batch):
    """Number of positions that carry a loss in a collated batch (train.py divides the summed loss
    of an optimizer step by the total over its micro-batches)."""
    return int((batch["labels"] != IGNORE_INDEX).sum())


def count_input_tokens(batch):
    """Number of real tokens in a collated batch, padding excluded (train.py's tokens_per_s)."""
    return int(batch["attention_mask"].sum())


def split_validation(records, fraction, seed):
    """(training records, validation records): a fraction of the records, at least one, drawn by
    a permutation seeded with `seed`, held out; the same split for the same seed (on resume)."""
    if not 0 < fraction < 1:
        raise DataError(f"--val-fraction {fraction} must be between 0 and 1 (e.g. 0.05)")
    n_val = max(1, round(fraction * len(records)))
    if n_val >= len(records):
        raise DataError(f"--val-fraction {fraction} of {len(records)} records leaves none to "
                        f"train on; lower it")
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = set(order[:n_val])
    return ([r for i, r in enumerate(records) if i not in held_out],
            [records[i] for i in sorted(held_out)])


def iter_batches(examples, batch_size, pad_id):
    """Collated batches in dataset order, last one possibly smaller (for evaluation)."""
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start:start + batch_size], pad_id)


class Batcher:
    """Endless shuffled micro-batches with a cursor that makes resume exact.

    Epoch e visits the examples in the order torch.randperm(n) drawn from a generator seeded with
    seed + e, so the order depends only on (seed, epoch) and the cursor (epoch, position) is all a
    checkpoint needs: a Batcher restored with load_state_dict() yields exactly the batches the
    saved one would have yielded next.

    Each step consumes batch_size * world_size examples of the epoch's order; rank r gets the r-th
    slice of batch_size. The leftover examples at the end of an epoch (fewer than one step) are
    skipped, a different leftover each epoch, so every micro-batch on every rank has exactly
    batch_size examples."""

    def __init__(self, examples, batch_size, pad_id, seed=0, shuffle=True, rank=0, world_size=1):
        step_size = batch_size * world_size
        if batch_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"bad batching: batch_size={batch_size}, rank={rank}, "
                            f"world_size={world_size}")
        if len(examples) < step_size:
            raise DataError(f"the dataset has {len(examples)} examples, fewer than one step needs "
                            f"(batch_size {batch_size} x world_size {world_size}); "
                            f"lower the batch size")
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        # the cursor: position = examples of this epoch's order already used
        self.epoch, self.position = 0, 0
        self._order, self._order_epoch = None, None

    @property
    def steps_per_epoch(self):
        return len(self.examples) // (self.batch_size * self.world_size)

    def epoch_order(self, epoch):
        """Indices of the examples in the order epoch `epoch` visits them."""
        if not self.shuffle:
            return list(range(len(self.examples)))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.examples), generator=generator).tolist()

    def next_batch(self):
        step_size = self.batch_size * self.world_size
        # not enough left for a full step: next epoch
        if self.position + step_size > len(self.examples):
            self.epoch, self.position = self.epoch + 1, 0
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = self.epoch_order(self.epoch), self.epoch
        start = self.position + self.rank * self.batch_size
        batch = [self.examples[i] for i in self._order[start:start + self.batch_size]]
        self.position += step_size
        return collate(batch, self.pad_id)

    def __iter__(self):
        return self

    def __next__(self):
        return self.next_batch()

    def state_dict(self):
        # plain ints only: safe to save with torch.save and read back with
        # torch.load(weights_only=True), or JSON
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_examples": len(self.examples), "batch_size": self.batch_size,
                "world_size": self.world_size}

    def load_state_dict(self, state):
        for key in ("seed", "num_examples", "batch_size", "world_size"):
            mine = len(self.examples) if key == "num_examples" else getattr(self, key)
            if state[key] != mine:
                raise DataError(f"the data cursor was saved with {key}={state[key]} "
                                f"but this run has {key}={mine}; "
                                f"resume with the same data, seed and batch settings")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
