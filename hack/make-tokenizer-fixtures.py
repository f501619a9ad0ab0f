#!/usr/bin/env python3
"""Builds the tokenizer and chat-template test fixtures.

  tests/fixtures/tokenizer/spbpe/      a small SentencePiece-style (Llama 2 /
                                       Mistral) BPE with byte fallback,
                                       trained here on a generated corpus
  tests/fixtures/tokenizer/smollm2/    SmolLM2's byte-level BPE, rebuilt from
                                       the GGUF model's tokenizer metadata
  tests/fixtures/tokenizer/corpus.json the strings the C tokenizer is checked on
  tests/fixtures/tokenizer/*/goldens.json  HF `tokenizers` ids and decodes
  tests/fixtures/tokenizer/variants.json   both tokenizers with pipeline parts
                                       swapped, with HF's ids on part of the corpus
  tests/fixtures/tokenizer/gguf/       tokenizer-only GGUF files (spbpe as a
                                       llama.cpp SentencePiece vocabulary, and
                                       files the loader must refuse)
  tests/fixtures/chat/goldens.json     chat templates rendered with jinja2 the
                                       way transformers' apply_chat_template does

Everything is deterministic: running it twice gives identical files.

usage: hack/make-tokenizer-fixtures.py [spbpe|smollm2|corpus|goldens|variants|gguf|chat ...]
       (no argument: all of them, in that order)
"""

import json
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKDIR = os.path.join(ROOT, "tests", "fixtures", "tokenizer")
CHATDIR = os.path.join(ROOT, "tests", "fixtures", "chat")
MODEL = os.environ.get("MODEL", os.path.join(ROOT, "models", "smollm2-135m-instruct-q4_1.gguf"))


def write_json(path, obj, indent=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent, sort_keys=False)
        f.write("\n")


# ---------------------------------------------------------------------------
# Chat templates, written out as they appear in each model family's
# tokenizer_config.json.

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}"
    "{% set loop_messages = messages %}"
    "{% set system_message = false %}"
    "{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}"
    "{% set content = message['content'] %}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)


# ---------------------------------------------------------------------------
# spbpe: a SentencePiece-style BPE trained on text generated here.

SP_WORDS = (
    "the of and to in is that it was for on are as with his they at be this from "
    "have or by one had not but what all were when we there can an your which their "
    "said if do will each about how up out them then she many some so these would "
    "other into has more her two like him see time could no make than first been its "
    "who now people my made over did down only way find use may water long little very "
    "after words called just where most know get through back much before go good new "
    "write our used me man too any day same right look think also around another came "
    "come work three word must because does part even place well such here take why "
    "things help put years different away again off went old number great tell men say "
    "small every found still between name should home big give air line set own under "
    "read last never us left end along while might next sound below saw something "
    "thought both few those always looked show large often together asked house world "
    "going want school important until form food keep children feet land side without "
    "boy once animals life enough took sometimes four head above kind began almost live "
    "page got earth need far hand high year mother light parts country father let night "
    "following picture being study second eyes soon times story boys since white days "
    "ever paper hard near sentence better best across during today others however sure "
    "means knew trying small token model server adapter request stream memory kernel "
    "matrix vector layer weight cache batch prompt answer question computer program"
).split()

SP_PUNCT = [".", ",", "!", "?", ";", ":"]


def sp_corpus():
    rng = random.Random(1234)
    lines = []
    for _ in range(4000):
        n = rng.randint(4, 16)
        words = [rng.choice(SP_WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words[0] = words[0].capitalize()
        if rng.random() < 0.2:
            words.insert(rng.randint(0, len(words)), str(rng.randint(0, 2025)))
        line = " ".join(words) + rng.choice(SP_PUNCT)
        lines.append(line)
    # a little accented text and code so that some of those merge too
    extra = [
        "café naïve résumé über straße déjà vu",
        "def main(): return 0",
        "int main(void) { return 0; }",
        '{"key": "value", "n": 42}',
    ]
    for i in range(200):
        lines.append(extra[i % len(extra)])
    return lines


def gen_spbpe():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = ["<0x%02X>" % b for b in range(256)]
    target_vocab = 512

    # Train with whitespace split into "▁word" pieces, as SentencePiece does,
    # then assemble the final Llama-2-shaped tokenizer by hand.
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=target_vocab - len(byte_tokens),
        special_tokens=specials,
        limit_alphabet=64,
        show_progress=False,
    )
    trainer_tok.train_from_iterator(sp_corpus(), trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    by_id = sorted(trained["vocab"].items(), key=lambda kv: kv[1])

    vocab = {}
    for t in specials + byte_tokens:
        vocab[t] = len(vocab)
    for t, _ in by_id:
        if t not in vocab:
            vocab[t] = len(vocab)
    merges = []
    for m in trained["merges"]:
        a, b = m if isinstance(m, list) else m.split(" ")
        merges.append((a, b))

    model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0",
        pair="<s>:0 $A:0 <s>:1 $B:1",
        special_tokens=[("<s>", vocab["<s>"])],
    )

    out = os.path.join(TOKDIR, "spbpe")
    os.makedirs(out, exist_ok=True)
    # Merges are written as "a b" strings, the older form Llama 2 and
    # Mistral files use (the SmolLM2 fixture has the newer [a, b] pairs).
    doc = json.loads(tok.to_str())
    doc["model"]["merges"] = ["%s %s" % (a, b) for a, b in merges]
    write_json(os.path.join(out, "tokenizer.json"), doc, indent=2)
    check = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    assert check.encode("hello world").ids == tok.encode("hello world").ids
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": 4096,
        "tokenizer_class": "LlamaTokenizer",
        "chat_template": LLAMA2_TEMPLATE,
    }
    write_json(os.path.join(out, "tokenizer_config.json"), config, indent=2)
    size = os.path.getsize(os.path.join(out, "tokenizer.json"))
    print("spbpe: vocab %d, merges %d, tokenizer.json %d bytes" % (tok.get_vocab_size(), len(merges), size))
    assert tok.get_vocab_size() <= target_vocab + 8
    assert size < 100_000


