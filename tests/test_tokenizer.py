"""Tests for tokenizer.py: ids equal open_clip's (the oracle) on every label name and on hand-made hard cases;
facts of openai/CLIP's simple_tokenizer.py; the ftfy fallback; the BPE learner/writer; find_bpe."""
import gzip
import hashlib
import os
from pathlib import Path

import pytest
import torch

from optional import need
from support import tokenizer
from support.tokenizer import Tokenizer, find_bpe, learn_bpe, normalize, pretokenize, tokenize, write_bpe

open_clip = need("open_clip")

REPO = str(Path(__file__).resolve().parent.parent)
LABEL_DIR = Path(REPO) / "labels"
TEMPLATES = ["{}", "There is a {} in the scene", "a photo of a {}."]
ASCII_CASES = [
    "1,000", "3.14 x 10", "it's", "don't", "we'll they'd you're I'm I've", "_-", "snake_case", "__init__",
    "&amp;", "&lt;b&gt;", "Tom &amp; Jerry", "&amp;lt;", "<b>bold</b>", "  lots   of\twhite\n\nspace  ",
    "UPPER Case MiXeD", "hello!!!??", "e.g., U.S.A.", "a-b/c\\d", "#hashtag @user", "", "   ",
]
UNICODE_CASES = [
    "Café naïve résumé", "x²", "½ cup", "Ⅻ ① ٣", "it’s", "“quoted”", "ﬁsh ﬂy", "ＡＢＣ１２３", "emoji 🐶🎉",
    "日本語のテキスト", "中文 字", "한국어", "Ω ohm", "İstanbul", "Straße", "a\u0345b", "zero\u200bwidth",
    "nbsp\u00a0space", "ideographic\u3000space", "soft\u00adhyphen", "x\x1cy", "a\vb",
]


def label_names() -> list:
    names = {line.strip() for f in sorted(LABEL_DIR.glob("*.txt")) for line in f.read_text().splitlines()}
    return sorted(n for n in names if n)


@pytest.fixture(scope="module")
def oracle():
    """open_clip's own tokenizer object (official vocab; its special literals differ, see below)."""
    return open_clip.tokenizer.SimpleTokenizer()


@pytest.fixture(scope="module")
def label_texts():
    names = label_names()
    assert len(names) > 1000, "labels/*.txt should hold the NUS-WIDE, COCO and VOC names"
    return [t.format(n) for t in TEMPLATES for n in names]


def test_sanity_ids():
    tok = tokenizer.official_tokenizer()
    assert tok.sot_id == 49406 and tok.eot_id == 49407 and tok.vocab_size == 49408
    assert tokenize("a photo of a dog.")[0, :9].tolist() == [49406, 320, 1125, 539, 320, 1929, 269, 49407, 0]
    assert tokenize("There is a dog in the scene")[0, :9].tolist() == [
        49406, 997, 533, 320, 1929, 530, 518, 3562, 49407]
    assert tok.encode("X") == [343]
    out = tokenize(["a dog", "a cat"])
    assert out.shape == (2, 77) and out.dtype == torch.long
    assert tokenizer.official_tokenizer() is tok, "tokenize() must reuse one tokenizer"


def test_vocab_layout():
    tok = tokenizer.official_tokenizer()
    table = tokenizer.byte_table()
    assert sum(chr(b) == s for b, s in table.items()) == 188 and table[ord(" ")] == "Ġ"
    assert tok.pieces[0] == "!" and tok.pieces[256] == "!</w>" and tok.pieces[512] == "in"
    assert tok.pieces[49405] == "jekyll</w>"


def test_labels_match_open_clip(oracle, label_texts):
    ours = tokenize(label_texts)
    assert torch.equal(ours, open_clip.tokenize(label_texts))
    tok = tokenizer.official_tokenizer()
    for text in label_texts[::7]:  # decode: a sample is enough, encode is already covered
        assert tok.decode(tok.encode(text)) == oracle.decode(oracle.encode(text))


@pytest.mark.parametrize("text", ASCII_CASES + UNICODE_CASES)
def test_hand_cases_match_open_clip(oracle, text):
    tok = tokenizer.official_tokenizer()
    assert tok.encode(text) == oracle.encode(text)
    assert torch.equal(tokenize(text), open_clip.tokenize(text))


