"""One reader per published format. Every bad row becomes one `file:line: field: what is wrong` problem.

Formats (detected from the keys of the rows, never from the file name):
  medqa          {"question", "options": {"A": ..}, "answer_idx": "A".., ...}        (MedQA original, 4 or 5 options)
  medqa-hub      {"sent1", "ending0".."ending3"(4), "label": int}                      (GBaker/MedQA-USMLE-4-options-hf)
  medmcqa        {"question", "opa".."opd", "cop": int, "exp", "subject_name", "id"}  (cop 1-based as published, 0 on Hub)
  pubmedqa       ori_pqal.json {PMID: {"QUESTION", "CONTEXTS", "final_decision"}} or Hub {"question", "context", ..}
  mmlu           headerless CSV `question,A,B,C,D,answer` or Hub {"question", "choices", "answer": int}
  demo           {"id", "question", "options": [..], "answer": int, "explanation", "subject"}  (medtune's own layout)
  mapped         any JSONL/CSV/Parquet through a column mapping (see `parse_mapping`)
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path

from medtune.data.items import LETTERS, MCQItem
from medtune.errors import DataError, MedtuneError, not_a_file, shown

PUBMEDQA_OPTIONS = ("yes", "no", "maybe")


class RowError(Exception):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")


class DuplicateKey(ValueError):
    """A JSON object with a key twice: json.loads would silently keep the last value."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    for k in keys:
        if keys.count(k) > 1:
            raise DuplicateKey(f"duplicate key {k!r} (JSON keeps only the last value; which one was meant?)")
    return dict(pairs)


def load_json(text: str):
    """json.loads that refuses an object with a duplicate key (every JSON/JSONL reader of input files uses it)."""
    return json.loads(text, object_pairs_hook=_unique_keys)


MAX_ROWS = 2_000_000  # 10x MedMCQA's training set; a 120 KB Parquet file can claim millions of rows
MAX_FIELD_CHARS = 100_000  # 50x a long MedQA vignette, beyond any model's context: more is a broken file, not a question
# A Parquet file's decoded text: a 1 KB dictionary-encoded file can repeat one 99,000-character string 20,000 times
# (2 GB of Python strings). About twice MedMCQA's whole training set with its explanations (182,822 rows at ~620
# characters, as its 4,183-row dev file has): no real benchmark file comes near. Peak memory stays ~0.4 GB.
MAX_PARQUET_CHARS = 256_000_000
PARQUET_BATCH_ROWS = 256  # rows decoded at a time: at most 256 x a few fields x MAX_FIELD_CHARS before the count stops it
SURROGATE = re.compile("[\ud800-\udfff]")


def read_file(path: str | Path, cop_base: int | None = None, mapping: dict[str, str] | None = None,
              subject: str | None = None) -> list[MCQItem]:
    """Read every row of a local file into items; raise DataError listing every bad row, or MedtuneError."""
    path = Path(path)  # (cop_base's range is checked by sources.load, for every source)
    if not path.is_file():
        raise MedtuneError(f"{path}: {not_a_file(path)}")
    rows = list(read_rows(path, header=mapping is not None))
    if not rows:
        raise DataError([f"{path}: no rows"])
    fmt = "mapped" if mapping else detect_format(path, rows[0][1])
    if mapping:
        check_mapping(path, rows[0][0], rows[0][1], mapping)
    if fmt == "medmcqa":
        cop_base = decide_cop_base(path, rows, cop_base)
    items, problems, seen = [], [], {}
    for where, row in rows:
        try:
            item = READERS[fmt](row, where=where, path=path, cop_base=cop_base, mapping=mapping, subject=subject)
            _bounded(item)
        except RowError as e:
            problems.append(f"{where}: {e}")
            continue
        items.append(item)
        if item.id in seen:
            problems.append(f"{where}: id: duplicate id {item.id!r} (first at {seen[item.id]})")
        seen.setdefault(item.id, where)
    if problems:  # a key of a JSON object is part of `where`; a newline in it must not split a problem in two
        raise DataError([" ".join(problem.splitlines()) for problem in problems])
    return items


