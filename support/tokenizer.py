"""CLIP's byte-level BPE tokenizer, written from its description: standard library (+ torch for batches).

Text -> ids in five steps (as openai/CLIP's clip/simple_tokenizer.py does them):

1. Normalise: ftfy.fix_text (repairs mojibake, curly quotes, ligatures, fullwidth forms, control characters),
   html.unescape twice, collapse every run of Unicode White_Space to one space, strip, lowercase.
2. Pre-tokenise with one alternation, tried left to right at each position:
   the literals <|startoftext|> / <|endoftext|>  |  the contractions 's 't 're 've 'm 'll 'd  |
   a run of letters (Unicode categories L*)  |  ONE number character (N*, so "1,000" -> 1 , 0 0 0)  |
   a run of anything that is neither whitespace, letter nor number ("_-", "!!").  Whitespace is dropped.
3. Bytes -> symbols: each pre-token is UTF-8 encoded and every byte becomes one printable character through a
   fixed table (188 printable Latin-1 bytes map to themselves, the other 68 to U+0100..U+0143; space -> "Ġ"),
   so any string is spelled with 256 base symbols and no symbol is whitespace.
4. BPE: the last symbol of a word gets "</w>" (end of word). A merge list ranks symbol pairs by how early
   the learner found them; repeatedly take the adjacent pair of lowest rank present in the word and merge
   every left-to-right occurrence of it, until no adjacent pair has a rank.
       "dog" -> d o g</w> -> (rank of "o g</w>" is lowest) d og</w> -> dog</w>
5. Vocabulary: ids 0-255 are the 256 symbols, 256-511 the same with "</w>", then one id per merge (the
   concatenated pair) in file order, then SOT and EOT. Official: 48,894 merges, SOT 49406, EOT 49407.
   A batch row is SOT + ids + EOT, zero-padded to 77 (the text tower pools at argmax(id) = EOT, and its
   causal mask hides the padding, so pad id 0 = "!" is harmless).

Stdlib `re` instead of the `regex` module: the letter/number/whitespace classes are built once from
`unicodedata` categories (the "faithful version"). Only the literals are case-insensitive, as in the
official pattern (so "'ſ" is the contraction 's). U+0345 is dropped, as the official case-insensitive
classes drop it. Remaining difference: code points unassigned in Python's Unicode database but assigned in
the regex module's newer tables.

Deviations (documented, exotic text only):
- Without ftfy installed, `_fix_text_stdlib` stands in: NFC, curly quotes, Latin ligatures, full/halfwidth
  forms and control characters are fixed as ftfy does (every single code point but the C1 controls gives
  ftfy's ids); mojibake, C1 controls (read as Windows-1252 by ftfy) and ftfy's own HTML unescape are not.
- decode() strips "</w>" per piece (the official code replaces it in the decoded string, which also eats a
  literal "</w>" typed in the text). Output dtype is int64 (official: int32; open_clip: int64).
- Special-token literals in the text map to SOT/EOT as in openai/CLIP (open_clip 3.3 does not do this).

Shapes: N texts, L context length (77).
"""
import functools
import gzip
import html
import itertools
import os
import re
import sys
import unicodedata
from collections import Counter

import torch

try:  # ftfy is optional: see the stdlib fallback below
    import ftfy
except ImportError:
    ftfy = None

BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
OFFICIAL_BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
OFFICIAL_VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
SOT_TEXT, EOT_TEXT = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
N_RESERVED = 2 * 256 + 2  # byte symbols, byte symbols + </w>, SOT, EOT; the rest of the vocab is merges


# --- 1. normalisation -------------------------------------------------------------------------------------
_QUOTES = str.maketrans({c: "'" for c in "\u02bc\u2018\u2019\u201a\u201b"}
                        | {c: '"' for c in "\u201c\u201d\u201e\u201f"} | {"\ufb05": "\u017ft"})  # ﬅ -> ſt
_COMPAT = frozenset([0x132, 0x133, 0x149, *range(0x1C4, 0x1CD), *range(0x1F1, 0x1F4),  # ĳ ŉ ǆ ǉ ǌ ǳ
                     0xFB00, 0xFB01, 0xFB02, 0xFB03, 0xFB04, 0xFB06,  # ﬀ ﬁ ﬂ ﬃ ﬄ ﬆ
                     0x3000, *range(0xFF01, 0xFFEF)])  # fullwidth and halfwidth forms