def test_pretokens_documented_facts():
    assert pretokenize(normalize("1,000")) == ["1", ",", "0", "0", "0"]
    assert pretokenize(normalize("x²")) == ["x", "²"]
    assert pretokenize(normalize("_-")) == ["_-"]
    assert pretokenize(normalize("snake_case")) == ["snake", "_", "case"]
    assert pretokenize(normalize("It’s")) == ["it", "'s"]
    assert pretokenize(normalize("&lt;b&gt;")) == ["<", "b", ">"]
    assert normalize("  A \t\u3000 B ") == "a b"


def test_pretoken_classes_match_regex_module_on_every_assigned_code_point():
    """The stdlib classes vs the official `regex` pattern: equal on every code point Python knows."""
    regex = need("regex")
    import unicodedata
    official = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
                             r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)
    bad = []
    for cp in range(0x110000):
        char = chr(cp)
        if unicodedata.category(char) in ("Cn", "Co", "Cs"):
            continue
        text = f"a{char}b 1{char}"
        if pretokenize(text) != official.findall(text):
            bad.append(hex(cp))
    assert not bad, f"pre-tokens differ from the regex module at {bad[:10]} ({len(bad)} code points)"
    for text in ["'ſ", "it'ſ", "<|ſtartoftext|>", "'\u212a"]:  # the case-insensitive literals
        assert pretokenize(text) == official.findall(text), text


def test_truncation(oracle):
    long_text = " ".join(["dog"] * 100)
    with pytest.raises(ValueError, match="dog dog"):
        tokenize(long_text)
    cut = tokenize(long_text, truncate=True)
    assert cut.shape == (1, 77) and cut[0, -1].item() == 49407 and cut[0, 0].item() == 49406
    assert (cut[0, 1:-1] == 1929).all()
    assert torch.equal(cut, open_clip.tokenize(long_text))  # open_clip always truncates this way
    fits = " ".join(["dog"] * 75)  # 75 + SOT + EOT = 77
    assert tokenize(fits)[0, -1].item() == 49407
    short = tokenize(["a dog", long_text], context_length=10, truncate=True)
    assert short.shape == (2, 10) and short[1, -1].item() == 49407 and short[0, 3].item() == 49407


def test_special_token_literals():
    """openai/CLIP maps the literals to SOT/EOT; open_clip 3.3 does not, so no oracle here."""
    tok = tokenizer.official_tokenizer()
    assert tok.encode("<|startoftext|>a dog<|endoftext|>") == [49406, 320, 1929, 49407]
    assert tok.encode("A <|EndOfText|> B") == [320, 49407, 321]  # lowercased first, like the official
    assert tok.encode("<|endoftext|>") == [49407]
    assert tok.decode([49406, 320, 1929, 49407]) == "<|startoftext|>a dog <|endoftext|>"


def test_ftfy_fallback_gives_the_same_ids(monkeypatch, label_texts):
    need("ftfy")
    tok = Tokenizer()
    cases = label_texts + ASCII_CASES + ["it’s", "“quoted”", "ﬁsh ﬂy", "ＡＢＣ１２３", "a\x00b\x7fc", "a\vb"]
    with_ftfy = [tok.encode(t) for t in cases]
    monkeypatch.setattr(tokenizer, "ftfy", None)
    assert normalize("It’s ＡＢＣ ﬁ") == "it's abc fi"  # proves the fallback is what runs now
    fresh = Tokenizer()  # no cached words from the ftfy run
    assert [fresh.encode(t) for t in cases] == with_ftfy


CORPUS = [f"{t} {n}" for t in ("There is a", "a photo of a", "a red", "a small")
          for n in ("dog", "cat", "red car", "blue sky", "tree", "scene with a dog")] * 3


def test_learn_bpe_tie_break_and_early_stop():
    # both pairs are seen twice: the smaller pair in string order goes first; then nothing is left to merge
    assert learn_bpe(["ab cd ab cd"], 10) == [("a", "b</w>"), ("c", "d</w>")]
    assert learn_bpe(["aaa aaa b"], 1) == [("a", "a")]  # (a, a) counts 2 per word, (a, a</w>) 1