def _bounded(item: MCQItem) -> None:
    """Work per item stays bounded: no text beyond MAX_FIELD_CHARS (tokenizing 50 MB is minutes, scoring it memory).
    And every text is valid Unicode: a lone surrogate (JSON's "\\ud800" with no pair) passes json.loads but breaks the
    tokenizer and every UTF-8 write later, so it is refused here, where the file and line are known."""
    if len(item.options) < 2:
        raise RowError("options", f"{len(item.options)} option(s); a multiple-choice item needs at least 2")
    for field, texts in (("question", [item.question]), ("options", item.options),
                         ("explanation", [item.explanation or ""])):
        longest = max(len(t) for t in texts)
        if longest > MAX_FIELD_CHARS:
            raise RowError(field, f"{longest:,} characters; the limit is {MAX_FIELD_CHARS:,} (is the file broken?)")
    for field, texts in (("id", [item.id]), ("question", [item.question]), ("options", item.options),
                         ("explanation", [item.explanation or ""]), ("subject", [item.subject or ""])):
        for k, text in enumerate(texts):
            problem = not_unicode(text)
            if problem:
                raise RowError(f"{field}[{k}]" if field == "options" else field, problem)


def not_unicode(text: str) -> str | None:
    """Why `text` cannot be encoded as UTF-8 (a lone surrogate), or None. Python keeps a lone surrogate from a JSON
    escape or from undecodable command-line bytes (surrogateescape) as a str that no tokenizer or writer accepts."""
    found = SURROGATE.search(text)
    if found is None:
        return None
    return (f"holds a lone surrogate U+{ord(found.group()):04X} at character {found.start() + 1}, which is not valid "
            "Unicode (an unpaired \\ud800-style escape, or bytes that are not UTF-8); remove or replace it")


BOMS = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))


def read_text(path: Path) -> str:
    """The file's text: UTF-8, with or without a BOM (UTF-16 with a BOM too, as Windows tools write it). Binary data
    and invalid UTF-8 become one `file:line: encoding: ...` problem, never a traceback."""
    data = path.read_bytes()
    encoding = "utf-8"
    for bom, enc in BOMS:
        if data.startswith(bom):
            data, encoding = data[len(bom):], enc
            break
    if encoding == "utf-8" and b"\x00" in data[:8192]:
        raise DataError([(f"{path}: encoding: binary data (NUL bytes), not a text file; medtune reads JSONL, JSON, "
                          "CSV or Parquet")])
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError([(f"{path}:{line}: encoding: invalid {encoding.upper()} byte 0x{data[e.start]:02x} at column "
                          f"{column}; save the file as UTF-8")]) from None


NOT_READ = (".tsv", ".tab", ".xlsx", ".xls", ".ods")  # tables medtune has no reader for; any other suffix is JSONL


def read_rows(path: Path, header: bool = False) -> Iterator[tuple[str, dict]]:
    """(`file:line`, row) pairs. JSONL/JSON/CSV/Parquet; a JSON object keyed by id (PubMedQA) yields its values."""
    suffix = path.suffix.lower()
    if suffix in NOT_READ:  # read as JSON lines, every line was "json: Expecting value" (probe 9)
        raise MedtuneError(f"{path}: {suffix} files are not read; supported: .jsonl, .json, .csv, .parquet (save it "
                           "as CSV, with --map naming the columns if needed)")
    if suffix == ".parquet":
        yield from _parquet_rows(path)
        return
    if suffix == ".csv":
        yield from _csv_rows(path, header)
        return
    text = read_text(path)
    if suffix == ".json":
        yield from _json_rows(path, text)
        return
    problems = []
    for n, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 inside a question is no newline
        if not line.strip():
            continue
        try:
            row = load_json(line)
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{n}: json: {e.msg} at column {e.colno}")
            continue
        except ValueError as e:  # DuplicateKey, or a number of over 4,300 digits
            problems.append(f"{path}:{n}: json: {str(e)[:200]}")
            continue
        except RecursionError:  # the stdlib parser recurses once per [ or {
            raise DataError([f"{path}:{n}: json: {TOO_DEEP}"]) from None
        if not isinstance(row, dict):
            problems.append(f"{path}:{n}: row: expected a JSON object, got {type(row).__name__}")
            continue
        yield f"{path}:{n}", row
    if problems:
        raise DataError(problems)


TOO_DEEP = "nested too deeply (thousands of [ or {); an item is a flat object"