# ---------------------------------------------------------------------------
# smollm2: the byte-level BPE of SmolLM2, rebuilt from the GGUF metadata the
# way its tokenizer.json is laid out (Digits then ByteLevel pre-tokenizer,
# ByteLevel decoder, no normalizer, control tokens as special added tokens).


def gguf_field(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    if f.types and f.types[0].name == "ARRAY":
        sub = f.types[1].name if len(f.types) > 1 else ""
        if sub == "STRING":
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i][0].item() for i in f.data]
    if f.types[0].name == "STRING":
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]][0].item()


def gen_smollm2():
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    r = GGUFReader(MODEL)
    assert gguf_field(r, "tokenizer.ggml.model") == "gpt2"
    assert gguf_field(r, "tokenizer.ggml.pre") == "smollm"
    tokens = gguf_field(r, "tokenizer.ggml.tokens")
    types = gguf_field(r, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ")) for m in gguf_field(r, "tokenizer.ggml.merges")]
    bos = gguf_field(r, "tokenizer.ggml.bos_token_id")
    eos = gguf_field(r, "tokenizer.ggml.eos_token_id")
    template = gguf_field(r, "tokenizer.chat_template")
    add_bos = gguf_field(r, "tokenizer.ggml.add_bos_token")

    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    control = [i for i, t in enumerate(types) if t == 3]
    assert control == list(range(len(control))), "control tokens are expected first"
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])

    out = os.path.join(TOKDIR, "smollm2")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "tokenizer.json")
    doc = json.loads(tok.to_str())
    write_json(path, doc)
    config = {
        "add_bos_token": bool(add_bos),
        "add_prefix_space": False,
        "bos_token": tokens[bos],
        "eos_token": tokens[eos],
        "unk_token": tokens[0],
        "pad_token": tokens[eos],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "tokenizer_class": "GPT2Tokenizer",
        "vocab_size": len(tokens),
        "additional_special_tokens": [tokens[i] for i in control[1:3]],
        "chat_template": template,
    }
    write_json(os.path.join(out, "tokenizer_config.json"), config, indent=2)
    check = Tokenizer.from_file(path)
    assert check.encode("Hello world 123").ids == tok.encode("Hello world 123").ids
    print("smollm2: vocab %d, merges %d, tokenizer.json %d bytes" % (len(tokens), len(merges), os.path.getsize(path)))


# ---------------------------------------------------------------------------
# The corpus: strings chosen to exercise every part of both tokenizers.

