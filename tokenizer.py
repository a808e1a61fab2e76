"""
Tokenizer for Qwen2 / Qwen2.5 / Qwen3 Hugging Face checkpoints, without `transformers`.

The BPE itself is the `tokenizers` library reading the checkpoint's own tokenizer.json, so ids are
exactly the checkpoint's. What we add on top:
  - the special ids the rest of the code needs (eos, pad, <|im_start|>, <|im_end|>, stop ids);
  - `render_chat`: Qwen's ChatML for plain system/user/assistant turns, written out in Python but
    byte-identical to what the checkpoint's jinja chat template renders (tests compare against
    transformers' apply_chat_template). Which flavour to render is read off the template text:
      "qwen2"          Qwen2 / Qwen2.5 (and -Math/-Coder): the template inserts a default system
                       message when none is given; we extract that sentence from the template.
      "qwen3"          Qwen3 hybrid thinking (template mentions `enable_thinking`): no default
                       system; <think> blocks kept only after the last user query; with
                       enable_thinking=False the generation prompt pre-fills an empty think block.
      "qwen3_thinking" Qwen3 Thinking-2507: same history rules, the prompt always opens <think>.
      "qwen3_instruct" Qwen3 Instruct-2507 style ChatML: no default system, no think handling.
      "chatml"         no template in the checkpoint: plain ChatML.
  - `add_tokens` (the NPR tags, as non-special added tokens) and `save_pretrained`, which writes
    files that both this class and transformers' AutoTokenizer load to the same ids.
"""

import json
import os
import re

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

# Qwen's default system sentence sits in the template as a jinja string literal, e.g.
#   {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. ...<|im_end|>\n' }}
# (the `\n` are backslash-n escapes in the template source). The `[^']` excludes the other
# system line, `'<|im_start|>system\n' + messages[0]['content'] + ...`.
DEFAULT_SYSTEM_RE = re.compile(r"'<\|im_start\|>system\\n([^']*)<\|im_end\|>\\n'")
THINKING_PROMPT = "'<|im_start|>assistant\\n<think>\\n'"  # Thinking-2507's generation prompt


def _token_str(tok):
    # tokenizer_config.json stores special tokens either as strings or as serialised AddedTokens
    return tok.get("content") if isinstance(tok, dict) else tok


def detect_chat_variant(template):
    """Returns (variant, default_system) for a chat template string (or None)."""
    if not template:
        return "chatml", None
    if "<|im_start|>" not in template:
        return "unknown", None  # not ChatML: render_chat refuses rather than guess
    if "enable_thinking" in template:
        return "qwen3", None
    if THINKING_PROMPT in template:
        return "qwen3_thinking", None
    m = DEFAULT_SYSTEM_RE.search(template)
    if m:
        # jinja decodes its string literals with the unicode-escape codec; do the same
        return "qwen2", m.group(1).encode("ascii", "backslashreplace").decode("unicode-escape")
    return "qwen3_instruct", None