def _json_rows(path: Path, text: str) -> Iterator[tuple[str, dict]]:
    try:
        data = load_json(text)
    except json.JSONDecodeError as e:
        raise DataError([f"{path}:{e.lineno}: json: {e.msg} at column {e.colno}"]) from None
    except ValueError as e:  # DuplicateKey, or a number of over 4,300 digits
        raise DataError([f"{path}: json: {str(e)[:200]}"]) from None
    except RecursionError:
        raise DataError([f"{path}: json: {TOO_DEEP}"]) from None
    if isinstance(data, dict):  # PubMedQA ori_pqal.json: {PMID: row}
        pairs = [(f"{path}:{key if key.isprintable() else repr(key)}", {"__key__": key, **row} if isinstance(row, dict)
                  else row)
                 for key, row in data.items()]
    elif isinstance(data, list):
        pairs = [(f"{path}:{i}", row) for i, row in enumerate(data, start=1)]
    else:
        raise DataError([(f"{path}: json: expected a list of objects or an object keyed by id, got "
                          f"{type(data).__name__}")])
    bad = [f"{where}: row: expected a JSON object, got {type(row).__name__}" for where, row in pairs
           if not isinstance(row, dict)]
    if bad:
        raise DataError(bad)
    yield from pairs


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa  # only for parquet files
    import pyarrow.parquet as pq

    def unreadable(e: Exception) -> DataError:
        return DataError([f"{path}: parquet: not a readable Parquet file ({str(e).splitlines()[0][:200]})"])

    try:
        file = pq.ParquetFile(path)
        rows = file.metadata.num_rows  # from the footer: nothing is decompressed yet
        if rows > MAX_ROWS:
            raise DataError([f"{path}: parquet: {rows:,} rows; the limit is {MAX_ROWS:,} (split the file)"])
        batches = file.iter_batches(batch_size=PARQUET_BATCH_ROWS)
    except (pa.ArrowException, OSError) as e:
        raise unreadable(e) from None
    # Decoded in batches and counted as they come: the decoded text, not the file's size, is what costs memory
    # (dictionary encoding + zstd store a repeated string once), so it is capped before it is all materialised.
    i, chars = 0, 0
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as e:
            raise unreadable(e) from None
        if batch is None:
            return
        for row in batch.to_pylist():
            i += 1
            chars += _chars(row)
            if chars > MAX_PARQUET_CHARS:
                raise DataError([(f"{path}:row {i}: parquet: the text decoded so far is over {MAX_PARQUET_CHARS:,} "
                                 "characters (twice MedMCQA's training set; repeated values compress to "
                                 "almost nothing): is the file broken? split it into smaller files")])
            yield f"{path}:row {i}", row