CORPUS_FIXED = [
    "",
    " ",
    "  ",
    "\n",
    "\t",
    "a",
    "Hello",
    "Hello world",
    "Hello, world!",
    " Hello world",
    "hello   world",
    "Hello world   ",
    "The quick brown fox jumps over the lazy dog.",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG!",
    "It's a dog's life, isn't it? They're here, we'll see, I've done it, I'm sure, he'd go.",
    "IT'S DON'T WE'LL THEY'RE I'M I'VE HE'D",
    "it\u2019s a curly apostrophe \u2019s \u2019re",
    "'s 't 're 've 'm 'll 'd",
    "''' \"\"\" `backticks` ``double``",
    "rock'n'roll o'clock y'all",
    "Mr. Smith went to Washington, D.C., on Jan. 5th; he stayed for 3 days.",
    "Punctuation!!! ??? ... --- ___ *** ### $$$ %%% ^^^ &&& ||| ~~~",
    "(parentheses) [brackets] {braces} <angles>",
    "email@example.com https://example.org/path?q=1&r=two#frag",
    "C:\\Users\\name\\file.txt /usr/local/bin/python3",
    "0",
    "7",
    "42",
    "123",
    "1234",
    "12345678901234567890",
    "3.14159 2.71828 -1.5e-10 +6.022e23",
    "Call 555-0100 or +1 (800) 555-0199 before 12:30pm on 2024-03-15.",
    "$1,000,000.00 and 50% off 1/2 price",
    "v1.2.3-rc4 build 20240115",
    "x1 y22 z333 abc123def 9lives",
    "\u00b2\u00b3 \u00b9\u2044\u2082 \u00bd \u00be",
    "\u216b \u2163 \u2177 roman numerals",
    "\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669 arabic-indic digits",
    "\uff11\uff12\uff13 fullwidth \uff21\uff22\uff23",
    "\u0966\u0967\u0968\u0969 devanagari digits",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber stra\u00dfe d\u00e9j\u00e0 vu",
    "\u00c5ngstr\u00f6m \u00d8resund \u00c6r\u00f8 \u00de\u00f3rr",
    "e\u0301 decomposed e-acute and n\u0303",
    "S\u00e3o Paulo, Z\u00fcrich, Krak\u00f3w, M\u00e1laga, \u0130stanbul",
    "\ufb01 \ufb02 ligatures and \u00df \u1e9e",
    "\u0393\u03b5\u03b9\u03ac \u03c3\u03bf\u03c5 \u039a\u03cc\u03c3\u03bc\u03b5",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u041a\u0430\u043a \u0434\u0435\u043b\u0430?",
    "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "\u0627\u0644\u0633\u0644\u0627\u0645 \u0639\u0644\u064a\u0643\u0645 \u0648\u0631\u062d\u0645\u0629 \u0627\u0644\u0644\u0647",
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e",
    "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35\u0e0a\u0e32\u0e27\u0e42\u0e25\u0e01",
    "\uc548\ub155\ud558\uc138\uc694 \uc138\uacc4",
    "\u3053\u3093\u306b\u3061\u306f\u4e16\u754c",
    "\u30ab\u30bf\u30ab\u30ca\u3068\u3072\u3089\u304c\u306a\u3068\u6f22\u5b57",
    "\u4f60\u597d\uff0c\u4e16\u754c\uff01",
    "\u6211\u7231\u5317\u4eac\u5929\u5b89\u95e8\u3002\u4eca\u5929\u5929\u6c14\u5f88\u597d\u3002",
    "\u4e2d\u6587English\u6df7\u5408mixed\u6587\u672c",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3001\u53e5\u8aad\u70b9\u3002\u300c\u5f15\u7528\u300d",
    "\U0001f642",
    "\U0001f916 robots \U0001f916\U0001f916",
    "\U0001f44d\U0001f3fd thumbs with skin tone",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 family ZWJ sequence",
    "\U0001f469\u200d\U0001f4bb technologist",
    "\U0001f3f3\ufe0f\u200d\U0001f308 rainbow flag",
    "\U0001f1fa\U0001f1f8\U0001f1eb\U0001f1f7\U0001f1ef\U0001f1f5 flags",
    "\u2764\ufe0f heart with variation selector",
    "emoji\U0001f642between\U0001f642words",
    "\u2603 \u2605 \u2660 \u2663 \u2665 \u2666 \u2192 \u2190 \u2191 \u2193 \u2200 \u2203 \u2205 \u221e \u2260 \u2264 \u2265",
    "math: \u2211_{i=1}^{n} x_i\u00b2 = \u222b f(x) dx",
    "\ufffd replacement char \ufffd\ufffd",
    "control \x01\x02\x03 chars \x7f delete",
    "bell\x07 backspace\x08 escape\x1b[31m red",
    "vertical\x0btab form\x0cfeed",
    "next\x85line",
    "no\u00a0break\u00a0space",
    "ideographic\u3000space",
    "line\u2028separator paragraph\u2029separator",
    "zero\u200bwidth\u200cnon\u200djoiner\ufeffbom",
    "soft\u00adhyphen",
    "\u00a0leading nbsp",
    "trailing nbsp\u00a0",
    "Hello\nworld",
    "Hello\n\nworld",
    "Hello\r\nworld\r\n",
    "a\n\n\n\nb",
    "a\tb\tc",
    "\t\tindented with tabs",
    "    indented with four spaces",
    "trailing spaces   ",
    "trailing newline\n",
    "trailing spaces and newline   \n",
    "  \n  \n",
    "\n\n\n",
    " \t \n \r\n ",
    "word \n word",
    "many          spaces          between",
    "\r\n\r\n",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<s>",
    "</s>",
    "<unk>",
    "<s>Hello</s>",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n",
    "text before <|im_start|> and after",
    "text<|im_end|>text",
    " <|im_end|> ",
    "<|im_start|><|im_end|><|im_start|>",
    "<|im_sta partial special",
    "<|im_start|",
    "< s > <s > < /s>",
    "<<s>> <</s>>",
    "<s><s></s></s>",
    "[INST] Hello [/INST] Hi there </s>",
    "<<SYS>>\nsystem prompt\n<</SYS>>\n\n",
    "<reponame>loraplane<file_sep>main.c",
    "<0x41> looks like a byte token",
    "<jupyter_code>print(1)<jupyter_output>1",
    "def add(a, b):\n    return a + b\n",
    "class Foo(Bar):\n    \"\"\"Docstring.\"\"\"\n\n    def __init__(self, x: int = 0) -> None:\n        self.x = x\n",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(f\"{i} is even\")\n",
    "import os, sys\nfrom typing import List, Dict\n",
    "lambda x: x ** 2 if x > 0 else -x",
    "#include <stdio.h>\n\nint main(void)\n{\n\tprintf(\"hello, world\\n\");\n\treturn 0;\n}\n",
    "static int lp_foo(struct lp_err *err) { return -EINVAL; }",
    "for (size_t i = 0; i < n; i++) {\n        a[i] += b[i] * c;\n}",
    "x->y.z[3] = (*p)++ << 2 >> 1 & 0xFF | ~0u ^ 0b1010;",
    "#define MAX(a, b) ((a) > (b) ? (a) : (b))",
    "/* block comment */ // line comment",
    "{\"name\": \"loraplane\", \"version\": 1, \"tags\": [\"a\", \"b\"], \"nested\": {\"ok\": true, \"n\": null}}",
    "{\n  \"key\": \"value\",\n  \"list\": [\n    1,\n    2.5,\n    -3\n  ]\n}",
    "[{\"role\":\"user\",\"content\":\"hi\"}]",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "<html><body><p class=\"x\">Hello &amp; welcome</p></body></html>",
    "$ ls -la | grep foo > out.txt 2>&1 &",
    "git commit -m \"fix: handle empty input\"",
    "key=value; other_key = 'quoted value'",
    "snake_case camelCase PascalCase kebab-case SCREAMING_CASE",
    "__init__ __main__ __name__",
    "ab",
    "abc",
    "a" * 65,
    "supercalifragilisticexpialidocious",
    "Pneumonoultramicroscopicsilicovolcanoconiosis",
    "antidisestablishmentarianism " * 3,
    "Donaudampfschifffahrtselektrizit\u00e4tenhauptbetriebswerkbauunterbeamtengesellschaft",
    "!" * 34,
    "." * 44,
    "-" * 80,
    "=" * 40 + "\n" + "=" * 40,
    "      ",
    "\t\t\t\t",
    "I",
    "I'm",
    "'",
    "''",
    "\"",
    "?",
    " ?",
    " 1",
    "1 ",
    " 12 34 ",
    "a1b2c3",
    "1st 2nd 3rd 4th",
    "1,234,567",
    "3+4=7",
    "100%",
    "#1",
    "It costs \u20ac5 or \u00a34 or \u00a5600 or \u20b9400.",
    "Temperature: -5\u00b0C (23\u00b0F)",
    "The year 1999 and 2000 and 2024.",
    "Version 10.15.7 of macOS.",
    "He said, \"Hello!\" and she replied, 'Hi.'",
    "\u00abguillemets\u00bb \u201eGerman quotes\u201c \u201cEnglish quotes\u201d",
    "em\u2014dash en\u2013dash hyphen-minus",
    "ellipsis\u2026 bullet \u2022 middle\u00b7dot",
    "tab\tseparated\tvalues\n1\t2\t3",
    "comma,separated,values\n1,2,3",
    "Once upon a time, there was a little model that wanted to serve many adapters at once.",
    "Low-rank adaptation (LoRA) adds a small trainable update B\u00b7A to a frozen weight W.",
    "The server batches requests from many users and streams the tokens back as they are generated.",
    "Q: What is the capital of France?\nA: Paris.",
    "User: Tell me a joke.\nAssistant: Why did the chicken cross the road?",
]


def corpus_generated():
    rng = random.Random(20240601)
    out = []
    words = SP_WORDS
    # prose of varied length and casing
    for i in range(60):
        n = rng.randint(1, 40)
        ws = [rng.choice(words) for _ in range(n)]
        for j in range(len(ws)):
            r = rng.random()
            if r < 0.1:
                ws[j] = ws[j].capitalize()
            elif r < 0.13:
                ws[j] = ws[j].upper()
            elif r < 0.18:
                ws[j] = ws[j] + rng.choice(["'s", "'re", "'ll", "'d", "n't", "'ve", "'m"])
            elif r < 0.24:
                ws[j] = str(rng.randint(0, 10 ** rng.randint(1, 9)))
        sep = rng.choice([" ", " ", " ", "  ", "\n", " \t"])
        out.append(sep.join(ws) + rng.choice(["", ".", "!", "?", "\n", " ", "...", ":"]))
    # whitespace patterns around words
    spaces = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n", "\n ", "\t\n", "\u00a0", "\u3000"]
    for i in range(40):
        a, b = rng.choice(words), rng.choice(words)
        lead = rng.choice(["", rng.choice(spaces)])
        trail = rng.choice(["", rng.choice(spaces)])
        out.append(lead + a + rng.choice(spaces) + b + trail)
    # mixtures of scripts, digits, emoji, punctuation
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        " .,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
        "\u00e9\u00e8\u00ea\u00eb\u00e0\u00e2\u00e4\u00ee\u00ef\u00f4\u00f6\u00fb\u00fc\u00e7\u00f1\u00e5\u00f8\u00e6\u0153\u00df",
        "\u65e5\u672c\u8a9e\u4e2d\u6587\u5b57\u6f22\u5b57\u3072\u3089\u304c\u306a\u30ab\u30bf\u30ab\u30ca",
        "\ud55c\uad6d\uc5b4\uae00\uc790",
        "\u0430\u0431\u0432\u0433\u0434\u0435\u0436\u0437\u0438\u0439\u043a\u043b\u043c\u043d\u043e\u043f\u0440\u0441\u0442\u0443\u0444\u0445\u0446\u0447\u0448\u0449\u044b\u044d\u044e\u044f",
        "\u03b1\u03b2\u03b3\u03b4\u03b5\u03b6\u03b7\u03b8\u03b9\u03ba\u03bb\u03bc\u03bd\u03be\u03bf\u03c0\u03c1\u03c3\u03c4\u03c5\u03c6\u03c7\u03c8\u03c9",
        "\u0627\u0628\u062a\u062b\u062c\u062d\u062e\u062f\u0630\u0631\u0632\u0633\u0634\u0635\u0636\u0637\u0638\u0639\u063a\u0641\u0642\u0643\u0644\u0645\u0646\u0647\u0648\u064a",
        "\U0001f642\U0001f916\U0001f44d\U0001f3fd\u2764\ufe0f\U0001f389\U0001f525\u2728\U0001f680",
        " \t\n",
        "\u00b2\u00b3\u00bd\u0663\u0664\uff11\uff12\u216b",
    ]
    for i in range(70):
        n = rng.randint(1, 60)
        chosen = rng.sample(pools, rng.randint(1, 4))
        out.append("".join(rng.choice(rng.choice(chosen)) for _ in range(n)))
    # digit runs of every length, with and without a leading space
    for n in range(1, 21):
        d = "".join(str(rng.randint(0, 9)) for _ in range(n))
        out.append(d if n % 2 else " " + d)
    # code lines with indentation
    code = [
        "if (x == NULL)",
        "return -ENOMEM;",
        "}",
        "else {",
        "for item in items:",
        "yield item",
        "try:",
        "except ValueError as e:",
        "raise",
        "print(\"done\")",
        "x = {\"a\": 1}",
        "// FIXME later",
    ]
    for i in range(30):
        lines = []
        for _ in range(rng.randint(1, 6)):
            lines.append(rng.choice(["", "  ", "    ", "\t", "\t\t", "        "]) + rng.choice(code))
        out.append("\n".join(lines) + rng.choice(["", "\n"]))
    # special tokens between text
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>", "</s>", "<unk>"]
    for i in range(20):
        parts = []
        for _ in range(rng.randint(1, 4)):
            parts.append(rng.choice(["", " ", "\n"]) + rng.choice(words) + rng.choice(["", " ", "\n"]))
            parts.append(rng.choice(specials))
        out.append("".join(parts))
    # long inputs: the BPE must not be quadratic
    letters = "abcdefghijklmnopqrstuvwxyz"
    out.append("".join(rng.choice(letters) for _ in range(3000)))
    out.append("the" * 1500)
    out.append(" ".join(rng.choice(words) for _ in range(1500)))
    out.append("".join(rng.choice("\u65e5\u672c\u8a9e\u4e2d\u6587\u5b57\u6f22") for _ in range(1000)))
    return out


