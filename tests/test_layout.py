"""The package layout: what is installed, and files saved by older releases still load."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"


def test_no_generic_top_level_name_is_installed():
    dist = importlib.metadata.distribution("oba-fx")
    top = set((dist.read_text("top_level.txt") or "").split())
    assert top == {"oba_fx", "models_zoo"}, top
    import oba_fx.passes.trace

    assert oba_fx.passes.trace.__name__ == "oba_fx.passes.trace"


def test_a_file_saved_by_0_1_loads_and_computes_the_same(tmp_path):
    """tests/data/legacy_slim_ee14332.pt was saved at commit ee14332, when the passes were the top-level
    package ``passes``: a slim GraphModule with the in-place helpers and a SlimMultiheadAttention. It runs in a
    fresh interpreter outside the repository, so no ``passes`` folder is on sys.path."""
    code = f"""
import sys, torch, oba_fx
m, meta = oba_fx.load({str(DATA / 'legacy_slim_ee14332.pt')!r}, with_meta=True)
assert 'passes' not in sys.modules, 'the alias outlived load()'
assert type(m.mha).__module__ == 'oba_fx.passes.attention', type(m.mha).__module__
torch.manual_seed(meta['probe_seed'])
with torch.no_grad():
    y = m(torch.randn(2, 3, 6, 6))
assert torch.equal(y, torch.tensor(meta['output'])), (y - torch.tensor(meta['output'])).abs().max()
oba_fx.save(m, {str(tmp_path / 'resaved.pt')!r})
assert b'passes.inplace' not in open({str(tmp_path / 'resaved.pt')!r}, 'rb').read().replace(b'oba_fx.passes', b'')
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_legacy_alias_leaves_a_users_own_passes_module_alone(tmp_path):
    (tmp_path / "passes.py").write_text("MINE = True\n")
    code = f"""
import passes, oba_fx
try:
    oba_fx.load({str(DATA / 'legacy_slim_ee14332.pt')!r})
except ValueError as e:
    assert 'passes' in str(e), e
import sys
assert sys.modules['passes'].MINE
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
