"""
The tokenizer of a checkpoint folder: HF `tokenizers` with BOS/EOS made explicit, and the
checkpoint's own chat template.

model.load_model_and_tokenizer returns one beside the model; eval.py and the tests load one with
load_tokenizer; data.py renders examples through its encode / chat_prompt / apply_chat_template.
The folder is an HF one: tokenizer.json, with the special tokens named in tokenizer_config.json (or
special_tokens_map.json) and their ids, as a fallback, in config.json / generation_config.json; the
chat template is tokenizer_config.json's "chat_template" or the file chat_template.jinja.
"""

from __future__ import annotations

import json
from pathlib import Path

from fileio import CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


class ChatTemplateError(ValueError):
    """A chat template refused a conversation: its raise_exception(...) (Llama 2's "Conversation
    roles must alternate user/assistant/user/assistant/...") or another error while rendering.
    data.py names the record; the message is the template's."""


class Tokenizer:
    """A thin wrapper over HF `tokenizers` that makes BOS/EOS explicit.

    encode(text, bos, eos) never relies on the tokenizer's post-processor (Llama 3 adds BOS there),
    so a sequence gets exactly one BOS when asked for, and none otherwise. `bos_id` is None for
    models trained without a BOS (SmolLM2): asking for BOS is then a no-op.
    """

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as HFTokenizer
        path = Path(path)
        self.path = path
        file = path / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(f"{file}: not found; the checkpoint folder needs the HF "
                                  f"tokenizer.json")
        try:
            self.tk = HFTokenizer.from_file(str(file))
        except Exception as e:
            raise CheckpointError(f"{file}: cannot be read ({str(e).splitlines()[0]}); "
                                  f"download it again") from None
        tcfg = _read_json(path / "tokenizer_config.json")
        special = _read_json(path / "special_tokens_map.json")
        tcfg.update({k: v for k, v in special.items() if k not in tcfg})
        mcfg = _read_json(path / "config.json")
        gcfg = _read_json(path / "generation_config.json")

        def token_id(key):      # a token named in tokenizer_config, else an id in the configs
            tok = tcfg.get(key)
            if isinstance(tok, dict):
                tok = tok.get("content")
            if isinstance(tok, str) and self.tk.token_to_id(tok) is not None:
                return self.tk.token_to_id(tok)
            i = gcfg.get(f"{key}_id", mcfg.get(f"{key}_id"))
            return i[0] if isinstance(i, list) else i

        bos = token_id("bos_token")
        add_bos = tcfg.get("add_bos_token")
        if add_bos is None:     # Llama 3: BOS comes from the post-processor template
            add_bos = bos is not None and bos in self.tk.encode("a", add_special_tokens=True).ids
        self.bos_id = bos if add_bos else None
        self.eos_id = token_id("eos_token")
        if self.eos_id is None:
            raise CheckpointError(f"{path}: no EOS token in tokenizer_config.json or config.json")
        pad = token_id("pad_token")
        self.pad_id = pad if pad is not None else self.eos_id
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        # the special tokens' text, as chat templates use them ({{ bos_token }}, {{ eos_token }})
        ids = {key: token_id(key) for key in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.special_tokens = {key: self.tk.id_to_token(i) for key, i in ids.items()
                               if i is not None and self.tk.id_to_token(i) is not None}
        self.chat_template = chat_template_source(tcfg, path)
        self._compiled_template = None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id is not None and not (ids and ids[0] == self.bos_id):
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """ids of `text` (no BOS/EOS added) and each token's (start, end) character span in it:
        how data.py finds which tokens a span of the text became."""
        enc = self.tk.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The text of a conversation as the checkpoint's chat template writes it, rendered as
        transformers does (jinja2, sandboxed: a template from a downloaded folder cannot reach
        Python objects); add_generation_prompt appends the opening of the assistant's turn."""
        if self.chat_template is None:
            raise CheckpointError(f"{self.path}: the checkpoint has no chat template "
                                  f"(tokenizer_config.json 'chat_template' or "
                                  f"chat_template.jinja); use a chat (Instruct) model, or data "
                                  f"and flags without chat")
        import jinja2
        if self._compiled_template is None:
            self._compiled_template = compile_chat_template(self.chat_template)
        try:
            return self._compiled_template.render(messages=messages,
                                                  add_generation_prompt=add_generation_prompt,
                                                  **self.special_tokens)
        except jinja2.exceptions.TemplateError as e:
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise ChatTemplateError(f"the chat template of {self.path} refuses it ({reason}); fix "
                                    f"the record, or use a checkpoint whose template accepts "
                                    f"it") from None

    def chat_prompt(self, user: str, system: str | None = None) -> str:
        """The text of a one-turn conversation up to the assistant's answer, from the chat
        template; for SmolLM2 (ChatML, its default system message inserted by the template):
            <|im_start|>system\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\n
            <|im_start|>user\n{user}<|im_end|>\n
            <|im_start|>assistant\n
        The answer then ends with EOS (<|im_end|> for SmolLM2-Instruct). A checkpoint without a
        template is a CheckpointError."""
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": user})
        return self.apply_chat_template(messages, add_generation_prompt=True)


def chat_template_source(tcfg: dict, path: Path) -> str | None:
    """The chat template of a checkpoint: tokenizer_config.json's "chat_template" (a string, or a
    list of named templates, of which "default" is used), else chat_template.jinja."""
    template = tcfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    return template


def compile_chat_template(source: str):
    """A jinja2 template in the environment transformers renders chat templates in: sandboxed
    (ImmutableSandboxedEnvironment), trim_blocks and lstrip_blocks, loop controls, a tojson that
    keeps non-ASCII text, raise_exception and strftime_now. {% generation %} blocks (transformers
    marks assistant text with them) render their body: data.py finds the assistant's text by
    rendering, not by these marks."""
    import json
    from datetime import datetime

    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise CheckpointError(f"the checkpoint's chat template does not parse ({e.message}, "
                              f"line {e.lineno})") from None


def _read_json(p: Path) -> dict:
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: invalid JSON ({e}); fix or delete the file") from None


def load_tokenizer(path: str | Path, vocab_rows: int | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint folder (model.resolve_checkpoint turns a name into one).

    With vocab_rows (the embedding's row count), a tokenizer with more ids is an error: an id past
    the last row would index out of the embedding.
    """
    path = Path(path)
    tok = Tokenizer(path)
    if vocab_rows is not None and tok.vocab_size > vocab_rows:
        raise CheckpointError(f"{path / 'tokenizer.json'}: tokenizer has {tok.vocab_size} tokens "
                              f"but the model's embedding has {vocab_rows} rows; use the tokenizer "
                              f"that belongs to this checkpoint")
    return tok
