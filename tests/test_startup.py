"""The command line answers without importing torch where it needs none (issue 14)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "torchvision", "sklearn", "PIL")


def _imported_after(code: str, cwd) -> list[str]:
    script = (f"import sys, json\n{code}\n"
              f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [["--help"], ["ls"], ["ls", "--json"], ["extract", "--help"]])
def test_cli_without_work_imports_no_torch(tmp_path, args):
    code = ("from featcache.cli import main\n"
            f"try:\n    main({args!r}, standalone_mode=False)\nexcept SystemExit:\n    pass")
    assert _imported_after(code, tmp_path) == []


def test_reading_a_cache_imports_no_torch(tmp_path):
    assert _imported_after("import featcache\nfrom featcache import open_cache, list_caches", tmp_path) == []


def test_public_names_are_the_functions_whatever_the_import_order(tmp_path):
    code = ("import featcache.extract, featcache.predict\n"
            "from featcache.extract import ExtractConfig\n"
            "from featcache import extract, predict, probe_layers\n"
            "import types\n"
            "assert all(isinstance(f, types.FunctionType) for f in (extract, predict, probe_layers)), (extract, predict)\n"
            "assert sorted(featcache.__all__) == featcache.__all__ and all(hasattr(featcache, n) for n in featcache.__all__)")
    assert set(_imported_after(code, tmp_path)) >= {"torch"}