_KEEP_CONTROLS = frozenset("\t\n\f\r")
_DROP = frozenset("\x7f\ufeff\u206a\u206b\u206c\u206d\u206e\u206f\ufff9\ufffa\ufffb\ufffc")  # DEL, BOM, Cf


def _fix_text_stdlib(text: str) -> str:
    """The part of ftfy.fix_text that matters for labels and prompts (see the module docstring)."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(unicodedata.normalize("NFKC", c) if ord(c) in _COMPAT else c for c in text)
    text = text.translate(_QUOTES)
    return "".join(c for c in text if c in _KEEP_CONTROLS or not (c < " " or c in _DROP))


def normalize(text: str) -> str:
    """Step 1: fix, unescape twice, collapse whitespace, lowercase (the official order)."""
    text = ftfy.fix_text(text) if ftfy is not None else _fix_text_stdlib(text)
    text = html.unescape(html.unescape(text)).strip()
    return _patterns()[0].sub(" ", text).strip().lower()


# --- 2. pre-tokenisation ----------------------------------------------------------------------------------
@functools.cache
def _patterns() -> tuple:
    """(whitespace run, the alternation of step 2), built on first use from all 1.1M code points (~0.3 s).

    Whitespace is Unicode White_Space: categories Zs, Zl, Zp plus TAB..CR and NEL. (Python's str.isspace
    and re's \\s also accept U+001C..U+001F, which the official `regex` \\s does not.)
    """
    categories = list(map(unicodedata.category, map(chr, range(0x110000))))  # C loops: fast
    kind_of = {cat: "space" if cat in ("Zs", "Zl", "Zp") else
               {"L": "letter", "N": "number"}.get(cat[0], "other") for cat in set(categories)}
    kinds = [kind_of[cat] for cat in categories]  # code point -> kind
    for char in "\t\n\v\f\r\x85":
        kinds[ord(char)] = "space"
    kinds[0x345] = "dropped"  # official: its case variant is a letter, so under IGNORECASE it matches nothing
    ranges = {kind: [] for kind in ("space", "letter", "number", "other", "dropped")}
    start = 0
    for kind, run in itertools.groupby(kinds):  # runs of one kind -> "\\Ustart-\\Uend" class ranges
        end = start + sum(1 for _ in run) - 1
        ranges[kind].append(f"\\U{start:08x}-\\U{end:08x}")
        start = end + 1
    letter, number, space, other = ("[" + "".join(ranges[k]) + "]"
                                    for k in ("letter", "number", "space", "other"))
    literals = [re.escape(SOT_TEXT), re.escape(EOT_TEXT), "'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]
    pretoken = re.compile("(?i:" + "|".join(literals) + f")|{letter}+|{number}|{other}+")
    return re.compile(space + "+"), pretoken


def pretokenize(text: str) -> list:
    """Step 2 on already normalised text: "it's 1,000!" -> ["it", "'s", "1", ",", "0", "0", "0", "!"]."""
    return _patterns()[1].findall(text)


# --- 3. byte table ----------------------------------------------------------------------------------------
@functools.cache
def byte_table() -> dict:
    """byte -> one printable symbol. Iteration order is vocab order (it is also code-point order)."""
    kept = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    moved = [b for b in range(256) if b not in kept]  # controls, space, NBSP, soft hyphen
    table = {b: chr(b) for b in kept}
    table.update({b: chr(256 + i) for i, b in enumerate(moved)})
    return table


def word_symbols(word: str) -> tuple:
    """Step 3 and the start of step 4: "dog" -> ("d", "o", "g</w>")."""
    table = byte_table()
    symbols = [table[b] for b in word.encode("utf-8")]
    symbols[-1] += END_OF_WORD
    return tuple(symbols)


# --- 4. BPE -----------------------------------------------------------------------------------------------
def merge_pair(word: tuple, pair: tuple) -> tuple:
    """Merge every left-to-right, non-overlapping occurrence of `pair`: (a, a, a) + (a, a) -> (aa, a)."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def apply_bpe(word: tuple, ranks: dict) -> tuple:
    """Step 4: keep merging the lowest-ranked adjacent pair until no adjacent pair is ranked."""
    while len(word) > 1:
        pair = min(zip(word, word[1:]), key=lambda p: ranks.get(p, float("inf")))
        if pair not in ranks:
            break
        word = merge_pair(word, pair)
    return word


def read_bpe(path: str, n_merges: int) -> list:
    """The first `n_merges` merges after the header line, as (left, right) pairs."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = [line for line in f.read().split("\n")[1:] if line]
    if len(lines) < n_merges:
        raise ValueError(f"{path} has {len(lines)} merges after its header, but the vocabulary size needs "
                         f"{n_merges} (vocab_size = 512 byte symbols + merges + 2 special tokens)")
    merges = [tuple(line.split()) for line in lines[:n_merges]]
    bad = next((i for i, m in enumerate(merges) if len(m) != 2), None)
    if bad is not None:
        raise ValueError(f"{path} line {bad + 2}: expected two symbols 'a b', got {lines[bad]!r}")
    return merges


# --- 5. the tokenizer -------------------------------------------------------------------------------------
class Tokenizer:
    """Text -> ids with a BPE vocabulary file. Official file and size by default.

    tok = Tokenizer(); tok.encode("a photo of a dog.") -> [320, 1125, 539, 320, 1929, 269]
    tok(["a dog", "a cat"]) -> LongTensor (2, 77)
    """

    def __init__(self, bpe_path=None, vocab_size: int = OFFICIAL_VOCAB_SIZE):
        if vocab_size < N_RESERVED:
            raise ValueError(f"vocab_size={vocab_size} is below the {N_RESERVED} ids that are not merges")
        self.bpe_path = find_bpe(bpe_path)
        merges = read_bpe(self.bpe_path, vocab_size - N_RESERVED)
        symbols = list(byte_table().values())
        self.pieces = (symbols + [s + END_OF_WORD for s in symbols]
                       + ["".join(m) for m in merges] + [SOT_TEXT, EOT_TEXT])  # id -> piece
        assert len(self.pieces) == vocab_size, (len(self.pieces), vocab_size)
        self.encoder = {piece: i for i, piece in enumerate(self.pieces)}  # a repeated piece keeps its last id
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.vocab_size = vocab_size
        self.sot_id, self.eot_id = vocab_size - 2, vocab_size - 1
        self._byte_of = {sym: b for b, sym in byte_table().items()}
        self._cache = {SOT_TEXT: [self.sot_id], EOT_TEXT: [self.eot_id]}  # pre-token -> ids

    def encode(self, text: str) -> list:
        """Ids of `text` without SOT/EOT."""
        ids = []
        for word in pretokenize(normalize(text)):
            if word not in self._cache:  # BPE is the slow part and label sets repeat words a lot
                self._cache[word] = [self.encoder[p] for p in apply_bpe(word_symbols(word), self.ranks)]
            ids.extend(self._cache[word])
        return ids

    def decode(self, ids) -> str:
        """Ids -> text; each end of word becomes a space ("a photo of a dog . ")."""
        data = bytearray()
        for i in ids:
            piece = self.pieces[int(i)]
            if piece in (SOT_TEXT, EOT_TEXT):
                data += piece.encode("utf-8")
                continue
            word_end = piece.endswith(END_OF_WORD)
            data += bytes(self._byte_of[s] for s in piece.removesuffix(END_OF_WORD))
            data += b" " if word_end else b""
        return data.decode("utf-8", errors="replace")

    def __call__(self, texts, context_length: int = CONTEXT_LENGTH, truncate: bool = False) -> torch.Tensor:
        """SOT + ids + EOT per text, zero-padded -> LongTensor (N, context_length).

        Too long: ValueError naming the text, unless truncate=True (keep the first context_length ids and
        make the last one EOT, which is where the text tower pools).
        """
        assert context_length >= 2, f"context_length={context_length} cannot hold SOT and EOT"
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.zeros(len(texts), context_length, dtype=torch.long)  # (N, L)
        for row, text in enumerate(texts):
            ids = [self.sot_id] + self.encode(text) + [self.eot_id]
            if len(ids) > context_length:
                if not truncate:
                    shown = text if len(text) <= 60 else text[:57] + "..."
                    raise ValueError(f"text {shown!r} is {len(ids)} tokens with SOT/EOT, more than "
                                     f"context_length={context_length}; pass truncate=True to cut it")
                ids = ids[:context_length - 1] + [self.eot_id]
            out[row, :len(ids)] = torch.tensor(ids)
        return out


@functools.cache
def official_tokenizer() -> Tokenizer:
    """The official 49,408-id tokenizer, built on first use and then shared."""
    return Tokenizer()


def tokenize(texts, context_length: int = CONTEXT_LENGTH, truncate: bool = False) -> torch.Tensor:
    """clip.tokenize: LongTensor (N, context_length) with the official vocabulary."""
    return official_tokenizer()(texts, context_length=context_length, truncate=truncate)


# --- learning a small vocabulary --------------------------------------------------------------------------
def learn_bpe(texts, n_merges: int) -> list:
    """Learn up to `n_merges` merges from `texts` with the same steps 1-3 as encoding.

    Count the words, then repeatedly merge the adjacent pair with the highest count (summed over words,
    weighted by word frequency); ties go to the smallest pair in string order, so results are deterministic.
    Stops early when every word is a single symbol. Pairs are recounted after every merge: simple, and a few
    seconds for thousands of distinct words (2,000 merges on all label names: ~8 s), not for web corpora.
    """
    words = Counter(word_symbols(w) for t in texts for w in pretokenize(normalize(t))
                    if w not in (SOT_TEXT, EOT_TEXT))
    merges = []
    while len(merges) < n_merges:
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = Counter()
        for word, count in words.items():
            merged[merge_pair(word, best)] += count
        words = merged
    return merges


def write_bpe(path, merges) -> None:
    """Write merges in the official format: a header line, then "left right" per line, gzip-compressed.

    Load with Tokenizer(path, vocab_size=512 + len(merges) + 2).
    """
    for pair in merges:
        assert len(pair) == 2 and all(s and not any(c.isspace() for c in s) for s in pair), pair
    text = "#version: 0.2 - sigrl learn_bpe\n" + "".join(f"{a} {b}\n" for a, b in merges)
    # no file name and time in the gzip header: the same merges always give the same bytes
    with open(path, "wb") as raw, gzip.GzipFile("", "wb", fileobj=raw, mtime=0) as gz:
        gz.write(text.encode("utf-8"))


# --- finding the vocabulary file --------------------------------------------------------------------------
# The official merges ship with this repository (vocab/, MIT licence of openai/CLIP, see vocab/LICENSE), so
# CLIP's tokenizer needs no download, no environment variable and no other package.
SHIPPED_BPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vocab", BPE_NAME)
BPE_SOURCE = f"https://github.com/openai/CLIP/raw/main/clip/{BPE_NAME}"


def find_bpe(path=None) -> str:
    """The BPE file: `path` if given, else $SIGRL_BPE if set, else the official one shipped in vocab/.

    A place that is named (argument or variable) but missing is an error, never a silent fallback: a custom
    vocabulary must not be replaced by the official one.
    """
    if path is not None:
        tried = f"argument {str(path)!r}"
    elif os.environ.get("SIGRL_BPE"):
        path, tried = os.environ["SIGRL_BPE"], f"$SIGRL_BPE={os.environ['SIGRL_BPE']!r}"
    else:
        path, tried = SHIPPED_BPE, f"the copy shipped with this repository, {SHIPPED_BPE}"
    if os.path.isfile(path):
        return str(path)
    raise FileNotFoundError(f"CLIP BPE vocabulary not found (tried: {tried}); the official {BPE_NAME} is "
                            f"{BPE_SOURCE} (sha256 {OFFICIAL_BPE_SHA256})")


if __name__ == "__main__":
    tok = official_tokenizer()
    text = " ".join(sys.argv[1:]) or "There is a dog in the scene"
    ids = tok.encode(text)
    print(f"text:   {text!r}\nnormal: {normalize(text)!r}")
    print("pieces:", [tok.pieces[i] for i in ids])
    print("ids:   ", ids)
    print("batch: ", tuple(tok(text).shape), tok(text)[0, :len(ids) + 3].tolist())
