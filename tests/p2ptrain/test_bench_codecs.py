"""``p2ptrain bench codecs`` runs and keeps its JSON contract (a tiny size; not a timing test)."""

from __future__ import annotations

import json

import pytest

from p2ptrain.cli._main import main


def test_json_contract(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "codecs", "--size", "64KiB", "--repeat", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["size_bytes"] == 64 * 1024
    assert result["torch_threads"] >= 1
    rows = {r["name"]: r for r in result["codecs"]}
    assert list(rows) == ["none", "fp16", "bf16", "int8", "topk"]
    for r in rows.values():
        assert {"name", "encode_gbps", "decode_gbps", "wire_ratio", "rel_error"} <= set(r)
        assert r["encode_gbps"] > 0 and r["decode_gbps"] > 0
    assert rows["none"]["wire_ratio"] == 1.0 and rows["none"]["rel_error"] == 0.0
    assert rows["fp16"]["wire_ratio"] == 0.5
    assert 0.25 < rows["int8"]["wire_ratio"] < 0.26 and rows["int8"]["rel_error"] < 0.01
    assert rows["topk"]["wire_ratio"] == pytest.approx(0.02, rel=0.01)


def test_table_and_codec_choice(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "codecs", "--size", "64KiB", "--repeat", "1", "--codec", "int8:64"]) == 0
    out = capsys.readouterr().out
    assert "int8:64" in out and "fp16" not in out


def test_bad_arguments_exit_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["bench", "codecs", "--size", "64 Mio"])
    assert info.value.code == 2
    assert "unknown size unit" in capsys.readouterr().err
    assert main(["bench", "codecs", "--size", "64KiB", "--codec", "int9"]) == 2
    assert "unknown codec 'int9'" in capsys.readouterr().err