class Tokenizer:
    def __init__(self, tk, config=None, chat_template=None):
        self._tk = tk  # tokenizers.Tokenizer: BPE model, pre-tokenizer, added tokens
        self.config = dict(config or {})  # the raw tokenizer_config.json, kept for save_pretrained
        self.chat_template = chat_template
        self.chat_variant, self.default_system = detect_chat_variant(chat_template)
        # special ids; a base checkpoint (or no config) ends documents with <|endoftext|>
        self.im_start_id = tk.token_to_id("<|im_start|>")
        self.im_end_id = tk.token_to_id("<|im_end|>")
        self.endoftext_id = tk.token_to_id("<|endoftext|>")
        eos = _token_str(self.config.get("eos_token"))
        self.eos_id = tk.token_to_id(eos) if eos else None
        if self.eos_id is None:
            self.eos_id = self.endoftext_id if self.endoftext_id is not None else self.im_end_id
        pad = _token_str(self.config.get("pad_token"))
        self.pad_id = tk.token_to_id(pad) if pad else None
        if self.pad_id is None:
            self.pad_id = self.eos_id
        # an instruct model ends its turn with <|im_end|> even where eos says <|endoftext|>
        self.stop_ids = {i for i in (self.eos_id, self.im_end_id, self.endoftext_id) if i is not None}

    @classmethod
    def from_pretrained(cls, path):
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer folder not found: {path}")
        tk_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tk_file):
            raise FileNotFoundError(f"no tokenizer.json in {path} (expected {tk_file})")
        config = {}
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            try:
                with open(cfg_file, encoding="utf-8") as f:
                    config = json.load(f)
            except ValueError as e:
                raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
        # transformers >= 4.43 may save the template as its own file; it wins over the config's
        template = config.get("chat_template")
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        try:
            tk = HFTokenizer.from_file(tk_file)
        except Exception as e:  # the tokenizers library's error names no file
            raise ValueError(f"{tk_file}: not a readable tokenizer.json ({e})") from None
        return cls(tk, config, template)

    # ---- ids <-> text ----

    def encode(self, text):
        # no BOS/EOS: Qwen uses none, and chat markup comes from render_chat. Added tokens written
        # in the text (<|im_start|>, the NPR tags) are matched before BPE and become single ids.
        return self._tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=False):
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_piece(self, token_id):
        # a byte-level piece can hold part of a UTF-8 character and then decodes to U+FFFD;
        # streaming printers should decode the running sequence instead
        return self._tk.decode([int(token_id)], skip_special_tokens=False)

    def token_to_id(self, token):
        return self._tk.token_to_id(token)

    @property
    def vocab_size(self):
        # BPE vocab + added tokens; the model's embedding may have more rows (151936 for Qwen)
        return self._tk.get_vocab_size(with_added_tokens=True)

    def __len__(self):
        return self.vocab_size

    @property
    def max_id(self):
        # the largest token id, added tokens included: a model needs max_id + 1 embedding rows
        return max(self._tk.get_vocab(with_added_tokens=True).values())

    def add_tokens(self, tokens):
        """Registers `tokens` (the NPR tags) as added tokens: one id each, also inside running text,
        but NOT special, like Qwen's own <think>: readers that decode with skip_special_tokens=True
        (vLLM, transformers pipelines) must keep them in the answer. New ids go after the current
        vocabulary; already added tokens keep their id (and flags). For real Qwen checkpoints the
        new ids stay below the embedding size (151936), so the model needs no resize."""
        added = {t.content for t in self._tk.get_added_tokens_decoder().values()}
        new = [t for t in tokens if t not in added]
        # normalized=False: matched on the raw text, like Qwen's own added tokens
        self._tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in new])
        return [self._tk.token_to_id(t) for t in tokens]

    # ---- chat ----

    def render_chat(self, messages, add_generation_prompt=True, enable_thinking=None):
        """ChatML text for plain system/user/assistant turns with string contents, equal to the
        checkpoint's template under apply_chat_template(tokenize=False). `enable_thinking` only
        matters for the Qwen3 hybrid template: None renders what the template does without the
        variable (no think block), False pre-fills an empty think block (the non-thinking mode the
        stages run in, npr.chat_prompt), True is the same as None.
        The flavour comes from `self.chat_variant` (and `self.default_system` for "qwen2"), both
        detected from the template and free to be overridden."""
        v = self.chat_variant
        if v == "unknown":
            raise ValueError("chat template is not Qwen ChatML; set tokenizer.chat_variant to one of "
                             "'qwen2', 'qwen3', 'qwen3_thinking', 'qwen3_instruct', 'chatml'")
        if not messages:
            raise ValueError("render_chat needs at least one message")
        for m in messages:
            if m["role"] not in ("system", "user", "assistant") or not isinstance(m["content"], str):
                raise ValueError(f"render_chat supports plain system/user/assistant string turns, got {m}")
        think = v in ("qwen3", "qwen3_thinking")
        out = []
        if v == "qwen2" and messages[0]["role"] != "system":
            out.append(f"<|im_start|>system\n{self.default_system}<|im_end|>\n")

        def is_query(m):  # a user turn that only wraps a <tool_response> is not a query
            c = m["content"]
            return m["role"] == "user" and not (c.startswith("<tool_response>") and c.endswith("</tool_response>"))

        # Qwen3: think blocks survive only in assistant turns after the last user query
        last_query = max((i for i, m in enumerate(messages) if is_query(m)), default=len(messages) - 1)
        for i, m in enumerate(messages):
            role, content = m["role"], m["content"]
            if role != "assistant" or not think:
                out.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
                continue
            # split "<think>r</think>c" the way the template does (reasoning_content field wins)
            reasoning = m.get("reasoning_content")
            if not isinstance(reasoning, str):
                reasoning = ""
                if "</think>" in content:
                    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                    content = content.split("</think>")[-1].lstrip("\n")
            if i > last_query and (i == len(messages) - 1 or reasoning):
                reasoning, content = reasoning.strip("\n"), content.lstrip("\n")
                out.append(f"<|im_start|>assistant\n<think>\n{reasoning}\n</think>\n\n{content}<|im_end|>\n")
            else:
                out.append(f"<|im_start|>assistant\n{content}<|im_end|>\n")
        if add_generation_prompt:
            out.append("<|im_start|>assistant\n")
            if v == "qwen3" and enable_thinking is False:  # the template tests `is false`
                out.append("<think>\n\n</think>\n\n")
            elif v == "qwen3_thinking":
                out.append("<think>\n")
        return "".join(out)

    # ---- saving ----

    def save_pretrained(self, path):
        """Writes tokenizer.json + tokenizer_config.json (the loaded config with its unknown fields
        kept, and added_tokens_decoder rewritten to include tokens added since loading)."""
        os.makedirs(path, exist_ok=True)
        self._tk.save(os.path.join(path, "tokenizer.json"))
        cfg = dict(self.config)
        # transformers' Qwen2Tokenizer rebuilds the tokenizer from the vocab/merges and takes its
        # added tokens from this table alone, so every added token must be listed here
        cfg["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                     "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
            for i, t in sorted(self._tk.get_added_tokens_decoder().items())
        }
        cfg["eos_token"] = self._tk.id_to_token(self.eos_id) if self.eos_id is not None else None
        cfg["pad_token"] = self._tk.id_to_token(self.pad_id) if self.pad_id is not None else None
        # without a class, AutoTokenizer has nothing to go on; the generic fast tokenizer loads
        # tokenizer.json exactly as written (a Qwen checkpoint keeps its own Qwen2Tokenizer)
        cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        cfg.setdefault("clean_up_tokenization_spaces", False)  # decode must not touch spaces
        cfg.setdefault("bos_token", None)
        cfg.setdefault("add_bos_token", False)
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
            jinja_file = os.path.join(path, "chat_template.jinja")
            if os.path.isfile(jinja_file):  # a stale one would override the config's
                with open(jinja_file, "w", encoding="utf-8") as f:
                    f.write(self.chat_template)
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)
        added_file = os.path.join(path, "added_tokens.json")
        if os.path.isfile(added_file):  # a legacy copy of the same table (content -> id): keep it in step
            with open(added_file, "w", encoding="utf-8") as f:
                json.dump({t.content: i for i, t in sorted(self._tk.get_added_tokens_decoder().items())},
                          f, indent=2, ensure_ascii=False)