def test_learn_write_round_trip(tmp_path):
    merges = learn_bpe(CORPUS, 500)
    assert merges == learn_bpe(CORPUS, 500), "learning must be deterministic"
    assert 0 < len(merges) < 500, "a small corpus runs out of pairs: learning stops early"
    path = tmp_path / "toy.bpe.txt.gz"
    write_bpe(path, merges)
    lines = gzip.open(path, "rt", encoding="utf-8").read().splitlines()
    assert lines[0].startswith("#version") and lines[1:] == [f"{a} {b}" for a, b in merges]
    again = tmp_path / "again.bpe.txt.gz"
    write_bpe(again, merges)
    assert path.read_bytes() == again.read_bytes(), "the file must not depend on the time of writing"

    tok = Tokenizer(path, vocab_size=512 + len(merges) + 2)
    assert (tok.sot_id, tok.eot_id) == (tok.vocab_size - 2, tok.vocab_size - 1)
    for word in {w for text in CORPUS for w in pretokenize(normalize(text))}:  # every word seen: one piece
        assert len(tok.encode(word)) == 1, (word, [tok.pieces[i] for i in tok.encode(word)])
    assert len(tok.encode("zebra")) == 5  # unseen letters stay bytes
    for text in CORPUS[:8] + ["A zebra, 1,000 times!", "Café ½ 日本"]:
        ids = tok.encode(text)
        assert tok.decode(ids).split() == pretokenize(normalize(text))
        assert tok.encode(tok.decode(ids)) == ids

    # a budget of 10 merges: the corpus already gets shorter than raw bytes, though not yet one piece a word
    write_bpe(tmp_path / "ten.gz", merges[:10])
    ten = Tokenizer(tmp_path / "ten.gz", vocab_size=512 + 10 + 2)
    n_bytes = sum(len(w.encode()) for text in CORPUS for w in pretokenize(normalize(text)))
    n_words = sum(len(pretokenize(normalize(text))) for text in CORPUS)
    assert n_words == sum(len(tok.encode(text)) for text in CORPUS)
    assert n_words < sum(len(ten.encode(text)) for text in CORPUS) < n_bytes
    batch = tok(CORPUS[:3], context_length=16)
    assert batch.shape == (3, 16) and (batch.max(dim=1).values == tok.eot_id).all()

    with pytest.raises(ValueError, match=f"{len(merges)} merges"):
        Tokenizer(path)  # the official size needs 48,894 merges


def test_find_bpe(tmp_path, monkeypatch):
    monkeypatch.delenv("SIGRL_BPE", raising=False)
    default = find_bpe()
    assert default == tokenizer.SHIPPED_BPE and os.path.dirname(default) == os.path.join(REPO, "vocab")
    shipped = hashlib.sha256(Path(default).read_bytes()).hexdigest()
    assert shipped == tokenizer.OFFICIAL_BPE_SHA256
    # the copy inside open_clip is an independent one of the same official file
    assert shipped == hashlib.sha256((Path(open_clip.__file__).parent / tokenizer.BPE_NAME).read_bytes()).hexdigest()
    assert "MIT License" in (Path(REPO) / "vocab" / "LICENSE").read_text()

    path = tmp_path / "mine.txt.gz"
    write_bpe(path, [("a", "b")])
    assert find_bpe(path) == str(path)
    monkeypatch.setenv("SIGRL_BPE", str(path))
    assert find_bpe() == str(path)
    assert find_bpe(default) == default, "the argument comes before the variable"

    def one_line_error(*args, match):
        with pytest.raises(FileNotFoundError, match=match) as err:
            find_bpe(*args)
        message = str(err.value)
        assert "\n" not in message and tokenizer.BPE_SOURCE in message and tokenizer.OFFICIAL_BPE_SHA256 in message

    one_line_error(tmp_path / "gone.gz", match="argument .*gone.gz")
    monkeypatch.setenv("SIGRL_BPE", str(tmp_path / "gone.gz"))
    one_line_error(match=r"\$SIGRL_BPE=.*gone.gz")
    monkeypatch.delenv("SIGRL_BPE")
    monkeypatch.setattr(tokenizer, "SHIPPED_BPE", str(tmp_path / "deleted" / tokenizer.BPE_NAME))
    one_line_error(match="shipped with this repository")
