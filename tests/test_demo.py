"""The README's first command: `patchkit demo` runs end to end and reports exactness."""

from __future__ import annotations

import pytest

from patchkit.cli import main


def test_demo_quick_runs_and_reverse_is_exact(capsys):
    pytest.importorskip("transformers")
    assert main(["demo", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "SdpaBertEncoder" in out or "patched" in out
    assert "reverse restored the original exactly (same module and parameter objects, same bytes): yes" in out
    assert "demo OK" in out
