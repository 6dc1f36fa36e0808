"""Data sources over local TSV, JSONL and text files, with malformed lines counted and located.

TSV and text files are read through `tf.data.TextLineDataset`; JSONL files are parsed in Python
(JSON has no TF parser). For training (shuffled), a split of up to SHUFFLE_IN_MEMORY_BYTES of files
is held in memory by every host, shuffled whole at every epoch and divided among the hosts by
example; a larger one is divided by file when there are at least as many files with examples as
hosts (else by example), JSONL still held in memory (this host's files) and shuffled whole,
TSV/text streamed, shuffled by file and within seqio's buffer only. Either way the dataset is made
of TF ops, so the input iterator can be saved in a checkpoint. The first use of a split scans its
files once in Python to count examples (for examples-proportional mixing) and malformed lines,
which then fail the run with their count and location, or are skipped, as `on_malformed` says.

What is malformed: TSV, a line whose number of tab-separated fields differs from the header's
(or, without a header, from the number most lines have); JSONL, a line that is not a JSON
object, lacks a mapped key, or maps a key to a list/object, null or text with a lone surrogate
escape; any format, a line that is not UTF-8. Blank lines are skipped silently, and a UTF-8
byte-order mark at the start of a file is dropped. Compressed (.gz) files are refused with the fix.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence

import seqio
import tensorflow as tf

from mtjax.data import memory
from mtjax.errors import UserError
from mtjax.parallel import distributed

FORMATS = ("tsv", "jsonl", "text")
_EXTENSIONS = {".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".txt": "text",
               ".text": "text"}
_SHOWN_LOCATIONS = 5
# Up to this many bytes of files per split, a shuffled split is held in memory by every host,
# shuffled whole at every epoch and divided among hosts by example; larger TSV/text splits stream
# and larger JSONL splits hold this host's files only (see FileSource.get_dataset).
SHUFFLE_IN_MEMORY_BYTES = 512 * 2**20
_BOM = "\ufeff".encode()


class DataFileError(UserError, ValueError):
    """A data file is missing, empty, or has malformed lines; the message names it."""


# What the run asks for when a helper leaves `on_malformed` unset (config data.on_malformed).
RUN_DEFAULTS = {"on_malformed": "fail"}


def infer_format(path: str) -> str:
    """The format of a file from its extension (.tsv, .jsonl/.json, .txt/.text)."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".gz":
        raise DataFileError(
            f"{path!r} is compressed; mtjax reads plain text files: decompress it (gunzip -k)")
    if ext not in _EXTENSIONS:
        raise DataFileError(
            f"cannot tell the format of {path!r} from its extension; pass format= one of "
            f"{FORMATS}")
    return _EXTENSIONS[ext]


@dataclasses.dataclass(frozen=True)
class Scan:
    """What one pass over a split's files found."""

    examples: int
    malformed: int
    locations: tuple[str, ...]  # the first few "file:line: reason"
    header: tuple[str, ...] | None  # TSV column names when the files have a header
    fields: int | None  # TSV fields per line: the header's, else most lines'
    files: tuple[str, ...] = ()  # the split's files, in the order read
    file_examples: tuple[int, ...] = ()  # examples of each file
    file_bytes: tuple[int, ...] = ()  # bytes of each file, when scanned


