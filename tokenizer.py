"""
The tokenizer of a checkpoint folder: HF `tokenizers` with BOS/EOS made explicit, and chat prompts.

model.load_model_and_tokenizer returns one beside the model; eval.py and the tests load one with
load_tokenizer; data.py renders examples through its encode / chat_prompt. The folder is an HF one:
tokenizer.json, with the special tokens named in tokenizer_config.json (or special_tokens_map.json)
and their ids, as a fallback, in config.json / generation_config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from fileio import CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


class Tokenizer:
    """A thin wrapper over HF `tokenizers` that makes BOS/EOS explicit.

    encode(text, bos, eos) never relies on the tokenizer's post-processor (Llama 3 adds BOS there),
    so a sequence gets exactly one BOS when asked for, and none otherwise. `bos_id` is None for
    models trained without a BOS (SmolLM2): asking for BOS is then a no-op.
    """

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as HFTokenizer
        path = Path(path)
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
        self.chat_template = tcfg.get("chat_template")
        self.chat_format = self._detect_chat_format()

    def _detect_chat_format(self):
        has = lambda token: self.tk.token_to_id(token) is not None
        if has("<|im_start|>") and has("<|im_end|>"):
            return "chatml"                      # SmolLM2, Qwen
        if has("<|start_header_id|>"):
            return "llama3"
        return None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id is not None and not (ids and ids[0] == self.bos_id):
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    def chat_prompt(self, user: str, system: str | None = None) -> str | None:
        """The text of a one-turn conversation up to the assistant's answer; None for a base model.

        ChatML (SmolLM2), one line per turn:
            <|im_start|>system\\n...<|im_end|>\\n
            <|im_start|>user\\n...<|im_end|>\\n
            <|im_start|>assistant\\n
        The answer ends with eos (<|im_end|> for SmolLM2-Instruct). SmolLM2's template inserts its
        default system message when none is given; so do we, so that prompts match what the model
        was tuned on.
        """
        if self.chat_format == "chatml":
            smollm = "You are a helpful AI assistant named SmolLM"
            if system is None and self.chat_template and smollm in self.chat_template:
                system = smollm + ", trained by Hugging Face"
            head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
            return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        if self.chat_format == "llama3":
            head = (f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
                    if system else "")
            return (f"{head}<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
                    f"<|start_header_id|>assistant<|end_header_id|>\n\n")
        return None


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
