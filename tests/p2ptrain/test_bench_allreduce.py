"""``p2ptrain bench allreduce`` runs both sides and keeps its JSON contract (small sizes; not a timing test)."""

from __future__ import annotations

import json

import pytest

from p2ptrain.cli._main import main


@pytest.mark.slow
def test_buckets_are_summed_as_a_training_step_sums_them(capsys: pytest.CaptureFixture[str]) -> None:
    # Real processes on 127.0.0.1: two p2ptrain members, then two gloo ranks.
    assert main(["bench", "allreduce", "--peers", "2", "--size", "1MiB", "--bucket", "256KiB", "--repeat", "2",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["size_bytes"], out["bucket_bytes"], out["buckets"]) == (1 << 20, 256 << 10, 4)
    assert out["p2ptrain_s"] > 0 and out["gloo_s"] > 0 and out["where"] == "loopback"
    assert out["ratio"] == pytest.approx(out["p2ptrain_s"] / out["gloo_s"], rel=0.1)  # from unrounded times


@pytest.mark.parametrize("bucket", ["1001", "0", "4"])
def test_a_bucket_that_is_not_whole_floats_or_too_small_is_refused(bucket: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "allreduce", "--size", "1MiB", "--bucket", bucket]) == 2
    assert f"--bucket {bucket} must be" in capsys.readouterr().err
