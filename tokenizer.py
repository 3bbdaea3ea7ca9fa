"""The checkpoint's tokenizer.json (via the `tokenizers` library), its stop tokens, and ChatML prompts."""
import os

from model import read_json, resolve_checkpoint


class Tokenizer:
    def __init__(self, path_or_repo_id):
        from tokenizers import Tokenizer as HFTokenizer
        path = resolve_checkpoint(path_or_repo_id)
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: file not found (the checkpoint has no tokenizer.json)")
        self.path, self.tok = path, HFTokenizer.from_file(file)
        # ids the tokenizer can decode; Qwen's embedding has more rows (151936) than this, and sample.py masks the rest
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.stop_ids = sorted(self._stop_ids())
        self.pad_id = self.stop_ids[0]  # any id works: masks come from lengths, never from comparing with pad

    def _stop_ids(self):
        """eos_token_id of config.json and generation_config.json (an int or a list), plus <|im_end|>."""
        ids = set()
        for name in ("config.json", "generation_config.json"):
            f = os.path.join(self.path, name)
            eos = read_json(f).get("eos_token_id") if os.path.isfile(f) else None
            ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
        im_end = self.tok.token_to_id("<|im_end|>")
        if im_end is not None:
            ids.add(im_end)  # ChatML ends every turn with it; base Qwen configs list only <|endoftext|>
        if not ids:
            raise ValueError(f"{self.path}: no eos_token_id in config.json/generation_config.json and no <|im_end|>")
        return ids

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_plain(self, text):
        """encode, reading special-token strings as plain text (untrusted text cannot forge a chat turn)."""
        # Untrusted text (a completion that a judge reads, judge.py) that spells "<|im_end|>" gets the characters,
        # not the token, so it cannot forge a chat turn.
        self.tok.encode_special_tokens = True  # tokenizers >= 0.15; `encode` above splits on them whatever its flag
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        finally:
            self.tok.encode_special_tokens = False

    def decode(self, ids, skip_special_tokens=False):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @staticmethod
    def chatml(messages):
        """<|im_start|>role\\ncontent<|im_end|>\\n per message, then <|im_start|>assistant\\n (Qwen and SmolLM2)."""
        # Unlike the checkpoints' jinja templates, no default system prompt is injected: pass one explicitly.
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + "<|im_start|>assistant\n"

    def encode_chat(self, messages):
        return self.encode(self.chatml(messages))