def _chars(value) -> int:
    """Characters of text in a decoded Parquet row (strings inside lists and structs included)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_chars(v) for v in value.values())
    if isinstance(value, list):
        return sum(_chars(v) for v in value)
    return 0


def _csv_rows(path: Path, header_given: bool) -> Iterator[tuple[str, dict]]:
    import io

    # strict: a quote left open is an error, not a field that swallows the rows after it
    reader = csv.reader(io.StringIO(read_text(path), newline=""), strict=True)
    rows, lines, start = [], [], 1
    try:
        for values in reader:  # a quoted field can span lines: a row is named by the line it starts on
            rows.append(values)
            lines.append(start)
            start = reader.line_num + 1
    except csv.Error as e:  # named by the line the broken row starts on (line_num is past the end at EOF)
        hint = " (a quote opened on this line is never closed)" if "end of data" in str(e) or "expected after" in str(
            e) else ""
        raise DataError([f"{path}:{start}: csv: {e}{hint}"]) from None
    header = [h.strip() for h in rows[0]] if rows else []
    has_header = header_given or "question" in [h.lower() for h in header]
    if not has_header:  # MMLU as published: question,A,B,C,D,answer with no header
        header = ["question", *LETTERS[: max(len(rows[0]) - 2, 0)], "answer"] if rows else []
    for n, values in zip(lines[1:] if has_header else lines, rows[1:] if has_header else rows):
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            raise DataError([f"{path}:{n}: row: expected {len(header)} columns, got {len(values)}"])
        yield f"{path}:{n}", {"__csv__": True, **dict(zip(header, values))}


def detect_format(path: Path, row: dict) -> str:
    keys = set(row)
    if "options" in keys and "answer_idx" in keys:
        return "medqa"
    if "sent1" in keys and "ending0" in keys:
        return "medqa-hub"
    if {"opa", "opb", "opc", "opd", "cop"} <= keys:
        return "medmcqa"
    if "QUESTION" in keys or ("final_decision" in keys and ("context" in keys or "CONTEXTS" in keys)):
        return "pubmedqa"
    if "choices" in keys and "answer" in keys or "__csv__" in keys and "A" in keys:
        return "mmlu"
    if {"question", "options", "answer"} <= keys:
        return "demo"
    raise MedtuneError(
        f"{path}: unknown format (first row keys: {', '.join(sorted(shown(k) for k in keys if not k.startswith('__')))}); "
        "supported: MedQA, MedMCQA, PubMedQA, MMLU, medtune's demo layout, or pass --map question=COL,options=COL|COL,"
        "answer=COL for any other file"
    )


def decide_cop_base(path: Path, rows: list[tuple[str, dict]], cop_base: int | None) -> int:
    """MedMCQA `cop` is 1-based in the published files and 0-based on the Hub; decide from the whole file."""
    if cop_base is not None:
        return cop_base
    values = {_integer(row.get("cop")) for _, row in rows}  # as _index reads them; the rest fail per row
    has0, has4 = 0 in values, 4 in values
    if has0 and has4:
        raise DataError([f"{path}: cop: both 0 and 4 occur, so the file mixes 0-based and 1-based answers"])
    if has0:
        return 0
    if has4:
        return 1
    bad = [f"{where}: cop: expected an integer 0-4, got {row.get('cop')!r}" if _integer(row.get("cop")) is None
           else f"{where}: cop: {_integer(row.get('cop'))} is out of range 0..4" for where, row in rows
           if _integer(row.get("cop")) not in (1, 2, 3)]
    if bad:  # undecidable, and these rows would fail whatever the base: say so, not "only values 1-3 occur"
        raise DataError(bad)
    raise MedtuneError(
        f"{path}: cop: only values 1-3 occur, so the file alone can't tell 0-based (Hub) from 1-based (published); "
        "pass --cop-base 0 or --cop-base 1"
    )


def _text(row: dict, key: str, required: bool = True) -> str | None:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise RowError(key, "missing" if key not in row else "null" if value is None else "empty")
        return None
    if not isinstance(value, str):
        raise RowError(key, f"expected text, got {type(value).__name__}")
    return value  # as published: lm-evaluation-harness builds its prompts from the unstripped text


def _integer(value) -> int | None:
    """An integer as published (3 or "3"), else None ("B", "--5", a superscript digit, true)."""
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _index(value, n: int, field: str, base: int = 0) -> int:
    if _integer(value) is None:  # reported as it was written
        raise RowError(field, f"expected an integer, got {value!r}")
    value = _integer(value)
    if not base <= value < n + base:
        raise RowError(field, f"{value} is out of range {base}..{n - 1 + base}")
    return value - base


def _id(value, path: Path, where: str, field: str = "id") -> str:
    """The row's id as text (a string or an integer as published), else `<file stem>-<line>`. An object or list as an
    id would be written out as its Python repr and break every later lookup: refused."""
    if value is None:
        return _line_id(path, where)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RowError(field, f"expected text or an integer, got {type(value).__name__}")
    return str(value) if value else _line_id(path, where)


def _line_id(path: Path, where: str) -> str:
    return f"{path.stem}-{where.rsplit(':', 1)[-1].replace('row ', '')}"


def _medqa(row, where, path, **_) -> MCQItem:
    options = row.get("options")
    if not isinstance(options, dict) or not options:
        raise RowError("options", "expected an object like {\"A\": ..., \"B\": ...}")
    letters = sorted(options)
    if letters != list(LETTERS[: len(letters)]) or len(letters) not in (4, 5):
        raise RowError("options", f"expected keys A-D or A-E, got {', '.join(letters)}")
    texts = tuple(_text(options, k) or "" for k in letters)
    gold = row.get("answer_idx")
    if gold not in letters:
        raise RowError("answer_idx", f"expected one of {', '.join(letters)}, got {gold!r}")
    if isinstance(row.get("answer"), str) and row["answer"].strip() != texts[letters.index(gold)].strip():
        raise RowError("answer", f"{row['answer'][:60]!r} is not option {gold} ({texts[letters.index(gold)][:60]!r}) "
                                 "although answer_idx says so; which is right?")
    return MCQItem(id=_id(row.get("id"), path, where), question=_text(row, "question"), options=texts,
                   answer=letters.index(gold), subject=_text(row, "meta_info", False), benchmark="medqa")


def _medqa_hub(row, where, path, **_) -> MCQItem:
    n = 5 if "ending4" in row else 4
    texts = tuple(_text(row, f"ending{i}") for i in range(n))
    return MCQItem(id=_id(row.get("id"), path, where), question=_text(row, "sent1"), options=texts,
                   answer=_index(row.get("label"), n, "label"), benchmark="medqa")


def _medmcqa(row, where, path, cop_base, **_) -> MCQItem:
    texts = tuple(_text(row, k) for k in ("opa", "opb", "opc", "opd"))
    return MCQItem(id=_id(row.get("id"), path, where), question=_text(row, "question"), options=texts,
                   answer=_index(row.get("cop"), 4, "cop", base=cop_base), explanation=_text(row, "exp", False),
                   subject=_text(row, "subject_name", False), benchmark="medmcqa")


def _pubmedqa(row, where, path, **_) -> MCQItem:
    if "QUESTION" in row:  # ori_pqal.json, keyed by PMID
        question, contexts, pid = _text(row, "QUESTION"), row.get("CONTEXTS"), row.get("__key__")
        explanation = _text(row, "LONG_ANSWER", False)
    else:  # Hub pqa_labeled
        ctx = row.get("context") if isinstance(row.get("context"), dict) else {}
        question, contexts, pid = _text(row, "question"), ctx.get("contexts"), row.get("pubid")
        explanation = _text(row, "long_answer", False)
    if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
        raise RowError("CONTEXTS" if "QUESTION" in row else "context.contexts", "expected a list of text")
    decision = (_text(row, "final_decision", False) or "").strip().lower()
    if decision not in PUBMEDQA_OPTIONS:
        raise RowError("final_decision", f"expected yes, no or maybe, got {row.get('final_decision')!r}")
    # lm-eval's pubmedqa text, contexts joined by newlines and used as written (its preprocess_pubmedqa.doc_to_text)
    text = "Abstract: " + "\n".join(contexts) + "\nQuestion: " + question
    return MCQItem(id=_id(pid, path, where, "pubid"), question=text, options=PUBMEDQA_OPTIONS,
                   answer=PUBMEDQA_OPTIONS.index(decision), explanation=explanation, benchmark="pubmedqa")


def _mmlu(row, where, path, subject=None, **_) -> MCQItem:
    if "__csv__" in row:
        letters = [k for k in LETTERS if k in row]
        texts = tuple(_text(row, k) for k in letters)
        gold = (row.get("answer") or "").strip().upper()
        if gold not in letters:
            raise RowError("answer", f"expected one of {', '.join(letters)}, got {row.get('answer')!r}")
        answer = letters.index(gold)
        subject = subject or path.stem.removesuffix("_test").removesuffix("_dev").removesuffix("_val")
    else:
        choices = row.get("choices")
        if not isinstance(choices, list) or len(choices) < 2:
            raise RowError("choices", "expected a list of at least 2 options")
        texts = tuple(_text({"choices": c}, "choices") for c in choices)
        answer = _index(row.get("answer"), len(texts), "answer")
        subject = _text(row, "subject", False) or subject
    return MCQItem(id=_id(row.get("id"), path, where), question=_text(row, "question"), options=texts,
                   answer=answer, subject=subject, benchmark="mmlu")


def _demo(row, where, path, **_) -> MCQItem:
    options = row.get("options")
    if not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS):
        raise RowError("options", f"expected a list of 2-{len(LETTERS)} options")
    texts = tuple(_text({"options": o}, "options") for o in options)
    return MCQItem(id=_id(row.get("id"), path, where), question=_text(row, "question"), options=texts,
                   answer=_index(row.get("answer"), len(texts), "answer"),
                   explanation=_text(row, "explanation", False), subject=_text(row, "subject", False),
                   benchmark=str(row.get("benchmark") or "generic"))


def parse_mapping(spec: str) -> dict[str, str]:
    """`question=q,options=a|b|c|d,answer=label[,answer_base=1][,id=..][,subject=..][,explanation=..]`."""
    mapping = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in {"question", "options", "answer", "answer_base", "id", "subject", "explanation"}:
            raise MedtuneError(f"--map {spec!r}: bad entry {part!r}; keys: question, options, answer, answer_base, "
                               "id, subject, explanation")
        if key in mapping:
            raise MedtuneError(f"--map {spec!r}: {key} given twice")
        mapping[key] = value
    columns = mapping.get("options", "").split("|")
    if len(set(columns)) != len(columns) or not 2 <= len(columns) <= len(LETTERS):
        raise MedtuneError(f"--map {spec!r}: options must name 2 to {len(LETTERS)} different columns")
    if mapping.get("answer_base", "0") not in ("0", "1"):
        raise MedtuneError(f"--map {spec!r}: answer_base must be 0 or 1")
    missing = {"question", "options", "answer"} - set(mapping)
    if missing:
        raise MedtuneError(f"--map {spec!r}: missing {', '.join(sorted(missing))}")
    return mapping


def check_mapping(path: Path, where: str, row: dict, mapping: dict[str, str]) -> None:
    """Every column --map names exists in the first row (a CSV's header): else one line naming the columns there are."""
    named = [mapping[k] for k in ("question", "answer", "id", "subject", "explanation") if k in mapping]
    columns = [k for k in row if not k.startswith("__")]
    where = f"{path}:1" if "__csv__" in row else where  # a CSV's columns are its header line
    for column in [*named[:2], *mapping["options"].split("|"), *named[2:]]:
        if column not in row:
            raise MedtuneError(f"{where}: {column}: no such column (the columns are {', '.join(columns)[:300]}); "
                               "fix --map")


def _mapped(row, where, path, mapping, **_) -> MCQItem:
    cols = mapping["options"].split("|")
    texts = tuple(_text({c: str(row[c]) if isinstance(row.get(c), (int, float)) else row.get(c)} if c in row else {},
                        c) for c in cols)
    answer = _mapped_answer(row.get(mapping["answer"]), texts, cols, mapping["answer"],
                            int(mapping.get("answer_base", 0)))
    get = lambda key: _text({key: str(row[mapping[key]])}, key, False) if key in mapping and row.get(mapping[key]) \
        is not None else None
    return MCQItem(id=get("id") or _line_id(path, where), question=_text(row, mapping["question"]), options=texts,
                   answer=answer, explanation=get("explanation"), subject=get("subject"))


def _mapped_answer(gold, texts: tuple[str, ...], cols: list[str], field: str, base: int) -> int:
    """A --map answer is a letter, an option's text or an option number. A value that reads two ways to two different
    options (letter A, and the text of the option whose text is "A") is refused, not guessed."""
    value = gold.strip() if isinstance(gold, str) else gold
    number = _integer(value)
    readings = {}  # option index -> how the value names it
    if isinstance(value, str) and value.upper() in LETTERS[: len(texts)]:
        k = LETTERS.index(value.upper())
        readings[k] = f"letter {value.upper()} = option {k + 1} ({cols[k]}: {texts[k]!r})"
    if isinstance(value, str) and value in texts:
        k = texts.index(value)
        readings.setdefault(k, f"the text of option {k + 1} ({cols[k]})")
    if number is not None and base <= number < len(texts) + base:
        k = number - base
        readings.setdefault(k, f"number {number} = option {k + 1} ({cols[k]}: {texts[k]!r}; answer_base={base})")
    if not readings:
        return _index(gold, len(texts), field, base=base)  # says why it is none of the three
    if len(readings) > 1:
        fix = "as its letter" if number is not None else "as an option number (0-based, or 1-based with answer_base=1)"
        raise RowError(field, f"{gold!r} is ambiguous: {', or '.join(readings.values())}; write the answer {fix}")
    return next(iter(readings))


READERS = {"medqa": _medqa, "medqa-hub": _medqa_hub, "medmcqa": _medmcqa, "pubmedqa": _pubmedqa, "mmlu": _mmlu,
            "demo": _demo, "mapped": _mapped}
