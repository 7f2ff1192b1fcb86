"""Synthetic long-context tasks for checking sparse attention accuracy offline.

Four task families in the spirit of RULER / LongEval, each a (prompt, answer) pair whose answer can only
be produced by attending to one or a few *needles* buried in a long haystack:

- ``passkey``: one pass key (digits) hidden in filler text.
- ``kv_retrieval``: several ``record <key>: <value>`` lines; the question asks for one key.
- ``multi_needle``: several named magic numbers; the question asks for all of them, in a given order.
- ``variable_tracking``: chains ``VAR A = 12345``, ``VAR B = VAR A`` ...; the question asks for every
  variable that holds a value (with a distractor chain holding another value).

The haystack is drawn from a caller-provided text corpus (:class:`FillerCorpus`), so real text found on
the machine (:func:`find_local_text`) can be used. Lengths are targeted in tokens of a given tokenizer;
every piece of a prompt ends with a newline, and a tokenizer whose pre-tokenizer isolates ``"\\n"`` (as the
one of ``scripts/train_small_model.py`` does) tokenizes the whole prompt exactly as the concatenation of
its pieces, so :attr:`LongCtxTask.input_ids` and the token spans of the needles are exact.

Everything is deterministic given the seed.
"""

from __future__ import annotations

import os
import random
import re
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TASK_KINDS: tuple[str, ...] = ("passkey", "kv_retrieval", "multi_needle", "variable_tracking")

Encode = Callable[[str], list[int]]
EncodeBatch = Callable[[list[str]], list[list[int]]]

_WORDS = (
    "apple amber anchor arrow aspen badger banjo beacon birch bison cactus canyon cedar cobalt comet "
    "copper coral cricket delta desert dolphin ember falcon fern fjord garnet glacier granite harbor "
    "hazel heron indigo iris ivory jasper juniper kestrel lagoon lantern lemon lilac maple marble meadow "
    "nectar nickel oasis olive onyx orchid otter pebble pepper pine plum quartz raven reef saffron "
    "sage salmon sparrow spruce tulip tundra velvet violet walnut willow zephyr"
).split()


def approx_tokens(text: str) -> int:
    """Rough token count of ``text`` when no tokenizer is given (about 4 characters a token)."""
    return max(1, round(len(text) / 4))


def as_encoders(tokenizer: Any) -> tuple[Encode, EncodeBatch]:
    """Return ``(encode, encode_batch)`` without special tokens for a ``tokenizers.Tokenizer`` or an HF
    fast tokenizer (``PreTrainedTokenizerFast`` and friends)."""
    tok = getattr(tokenizer, "backend_tokenizer", tokenizer)

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

    return encode, encode_batch


# --------------------------------------------------------------------------------------------------
# Filler text
# --------------------------------------------------------------------------------------------------


