"""Fuzzed recipes: deterministic mutations of recipes/quickstart.yaml for robustness tests.

`fuzz_recipes(seed, n)` yields (name, recipe bytes). Every mutation is one a hostile or careless
user could write: wrong types, unknown keys, YAML tags, aliases (including alias bombs), deep
nesting, binary junk, byte-order marks, UTF-16, huge numbers. A correct xai answers each with
outputs or exit code 2 and a message, never a traceback, hang or unbounded memory.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Iterator

import yaml

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"

WEIRD_VALUES = (
    "null", "~", "true", "-1", "0", "3.5", ".nan", "-.inf", ".inf", "1e400", "9" * 40, "-" + "9" * 30,
    "''", "'\\0'", "[]", "{}", "[1, 2, 3]", "{a: 1}", "!!binary aGVsbG8=", "2001-02-30", "2001-02-03",
    "!!python/object:os.system ls", "!custom x", "!!set {a, b}", "!!omap [a: 1]", "0x7fffffffffffffff",
    "'" + "x" * 5000 + "'", "*undefined", "&a [1, *a]", "{<<: 3}", "[[[[1]]]]", "99999999",
)


def _base() -> dict:
    return yaml.safe_load(QUICKSTART.read_text())


def _dump(data: object) -> bytes:
    return yaml.safe_dump(data, sort_keys=False).encode()


def _paths(data: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path of nested mappings (lists by index)."""
    out = [prefix] if prefix else []
    if isinstance(data, dict):
        for k, v in data.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += _paths(v, prefix + (i,))
    return out


def _set_text(rng: random.Random, value_text: str) -> bytes:
    """quickstart with the YAML text `value_text` at a random key path (top level or nested)."""
    data = _base()
    path = rng.choice(_paths(data))
    node = data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = "__FUZZ__"
    text = yaml.safe_dump(data, sort_keys=False, width=10**6)
    return text.replace("__FUZZ__", value_text.replace("\n", " "), 1).encode()


def wrong_type(rng: random.Random) -> bytes:
    return _set_text(rng, rng.choice(WEIRD_VALUES))


def unknown_keys(rng: random.Random) -> bytes:
    data = _base()
    count = rng.choice((1, 5, 50, 2000, 20000))
    target = rng.choice((data, data["methods"], data["methods"]["occlusion"], data["writers"]["png"]))
    for i in range(count):
        target[f"unknown_{rng.randrange(10**6)}_{i}"] = i
    return _dump(data)


def alias_bomb(rng: random.Random) -> bytes:
    width, depth = rng.choice(((9, 9), (20, 10), (10, 6), (2, 40)))
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, depth)]
    where = rng.choice(("top", "methods", "options"))
    body = QUICKSTART.read_text()
    if where == "top":
        return (body + "\n".join(lines) + "\n").encode()
    anchors = "anchors:\n" + "".join(f"  {line}\n" for line in lines)
    if where == "methods":
        return (anchors + body.replace("methods:\n", f"methods:\n  bomb: *a{depth - 1}\n", 1)).encode()
    return (anchors + body.replace("{window: 8, stride: 4}", f"{{window: *a{depth - 1}, stride: 4}}")).encode()


def deep_nesting(rng: random.Random) -> bytes:
    depth = rng.choice((65, 500, 5000, 50000))
    style = rng.choice(("flow_map", "flow_list", "block_map", "block_list"))
    if style == "flow_map":
        value = "{a: " * depth + "1" + "}" * depth
    elif style == "flow_list":
        value = "[" * depth + "]" * depth
    elif style == "block_map":
        value = "\n" + "".join(" " * (i + 1) + "a:\n" for i in range(min(depth, 600)))
        return (QUICKSTART.read_text() + "deep:" + value).encode()
    else:
        value = "\n" + "".join(" " * (i + 1) + "-\n" for i in range(min(depth, 600)))
        return (QUICKSTART.read_text() + "deep:" + value).encode()
    return _set_text(rng, value)


def tags(rng: random.Random) -> bytes:
    tag = rng.choice(("!!python/object/apply:os.system", "!!python/name:os.system", "!foo", "!!map", "!!seq",
                      "!!str", "!!int", "!!float", "!!binary", "!!timestamp", "!<tag:example.com,2000:x>"))
    return _set_text(rng, f"{tag} {rng.choice(('x', '1', '[1]', '{a: 1}'))}")


def junk(rng: random.Random) -> bytes:
    body = QUICKSTART.read_bytes()
    kind = rng.choice(("random", "flip", "truncate", "nul", "invalid_utf8", "control"))
    if kind == "random":
        return bytes(rng.randrange(256) for _ in range(rng.choice((1, 64, 4096))))
    if kind == "truncate":
        return body[: rng.randrange(len(body))]
    data = bytearray(body)
    position = rng.randrange(len(data))
    if kind == "flip":
        data[position] ^= 1 << rng.randrange(8)
    elif kind == "nul":
        data[position:position] = b"\0"
    elif kind == "invalid_utf8":
        data[position:position] = rng.choice((b"\xff", b"\xc3\x28", b"\xed\xa0\x80"))
    else:
        data[position:position] = bytes([rng.choice((1, 7, 27, 127))])
    return bytes(data)


def encodings(rng: random.Random) -> bytes:
    text = wrong_type(rng).decode("utf-8")  # a mutation of its own, so encodings vary too
    kind = rng.choice(("bom", "utf16", "utf16be", "utf32", "bom_junk"))
    if kind == "bom":
        return b"\xef\xbb\xbf" + text.encode()
    if kind == "bom_junk":
        return b"\xef\xbb\xbf" + bytes(rng.randrange(256) for _ in range(32))
    return text.encode({"utf16": "utf-16", "utf16be": "utf-16-be", "utf32": "utf-32"}[kind])


def huge_numbers(rng: random.Random) -> bytes:
    key = rng.choice(("seed", "batch_size", "workers", "target", "preprocess", "window", "stride", "max_batch"))
    value = rng.choice(("99999999", "-8", "0", "1e308", str(2**64), "9" * 4400, ".nan"))
    data = _base()
    if key == "preprocess":
        data["preprocess"] = {"size": "__N__"}
    elif key in ("window", "stride", "max_batch"):
        data["methods"]["occlusion"][key] = "__N__"
    else:
        data[key] = "__N__"
    return _dump(data).replace(b"'__N__'", value.encode())


MUTATIONS: dict[str, Callable[[random.Random], bytes]] = {
    f.__name__: f for f in (wrong_type, unknown_keys, alias_bomb, deep_nesting, tags, junk, encodings, huge_numbers)
}


def fuzz_recipes(seed: int, n: int) -> Iterator[tuple[str, bytes]]:
    """`n` fuzzed recipes (name, bytes), the same for the same seed; mutation kinds take turns."""
    rng = random.Random(seed)
    kinds = list(MUTATIONS)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        yield f"{i:04d}-{kind}", MUTATIONS[kind](rng)