def _lines(path: str):
    """(line number, bytes without the line ending) for every line, as TextLineDataset splits."""
    with tf.io.gfile.GFile(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            # Editors on Windows start UTF-8 files with a byte-order mark (and concatenated
            # files carry theirs into the middle): it is no part of the text.
            raw = raw.removeprefix(_BOM)
            yield number, raw.rstrip(b"\n").rstrip(b"\r")


@functools.cache
def _scan(files: tuple[str, ...], fmt: str, keys: tuple, header: bool, stamp: tuple) -> Scan:
    """Counts examples and malformed lines; `stamp` (each file's mtime and bytes) invalidates
    the cache on edits."""
    examples, malformed, located = 0, 0, []  # located: (order, "file:line: reason")
    names, expected = None, None
    file_examples = []
    # TSV without a header: the number of fields most lines have is the expected one, known
    # once every line is seen. (Taken from the first line, one stray line at the top made
    # every good line malformed: on_malformed='skip' trained on the stray line alone.)
    by_fields: dict[int, list[int]] = {}  # fields -> lines of it in each file
    first_of: dict[int, list[tuple[int, str, int]]] = {}  # fields -> first few (order, file, line)
    order = 0

    def bad(path, number, reason):
        nonlocal malformed
        malformed += 1
        if len(located) < _SHOWN_LOCATIONS:
            located.append((order, f"{path}:{number}: {reason}"))

    for i, path in enumerate(files):
        file_examples.append(examples)
        for number, raw in _lines(path):
            order += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                bad(path, number, "not UTF-8")
                continue
            if _blank(line) and not (fmt == "tsv" and header and number == 1):
                continue  # a blank line carries no example (editors leave one at the end)
            if fmt == "tsv":
                fields = line.split("\t")
                if header and number == 1:
                    if names is None:
                        names, expected = tuple(fields), len(fields)
                    elif tuple(fields) != names:
                        bad(path, number, f"header {fields} differs from {list(names)}")
                    continue
                if not header:
                    by_fields.setdefault(len(fields), [0] * len(files))[i] += 1
                    first = first_of.setdefault(len(fields), [])
                    if len(first) < _SHOWN_LOCATIONS:
                        first.append((order, path, number))
                    continue
                if len(fields) != expected:
                    bad(path, number, f"{len(fields)} tab-separated fields, expected {expected}")
                    continue
            elif fmt == "jsonl":
                reason = _json_problem(line, keys)
                if reason:
                    bad(path, number, reason)
                    continue
            examples += 1
        file_examples[-1] = examples - file_examples[-1]
    if by_fields:  # the most lines; a tie: the number of the first of them
        expected = max(by_fields, key=lambda n: (sum(by_fields[n]), -first_of[n][0][0]))
        for n, counts in by_fields.items():
            if n == expected:
                examples += sum(counts)
                file_examples = [a + b for a, b in zip(file_examples, counts, strict=True)]
            else:
                malformed += sum(counts)
                located += [(o, f"{path}:{number}: {n} tab-separated fields, expected "
                                f"{expected}") for o, path, number in first_of[n]]
    locations = [text for _, text in sorted(located)[:_SHOWN_LOCATIONS]]
    if fmt == "tsv" and header and names is not None:
        missing = [k for k in keys if isinstance(k, str) and k not in names]
        if missing:
            raise DataFileError(
                f"column(s) {missing} not in the header of {files[0]} (columns: {list(names)})")
    if fmt == "tsv" and expected is not None:
        too_far = [k for k in keys if isinstance(k, int) and not 0 <= k < expected]
        if too_far:
            raise DataFileError(
                f"column index(es) {too_far} out of range: {files[0]} has {expected} "
                "tab-separated fields per line")
    return Scan(examples, malformed, tuple(locations), names, expected, files,
                tuple(file_examples), tuple(length for _, length in stamp))


def _blank(line: str) -> bool:
    """Whitespace only, as the TSV/text reader's tf.strings.strip sees it: ASCII whitespace.
    (Python's own strip() also takes U+3000, NBSP and \\x1c-\\x1f for blank, and the count
    then missed lines the reader yields.)"""
    return not line.strip(" \t\n\v\f\r")


def _json_problem(line: str, keys: tuple) -> str | None:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return f"invalid JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
        return f"a JSON {type(obj).__name__}, expected an object"
    for key in keys:
        if key not in obj:
            return f"no key {key!r} (keys: {sorted(obj)[:8]})"
        if obj[key] is None:
            return f"key {key!r} is null, expected text or a number"
        if isinstance(obj[key], (dict, list)):
            return f"key {key!r} holds a {type(obj[key]).__name__}, expected text or a number"
        if isinstance(obj[key], str) and not _is_unicode(obj[key]):
            return (f"key {key!r} holds a lone surrogate escape (half of a \\uXXXX pair), "
                    "not text")
    return None


def _is_unicode(text: str) -> bool:
    """False for text with a lone surrogate (JSON's "\\ud83d" alone), which UTF-8 cannot
    hold: the reader's tensors could not be made of it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)  # true, false


class FileSource(seqio.FileDataSource):
    """A seqio source yielding one string feature per entry of `columns`.

    Args:
        split_to_files: split -> file pattern(s) (globs allowed).
        fmt: "tsv", "jsonl" or "text".
        columns: output feature -> column: a TSV column index or header name, a JSONL key;
            text files have one column, the line.
        header: TSV files start with a header line of column names.
        on_malformed: "fail", "skip", or None for the run's default (data.on_malformed).
        task_name: named in messages.
    """

    def __init__(self, split_to_files: Mapping[str, str | Sequence[str]], fmt: str,
                 columns: Mapping[str, int | str], *, header: bool = False,
                 on_malformed: str | None = None, task_name: str = "?"):
        if fmt not in FORMATS:
            raise DataFileError(f"format must be one of {FORMATS}, got {fmt!r}")
        if on_malformed not in (None, "fail", "skip"):
            raise DataFileError(f"on_malformed must be 'fail' or 'skip', got {on_malformed!r}")
        if header and fmt != "tsv":  # (text: the count held the line the reader skipped)
            raise DataFileError(
                f"task {task_name!r}: header=True applies to TSV files only, and these are "
                f"{fmt}: leave header unset")
        if fmt == "tsv" and not header and any(isinstance(c, str) for c in columns.values()):
            raise DataFileError(
                f"task {task_name!r}: TSV columns {dict(columns)} name header fields; pass "
                "header=True, or give column indices")
        self.fmt, self.columns, self.header = fmt, dict(columns), header
        self._on_malformed, self.task_name = on_malformed, task_name
        # Why a cycle length of 1: files are read one after another, so the interleave keeps no
        # per-file buffers and the iterator checkpoint stays small.
        super().__init__(read_file_fn=self._read_file, split_to_filepattern=dict(split_to_files),
                         cycle_length=1, block_length=1)

    @property
    def on_malformed(self) -> str:
        return self._on_malformed or RUN_DEFAULTS["on_malformed"]

    def list_shards(self, split: str) -> Sequence[str]:
        if split not in self._split_to_filepattern:
            raise DataFileError(
                f"task {self.task_name!r} has no split {split!r} (splits: {list(self.splits)})")
        # Every pattern must match: a typo in one file of a list would otherwise train on the
        # rest without a word (seqio passes a pattern without wildcards through unchecked).
        pattern = self._split_to_filepattern[split]
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        files = []
        for one in patterns:
            matched = [f for f in seqio.utils.list_files(one) if tf.io.gfile.exists(f)]
            if not matched:
                relative = not os.path.isabs(one) and "://" not in one
                raise DataFileError(
                    f"task {self.task_name!r}, split {split!r}: no file matches {one!r}"
                    + (f" (relative paths are read from the current directory, {os.getcwd()})"
                       if relative else ""))
            files += matched
        compressed = [f for f in files if f.endswith(".gz")]
        if compressed:
            raise DataFileError(
                f"task {self.task_name!r}, split {split!r}: {compressed[0]} is compressed; "
                "mtjax reads plain text files: decompress it (gunzip -k)")
        return files

    def scan(self, split: str) -> Scan:
        """Counts the split's examples and malformed lines (cached until a file changes)."""
        files = tuple(self.list_shards(split))
        stamp = tuple((s.mtime_nsec, s.length) for s in map(tf.io.gfile.stat, files))
        keys = tuple(self.columns.values())
        try:
            return _scan(files, self.fmt, keys, self.header, stamp)
        except DataFileError as e:
            raise DataFileError(f"task {self.task_name!r}, split {split!r}: {e}") from None

    def num_input_examples(self, split: str) -> int:
        return self.scan(split).examples

    def check(self, split: str) -> Scan:
        """Scans `split`; raises on malformed lines (unless skipping) or an empty split."""
        scan = self.scan(split)
        # No line a record: most likely one JSON document (a list, or an object over several
        # lines), which no line-by-line fix or skip makes into examples.
        not_jsonl = (" JSONL holds one JSON object per line, and no line here is one: write "
                     "each record on a line of its own (e.g. jq -c '.[]' data.json)"
                     if self.fmt == "jsonl" and scan.malformed and not scan.examples else "")
        if scan.malformed:
            where = "; ".join(scan.locations) + (" ..." if scan.malformed > len(scan.locations)
                                                 else "")
            if self.on_malformed == "fail":
                raise DataFileError(
                    f"task {self.task_name!r}, split {split!r}: {scan.malformed} malformed "
                    f"line(s): {where}." + (not_jsonl or " Fix them, or skip them with "
                                            "on_malformed='skip' (config data.on_malformed=skip)"))
            _warn_once(f"mtjax: task {self.task_name!r}, split {split!r}: skipping "
                       f"{scan.malformed} malformed line(s): {where}")
        if scan.examples == 0:
            raise DataFileError(
                f"task {self.task_name!r}, split {split!r} is empty: no example in "
                f"{', '.join(scan.files)}" + (f".{not_jsonl}" if not_jsonl else ""))
        return scan

    @property
    def supports_arbitrary_sharding(self) -> bool:
        # get_dataset divides the split among hosts itself: seqio gives it every ShardInfo.
        return True

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                    shard_info: seqio.ShardInfo | None = None, **kwargs) -> tf.data.Dataset:
        """The split, or this host's share of it.

        Shuffled and up to SHUFFLE_IN_MEMORY_BYTES of files, every host holds the whole split,
        puts it in the same new order at each epoch and takes every num_shards-th example of
        it: the hosts' shares are disjoint and of equal length, however many files there are
        and whatever their sizes. Otherwise by file when there are at least as many files
        with examples as hosts (each host's files of about equal bytes, see `host_files`),
        else by example."""
        del kwargs  # sequence_length, use_cached, num_epochs: a file source has no use for them
        scan = self.check(split)  # (its listing and sizes: the files are globbed once)
        files, sizes = list(scan.files), list(scan.file_bytes)
        if shuffle and sum(sizes) <= SHUFFLE_IN_MEMORY_BYTES:
            if self.fmt == "jsonl":
                return memory.examples_dataset(self._jsonl_columns(files), True, seed, shard_info)
            # Read in file order, then held and shuffled whole (see memory.examples_dataset).
            lines = self._stream(files, scan, False, seed)
            return memory.examples_dataset(_collect(lines, self.columns), True, seed, shard_info)
        if shuffle and self.fmt != "jsonl":
            _warn_once(
                f"mtjax: note: task {self.task_name!r}, split {split!r}: "
                f"{math.ceil(sum(sizes) / 2**20)} MiB of files, more than the "
                f"{SHUFFLE_IN_MEMORY_BYTES // 2**20} MiB held in memory to shuffle: they "
                f"stream, shuffled by file and within a buffer of examples only, so split a "
                f"sorted file into many shuffled files (of about equal size: with several "
                f"hosts, each keeps its own files)")
        num_shards = shard_info.num_shards if shard_info else 1
        # A file without examples (0 bytes, a header or blank lines only) is no host's share:
        # a host given one as its whole share had none, and its stream ended at once (files
        # of 3,000 examples and 0 bytes, or a header only, 2 hosts: 3,000 and 0).
        held = [i for i, count in enumerate(scan.file_examples) if count]
        by_file = num_shards > 1 and len(held) >= num_shards
        if by_file:
            files, sizes = [files[i] for i in held], [sizes[i] for i in held]
            shares = host_files(files, sizes, num_shards)
            self._warn_uneven(split, shares, dict(zip(files, sizes, strict=True)))
            files = shares[shard_info.index]
        if self.fmt == "jsonl":
            # Held in memory either way; shuffled, in a new order at each epoch.
            ds = memory.examples_dataset(self._jsonl_columns(files), shuffle, seed)
        else:
            ds = self._stream(files, scan, shuffle, seed)
        if num_shards > 1 and not by_file:  # fewer files than hosts: seqio's division
            ds = ds.shard(num_shards, shard_info.index)
        return ds

    def _warn_uneven(self, split: str, shares: list[list[str]], size: dict[str, int]) -> None:
        """A host's examples come as often as any other host's: the examples of a smaller
        share repeat more often, which a user can only fix by resizing the files."""
        totals = [sum(size[f] for f in share) for share in shares]
        if min(totals) < 0.9 * max(totals):
            _warn_once(
                f"mtjax: note: task {self.task_name!r}, split {split!r}: {len(size)} files "
                f"divided among {len(shares)} hosts make shares of {min(totals) / 2**20:.0f} to "
                f"{max(totals) / 2**20:.0f} MiB, and every host reads its share at the same "
                f"rate: the smaller shares' examples come up to "
                f"{max(totals) / max(min(totals), 1):.1f}x as often. Split the data into "
                f"files of about equal size (many more files than hosts)")

    def _stream(self, files: Sequence[str], scan: Scan, shuffle: bool, seed: int | None
                ) -> tf.data.Dataset:
        """The files' examples one file after another (in a new file order each epoch when
        shuffled). One file at a time: the interleave keeps no per-file buffers, and the
        input iterator's checkpoint stays small."""
        files_ds = tf.data.Dataset.from_tensor_slices(tf.constant(list(files), tf.string))
        if shuffle:
            files_ds = files_ds.shuffle(len(files), seed=seed)
        return files_ds.interleave(functools.partial(self._read_file, scan=scan),
                                   cycle_length=1, block_length=1,
                                   num_parallel_calls=tf.data.AUTOTUNE)

    def _read_file(self, path: tf.Tensor, scan: Scan) -> tf.data.Dataset:
        """TSV/text lines of one file -> examples; drops the lines the scan calls malformed."""
        ds = tf.data.TextLineDataset(path).skip(1 if self.header else 0)
        # Without a byte-order mark or a carriage return, as _lines reads the lines.
        ds = ds.map(lambda line: tf.strings.regex_replace(
            tf.strings.regex_replace(line, "^\ufeff", ""), "\r$", ""))
        # Valid UTF-8 is what transcoding leaves unchanged.
        ds = ds.filter(lambda line: tf.equal(
            tf.strings.unicode_transcode(line, "UTF-8", "UTF-8", errors="replace"), line))
        ds = ds.filter(lambda line: tf.strings.length(tf.strings.strip(line)) > 0)
        if self.fmt == "text":
            (feature,) = self.columns
            return ds.map(lambda line: {feature: line})
        index = {k: (scan.header.index(c) if isinstance(c, str) else c)
                 for k, c in self.columns.items()}
        ds = ds.map(lambda line: tf.strings.split(line, "\t"))
        ds = ds.filter(lambda fields: tf.equal(tf.size(fields), scan.fields))
        return ds.map(lambda fields: {k: fields[i] for k, i in index.items()})

    def _jsonl_columns(self, files: Sequence[str]) -> dict[str, list[str]]:
        """The files' JSONL records, column by column, in file order."""
        columns = {k: [] for k in self.columns}
        for path in files:
            for _, raw in _lines(path):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    continue
                if _blank(line) or _json_problem(line, tuple(self.columns.values())):
                    continue
                # Numbers as written in the file: json.dumps(1e5) would give "100000.0".
                obj = json.loads(line, parse_int=str, parse_float=str, parse_constant=str)
                for k, key in self.columns.items():
                    columns[k].append(_json_text(obj[key]))
        return columns


