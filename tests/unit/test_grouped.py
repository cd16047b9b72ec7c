"""Grouped (app/store/grouped.py): concurrent single calls made as one batch call, each caller answered with
its own result or error. The calls here are plain coroutines that record what they were given; the store's
use of it against PostgreSQL is tested in tests/saga/test_relay_batches.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.store.grouped import Grouped, GroupFull


class Recorder:
    """`one` and `many` calls of a Grouped, recorded; `many` answers an error for any item named 'bad'."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.release = asyncio.Event()
        self.release.set()

    async def one(self, item: str, **span: Any) -> str:
        self.calls.append(("one", [item]))
        await self.release.wait()
        if item == "bad":
            raise ValueError(item)
        return item.upper()

    async def many(self, items: list[str], **span: Any) -> list[str | Exception]:
        self.calls.append(("many", list(items)))
        await self.release.wait()
        return [ValueError(i) if i == "bad" else i.upper() for i in items]


def _grouped(recorder: Recorder, *, batch_max: int = 64, waiting_max: int = 1_000) -> Grouped[str, str]:
    return Grouped("test", recorder.one, recorder.many, batch_max=batch_max, waiting_max=waiting_max)


async def test_callers_that_arrive_together_are_sent_in_one_call_and_each_gets_its_own_result_or_error() -> None:
    recorder = Recorder()
    grouped = _grouped(recorder)
    results = await asyncio.gather(*(grouped(i) for i in ["a", "bad", "c"]), return_exceptions=True)
    assert recorder.calls == [("many", ["a", "bad", "c"])], f"expected one batch call: {recorder.calls}"
    assert results[0] == "A" and results[2] == "C", results
    assert isinstance(results[1], ValueError), f"expected the bad item's own error: {results}"


async def test_a_caller_alone_goes_through_the_one_item_call_and_its_error_is_its_own() -> None:
    recorder = Recorder()
    grouped = _grouped(recorder)
    assert await grouped("a") == "A"
    with pytest.raises(ValueError):
        await grouped("bad")
    assert recorder.calls == [("one", ["a"]), ("one", ["bad"])], recorder.calls


async def test_callers_that_arrive_while_a_call_runs_form_the_next_call_at_most_batch_max_each() -> None:
    recorder = Recorder()
    grouped = _grouped(recorder, batch_max=2)
    recorder.release.clear()
    first = asyncio.ensure_future(grouped("a"))
    await asyncio.sleep(0)  # the worker takes "a" alone and waits in its call
    await asyncio.sleep(0)
    later = [asyncio.ensure_future(grouped(i)) for i in ["b", "c", "d"]]
    await asyncio.sleep(0)
    recorder.release.set()
    assert await asyncio.gather(first, *later) == ["A", "B", "C", "D"]
    assert recorder.calls == [("one", ["a"]), ("many", ["b", "c"]), ("one", ["d"])], recorder.calls


async def test_a_caller_that_stops_waiting_leaves_its_item_sent_and_the_others_answered() -> None:
    recorder = Recorder()
    grouped = _grouped(recorder)
    recorder.release.clear()
    impatient = asyncio.ensure_future(grouped("a"))
    patient = asyncio.ensure_future(grouped("b"))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    impatient.cancel()
    recorder.release.set()
    assert await patient == "B"
    assert impatient.cancelled()
    assert recorder.calls == [("many", ["a", "b"])], f"expected the abandoned item sent all the same: {recorder.calls}"


async def test_past_its_waiting_bound_a_call_is_refused_and_nothing_is_sent() -> None:
    recorder = Recorder()
    grouped = _grouped(recorder, batch_max=1, waiting_max=2)
    recorder.release.clear()
    waiting = [asyncio.ensure_future(grouped(i)) for i in ["a", "b"]]
    await asyncio.sleep(0)
    with pytest.raises(GroupFull):
        await grouped("c")
    recorder.release.set()
    assert await asyncio.gather(*waiting) == ["A", "B"]
    assert "c" not in [item for _, items in recorder.calls for item in items]
