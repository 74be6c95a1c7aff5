"""Every ``diffopt.x.y`` name the README writes is reachable as written after a plain
``import diffopt`` (issue #17 item 14: ``diffopt.optim.learned.load`` raised AttributeError)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_names() -> list[str]:
    text = (ROOT / "README.md").read_text()
    names = set(re.findall(r"\bdiffopt(?:\.[A-Za-z_][A-Za-z0-9_]*)+", text))
    return sorted(n for n in names if not n.endswith((".py", ".md", ".png", ".json")))


def test_the_readme_names_modules_and_objects():
    names = readme_names()
    assert "diffopt.optim.learned.load" in names and "diffopt.unroll.InnerLoop" in names
    assert len(names) >= 15


def test_every_name_the_readme_writes_resolves_after_import_diffopt():
    # Each name is resolved after a fresh `import diffopt` (every diffopt module dropped from
    # sys.modules first), so one name's imports cannot make the next one reachable.
    code = (
        "import importlib, sys\n"
        "missing = []\n"
        "for name in sys.argv[1:]:\n"
        "    for module in [m for m in sys.modules if m == 'diffopt' or m.startswith('diffopt.')]:\n"
        "        del sys.modules[module]\n"
        "    obj = importlib.import_module('diffopt')\n"
        "    for part in name.split('.')[1:]:\n"
        "        try:\n"
        "            obj = getattr(obj, part)\n"
        "        except AttributeError:\n"
        "            missing.append(name)\n"
        "            break\n"
        "print('\\n'.join(missing))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, *readme_names()], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"not reachable after `import diffopt`:\n{done.stdout}"