def host_files(files: Sequence[str], sizes: Sequence[int], hosts: int) -> list[list[str]]:
    """``files`` (at least ``hosts``) divided among hosts in shares of about equal bytes: the
    largest file first, each to the host holding the fewest bytes so far (ties: the lower
    host). Every host computes the same division from the same listing.

    seqio deals files out in turn: files of 200, 1,000 and 4,000 examples gave 4,200 examples
    to one host of 2 and 1,000 to the other, whose examples then came 4.2 times as often; here
    the 4,000-example file is one host's share, and the other two the other's."""
    shares: list[list[int]] = [[] for _ in range(hosts)]
    held = [0] * hosts
    for i in sorted(range(len(files)), key=lambda i: (-sizes[i], i)):
        # (Fewest files next: empty files would otherwise all go to one host, and leave
        # another host without any.)
        host = min(range(hosts), key=lambda h: (held[h], len(shares[h]), h))
        shares[host].append(i)
        held[host] += sizes[i]
    return [[files[i] for i in sorted(share)] for share in shares]


def _collect(ds: tf.data.Dataset, columns: Mapping[str, object]) -> dict[str, tf.Tensor]:
    """Every example of ``ds`` (string features), column by column."""
    for whole in ds.batch(2**31 - 1).take(1):
        return whole
    return {k: tf.constant([], tf.string) for k in columns}  # no example at all


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """Print a note once per process, on host 0 only: every host scans the same files and
    reached the same note, and a job's merged log (srun, a pod) showed it once per host."""
    if message not in _WARNED:
        _WARNED.add(message)
        if distributed.is_first_host():
            print(message, file=sys.stderr, flush=True)