def _split_chunks(text: str, chunk_chars: int) -> list[str]:
    """Split ``text`` into newline-terminated chunks of whole lines, at most ``chunk_chars`` each (a longer
    line is cut and each part newline-terminated)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    chunks: list[str] = []
    cur: list[str] = []
    cur_len = 0
    for line in text.split("\n"):
        if not line.strip():
            line = ""
        parts = [line[i : i + chunk_chars] for i in range(0, len(line), chunk_chars)] or [""]
        for part in parts:
            piece = part + "\n"
            if cur and cur_len + len(piece) > chunk_chars:
                chunks.append("".join(cur))
                cur, cur_len = [], 0
            cur.append(piece)
            cur_len += len(piece)
    if cur:
        chunks.append("".join(cur))
    return [c for c in chunks if c.strip()]


class FillerCorpus:
    """Haystack source: texts cut into newline-terminated chunks, optionally pre-tokenized.

    Args:
        texts: documents (e.g. from :func:`find_local_text`).
        encode: tokenizer function (no special tokens); ``None`` estimates token counts from characters.
        encode_batch: optional batched version of ``encode`` (used once, to tokenize every chunk).
        chunk_chars: maximum characters of a chunk (the granularity of length targeting and needle depth).
    """

    def __init__(
        self,
        texts: Sequence[str],
        encode: Encode | None = None,
        encode_batch: EncodeBatch | None = None,
        chunk_chars: int = 200,
    ) -> None:
        self.chunks: list[str] = [c for t in texts for c in _split_chunks(t, chunk_chars)]
        if not self.chunks:
            raise ValueError("FillerCorpus needs some non-blank text")
        self.encode = encode
        if encode is None:
            lens = [approx_tokens(c) for c in self.chunks]
            self.flat_ids: np.ndarray | None = None
        else:
            if encode_batch is not None:
                ids = encode_batch(self.chunks)
            else:
                ids = [encode(c) for c in self.chunks]
            lens = [len(x) for x in ids]
            self.flat_ids = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=sum(lens))
        self.lens = np.asarray(lens, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lens)])

    @property
    def n_tokens(self) -> int:
        """Total tokens (or estimated tokens) of the corpus."""
        return int(self.offsets[-1])

    def count(self, text: str) -> int:
        """Token count of ``text`` with this corpus's tokenizer (or the estimate)."""
        return len(self.encode(text)) if self.encode is not None else approx_tokens(text)

    def chunk_ids(self, k: int) -> np.ndarray:
        """Token ids of chunk ``k`` (requires a tokenizer)."""
        assert self.flat_ids is not None
        return self.flat_ids[self.offsets[k] : self.offsets[k + 1]]

    def sample_chunks(self, rng: random.Random, budget: int) -> list[int]:
        """Indices of consecutive chunks (wrapping around) starting at a random chunk, as many as fit in
        ``budget`` tokens."""
        n = len(self.chunks)
        k = rng.randrange(n)
        out: list[int] = []
        total = 0
        misses = 0
        while misses < n:
            length = int(self.lens[k])
            if total + length > budget:
                if out or misses > 64:
                    break
                misses += 1  # skip an oversized first chunk
            else:
                out.append(k)
                total += length
            k = (k + 1) % n
        return out

    def sample_ids(self, rng: random.Random, n_tokens: int) -> np.ndarray:
        """A contiguous stream of exactly ``n_tokens`` corpus token ids (plain language-model data)."""
        assert self.flat_ids is not None
        total = self.n_tokens
        start = rng.randrange(total)
        idx = (start + np.arange(n_tokens)) % total
        return self.flat_ids[idx]


_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "node_modules"}
_TEXT_SUFFIXES = (".py", ".md", ".rst", ".txt")


