"""Hostile inputs shared by the bad-input tests: unicode edge cases, SQL-injection strings,
HTML/JS payloads, and malformed files of every supported format. Each payload that can run
sets window.__pwned or opens a dialog, so a browser test can tell whether any ran."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# Text that must round-trip exactly.
UNICODE = {
    "rtl-arabic": "مرحبا، كيف حالك؟ ‏(RLM)",
    "rtl-override": "abc \u202egnp.exe\u202c and \u2067isolate\u2069",
    "zero-width": "zero\u200bwidth\u200cnon\u200djoiner\ufeffbom\u2060word-joiner",
    "combining": "Z\u0338\u0322\u031ba\u0334\u031f\u0350l\u0301go e\u0301",
    "astral": "\U0001D544\U0001D552\U0001D565\U0001D559 \U0001F469\u200d\U0001F469\u200d\U0001F467 \U0001F3F3\ufe0f\u200d\U0001F308",
    "controls": "tab\there\rcarriage\x1bescape\x7fdel\u2028line-sep\u2029para-sep",
    "noncharacters": "\ufffe\uffff\U0010ffff replacement \ufffd",
}
SQL_INJECTION = {
    "drop-table": "'); DROP TABLE vote; --",
    "bobby": "Robert'); DROP TABLE prompt;--",
    "or-true": "\" OR 1=1 --",
    "placeholders": "%s %(x)s ? :name $1",
    "backslash": "\\'; SELECT pg_sleep(5); --",
    "union": "x' UNION SELECT password_hash FROM rater --",
}
PWN = "window.__pwned=1"
HTML_JS = {
    "script": f"<script>{PWN}</script>",
    "img-onerror": f'<img src=x onerror="{PWN}">',
    "svg-onload": f"<svg onload={PWN}></svg>",
    "iframe-srcdoc": f"<iframe srcdoc=\"<script>parent.{PWN}</script>\"></iframe>",
    "javascript-link": f"[click me](javascript:{PWN})",
    "html-javascript-link": f'<a href="javascript:{PWN}">click</a>',
    "details-ontoggle": f"<details open ontoggle={PWN}>x</details>",
    "style-breakout": f"</style><script>{PWN}</script>",
    "textarea-breakout": f"</textarea><script>{PWN}</script>",
    "alert": "<script>alert(1)</script><img src=x onerror=alert(2)>",
    "template-injection": "${" + PWN + "} {{constructor.constructor('" + PWN + "')()}}",
    "data-uri": f"<a href=\"data:text/html,<script>{PWN}</script>\">d</a>",
}
# Refused with a clear error (the store cannot hold them as text).
UNSTORABLE = {"nul": "nul\x00here", "lone-surrogate": "half \ud800 a pair"}


def jsonl_bytes(rows: list) -> bytes:
    return "".join((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n" for row in rows).encode()


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _corrupt_middle(data: bytes) -> bytes:
    """A parquet file whose footer is intact but whose data pages are garbage."""
    middle = bytearray(data)
    for i in range(8, len(data) // 2):
        middle[i] = 0xAB
    return bytes(middle)


GOOD_ROWS = [{"prompt": "fine"}, {"prompt": "also fine", "chosen": "yes", "rejected": "no"}]
_GOOD_PARQUET = parquet_bytes(pa.Table.from_pylist([{"prompt": f"row {i} " + "x" * 50} for i in range(2000)]))

# name -> (file name, bytes); every one must be refused with a one-line error naming the file.
MALFORMED: dict[str, tuple[str, bytes]] = {
    "jsonl-invalid-utf8": ("bad.jsonl", jsonl_bytes(GOOD_ROWS) + b'{"prompt": "caf\xe9 \xff"}\n'),
    "jsonl-utf16": ("bad.jsonl", '{"prompt": "utf-16 text"}\n'.encode("utf-16")),
    "jsonl-gzip": ("bad.jsonl", gzip.compress(jsonl_bytes(GOOD_ROWS))),
    "jsonl-truncated": ("bad.jsonl", jsonl_bytes(GOOD_ROWS)[:-9]),
    "jsonl-deep-nesting": ("bad.jsonl", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"),
    "jsonl-huge-integer": ("bad.jsonl", b'{"prompt": "x", "strength": 1' + b"0" * 5000 + b"}\n"),
    "jsonl-nan-margin": ("bad.jsonl", b'{"prompt": "x", "chosen": "a", "rejected": "b", "margin": NaN}\n'),
    "jsonl-array-rows": ("bad.jsonl", b'["prompt", "x"]\n'),
    "jsonl-empty": ("bad.jsonl", b""),
    "jsonl-blank-lines": ("bad.jsonl", b"\n\n   \n\t\n"),
    "jsonl-binary": ("bad.jsonl", bytes(range(256)) * 64),
    "jsonl-nul-escape": ("bad.jsonl", jsonl_bytes([{"prompt": UNSTORABLE["nul"]}])),
    "jsonl-lone-surrogate": ("bad.jsonl", b'{"prompt": "ok"}\n{"prompt": "half \\ud800 a pair"}\n'),
    "jsonl-surrogate-in-tags": ("bad.jsonl", b'{"prompt": "ok", "tags": ["\\udfff"]}\n'),
    "jsonl-raw-nul-byte": ("bad.jsonl", b'{"prompt": "raw\x00nul"}\n'),
    "csv-invalid-utf8": ("bad.csv", b"prompt\nfine\ncaf\xe9 \xff\n"),
    "csv-nul-byte": ("bad.csv", b"prompt\nfine\nnul\x00here\n"),
    "csv-cesu-surrogate": ("bad.csv", b"prompt\nhalf \xed\xa0\x80 a pair\n"),
    "csv-unterminated-quote": ("bad.csv", b'prompt,tags\n"never closed,a\n'),
    "csv-header-only": ("bad.csv", b"prompt,tags\n"),
    "csv-no-prompt-column": ("bad.csv", b"question,answer\nwhat,that\n"),
    "csv-extra-cells": ("bad.csv", b"prompt\nok\nbad,extra,cells\n"),
    "csv-binary": ("bad.csv", bytes(range(256)) * 64),
    "csv-deep-nesting-cell": ("bad.csv", b'messages\n"' + b"[" * 100_000 + b"]" * 100_000 + b'"\n'),
    "csv-quote-after-quoted-cell": ("bad.csv", b'prompt,tags\n"closed"then more,a\n'),
    "parquet-random-bytes": ("bad.parquet", bytes(range(256)) * 64),
    "parquet-truncated": ("bad.parquet", _GOOD_PARQUET[: len(_GOOD_PARQUET) // 2]),
    "parquet-corrupt-pages": ("bad.parquet", _corrupt_middle(_GOOD_PARQUET)),
    "parquet-empty-file": ("bad.parquet", b""),
    "parquet-no-rows": ("bad.parquet", parquet_bytes(pa.table({"prompt": pa.array([], pa.string())}))),
    "parquet-int-prompt": ("bad.parquet", parquet_bytes(pa.table({"prompt": [1, 2, 3]}))),
    "parquet-binary-invalid-utf8": ("bad.parquet", parquet_bytes(pa.table({"prompt": pa.array([b"ok", b"\xff\xfe"])}))),
    "parquet-nul": ("bad.parquet", parquet_bytes(pa.table({"prompt": ["fine", UNSTORABLE["nul"]]}))),
    "parquet-bad-messages": ("bad.parquet", parquet_bytes(pa.table({"messages": [[{"role": "user", "content": 5}]]}))),
    "parquet-null-prompt": ("bad.parquet", parquet_bytes(pa.table({"prompt": pa.array([None, None], pa.string())}))),
    "unknown-extension": ("bad.txt", jsonl_bytes(GOOD_ROWS)),
}


def write(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path