def gen_corpus():
    corpus = []
    seen = set()
    for s in CORPUS_FIXED + corpus_generated():
        if s not in seen:
            seen.add(s)
            corpus.append(s)
    for s in corpus:
        s.encode("utf-8")  # no lone surrogates
        assert "\0" not in s
    write_json(os.path.join(TOKDIR, "corpus.json"), corpus, indent=0)
    print("corpus: %d strings, %d characters" % (len(corpus), sum(len(s) for s in corpus)))


def decode_cases(name, tok):
    """Id sequences that encoding never produces (random ids, stray bytes)
    with HF's decode of them, for the streaming decoder."""
    rng = random.Random(777 if name == "smollm2" else 778)
    n = tok.get_vocab_size()
    vocab = tok.get_vocab()
    seqs = []
    if name == "smollm2":
        for _ in range(60):
            seqs.append([rng.randrange(n) for _ in range(rng.randint(1, 24))])
        # single bytes of multi-byte characters, cut anywhere
        for b in ("\u00e9", "\u65e5", "\U0001f642"):
            ids = tok.encode(b).ids
            seqs.append(ids[:1])
        seqs.append([vocab["\u0120"], vocab["\u00e6"]])  # " " then a lone lead byte 0xE6
    else:
        # HF's ByteFallback turns a whole run of byte tokens into U+FFFD per
        # byte when the run is not valid UTF-8 as a whole; a streaming decoder
        # cannot know a run's end, so runs here are either whole characters
        # or one stray byte between other tokens.
        plain = sorted(i for t, i in vocab.items() if not (t.startswith("<0x") and len(t) == 6))
        chars = ["\u00e9", "\u65e5", "\U0001f642", "\u0416", "A"]
        for _ in range(60):
            seq = []
            for _ in range(rng.randint(1, 16)):
                r = rng.random()
                if r < 0.15:
                    seq += [vocab["<0x%02X>" % b] for b in rng.choice(chars).encode("utf-8")]
                    seq.append(rng.choice(plain))
                elif r < 0.2:
                    seq.append(vocab["<0x%02X>" % rng.randrange(0x80, 0x100)])
                    seq.append(rng.choice(plain))
                else:
                    seq.append(rng.choice(plain))
            seqs.append(seq)
        seqs.append([vocab["<0xE6>"]])
        seqs.append([vocab["<0xE6>"], vocab["<0x97>"]])
        seqs.append([vocab["\u2581"]])
        seqs.append([vocab["\u2581"], vocab["\u2581"], vocab["x"]])
        seqs.append([vocab["<0x20>"], vocab["x"]])
        seqs.append([vocab["<unk>"], vocab["\u2581"]])
    out = []
    for ids in seqs:
        out.append(
            {
                "ids": ids,
                "decoded": tok.decode(ids, skip_special_tokens=False),
                "decoded_skip": tok.decode(ids, skip_special_tokens=True),
            }
        )
    return out


