"""Two real OS processes exchange tensors over 127.0.0.1, plain and CURVE-encrypted."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import torch

from p2ptrain.transport import CurveKeys, Endpoint

ECHO = Path(__file__).with_name("_transport_echo.py")
T = 30.0  # the child imports torch first: seconds on a loaded 2-core box


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


TENSORS = [
    torch.randn(3 << 18),  # 3 MiB: four 1 MiB frames (the last partial)
    torch.tensor([float("nan"), float("inf"), -0.0]),  # bit patterns survive, NaN included
    torch.arange(-5, 5, dtype=torch.int64),
    torch.randn(33, dtype=torch.float64).to(torch.bfloat16),
    torch.randn(17).to(torch.float16),
    torch.tensor([True, False, True]),
    torch.randint(0, 255, (1000,), dtype=torch.uint8),
    torch.zeros(0, 5),
    torch.tensor(7, dtype=torch.int32),
    torch.randn(40, 30).t(),  # non-contiguous
]


@pytest.mark.slow
@pytest.mark.parametrize("secret", [None, "p2ptrain-test-secret"], ids=["plain", "curve"])
async def test_two_processes_exchange_bit_exact_tensors(secret: str | None) -> None:
    keys = CurveKeys.from_secret(secret) if secret else None
    async with Endpoint("parent", "proc", curve=keys) as ep:
        args = [sys.executable, str(ECHO), ep.address] + ([secret] if secret else [])
        child = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
        try:
            assert child.stdout is not None
            line = await asyncio.wait_for(child.stdout.readline(), T)
            ep.add_peer("child", line.decode().strip())
            await ep.send("child", "data", tag=[1, "x"], meta={"n": len(TENSORS)}, tensors=TENSORS, timeout=T)
            await ep.send("child", "data", tag=2, tensors=[torch.randn(100)], codec="bf16", timeout=T)
            first = await ep.recv(timeout=T)
            second = await ep.recv(timeout=T)
            assert (first.sender, first.kind, first.tag, first.meta) == ("child", "echo", [1, "x"], {"n": len(TENSORS)})
            for sent, got in zip(TENSORS, first.tensors, strict=True):
                assert (got.dtype, got.shape) == (sent.dtype, sent.shape)
                assert as_bytes(got) == as_bytes(sent)
            assert second.tag == 2 and second.tensors[0].dtype == torch.float32
            await ep.send("child", "bye", timeout=T)
            assert await asyncio.wait_for(child.wait(), T) == 0
            assert ep.drops() == {}
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