def find_local_text(
    max_bytes: int = 16_000_000,
    roots: Sequence[str | os.PathLike[str]] | None = None,
    per_package_bytes: int = 1_000_000,
    min_file_bytes: int = 1_000,
    max_file_bytes: int = 400_000,
) -> list[str]:
    """Collect real text found on this machine: Python sources and docs of the standard library and the
    installed packages (``sysconfig`` paths), in a deterministic order.

    At most ``per_package_bytes`` come from one top-level package, so the mix stays diverse, and
    ``max_bytes`` in total. Files that are not UTF-8 are skipped.
    """
    if roots is None:
        paths = sysconfig.get_paths()
        roots = [paths["stdlib"], paths["purelib"]]
    texts: list[str] = []
    total = 0
    seen: set[str] = set()
    for root in roots:
        root_path = Path(root)
        if not root_path.is_dir() or str(root_path.resolve()) in seen:
            continue
        seen.add(str(root_path.resolve()))
        for top in sorted(root_path.iterdir(), key=lambda p: p.name):
            if top.name in _SKIP_DIRS or top.name.startswith(".") or top.name.endswith(".dist-info"):
                continue
            files: list[Path] = []
            if top.is_file():
                files = [top]
            elif top.is_dir():
                for dirpath, dirnames, filenames in os.walk(top):
                    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
                    files.extend(Path(dirpath) / f for f in sorted(filenames))
            pkg_bytes = 0
            for f in files:
                if not f.name.endswith(_TEXT_SUFFIXES):
                    continue
                try:
                    size = f.stat().st_size
                    if size < min_file_bytes or size > max_file_bytes:
                        continue
                    text = f.read_bytes().decode("utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
                texts.append(text)
                pkg_bytes += len(text)
                total += len(text)
                if total >= max_bytes:
                    return texts
                if pkg_bytes >= per_package_bytes:
                    break
    return texts


# --------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------


@dataclass
class LongCtxTask:
    """One synthetic task.

    ``prompt + completion`` is the full training text; ``answer`` is ``completion`` without the leading
    space, the string scored by :func:`score_answer`. ``needle_spans`` are character spans of the needle
    lines in ``prompt`` (``needles[i] == prompt[s:e]``); ``target_needles`` indexes the needles the answer
    comes from. ``input_ids``/``completion_ids``/``needle_token_spans`` are set when the corpus has a
    tokenizer (no BOS/EOS included).
    """

    kind: str
    prompt: str
    answer: str
    completion: str
    needles: list[str]
    needle_spans: list[tuple[int, int]]
    target_needles: list[int]
    depths: list[float]
    target_tokens: int
    n_tokens: int
    input_ids: np.ndarray | None = None
    completion_ids: np.ndarray | None = None
    needle_token_spans: list[tuple[int, int]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _digits(rng: random.Random, n: int) -> str:
    return str(rng.randint(10 ** (n - 1), 10**n - 1))


def _upper(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(n))


def _lower(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))


def _assemble(
    kind: str,
    corpus: FillerCorpus,
    rng: random.Random,
    target_tokens: int,
    header: str,
    needles: list[str],
    depths: list[float],
    question: str,
    completion: str,
    target_needles: list[int],
    forbidden: list[str],
    meta: dict[str, Any],
) -> LongCtxTask | None:
    """Build the prompt ``header + haystack (needles inserted at depths) + question``; ``None`` if the
    haystack happens to contain one of the ``forbidden`` strings (the caller redraws)."""
    enc = corpus.encode
    fixed = [header, *needles, question]
    overhead = sum(corpus.count(t) for t in fixed)
    budget = max(0, target_tokens - overhead)
    chunk_idx = corpus.sample_chunks(rng, budget) if budget > 0 else []
    haystack_text = "".join(corpus.chunks[k] for k in chunk_idx)
    if any(s in haystack_text for s in forbidden):
        return None
    n = len(chunk_idx)
    # Insertion boundary of each needle (stable: equal boundaries keep the given order).
    bounds = [min(n, max(0, round(d * n))) for d in depths]
    order = sorted(range(len(needles)), key=lambda i: (bounds[i], i))
    texts: list[str] = [header]
    ids: list[np.ndarray] = []
    if enc is not None:
        ids.append(np.asarray(enc(header), dtype=np.int32))
    needle_char: dict[int, tuple[int, int]] = {}
    needle_tok: dict[int, tuple[int, int]] = {}
    pos_c = len(header)
    pos_t = len(ids[0]) if ids else 0
    j = 0
    for b in range(n + 1):
        while j < len(order) and bounds[order[j]] == b:
            i = order[j]
            t = needles[i]
            texts.append(t)
            needle_char[i] = (pos_c, pos_c + len(t))
            pos_c += len(t)
            if enc is not None:
                nid = np.asarray(enc(t), dtype=np.int32)
                ids.append(nid)
                needle_tok[i] = (pos_t, pos_t + len(nid))
                pos_t += len(nid)
            j += 1
        if b < n:
            k = chunk_idx[b]
            texts.append(corpus.chunks[k])
            pos_c += len(corpus.chunks[k])
            if enc is not None:
                cid = corpus.chunk_ids(k)
                ids.append(cid)
                pos_t += len(cid)
    texts.append(question)
    prompt = "".join(texts)
    input_ids = completion_ids = None
    if enc is not None:
        ids.append(np.asarray(enc(question), dtype=np.int32))
        input_ids = np.concatenate(ids)
        completion_ids = np.asarray(enc(completion), dtype=np.int32)
        n_tokens = len(input_ids)
    else:
        n_tokens = overhead + int(sum(corpus.lens[k] for k in chunk_idx))
    return LongCtxTask(
        kind=kind,
        prompt=prompt,
        answer=completion.strip(),
        completion=completion,
        needles=list(needles),
        needle_spans=[needle_char[i] for i in range(len(needles))],
        target_needles=target_needles,
        depths=list(depths),
        target_tokens=target_tokens,
        n_tokens=n_tokens,
        input_ids=input_ids,
        completion_ids=completion_ids,
        needle_token_spans=[needle_tok[i] for i in range(len(needles))] if enc is not None else None,
        meta=meta,
    )


def _passkey(
    corpus: FillerCorpus, rng: random.Random, target: int, depth: float | None
) -> LongCtxTask | None:
    key = _digits(rng, rng.choice((5, 6, 7)))
    d = rng.random() if depth is None else depth
    return _assemble(
        "passkey",
        corpus,
        rng,
        target,
        header=(
            "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the pass key.\n"
        ),
        needles=[f"The pass key is {key}. Remember it. {key} is the pass key.\n"],
        depths=[d],
        question="\nWhat is the pass key? The pass key is",
        completion=f" {key}",
        target_needles=[0],
        forbidden=[key],
        meta={"passkey": key},
    )


def _kv(corpus: FillerCorpus, rng: random.Random, target: int, depth: float | None) -> LongCtxTask | None:
    n = rng.randint(4, 12)
    keys: list[str] = []
    while len(keys) < n:
        k = _lower(rng, 6)
        if k not in keys:
            keys.append(k)
    values = [_digits(rng, 6) for _ in range(n)]
    q = rng.randrange(n)
    depths = [rng.random() for _ in range(n)]
    if depth is not None:
        depths[q] = depth
    return _assemble(
        "kv_retrieval",
        corpus,
        rng,
        target,
        header="Records with a key and a value are hidden in the text below. Remember them.\n",
        needles=[f"record {k}: {v}\n" for k, v in zip(keys, values)],
        depths=depths,
        question=f"\nWhat is the value of record {keys[q]}? The value of record {keys[q]} is",
        completion=f" {values[q]}",
        target_needles=[q],
        forbidden=[*keys, *values],
        meta={"keys": keys, "values": values, "query": keys[q]},
    )


def _multi(corpus: FillerCorpus, rng: random.Random, target: int, depth: float | None) -> LongCtxTask | None:
    n = rng.randint(2, 4)
    names = rng.sample(_WORDS, n)
    nums = [_digits(rng, 6) for _ in range(n)]
    depths = [rng.random() for _ in range(n)]
    if depth is not None:
        depths[0] = depth
    ask = list(range(n))
    rng.shuffle(ask)
    return _assemble(
        "multi_needle",
        corpus,
        rng,
        target,
        header="Special magic numbers are hidden inside the following text. Remember them.\n",
        needles=[f"The special magic number for {a} is {b}.\n" for a, b in zip(names, nums)],
        depths=depths,
        question=(
            f"\nWhat are the special magic numbers for {', '.join(names[i] for i in ask)}? "
            "The special magic numbers are"
        ),
        completion=" " + ", ".join(nums[i] for i in ask),
        target_needles=ask,
        forbidden=nums,
        meta={"names": names, "numbers": nums, "asked": [names[i] for i in ask]},
    )


def _vartrack(
    corpus: FillerCorpus, rng: random.Random, target: int, depth: float | None
) -> LongCtxTask | None:
    hops = rng.randint(2, 4)
    n_chains = 2
    names: list[str] = []
    while len(names) < hops * n_chains:
        v = _upper(rng, 5)
        if v not in names:
            names.append(v)
    values: list[str] = []
    while len(values) < n_chains:
        v = _digits(rng, 5)
        if v not in values:
            values.append(v)
    needles: list[str] = []
    depths: list[float] = []
    for c in range(n_chains):
        chain = names[c * hops : (c + 1) * hops]
        ds = sorted(rng.random() for _ in range(hops))
        if depth is not None and c == 0:
            ds[0] = min(depth, ds[1] if hops > 1 else depth)
        for h, v in enumerate(chain):
            rhs = values[c] if h == 0 else f"VAR {chain[h - 1]}"
            needles.append(f"VAR {v} = {rhs}\n")
            depths.append(ds[h])
    return _assemble(
        "variable_tracking",
        corpus,
        rng,
        target,
        header="Memorize and track the chains of variable assignments hidden in the following text.\n",
        needles=needles,
        depths=depths,
        question=f"\nWhich variables are assigned the value {values[0]}? They are",
        completion=" " + " ".join(names[:hops]),
        target_needles=list(range(hops)),
        forbidden=[*names, *values],
        meta={"chains": [names[c * hops : (c + 1) * hops] for c in range(n_chains)], "values": values},
    )


_BUILDERS = {"passkey": _passkey, "kv_retrieval": _kv, "multi_needle": _multi, "variable_tracking": _vartrack}


def make_task(
    kind: str,
    corpus: FillerCorpus,
    target_tokens: int,
    seed: int | None = None,
    rng: random.Random | None = None,
    depth: float | None = None,
) -> LongCtxTask:
    """Generate one task of ``kind`` (one of :data:`TASK_KINDS`) of about ``target_tokens`` prompt tokens
    (never more; less by at most one filler chunk plus what the header and question can't fill).

    Deterministic given ``seed`` (with the same corpus and tokenizer); or pass an ``rng`` to draw from a
    shared stream. ``depth`` in [0, 1] pins the (first) needle's relative position; random otherwise.
    """
    if kind not in _BUILDERS:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {TASK_KINDS}")
    if rng is None:
        rng = random.Random(f"longctx/{kind}/{seed}/{target_tokens}")
    for _ in range(100):
        task = _BUILDERS[kind](corpus, rng, target_tokens, depth)
        if task is not None:
            return task
    raise RuntimeError(f"could not draw a {kind} task whose haystack avoids its answer")


def make_tasks(
    kind: str, corpus: FillerCorpus, target_tokens: int, n: int, seed: int = 0
) -> list[LongCtxTask]:
    """``n`` deterministic tasks (seeds ``seed .. seed + n - 1``) with needle depths evenly spread."""
    return [
        make_task(kind, corpus, target_tokens, seed=seed + i, depth=(i + 0.5) / n if n > 1 else None)
        for i in range(n)
    ]


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """First line of ``text``, with surrounding whitespace and trailing periods removed and inner
    whitespace collapsed."""
    line = text.strip().split("\n", 1)[0] if text.strip() else ""
    line = re.sub(r"\s+", " ", line).strip()
    return line.rstrip(".").strip()


def score_answer(prediction: str, answer: str) -> float:
    """Exact match (1.0 or 0.0) of the normalized first line of ``prediction`` against ``answer``."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def accuracy(predictions: Sequence[str], tasks: Sequence[LongCtxTask]) -> float:
    """Mean exact-match score of ``predictions`` against ``tasks``' answers."""
    if len(predictions) != len(tasks):
        raise ValueError("predictions and tasks differ in length")
    if not tasks:
        return 0.0
    return sum(score_answer(p, t.answer) for p, t in zip(predictions, tasks)) / len(tasks)
