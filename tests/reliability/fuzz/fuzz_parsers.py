"""Coverage-guided fuzzing of warmstart's parsers with atheris (libFuzzer for Python).

    pip install atheris
    python tests/reliability/fuzz/fuzz_parsers.py TARGET [CORPUS_DIR ...] [-atheris_runs=N]
    python tests/reliability/fuzz/fuzz_parsers.py TARGET -runs=100000 -max_total_time=60

TARGET is one of: header, index, toc, manifest, chunk_index, profile, layer (see targets.py).
Seed it with tests/reliability/fuzz/corpus/TARGET; libFuzzer writes new interesting inputs
into the first corpus folder given, and a crashing input to ./crash-<sha1>. An input that
crashes is a bug: copy it into corpus/TARGET/ as `reject-...` (or `accept-...`) once fixed,
so test_fuzz_corpus.py replays it from then on. Without atheris installed, `--replay` runs
the corpus (or any files given) through the same target and reports the outcome.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAMES = ("header", "index", "toc", "manifest", "chunk_index", "profile", "layer")


def replay(target: str, paths: list[str]) -> int:
    from fuzz.targets import TARGETS

    files = []
    for p in paths:
        files += ([os.path.join(p, n) for n in sorted(os.listdir(p))] if os.path.isdir(p)
                  else [p])
    for f in files:
        with open(f, "rb") as fh:
            print(f"{TARGETS[target](fh.read()):9} {f}")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in NAMES:
        print(__doc__, file=sys.stderr)
        return 2
    target = argv[1]
    if "--replay" in argv:
        paths = [a for a in argv[2:] if a != "--replay"]
        here = os.path.dirname(os.path.abspath(__file__))
        return replay(target, paths or [os.path.join(here, "corpus", target)])
    import atheris

    with atheris.instrument_imports(include=["warmstart"]):  # coverage of warmstart's code
        from fuzz.targets import TARGETS
    check = TARGETS[target]

    def one_input(data: bytes) -> None:
        check(data)

    atheris.Setup([argv[0], *argv[2:]], one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
