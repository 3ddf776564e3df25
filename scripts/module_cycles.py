#!/usr/bin/env python3
"""Import cycles between the top-level modules of each crate.

A top-level module is a file or directory under `crates/NAME/src` (lib.rs and main.rs
are the crate root, not modules). Module A depends on B when a non-test file of A
names `crate::B` in code (comments do not count). Prints every
cycle (as strongly connected groups) and the largest non-test source files; exits 1
when there is a cycle. Usage: python3 scripts/module_cycles.py [--max-lines N]
"""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def modules(src):
    mods = {}
    for entry in sorted(os.listdir(src)):
        path = os.path.join(src, entry)
        if entry in ("lib.rs", "main.rs"):
            continue
        name = entry[:-3] if entry.endswith(".rs") else entry
        if entry.endswith(".rs") or os.path.isdir(path):
            mods.setdefault(name, []).append(path)
    return mods


def files_of(paths):
    for p in paths:
        if os.path.isdir(p):
            for d, _, fs in os.walk(p):
                for f in fs:
                    if f.endswith(".rs"):
                        yield os.path.join(d, f)
        else:
            yield p


def strip_tests(text):
    # Drop `#[cfg(test)] mod tests { ... }` blocks written inline.
    at = text.find("#[cfg(test)]\nmod tests {")
    return text if at < 0 else text[:at]


def is_test_file(path):
    return os.path.basename(path) == "tests.rs" or os.sep + "tests" + os.sep in path


def sccs(graph):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            out.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def main():
    max_lines = 900
    if "--max-lines" in sys.argv:
        max_lines = int(sys.argv[sys.argv.index("--max-lines") + 1])
    cycles, big = [], []
    crates = os.path.join(ROOT, "crates")
    for crate in sorted(os.listdir(crates)):
        src = os.path.join(crates, crate, "src")
        if not os.path.isdir(src):
            continue
        mods = modules(src)
        graph = {m: set() for m in mods}
        for m, paths in mods.items():
            for f in files_of(paths):
                if is_test_file(f):
                    continue
                text = strip_tests(open(f).read())
                lines = text.count("\n")
                # Comments may name any module; only code is a dependency.
                text = re.sub(r"//[^\n]*", "", text)
                if lines > max_lines:
                    big.append((lines, os.path.relpath(f, ROOT)))
                for other in re.findall(r"\bcrate::([a-z_0-9]+)", text):
                    if other in mods and other != m:
                        graph[m].add(other)
        for group in sccs(graph):
            if len(group) > 1:
                cycles.append(f"{crate}: {' <-> '.join(group)}")
    for lines, f in sorted(big, reverse=True):
        print(f"over {max_lines} lines: {f} ({lines})")
    for c in cycles:
        print(f"cycle: {c}")
    print(f"{len(cycles)} cycles, {len(big)} files over {max_lines} lines")
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