def gen_goldens():
    from tokenizers import Tokenizer

    with open(os.path.join(TOKDIR, "corpus.json"), encoding="utf-8") as f:
        corpus = json.load(f)
    for name in ("smollm2", "spbpe"):
        tok = Tokenizer.from_file(os.path.join(TOKDIR, name, "tokenizer.json"))
        cases = []
        for s in corpus:
            plain = tok.encode(s, add_special_tokens=False).ids
            special = tok.encode(s, add_special_tokens=True).ids
            cases.append(
                {
                    "text": s,
                    "ids": plain,
                    "ids_special": special,
                    "decoded": tok.decode(plain, skip_special_tokens=False),
                    "decoded_skip": tok.decode(plain, skip_special_tokens=True),
                }
            )
        # with special tokens in the text treated as text
        tok.encode_special_tokens = True
        for c in cases:
            c["ids_split_special"] = tok.encode(c["text"], add_special_tokens=False).ids
        tok.encode_special_tokens = False
        doc = {"cases": cases, "decode_cases": decode_cases(name, tok)}
        write_json(os.path.join(TOKDIR, name, "goldens.json"), doc, indent=0)
        n_ids = sum(len(c["ids"]) for c in cases)
        lossy = [c["text"] for c in cases if c["decoded"] != c["text"]]
        print("%s goldens: %d strings, %d ids, %d decode differently: %r" % (name, len(cases), n_ids, len(lossy), lossy[:8]))


# ---------------------------------------------------------------------------
# Chat goldens: every family's real Jinja template rendered with jinja2 set up
# as transformers' apply_chat_template sets it up.

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Mistral-7B-Instruct-v0.2 (and Mixtral-8x7B-Instruct-v0.1): the system
# message is folded into the first user turn.
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an "
    "initial optional system message!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)


# Qwen2.5 Instruct: ChatML with a default system message (tokenizer_config.json
# of Qwen/Qwen2.5-*-Instruct).
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Qwen3 (dense, hybrid thinking): ChatML without a default system message;
# assistant turns after the last user query carry a <think> block, earlier
# ones lose theirs (tokenizer_config.json of Qwen/Qwen3-*).
QWEN3_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# Llama 3.1 Instruct (tokenizer_config.json of meta-llama/Llama-3.1-8B-Instruct;
# Llama 3.3's is the same text): a system turn that always carries the
# knowledge and "today" dates, tools as JSON in the first user turn, tool
# calls as {"name", "parameters"}, tool results in `ipython` turns.
LLAMA31_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Mistral-7B-Instruct-v0.3 (tokenizer v3; tokenizer_config.json of
# mistralai/Mistral-7B-Instruct-v0.3): [INST] without the leading space, the
# system message in the last user turn, [AVAILABLE_TOOLS] before the last
# user message, [TOOL_CALLS] and [TOOL_RESULTS] with 9-character ids.
MISTRAL_V3_TEMPLATE = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""


def render_chat(template, messages, add_generation_prompt, bos, eos):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class TemplateError(Exception):
        pass

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos
        ), None
    except TemplateError as e:
        return None, str(e)


def gen_chat():
    from gguf import GGUFReader

    smol = gguf_field(GGUFReader(MODEL), "tokenizer.chat_template")
    families = [
        ("chatml", "smollm2", smol, "<|im_start|>", "<|im_end|>"),
        ("llama3", "llama3", LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>"),
        ("llama2", "llama2", LLAMA2_TEMPLATE, "<s>", "</s>"),
        ("mistral", "mistral", MISTRAL_TEMPLATE, "<s>", "</s>"),
        ("chatml", "qwen2.5", QWEN25_TEMPLATE, None, "<|im_end|>"),
        ("qwen3", "qwen3", QWEN3_TEMPLATE, None, "<|im_end|>"),
        ("llama3.1", "llama3.1", LLAMA31_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>"),
        ("mistral-v0.3", "mistral-v0.3", MISTRAL_V3_TEMPLATE, "<s>", "</s>"),
    ]
    S = lambda c: {"role": "system", "content": c}
    U = lambda c: {"role": "user", "content": c}
    A = lambda c: {"role": "assistant", "content": c}
    conversations = [
        ("system_user", [S("You are a terse assistant."), U("What is LoRA?")], True),
        ("user_only", [U("Hello!")], True),
        ("user_only_no_prompt", [U("Hello!")], False),
        (
            "multi_turn",
            [S("Be brief."), U("Name a color."), A("Blue."), U("Another one?")],
            True,
        ),
        ("multi_turn_no_system", [U("Hi"), A("Hello! How can I help?"), U("Tell me a joke.")], True),
        ("ends_with_assistant", [U("2+2?"), A("4")], False),
        (
            "newlines_unicode",
            [
                S("Answer in French.\nUse short sentences."),
                U("Traduis : « the café is open » 🙂\n\nMerci !"),
            ],
            True,
        ),
        ("surrounding_whitespace", [U("  padded question \n\n"), A("\n answer with spaces  "), U("\tnext\t")], True),
        ("unicode_whitespace", [U("\u3000\u00a0hi\u2003\x1f\n"), A(" \u00a0ok\u3000"), U("\u200bzero-width\u200b")], True),
        ("empty_content", [U("")], True),
        ("empty_system", [S(""), U("hi")], True),
        ("system_only", [S("Only a system prompt.")], True),
        ("special_text_in_content", [U("what does <|im_end|> or </s> or [INST] mean?")], True),
        ("not_alternating", [U("one"), U("two")], True),
        ("assistant_first", [A("I start."), U("ok")], True),
        ("system_later", [U("hi"), S("Be brief."), U("ok")], True),
        # reasoning in assistant turns (Qwen3 keeps it only after the last query)
        ("think_history", [U("What is 2+2?"), A("<think>\nAdd them.\n</think>\n\n4"), U("And 3+3?")], True),
        ("think_last_assistant", [U("What is 2+2?"), A("<think>\nAdd them.\n</think>\n\n4")], False),
        ("think_after_query", [U("q"), A("<think>r1</think>a1"), A("\n\na2\n")], True),
        ("think_nested", [U("q"), A("x<think>a<think>\nb\n</think>c</think>\nd"), U("r")], False),
        ("think_tool_response", [U("Hi"), A("<think>x</think>ok"), U("<tool_response>\n42\n</tool_response>")], True),
    ]
    cases = []
    for style, family, template, bos, eos in families:
        for name, messages, gen in conversations:
            text, error = render_chat(template, messages, gen, bos, eos)
            cases.append(
                {
                    "name": "%s/%s" % (family, name),
                    "style": style,
                    "family": family,
                    "bos": bos,
                    "eos": eos,
                    "add_generation_prompt": gen,
                    "messages": messages,
                    "rendered": text,
                    "error": error,
                }
            )
    doc = {
        "templates": {family: {"style": style, "template": template, "bos": bos, "eos": eos}
                      for style, family, template, bos, eos in families},
        "cases": cases,
    }
    write_json(os.path.join(CHATDIR, "goldens.json"), doc, indent=1)
    print("chat goldens: %d cases, %d raise" % (len(cases), sum(1 for c in cases if c["error"])))


# ---------------------------------------------------------------------------
# Variants: the two fixture tokenizers with parts of the pipeline swapped, so
# that every supported component (Metaspace, each Split behaviour, Digits,
# added-token options, ignore_merges, unk handling, post-processors, other
# byte-level regexes) is checked against HF on part of the corpus.

LLAMA3_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
QWEN2_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


def gen_variants():
    from tokenizers import AddedToken, Tokenizer

    with open(os.path.join(TOKDIR, "corpus.json"), encoding="utf-8") as f:
        corpus = json.load(f)
    texts = [s for s in corpus if len(s) <= 200][::6]
    texts += [
        "the dog and the cat",
        "a <mask> b<mask>c  <mask>  d",
        "x [sep] y[sep]   z",
        "hotdog dog dogs the dog.",
        "123 4567 89",
        "  leading and trailing  ",
    ]
    ms_first = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": True}
    ms_always = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": False}
    ms_never = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "never", "split": True}

    def split(pattern, behavior, invert=False, kind="Regex"):
        return {"type": "Split", "pattern": {kind: pattern}, "behavior": behavior, "invert": invert}

    def bytelevel(prefix, regex):
        return {"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": True, "use_regex": regex}

    def template(single):
        return {
            "type": "TemplateProcessing",
            "single": single,
            "pair": single,
            "special_tokens": {
                "<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]},
                "</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]},
            },
        }

    A = {"Sequence": {"id": "A", "type_id": 0}}
    BOS = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    EOS = {"SpecialToken": {"id": "</s>", "type_id": 0}}
    sp_punct = "\u2581|[,.!?]"
    variants = [
        ("sp_metaspace_first", "spbpe", {"normalizer": None, "pre_tokenizer": ms_first, "decoder": ms_first}, {}, None),
        ("sp_metaspace_always_nosplit", "spbpe", {"normalizer": None, "pre_tokenizer": ms_always, "decoder": ms_always}, {}, None),
        ("sp_metaspace_never", "spbpe", {"normalizer": None, "pre_tokenizer": ms_never, "decoder": ms_never}, {}, None),
        ("sp_split_removed", "spbpe", {"pre_tokenizer": split(sp_punct, "Removed")}, {}, None),
        ("sp_split_isolated", "spbpe", {"pre_tokenizer": split(sp_punct, "Isolated")}, {}, None),
        ("sp_split_merged_prev", "spbpe", {"pre_tokenizer": split(sp_punct, "MergedWithPrevious")}, {}, None),
        ("sp_split_merged_next", "spbpe", {"pre_tokenizer": split(sp_punct, "MergedWithNext")}, {}, None),
        ("sp_split_contiguous", "spbpe", {"pre_tokenizer": split(sp_punct, "Contiguous")}, {}, None),
        ("sp_split_invert", "spbpe", {"pre_tokenizer": split("\\p{L}+", "Removed", invert=True)}, {}, None),
        ("sp_split_string", "spbpe", {"pre_tokenizer": split("\u2581", "MergedWithNext", kind="String")}, {}, None),
        (
            "sp_digits",
            "spbpe",
            {
                "normalizer": None,
                "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": False}, ms_first]},
                "decoder": ms_first,
            },
            {},
            None,
        ),
        (
            "sp_added_tokens",
            "spbpe",
            {},
            {},
            [
                AddedToken("<mask>", lstrip=True, rstrip=True, special=True, normalized=False),
                AddedToken("[sep]", rstrip=True, special=False, normalized=False),
                AddedToken("the", special=False, normalized=True),
                AddedToken("dog", single_word=True, special=False, normalized=False),
            ],
        ),
        ("sp_ignore_merges", "spbpe", {"normalizer": None, "pre_tokenizer": ms_first, "decoder": ms_first}, {"ignore_merges": True}, None),
        ("sp_unk_fused", "spbpe", {}, {"byte_fallback": False, "fuse_unk": True}, None),
        ("sp_unk_not_fused", "spbpe", {}, {"byte_fallback": False, "fuse_unk": False}, None),
        ("sp_template_bos_eos", "spbpe", {"post_processor": template([BOS, A, EOS])}, {}, None),
        (
            "sp_roberta",
            "spbpe",
            {"post_processor": {"type": "RobertaProcessing", "sep": ["</s>", 2], "cls": ["<s>", 1], "trim_offsets": True, "add_prefix_space": False}},
            {},
            None,
        ),
        (
            "bl_llama3_regex",
            "smollm2",
            {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX, "Isolated"), bytelevel(False, False)]}},
            {},
            None,
        ),
        (
            "bl_qwen2_regex",
            "smollm2",
            {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [split(QWEN2_REGEX, "Isolated"), bytelevel(False, False)]}},
            {},
            None,
        ),
        ("bl_prefix_space", "smollm2", {"pre_tokenizer": bytelevel(True, True)}, {}, None),
        ("bl_ignore_merges", "smollm2", {}, {"ignore_merges": True}, None),
    ]
    bases = {}
    for name in ("spbpe", "smollm2"):
        with open(os.path.join(TOKDIR, name, "tokenizer.json"), encoding="utf-8") as f:
            bases[name] = json.load(f)
    out = []
    for name, base, patch, model_patch, added in variants:
        doc = json.loads(json.dumps(bases[base]))
        doc.update(patch)
        doc["model"].update(model_patch)
        tok = Tokenizer.from_str(json.dumps(doc))
        if added:
            tok.add_tokens(added)
            # what the C side loads: the same file with the added tokens
            patch = dict(patch)
            patch["added_tokens"] = json.loads(tok.to_str())["added_tokens"]
        # to keep the file small, ids_special / decoded / decoded_skip are
        # left out where they equal ids / text / decoded
        cases = []
        for s in texts:
            ids = tok.encode(s, add_special_tokens=False).ids
            case = {"text": s, "ids": ids}
            special = tok.encode(s, add_special_tokens=True).ids
            decoded = tok.decode(ids, skip_special_tokens=False)
            skip = tok.decode(ids, skip_special_tokens=True)
            if special != ids:
                case["ids_special"] = special
            if decoded != s:
                case["decoded"] = decoded
            if skip != decoded:
                case["decoded_skip"] = skip
            cases.append(case)
        out.append({"name": name, "base": base, "patch": patch, "model_patch": model_patch, "cases": cases})
    with open(os.path.join(TOKDIR, "variants.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print("variants: %d, %d texts each, %d bytes" % (len(out), len(texts), os.path.getsize(os.path.join(TOKDIR, "variants.json"))))


# ---------------------------------------------------------------------------
# Tokenizer-only GGUF files: the spbpe tokenizer the way llama.cpp's
# converter stores a SentencePiece vocabulary (tokens, scores, token types,
# no merges), and two files the loader must refuse.


def write_gguf(path, fill):
    import gguf

    w = gguf.GGUFWriter(path, arch="llama")
    fill(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gen_gguf():
    import gguf

    with open(os.path.join(TOKDIR, "spbpe", "tokenizer.json"), encoding="utf-8") as f:
        doc = json.load(f)
    vocab = doc["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    # a token made by merge r scores -r: earlier merges win, as in
    # SentencePiece where the score orders the pieces
    scores = [0.0] * len(tokens)
    for r, m in enumerate(doc["model"]["merges"]):
        a, b = m.split(" ")
        scores[vocab[a + b]] = -float(r + 1)
    types = []
    for t in tokens:
        if t == "<unk>":
            types.append(gguf.TokenType.UNKNOWN)
        elif t in ("<s>", "</s>"):
            types.append(gguf.TokenType.CONTROL)
        elif t.startswith("<0x") and len(t) == 6:
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    with open(os.path.join(TOKDIR, "spbpe", "tokenizer_config.json"), encoding="utf-8") as f:
        template = json.load(f)["chat_template"]

    def spbpe(w):
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(vocab["<s>"])
        w.add_eos_token_id(vocab["</s>"])
        w.add_unk_token_id(vocab["<unk>"])
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_chat_template(template)

    small = ["a", "b", "ab", "\u0120", "\u0120a"]

    def bad_pre(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("made-up-pre")
        w.add_token_list(small)
        w.add_token_types([gguf.TokenType.NORMAL] * len(small))
        w.add_token_merges(["a b", "\u0120 a"])

    def bad_model(w):
        w.add_tokenizer_model("bert")
        w.add_token_list(small)

    def bad_merge(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt2")
        w.add_token_list(small)
        w.add_token_merges(["a b", "b zz"])

    out = os.path.join(TOKDIR, "gguf")
    os.makedirs(out, exist_ok=True)
    write_gguf(os.path.join(out, "spbpe.gguf"), spbpe)
    write_gguf(os.path.join(out, "bad-pre.gguf"), bad_pre)
    write_gguf(os.path.join(out, "bad-model.gguf"), bad_model)
    write_gguf(os.path.join(out, "bad-merge.gguf"), bad_merge)
    print("gguf: %s" % ", ".join("%s %d bytes" % (f, os.path.getsize(os.path.join(out, f))) for f in sorted(os.listdir(out))))


STEPS = {
    "spbpe": gen_spbpe,
    "smollm2": gen_smollm2,
    "corpus": gen_corpus,
    "goldens": gen_goldens,
    "variants": gen_variants,
    "gguf": gen_gguf,
    "chat": gen_chat,
}


def main(argv):
    steps = argv[1:] or list(STEPS)
    for s in steps:
        if s not in STEPS:
            sys.exit("unknown step '%s' (known: %s)" % (s, ", ".join(STEPS)))
    for s in steps:
        STEPS[s]()


if __name__ == "__main__":
    main(sys.argv)
