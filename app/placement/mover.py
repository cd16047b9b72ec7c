"""The slot mover (issue 11, DESIGN D13): a client-side process driving the state machine that migration 0008
records in `slot_moves` on the source and the target shard database.

    copy        the range's per-slot rows (app/store/slotdata.py), read in one snapshot of the source and
                upserted into the target in batches, while writes continue
    catch up    the change log (`slot_move_changes`, written by triggers in the writers' transactions): the
                rows it names after the move's cursor are copied again, until the lag is small
    pre-verify  once the catch-up is within a small lag, and before the freeze: a hash of every row of the
                range on both sides; the keys that differ are remembered (D), and from then on every key the
                catch-up consumes from the change log (C); then the catch-up closes the lag again
    freeze      the range's ownership becomes `moving` on the source (waits for the postings past the fence;
                later ones are answered 503 slot_moving); the sagas debited from the range must settle (bounded
                wait, else the move aborts); a last catch-up empties the log
    verify      per table, the rows of D and C compared one by one (Mover.verify_changed, which says why that
                is enough), and every account of the target at what the move pre-booked; a mover resumed without
                its pre-verify, or run with --full-verify, compares every row of the range (Mover.verify). A
                difference aborts the move and unfreezes the source
    switch      source: a check of the range's balances recorded (count, hash, totals: migration 0036), the
                range's total per currency booked out in one posting against the transit account towards the
                target (its range account `mvr_<move>_<currency>` debited), the range `moved`, naming the target
                (`switching`); target: each account's balance was pre-booked before the freeze against the
                target's range account (the last round just before it); now one posting per currency from the
                transit account and, for the accounts whose balance differs (the mover reads both sides), the
                difference, then the same check as the source's, or nothing (migrations 0031, 0036); the range
                owned with epoch + 1 (`switched`)
    cleanup     source: each account of the range booked to zero against its range account (migration 0028:
                outside the freeze), and the range's stored answers and inbox rows deleted (its journal stays,
                archived)

Every step is idempotent and recorded before the next begins, so running the mover again after any crash (of
the mover, a database, a regional service) continues from the recorded phase. Before `switching` a move can be
cancelled (or is aborted by a failed verify): the source unfrozen, the target's pre-booked balances booked back
to zero and its copies dropped. From
`switching` on it only goes forward: the source's balances are booked out, and the target books them in.

One mover at a time runs a move: `run` and `cancel` hold a session advisory lock keyed from the move's id on the
source shard's connection for as long as they act, and a second mover (or cancel) of the same move is refused at
once (MoveRefused naming the move). A killed mover's session ends with its connection, and its lock with it
(its server sessions check for the client every MOVE_CLIENT_CHECK_INTERVAL_MS, even mid-statement), so the
operator's re-run after a crash is never refused for a dead mover.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from app import limits
from app.ops.target import OpsError, Target
from app.store.slotdata import SLOT_TABLES, SlotTable
from app.topology.ids import new_ulid

ACTIVE = ("copying", "catching_up", "frozen", "switching")
CANCELLABLE = ("copying", "catching_up", "frozen")
FINAL = ("done", "cancelled", "aborted")

Progress = Callable[[str], None]


class MoveRefused(OpsError):
    """The move cannot start (or go on) as asked; nothing was changed by this call."""


# The seed of the move's advisory lock key, hashtextextended(move id, seed): other advisory locks of the schema
# hash other things with seeds 7 and 11 (migrations 0002, 0014).
MOVE_LOCK_SEED = 13

# The sagas debited from the move's range that are still pending, as a condition on `transfers t` with $1 the
# source shard and $2, $3 the range's first and last slot. The freeze waits until none is left, nudging their
# outbox messages meanwhile, and names them when the wait runs out (Mover._sagas_settled,
# _show_pending_sagas); txr_move_switch_out checks the same condition under the switch (migration 0019).
_PENDING_SAGAS_OF_RANGE_SQL = (
    "t.state = 'pending' and t.debit_shard = $1 and txr_id_slot(t.debit_account) between $2 and $3"
)


@dataclass(frozen=True)
class MoveSpec:
    id: str
    slot_lo: int
    slot_hi: int
    source_shard: str
    source_region: str
    target_shard: str
    target_region: str
    epoch: int

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "slot_lo": self.slot_lo, "slot_hi": self.slot_hi, "source_shard": self.source_shard,
            "source_region": self.source_region, "target_shard": self.target_shard,
            "target_region": self.target_region, "epoch": self.epoch,
        }

    def plan(self) -> list[str]:
        return [
            f"move slots {self.slot_lo}-{self.slot_hi} from shard {self.source_shard} ({self.source_region}) to "
            f"shard {self.target_shard} ({self.target_region}) as {self.id}",
            "copy the range's accounts, transfers, stored answers and saga inbox rows while writes continue, "
            "then catch up the changes made meanwhile; hash every row of the range on both sides (pre-verify) "
            f"and catch up again; {self.target_shard} pre-books the range's balances against its range account, "
            "and the rows that differed or changed are compared again (narrowing)",
            f"freeze the range on {self.source_shard} (requests answered 503 slot_moving, Retry-After "
            f"{limits.SLOT_MOVING_RETRY_AFTER_S} s), wait up to {limits.MOVE_PENDING_SAGAS_WAIT_S:g} s for sagas "
            "debited from it, verify the row counts and the rows that differed or changed since the pre-verify "
            "(a difference aborts and unfreezes)",
            f"switch: balances booked out on {self.source_shard} (one posting per currency) and in on "
            f"{self.target_shard} (one posting per currency, and the accounts changed since the pre-booking), which "
            f"owns the range with epoch {self.epoch}; {self.source_shard} answers 421 naming it",
            f"clean up: {self.source_shard} books each of the range's accounts to zero and deletes the range's "
            "stored answers and inbox rows (its journal stays)",
        ]


def parse_range(text: str) -> tuple[int, int]:
    lo_text, sep, hi_text = text.partition("-")
    try:
        lo, hi = int(lo_text), int(hi_text if sep else lo_text)
    except ValueError:
        raise MoveRefused(f"expected a slot range LO-HI, got {text[:20]!r}") from None
    if not 0 <= lo <= hi <= 4095:
        raise MoveRefused(f"slot range {lo}-{hi} is not within 0-4095")
    return lo, hi


@dataclass
class MoveStats:
    """What one run of the mover measured (`txroute bench move` reads it): wall seconds per step, in the order
    the steps ran (copy, catch_up, prebook, narrow, freeze, settle, final_catch_up, verify, switch_out, switch_in,
    cleanup: those this run drove), the rows copied, the change log's lag, and when the range was frozen and switched
    (`time.monotonic()`, so a caller can tell which of its requests met the freeze)."""

    steps_s: dict[str, float] = field(default_factory=dict)
    rows_copied: int = 0
    changes_applied: int = 0  # change-log entries the catch-up passes consumed
    catch_up_passes: int = 0
    lag_before_catch_up: int | None = None  # the changes made during the copy
    lag_at_freeze: int | None = None  # what the catch-up left for the freeze's own last pass
    rows_compared_in_freeze: int | None = None  # rows the verify compared one by one (D and C); None: full verify
    frozen_at: float | None = None
    switched_at: float | None = None  # the source recorded the switch: the target owns the range

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.steps_s[name] = self.steps_s.get(name, 0.0) + time.monotonic() - started


class MoverStopped(Exception):
    """Fault injection: the mover stopped as if killed right after recording a phase (`stop_after`)."""


# Points inside the phases where a test can hold the mover (FaultPause), each named after the source's phase
# recorded there: inside the copy's snapshot after its first table; in catch-up after a pass copied its rows but
# before it consumed the change log; frozen after verify, before the switch-out; switching after the source
# booked out and before the target books in; `switched_in` once the target booked in and owns the range while
# the source still says `switching`; switched before the cleanup; `pre_verified` right after the pre-verify and
# `prebooked` right after the target's pre-booking, just before the freeze (the source says `catching_up`).
PAUSE_POINTS = ("copying", "catching_up", "frozen", "switching", "switched_in", "switched", "pre_verified",
                "prebooked")


@dataclass
class PreVerify:
    """What one run of the mover learnt of the range before freezing it, per table name, each key the JSON text
    of the row's primary key (as the change log records it): `differing` (D) the keys whose rows differed
    between the sides, or were on one side only, when the pre-verify read them; `own` the target's own rows of
    the range then (left out of every comparison, as in Mover.verify); `consumed` (C) every key whose change-log
    entry a catch-up pass consumed since the pre-verify began."""

    differing: dict[str, set[str]] = field(default_factory=dict)
    own: dict[str, set[str]] = field(default_factory=dict)
    consumed: dict[str, set[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class FaultPause:
    """TEST-ONLY fault injection (tests/faults/test_slot_move_crashes.py), inert unless both variables are set:
    with TXROUTE_FAULT_MOVER_PAUSE_AT=<point> and TXROUTE_FAULT_MOVER_PAUSE_FILE=<path>, the mover creates the
    file on reaching that point and waits while it exists (at most MOVE_FAULT_PAUSE_S_MAX), so a test can kill
    the mover, a region or a database at a known moment inside a phase, or let it go on by removing the file."""

    point: str
    file: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> FaultPause | None:
        point, file = env.get("TXROUTE_FAULT_MOVER_PAUSE_AT", ""), env.get("TXROUTE_FAULT_MOVER_PAUSE_FILE", "")
        if not point or not file:
            return None
        if point not in PAUSE_POINTS:
            raise MoveRefused(f"TXROUTE_FAULT_MOVER_PAUSE_AT must be one of {', '.join(PAUSE_POINTS)}")
        return cls(point, Path(file))


class Mover:
    def __init__(self, target: Target, *, progress: Progress = print, stop_after: str | None = None,
                 pause: FaultPause | None = None, full_verify: bool = False) -> None:
        self.target = target
        self.full_verify = full_verify  # under the freeze, compare every row (Mover.verify), not only D and C
        self.progress = progress
        # Fault injection (tests): leave off right after this phase is recorded, as a killed mover would.
        self.stop_after = stop_after
        self.pause = pause
        self._held: dict[str, asyncpg.Connection] | None = None
        self._lock: tuple[str, str] | None = None  # (source shard, move id) while run/cancel hold the move's lock
        self._pre: PreVerify | None = None  # this run's pre-verify; None: a resumed run verifies every row
        # The target's range after this run's last pre-booking round (id -> balance, pre-booked), and the accounts
        # whose balance differs from the source's under the freeze (id -> the source's): None in a resumed run.
        self._prebooked: dict[str, tuple[int, int]] | None = None
        self._changed: dict[str, int] | None = None
        self.stats = MoveStats()

    async def _pause_at(self, point: str) -> None:
        """Hold here while the test's pause file exists (FaultPause); a no-op unless a test asked for `point`."""
        assert point in PAUSE_POINTS, point
        if self.pause is None or self.pause.point != point:
            return
        self.pause.file.write_text(f"{os.getpid()}\n")
        self.progress(f"paused at {point} (test fault injection) while {self.pause.file} exists")
        deadline = time.monotonic() + limits.MOVE_FAULT_PAUSE_S_MAX
        while self.pause.file.exists():
            if time.monotonic() >= deadline:
                raise MoveRefused(f"the test pause at {point} outlasted {limits.MOVE_FAULT_PAUSE_S_MAX:g} s")
            await _pause(limits.MOVE_FAULT_PAUSE_POLL_MS / 1000)
        self.pause = None  # once per run

    def _reached(self, phase: str) -> str:
        if phase == self.stop_after:
            raise MoverStopped(phase)
        return phase

    # Planning ---------------------------------------------------------------------------------------------

    async def spec(self, slot_lo: int, slot_hi: int, to_shard: str) -> MoveSpec:
        """The move that would take LO-HI to `to_shard`, or the one in progress for the same range and target
        (re-running a move resumes it). Refuses a range no single shard owns, or one already moving elsewhere."""
        topology = self.target.topology
        try:
            target_region = topology.shard(to_shard).region
        except KeyError:
            raise MoveRefused(f"no shard {to_shard[:40]!r} in the topology") from None
        for move in await self.moves():
            if _unfinished(move) and (move["slots"], move["target_shard"]) == (f"{slot_lo}-{slot_hi}", to_shard):
                return await self.find(move["id"])  # re-running a move resumes it
        claims: dict[str, list[asyncpg.Record]] = {}
        for shard in sorted(self.target.shard_dsns):
            async with self.connect(shard) as conn:
                claims[shard] = list(await conn.fetch(
                    """select slot_lo, slot_hi, epoch, state, move_id from slot_ownership
                       where slot_lo <= $2 and slot_hi >= $1 and state in ('owned', 'moving')""", slot_lo, slot_hi))
        if to_shard not in claims:
            raise MoveRefused(f"no database given for shard {to_shard} (--dsn {to_shard}=...)")
        holders = [s for s, rows in claims.items() if rows]
        if len(holders) != 1:
            raise MoveRefused(f"slots {slot_lo}-{slot_hi} are held by {len(holders)} shards "
                              f"({', '.join(holders) or 'none reachable'}): move one shard's part at a time")
        source = holders[0]
        if source == to_shard:
            raise MoveRefused(f"shard {to_shard} already owns slots {slot_lo}-{slot_hi}")
        rows = claims[source]
        covered = sum(min(r["slot_hi"], slot_hi) - max(r["slot_lo"], slot_lo) + 1 for r in rows)
        if covered != slot_hi - slot_lo + 1:
            raise MoveRefused(f"shard {source} owns only {covered} of slots {slot_lo}-{slot_hi}")
        async with self.connect(source) as conn:
            active = await conn.fetchrow(
                "select * from slot_moves where role = 'source' and phase = any($1::text[])", list(ACTIVE))
        if active is not None:
            same = (active["slot_lo"], active["slot_hi"], active["target_shard"]) == (slot_lo, slot_hi, to_shard)
            if not same:
                raise MoveRefused(f"shard {source} has move {active['id']} in progress (slots "
                                  f"{active['slot_lo']}-{active['slot_hi']} to {active['target_shard']}, phase "
                                  f"{active['phase']}): finish or cancel it first")
            return _spec(active)
        return MoveSpec(
            id="mv_" + new_ulid().lower(), slot_lo=slot_lo, slot_hi=slot_hi, source_shard=source,
            source_region=topology.shard(source).region, target_shard=to_shard, target_region=target_region,
            epoch=max(int(r["epoch"]) for r in rows) + 1,
        )

    async def begin(self, spec: MoveSpec) -> None:
        """Record the move on the source, then on the target (each refuses what it cannot take)."""
        for shard, role in ((spec.source_shard, "source"), (spec.target_shard, "target")):
            async with self.connect(shard) as conn:
                answer = json.loads(await conn.fetchval(
                    "select txr_move_begin($1::jsonb)::text", json.dumps({**spec.as_json(), "role": role})))
            if not answer["ok"]:
                if role == "target":  # nothing is frozen yet: the source's record is closed again
                    await self._close_source(spec, "cancelled", answer["detail"])
                raise MoveRefused(f"{answer['code']}: {answer['detail']}")

    # Running ----------------------------------------------------------------------------------------------

    async def run(self, spec: MoveSpec) -> str:
        """Drive the move from its recorded phase to `done`, or to `aborted` when its verify fails or its
        sagas do not settle in time. Returns the final phase. Refused at once (MoveRefused) while another
        mover runs or cancels the same move."""
        async with self._exclusive(spec):
            return await self._run(spec)

    @contextlib.asynccontextmanager
    async def _exclusive(self, spec: MoveSpec) -> AsyncIterator[None]:
        """Hold one connection per database for the whole run (the freeze then pays no connection set-up) and,
        on the source's, the move's session advisory lock: taken with the connection (connect), released when
        it closes, here or with a killed mover's session. Re-entrant: an abort inside a run cancels under it."""
        if self._held is not None:
            yield
            return
        self._held, self._lock = {}, (spec.source_shard, spec.id)
        try:
            async with self.connect(spec.source_shard):
                pass  # the lock, before anything is read or written
            yield
        finally:
            held, self._held, self._lock = self._held or {}, None, None
            for conn in held.values():
                if not conn.is_closed():
                    await conn.close()

    async def _run(self, spec: MoveSpec) -> str:
        phase = await self._phase(spec.source_shard, spec.id)
        stats = self.stats
        if phase == "copying":
            with stats.step("copy"):
                await self._copy(spec)
            await self._set_phase(spec.source_shard, spec.id, "catching_up")
            phase = self._reached("catching_up")
        if phase == "catching_up":
            with stats.step("catch_up"):
                await self._catch_up(spec, until_lag=limits.MOVE_CATCH_UP_LAG_ROWS_MAX, pause_at="catching_up")
            with stats.step("pre_verify"):
                await self._pre_verify(spec)
            await self._pause_at("pre_verified")
            with stats.step("catch_up"):  # the writes made while the pre-verify read the range
                stats.lag_at_freeze = await self._catch_up(spec, until_lag=limits.MOVE_CATCH_UP_LAG_ROWS_MAX)
            with stats.step("prebook"):
                skipped = await self._prebook(spec)
            if not skipped:
                with stats.step("narrow"):
                    await self._narrow(spec)
                with stats.step("prebook"):  # what changed while the rows were narrowed: a second or so is left
                    skipped = await self._prebook(spec)
            if skipped:
                await self.cancel(spec, phase="aborted", reason=f"{skipped} accounts of the range on "
                                  f"{spec.target_shard} do not hold what this move pre-booked (nothing frozen)")
                return "aborted"
            with stats.step("prebook"):
                self._prebooked = await self._target_balances(spec)
            await self._pause_at("prebooked")
            with stats.step("freeze"):
                await self._freeze(spec)
            stats.frozen_at = time.monotonic()
            phase = self._reached("frozen")
        if phase == "frozen":
            phase = self._reached(await self._settle_verify_switch_out(spec))
        if phase == "switching":
            await self._pause_at("switching")
            with stats.step("switch_in"):
                await self._switch_in(spec)
            stats.switched_at = time.monotonic()
            phase = self._reached("switched")
        if phase == "switched":
            await self._pause_at("switched")
            with stats.step("cleanup"):
                await self._cleanup(spec)
            phase = "done"
        if phase == "done":  # the source's cleanup may have committed without the target's last step
            await self._target_done(spec)
        return phase

    async def cancel(self, spec: MoveSpec, *, phase: str = "cancelled", reason: str = "cancelled by operator") -> None:
        """Undo a move before its switch: the source unfrozen (nothing was written meanwhile), the target's
        copies dropped, both records closed. Refused at once while another mover runs the move."""
        async with self._exclusive(spec):
            current = await self._phase(spec.source_shard, spec.id)
            if current not in (*CANCELLABLE, "cancelled", "aborted"):
                raise MoveRefused(f"move {spec.id} is {current}: past the switch it can only complete (re-run it)")
            await self._close_source(spec, phase, reason)
            # The pre-booked balances, to zero (by chunks; nothing once switched), then the copies dropped.
            await self._book_by_chunks(spec.target_shard, "txr_move_unbook", spec)
            async with self.connect(spec.target_shard) as conn, conn.transaction():
                exists = await conn.fetchval("select phase from slot_moves where id = $1 for update", spec.id)
                if exists is not None and exists not in ("switched", "done"):
                    await conn.execute("delete from slot_move_changes where move_id = $1", spec.id)
                    for table in reversed(SLOT_TABLES):
                        await conn.execute(
                            f"delete from {table.name} t where {table.slot_sql('t')} between $1 and $2 "  # noqa: S608
                            f"and ({table.drop_where})", spec.slot_lo, spec.slot_hi)
                    await conn.execute("select txr_move_phase($1, $2, $3)", spec.id, phase, reason[:300])
        self.progress(f"{spec.id}: {phase} ({reason}); slots {spec.slot_lo}-{spec.slot_hi} stay on {spec.source_shard}")

    async def _close_source(self, spec: MoveSpec, phase: str, reason: str) -> None:
        async with self.connect(spec.source_shard) as conn:
            await conn.execute("select txr_move_unfreeze($1, $2, $3)", spec.id, phase, reason[:300])

    # Phases -----------------------------------------------------------------------------------------------

    async def _copy(self, spec: MoveSpec) -> None:
        """Every per-slot row of the range, read in one snapshot of the source, upserted into the target."""
        async with self.connect(spec.source_shard) as src, self.connect(spec.target_shard) as dst:
            copied = 0
            async with src.transaction(isolation="repeatable_read", readonly=True):
                for table in SLOT_TABLES:
                    columns = await _columns(dst, table.name)
                    cursor = await src.cursor(
                        f"select to_jsonb(t)::text from {table.name} t "  # noqa: S608 (registry constants)
                        f"where {table.slot_sql('t')} between $1 and $2 and ({table.rows(spec.source_shard)})",
                        spec.slot_lo, spec.slot_hi)
                    while rows := await cursor.fetch(limits.MOVE_COPY_BATCH_ROWS):
                        await _import(dst, table, columns, _json_array(rows), spec.source_shard)
                        copied += len(rows)
                        self.stats.rows_copied += len(rows)
                        self.progress(f"{spec.id}: copy {table.name}: {copied} rows copied")
                    if table is SLOT_TABLES[0]:
                        await self._pause_at("copying")
            await src.execute("update slot_moves set rows_copied = $2, updated_at = clock_timestamp() where id = $1",
                              spec.id, copied)

    async def _catch_up(self, spec: MoveSpec, *, until_lag: int, pause_at: str | None = None) -> int:
        """Copy again the rows the change log names after the cursor, pass after pass, until at most
        `until_lag` changes are left (0: all). Returns the lag left."""
        async with self.connect(spec.source_shard) as src, self.connect(spec.target_shard) as dst:
            columns = {t.name: await _columns(dst, t.name) for t in SLOT_TABLES}
            if self.stats.lag_before_catch_up is None:
                self.stats.lag_before_catch_up = await _lag(src, spec.id)
            for attempt in range(1, limits.MOVE_CATCH_UP_PASSES_MAX + 1):
                await self._consume_target_writes(dst, spec)
                # Changes are consumed (deleted once copied), never skipped past by a cursor: a change logged by
                # a transaction that commits after a later one's must still be found by the next pass.
                changes = await src.fetch(
                    """select id, tbl, key::text from slot_move_changes where move_id = $1
                       order by id limit $2""", spec.id, limits.MOVE_COPY_BATCH_ROWS)
                if changes:
                    by_table: dict[str, dict[str, Any]] = {}  # a row changed many times is copied once
                    for change in changes:
                        by_table.setdefault(change["tbl"], {})[change["key"]] = json.loads(change["key"])
                    if self._pre is not None:  # C: every key imported (and so consumed) after the pre-verify began
                        for name, logged in by_table.items():
                            self._pre.consumed.setdefault(name, set()).update(logged)
                    for table in SLOT_TABLES:
                        keys = by_table.get(table.name)
                        if not keys:
                            continue
                        rows = await src.fetch(
                            f"select to_jsonb(t)::text from {table.name} t "  # noqa: S608 (registry constants)
                            f"join jsonb_populate_recordset(null::{table.name}, $3::jsonb) k "
                            f"using ({', '.join(table.key)}) "
                            f"where {table.slot_sql('t')} between $1 and $2 and ({table.rows(spec.source_shard)})",
                            spec.slot_lo, spec.slot_hi, json.dumps(list(keys.values())))
                        await _import(dst, table, columns[table.name], _json_array(rows), spec.source_shard)
                        await _delete_gone(src, dst, table, list(keys.values()))
                if pause_at is not None:  # copied, not yet consumed: a re-run copies these rows again
                    await self._pause_at(pause_at)
                if changes:
                    await src.execute(
                        """with done as (delete from slot_move_changes where id = any($2::bigint[]))
                           update slot_moves set log_cursor = log_cursor + $3, updated_at = clock_timestamp()
                           where id = $1""",
                        spec.id, [c["id"] for c in changes], len(changes))
                lag = await _lag(src, spec.id)
                self.stats.catch_up_passes += 1
                self.stats.changes_applied += len(changes)
                self.progress(f"{spec.id}: catch-up pass {attempt}: {len(changes)} changes applied, lag {lag}")
                if lag <= until_lag:
                    return lag
        raise MoveRefused(f"move {spec.id}: the catch-up did not get within {until_lag} changes in "
                          f"{limits.MOVE_CATCH_UP_PASSES_MAX} passes (writes outpace it); run it again")

    async def _consume_target_writes(self, dst: asyncpg.Connection, spec: MoveSpec) -> None:
        """The writes to the range on the target that this mover did not make (its change log there: migration
        0036), consumed: once the pre-verify has begun, their keys join C, so the verify compares their rows.
        (Before, the pre-verify itself reads every row as it then is.)"""
        consumed = await dst.fetch(
            """delete from slot_move_changes where id in
                   (select id from slot_move_changes where move_id = $1 order by id limit $2)
               returning tbl, key::text""", spec.id, limits.MOVE_COPY_BATCH_ROWS)
        if consumed and self._pre is not None:
            for change in consumed:
                self._pre.consumed.setdefault(change["tbl"], set()).add(change["key"])
        if consumed:
            self.progress(f"{spec.id}: {len(consumed)} writes to the range on {spec.target_shard} not made by the "
                          "mover, to compare")

    async def _show_pending_sagas(self, conn: asyncpg.Connection, spec: MoveSpec) -> None:
        """Why the range's sagas did not settle, as the source's outbox records them (for the operator, and a
        failing test): each pending transfer's message, whether delivered, its attempts and last error."""
        rows = await conn.fetch(
            f"""select t.id, t.credit_shard, o.attempts, o.failures, o.last_error,
                       o.delivered_at is not null as delivered, o.dead_lettered_at is not null as dead,
                       round(extract(epoch from o.next_attempt_at - clock_timestamp())::numeric, 1) as due_in_s
                from transfers t left join outbox o on o.transfer_id = t.id
                where {_PENDING_SAGAS_OF_RANGE_SQL}
                order by t.id limit $4""",  # noqa: S608 (a constant)
            spec.source_shard, spec.slot_lo, spec.slot_hi, limits.MOVE_PENDING_SAGAS_SHOWN_MAX)
        for r in rows:
            self.progress(
                f"{spec.id}: still pending: {r['id']} to {r['credit_shard']}: "
                + ("no outbox row" if r["attempts"] is None else
                   f"delivered {r['delivered']}, dead-lettered {r['dead']}, attempts {r['attempts']}, failures "
                   f"{r['failures']}, next attempt in {r['due_in_s']} s, last error {r['last_error'] or 'none'}"))

    async def _prebook(self, spec: MoveSpec) -> int:
        """Before the freeze: the target books in the balances the source shows now (no lock: they may still
        change), then the differences while many changed during a round, so that the switch-in books only what
        changed since the last round (migrations 0031, 0036). Each round reads the range's balances on both
        sides and sends the accounts that differ, by chunks of MOVE_BOOKING_CHUNK_ACCOUNTS accounts, each in its
        own transaction. Returns the accounts of the target not at what this move pre-booked (a balance no
        booking of the move put there), which the switch-in would refuse: the move then aborts before its
        freeze."""
        async with self.connect(spec.target_shard) as dst:  # past any round a crashed mover recorded
            recorded = await dst.fetchval(
                "select coalesce(max(round), 0) from slot_move_prebooked where move_id = $1", spec.id)
        for round_number in range(1, limits.MOVE_PREBOOK_ROUNDS_MAX + 1):
            source, target = await self._balances(spec)
            skipped = sum(1 for balance, prebooked in target.values() if balance != prebooked)
            if skipped:
                return skipped
            changed = sorted(_changed(source, target).items())
            booked = 0
            size = limits.MOVE_BOOKING_CHUNK_ACCOUNTS
            for start in range(0, len(changed), size):
                async with self.connect(spec.target_shard) as dst, dst.transaction():
                    answer = json.loads(await dst.fetchval(
                        "select txr_move_prebook_listed($1, $2, $3::jsonb)::text",
                        spec.id, recorded + round_number, json.dumps(dict(changed[start:start + size]))))
                booked, skipped = booked + int(answer["booked"]), skipped + int(answer["skipped"])
            self.progress(f"{spec.id}: pre-booking round {recorded + round_number}: {booked} balances booked on "
                          f"{spec.target_shard} (before the freeze)")
            if skipped:
                return skipped
            if booked <= limits.MOVE_PREBOOK_CHANGED_TARGET:
                break
        return 0

    async def _balances(self, spec: MoveSpec) -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
        """The range's customer balances on both sides, read at once."""
        source, target = await asyncio.gather(self._source_balances(spec), self._target_balances(spec))
        return source, target

    async def _source_balances(self, spec: MoveSpec, *, fresh: bool = False) -> dict[str, int]:
        """id -> balance of the range's customer accounts on the source."""
        async with self.connect(spec.source_shard, fresh=fresh) as src:
            rows = await src.fetch(
                "select id, balance from accounts where kind = 'customer' and slot between $1 and $2",
                spec.slot_lo, spec.slot_hi)
        return {r["id"]: r["balance"] for r in rows}

    async def _target_balances(self, spec: MoveSpec) -> dict[str, tuple[int, int]]:
        """id -> (balance, what this move pre-booked) of the range's customer accounts on the target."""
        async with self.connect(spec.target_shard) as dst:
            rows = await dst.fetch(
                """select a.id, a.balance, coalesce(p.amount, 0) as prebooked from accounts a
                   left join slot_move_prebooked p on p.move_id = $3 and p.account_id = a.id
                   where a.kind = 'customer' and a.slot between $1 and $2""", spec.slot_lo, spec.slot_hi, spec.id)
        return {r["id"]: (r["balance"], r["prebooked"]) for r in rows}

    async def _freeze(self, spec: MoveSpec) -> None:
        for attempt in range(1, limits.MOVE_FREEZE_ATTEMPTS_MAX + 1):
            try:
                async with self.connect(spec.source_shard) as conn, conn.transaction():
                    await conn.execute(f"set local lock_timeout = {int(limits.MOVE_FREEZE_LOCK_TIMEOUT_MS)}")
                    await conn.execute("select txr_move_freeze($1)", spec.id)
                self.progress(f"{spec.id}: frozen: slots {spec.slot_lo}-{spec.slot_hi} answer 503 slot_moving")
                return
            except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError):
                self.progress(f"{spec.id}: freeze attempt {attempt}: postings still hold the range; trying again")
        raise MoveRefused(f"move {spec.id}: could not freeze the range in {limits.MOVE_FREEZE_ATTEMPTS_MAX} "
                          "attempts (nothing frozen); run it again")

    async def _settle_verify_switch_out(self, spec: MoveSpec) -> str:
        stats = self.stats
        with stats.step("settle"):
            settled = await self._sagas_settled(spec)
        if not settled:
            await self.cancel(spec, phase="aborted", reason=f"sagas debited from the range still pending after "
                              f"{limits.MOVE_PENDING_SAGAS_WAIT_S:g} s")
            return "aborted"
        for verify_round in range(1, limits.MOVE_VERIFY_ROUNDS_MAX + 1):
            with stats.step("final_catch_up"):
                await self._catch_up(spec, until_lag=0)
            with stats.step("verify"):
                # With the balances on both sides (the source's read beside the verify): an account on one side
                # only, or not at what was pre-booked on the target, would make the switch-in refuse after the
                # source booked the range out. The target's were read after the last pre-booking round (nothing
                # else books its range), unless this mover was resumed.
                differences, source = await asyncio.gather(
                    self.verify(spec) if self._pre is None or self.full_verify else self.verify_changed(spec),
                    self._source_balances(spec, fresh=True))
                target = self._prebooked if self._prebooked is not None else {}
                if source.keys() - target.keys():  # resumed, or accounts opened since (copied by a catch-up)
                    target = await self._target_balances(spec)
            off = sorted(k for k, (balance, prebooked) in target.items() if balance != prebooked)
            if off:
                differences.append(f"{len(off)} accounts of the range on {spec.target_shard} do not hold what this "
                                   f"move pre-booked (first: {off[:3]})")
            alone = sorted(source.keys() ^ target.keys())
            if alone:
                differences.append(f"{len(alone)} accounts of the range on one side only (first: {alone[:3]})")
            self._changed = _changed(source, target)
            if differences:
                await self.cancel(spec, phase="aborted", reason="verify: " + "; ".join(differences))
                return "aborted"
            # Nothing fenced writes a frozen range; a change logged since the last catch-up is copied and its
            # row compared again (a key consumed now joins C), or the move gives up.
            async with self.connect(spec.source_shard) as src, self.connect(spec.target_shard) as dst:
                lag = await _lag(src, spec.id) + await _lag(dst, spec.id)  # the target's: writes it did not make
            if lag == 0:
                break
            self.progress(f"{spec.id}: verify round {verify_round}: {lag} changes logged under the freeze")
        else:
            await self.cancel(spec, phase="aborted", reason=f"the frozen range took writes after "
                              f"{limits.MOVE_VERIFY_ROUNDS_MAX} catch-ups and verifies")
            return "aborted"
        await self._pause_at("frozen")
        with stats.step("switch_out"):
            async with self.connect(spec.source_shard) as conn:
                answer = json.loads(await conn.fetchval("select txr_move_switch_out($1)::text", spec.id))
        if not answer["ok"]:  # a saga debited from the range is pending again: cannot happen under the freeze
            await self.cancel(spec, phase="aborted", reason=f"{answer['pending_sagas']} sagas pending at the switch")
            return "aborted"
        accounts = (answer.get("check") or {}).get("accounts", "the")
        self.progress(f"{spec.id}: switching: {accounts} accounts booked out of {spec.source_shard} "
                      "(one posting per currency)")
        return "switching"

    async def _sagas_settled(self, spec: MoveSpec) -> bool:
        """Wait (bounded) until no saga debited from the range is pending. Their messages are made due at once,
        again every MOVE_PENDING_SAGAS_NUDGE_MS: the range is frozen now, and a message in its relay backoff
        would otherwise wait as long as the whole wait. A message delivered twice meanwhile is applied once (the
        credit side's inbox) and settled once."""
        deadline = time.monotonic() + limits.MOVE_PENDING_SAGAS_WAIT_S
        nudged_at = float("-inf")
        async with self.connect(spec.source_shard) as conn:
            while True:
                pending = await conn.fetchval(
                    f"select count(*) from transfers t where {_PENDING_SAGAS_OF_RANGE_SQL}",  # noqa: S608 (a constant)
                    spec.source_shard, spec.slot_lo, spec.slot_hi)
                if pending == 0:
                    return True
                if time.monotonic() >= deadline:
                    await self._show_pending_sagas(conn, spec)
                    return False
                if time.monotonic() - nudged_at >= limits.MOVE_PENDING_SAGAS_NUDGE_MS / 1000:
                    nudged_at = time.monotonic()
                    await conn.execute(
                        f"""update outbox o set next_attempt_at = clock_timestamp()
                            from transfers t
                            where t.id = o.transfer_id and {_PENDING_SAGAS_OF_RANGE_SQL}
                              and o.delivered_at is null and o.dead_lettered_at is null
                              and o.next_attempt_at > clock_timestamp()""",  # noqa: S608 (a constant)
                        spec.source_shard, spec.slot_lo, spec.slot_hi)
                self.progress(f"{spec.id}: waiting for {pending} sagas debited from the range to settle")
                await _pause(limits.MOVE_PENDING_SAGAS_POLL_MS / 1000)

    async def verify(self, spec: MoveSpec) -> list[str]:
        """Per table, the range's row count and checksum on both sides (columns the copy sets aside)."""
        differences = []
        async with self.connect(spec.source_shard) as src, self.connect(spec.target_shard) as dst:
            for table in SLOT_TABLES:
                # The rows the target holds as its own are not copies to compare (_compared_sql leaves them out).
                where = _compared_sql(table, spec)
                sql = (f"select count(*), coalesce(sum(hashtextextended((to_jsonb(t) - $4::text[])::text, 0)), 0) "  # noqa: S608
                       f"from {table.name} t where {where}")
                args = (spec.slot_lo, spec.slot_hi, _keys_json(await _own_keys(dst, table, spec)),
                        list(table.unchecked))
                mine, theirs = await src.fetchrow(sql, *args), await dst.fetchrow(sql, *args)
                if tuple(mine) != tuple(theirs):
                    rows_sql = (f"select {_key_sql(table)} as key, (to_jsonb(t) - $4::text[])::text as doc "  # noqa: S608
                                f"from {table.name} t where {where}")
                    left = {r["key"]: r["doc"] for r in await src.fetch(rows_sql, *args)}
                    right = {r["key"]: r["doc"] for r in await dst.fetch(rows_sql, *args)}
                    differing = sorted(k for k in left.keys() | right.keys() if left.get(k) != right.get(k))
                    differences.append(f"{table.name}: {mine[0]} rows on {spec.source_shard}, {theirs[0]} on "
                                       f"{spec.target_shard}, {len(differing)} differ (first: {differing[:3]})")
                    if differing:
                        first = differing[0]
                        self.progress(f"{spec.id}: {table.name} {first}: {spec.source_shard} has {left.get(first)}; "
                                      f"{spec.target_shard} has {right.get(first)}")
        self.progress(f"{spec.id}: verify: " + ("; ".join(differences) if differences else "equal"))
        return differences

    async def _pre_verify(self, spec: MoveSpec) -> None:
        """Before the freeze: hash every compared row of the range on both sides, and remember the keys that
        differ (D) and the target's own rows; from here on the catch-up adds every key it consumes (C). Nothing
        is refused here: the rows of D are compared again under the freeze, after the catch-ups that follow."""
        self._pre = pre = PreVerify()  # C starts before the first row is read
        async with self.connect(spec.source_shard) as src, self.connect(spec.target_shard) as dst:
            for table in SLOT_TABLES:
                own = pre.own[table.name] = await _own_keys(dst, table, spec)
                left = await _row_hashes(src, table, spec, own)
                right = await _row_hashes(dst, table, spec, own)
                differing = {k for k in left.keys() | right.keys() if left.get(k) != right.get(k)}
                pre.differing[table.name] = differing
                self.progress(f"{spec.id}: pre-verify {table.name}: {len(left)} rows on {spec.source_shard}, "
                              f"{len(right)} on {spec.target_shard}, {len(differing)} to compare again under the "
                              "freeze")

    async def _narrow(self, spec: MoveSpec) -> None:
        """Before the freeze, while writes go on: the rows the freeze would compare (D, C, and those whose
        standing as the target's own changed) are compared one by one now, after a catch-up (which also copies
        what changed while the target pre-booked), and D keeps only those that still differ; C starts over before
        any row is read. Repeated while more than
        MOVE_NARROW_ROWS_TARGET rows are left, at most MOVE_NARROW_ROUNDS_MAX times. As sound as the pre-verify
        (verify_changed says why): a key left out of D and C was read equal on both sides after C started over,
        and any write of it since is consumed by a catch-up, which puts it back in C."""
        pre = self._pre
        if pre is None:
            return
        for round_number in range(1, limits.MOVE_NARROW_ROUNDS_MAX + 1):
            await self._catch_up(spec, until_lag=limits.MOVE_CATCH_UP_LAG_ROWS_MAX)  # what the pre-booking let in
            left_over = sum(len(pre.differing.get(t.name, set()) | pre.consumed.get(t.name, set()))
                            for t in SLOT_TABLES)
            if left_over <= limits.MOVE_NARROW_ROWS_TARGET:
                return
            consumed, pre.consumed = pre.consumed, {}  # C starts over before the first row is read
            kept = 0
            async with self.connect(spec.source_shard) as src, self.connect(spec.target_shard) as dst:
                for table in SLOT_TABLES:
                    own = await _own_keys(dst, table, spec)
                    keys = _keys_to_compare(pre, table, own, consumed)
                    pre.differing[table.name] = set(await _differing(src, dst, table, spec, own, keys))
                    pre.own[table.name] = own
                    kept += len(pre.differing[table.name])
            self.progress(f"{spec.id}: narrowed (round {round_number}): {left_over} rows compared before the "
                          f"freeze, {kept} still differ")

    async def verify_changed(self, spec: MoveSpec) -> list[str]:
        """Under the freeze, after the last catch-up: per table, one by one the rows of D (differing at the
        pre-verify) and C (consumed from the change logs since it began: the source's, and the target's of the
        writes there its mover did not make), and those that became or stopped being the target's own since.

        Why this is as strong as comparing every row (Mover.verify): take a key k in none of these sets. The
        pre-verify read k's row equal on both sides, in snapshots taken after it began. Its source row:
        every committed write of a range row logs its key in the writer's own transaction (txr_move_log,
        tests/integration/test_slot_freeze.py checks every registered table has the trigger), the freeze
        lets no write commit on the range after it (txr_owns' row lock), and the last catch-up consumed the
        log to empty; a key is added to C when a pass consumes its entry, not by a cursor over entry ids, so
        an entry committed out of id order is consumed (and counted) by a later pass, never skipped. So a
        write of k after the pre-verify began would have put k in C: the source row is the one the
        pre-verify read. (The loop in _settle_verify_switch_out checks the log is still empty after the
        verify.) Its target row: the mover's imports and deletes (copy, catch-up) change exactly the keys
        whose source entries a catch-up consumes, which are in C; any other write of a range row on the
        target, by whatever writer (the target's own postings, a saga credit, an operator's SQL, a writer
        the fences forgot, such as migration 0029's saga credit that deleted a copy's history), logs its key
        in the target's change log in the writer's transaction (migration 0036: every session but the
        mover's), which every catch-up pass consumes into C as well; the loop in _settle_verify_switch_out
        checks that log is empty after the verify too. (Client writes and saga credits of the range are
        refused there anyway, since the target does not own the range until the switch: txr_owns,
        txr_event_slot_owned, migration 0021.) The target's own rows (SlotTable.target_own, e.g. a saga
        credited from the range to the target itself) are read again here, left out on both sides as
        Mover.verify does, and a key whose standing changed since the pre-verify is compared. A mover
        resumed after a crash has no pre-verify in memory (nor the C its dead process built): it compares
        every row.

        What this trusts, then: the change-log triggers (a session that sets txr.move_copy, or disables
        triggers, as the owner can, writes unseen), and that hashtextextended's 64 bits tell rows apart
        (Mover.verify's sums trust the same). `txroute slots move --full-verify` compares every row's checksum
        under the freeze instead. Until migration 0036 this also counted every table's rows of the range on
        both sides under the freeze: the only check of the target's side then, and the longest part of the
        freeze at 100,000 accounts."""
        pre = self._pre
        assert pre is not None, "verify_changed without a pre-verify"
        differences = []
        compared = 0
        async with self.connect(spec.source_shard) as src, self.connect(spec.target_shard) as dst:
            for table in SLOT_TABLES:
                own = await _own_keys(dst, table, spec)
                keys = _keys_to_compare(pre, table, own, pre.consumed)
                differing = await _differing(src, dst, table, spec, own, keys)
                compared += len(keys)
                if differing:
                    differences.append(f"{table.name}: {len(differing)} of {len(keys)} rows compared differ "
                                       f"(first: {differing[:3]})")
        self.stats.rows_compared_in_freeze = compared
        self.progress(f"{spec.id}: verify ({compared} rows compared one by one): "
                      + ("; ".join(differences) if differences else "equal"))
        return differences

    async def _switch_in(self, spec: MoveSpec) -> None:
        """The target books in what the source booked out: the switch-out recorded a check of the range's
        balances (migration 0036), and the target is sent only the accounts whose balance differs from its own
        (the source's cannot change once `moved`, the target's only by this move's bookings). The call checks
        them before it books and, after, that its own check of the range equals the source's, in its
        transaction: once it commits the target owns the range and takes writes; a difference rolls the switch
        back on the target as well. A move switched out before 0036 recorded every balance instead."""
        async with self.connect(spec.source_shard) as src:
            recorded = await src.fetchrow(
                "select balance_check::text as check, balances::text as balances from slot_moves where id = $1",
                spec.id)
        args: tuple[Any, ...]
        if recorded["check"] is None:
            call, args = "txr_move_switch_in($1, $2::jsonb)", (spec.id, recorded["balances"])
        else:
            if self._changed is None:  # a resumed mover
                source, target = await self._balances(spec)
                self._changed = _changed(source, target)
            changed = json.dumps(self._changed)
            call, args = "txr_move_switch_in_changed($1, $2::jsonb, $3::jsonb)", (spec.id, changed, recorded["check"])
        async with self.connect(spec.target_shard) as dst, dst.transaction():
            try:
                answer = json.loads(await dst.fetchval(f"select {call}::text", *args))
            except asyncpg.RaiseError as refused:
                self._changed = None  # a re-run reads both sides again
                raise MoveRefused(f"move {spec.id}: the target refused the switch ({refused}); the source has booked "
                                  "the balances out: run the move again (it reads both sides afresh), and if it is "
                                  "refused again see runbooks/move-slots.md") from refused
            if not answer["ok"]:
                raise MoveRefused(f"move {spec.id}: the target refused the switch ({answer['detail']}); the source "
                                  "has booked the balances out: repair the target and run the move again")
        await self._pause_at("switched_in")
        async with self.connect(spec.source_shard) as src:
            await src.execute("select txr_move_switch_done($1)", spec.id)
        self.progress(f"{spec.id}: switched: {spec.target_shard} owns slots {spec.slot_lo}-{spec.slot_hi} "
                      f"(epoch {spec.epoch}; {answer.get('changed', 0)} balances changed since the pre-booking)")

    async def _cleanup(self, spec: MoveSpec) -> None:
        booked = await self._book_by_chunks(spec.source_shard, "txr_move_book_out", spec)
        if booked:
            self.progress(f"{spec.id}: cleanup: {booked} accounts booked to zero on {spec.source_shard}")
        async with self.connect(spec.source_shard) as src, src.transaction():
            for table in SLOT_TABLES:
                if table.source_after_switch == "delete":
                    await src.execute(
                        f"delete from {table.name} t where {table.slot_sql('t')} between $1 and $2 "  # noqa: S608
                        f"and ({table.rows(spec.source_shard)})", spec.slot_lo, spec.slot_hi)
            await src.execute("select txr_move_phase($1, 'done')", spec.id)
        await self._target_done(spec)
        self.progress(f"{spec.id}: done")

    async def _target_done(self, spec: MoveSpec) -> None:
        """The target's record of the move done, and what it pre-booked forgotten (no longer needed once switched
        in; deleted here rather than under the freeze)."""
        async with self.connect(spec.target_shard) as dst, dst.transaction():
            await dst.execute("delete from slot_move_prebooked where move_id = $1", spec.id)
            await dst.execute("delete from slot_move_changes where move_id = $1", spec.id)
            await dst.execute("select txr_move_phase($1, 'done')", spec.id)

    async def _book_by_chunks(self, shard: str, function: str, spec: MoveSpec) -> int:
        """Call a booking function of the range's accounts (txr_move_book_out on the source after the switch,
        txr_move_unbook on the target at a cancel: migration 0034) by chunks of MOVE_BOOKING_CHUNK_ACCOUNTS
        accounts in id order, each chunk its own transaction, until it has looked at every account; returns the
        accounts booked. A crash between chunks leaves the rest for the next run."""
        booked, after = 0, None
        while True:
            async with self.connect(shard) as conn, conn.transaction():
                answer = json.loads(await conn.fetchval(
                    f"select {function}($1, $2, $3)::text",
                    spec.id, after, limits.MOVE_BOOKING_CHUNK_ACCOUNTS))
            booked += int(answer["booked"])
            after = answer["last"]
            if after is None:
                return booked

    # Reading ----------------------------------------------------------------------------------------------

    async def moves(self) -> list[dict[str, Any]]:
        """Every move recorded on a reachable shard, newest first, with its lag and freeze duration."""
        found: dict[str, dict[str, Any]] = {}
        for shard in sorted(self.target.shard_dsns):
            try:
                async with self.connect(shard) as conn:
                    rows = await conn.fetch(
                        """select m.*, (select count(*) from slot_move_changes c where c.move_id = m.id) as lag
                           from slot_moves m order by created_at desc""")
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                continue
            for r in rows:
                doc = found.setdefault(r["id"], {"id": r["id"]})
                side = {"phase": r["phase"], "updated_at": r["updated_at"]}
                doc[r["role"]] = side
                doc.update(slots=f"{r['slot_lo']}-{r['slot_hi']}", source_shard=r["source_shard"],
                           target_shard=r["target_shard"], created_at=r["created_at"])
                if r["role"] == "source":
                    doc.update(phase=r["phase"], rows_copied=r["rows_copied"], lag=r["lag"], reason=r["reason"],
                               freeze_s=_seconds(r["frozen_at"], r["switched_at"]), next=_next_step(r["phase"]))
        for doc in found.values():
            if doc.get("phase") == "done" and _unfinished(doc):
                doc["next"] = "re-run `txroute slots move` to record the move done on its target"
        return sorted(found.values(), key=lambda d: d["created_at"], reverse=True)

    async def find(self, move_id: str) -> MoveSpec:
        for shard in sorted(self.target.shard_dsns):
            try:
                async with self.connect(shard) as conn:
                    row = await conn.fetchrow("select * from slot_moves where id = $1 and role = 'source'", move_id)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                continue
            if row is not None:
                return _spec(row)
        raise MoveRefused(f"no move {move_id[:40]!r} on any reachable source shard")

    async def _phase(self, shard: str, move_id: str) -> str:
        async with self.connect(shard) as conn:
            phase = await conn.fetchval("select phase from slot_moves where id = $1", move_id)
        if phase is None:
            raise MoveRefused(f"shard {shard} has no record of move {move_id}")
        return str(phase)

    async def _set_phase(self, shard: str, move_id: str, phase: str) -> None:
        async with self.connect(shard) as conn:
            await conn.execute("select txr_move_phase($1, $2)", move_id, phase)

    @contextlib.asynccontextmanager
    async def connect(self, shard: str, *, fresh: bool = False) -> AsyncIterator[asyncpg.Connection]:
        """A connection to the shard: while `run` or `cancel` acts, the one it holds per shard (one statement at a
        time); `fresh`: one of its own, closed after, for work running beside the held one's."""
        dsn = self.target.shard_dsns.get(shard)
        if dsn is None:
            raise MoveRefused(f"no database given for shard {shard} (--dsn {shard}=...)")
        held = None if fresh else self._held
        if held is not None and shard in held and not held[shard].is_closed():
            yield held[shard]
            return
        conn = await asyncpg.connect(
            dsn, timeout=limits.DB_CONNECT_TIMEOUT_S, command_timeout=limits.MOVE_STATEMENT_TIMEOUT_S,
            server_settings={"timezone": "UTC", "application_name": "txroute-mover",
                             "client_connection_check_interval": str(limits.MOVE_CLIENT_CHECK_INTERVAL_MS),
                             # Its writes of a range on the target are the move's own, not logged (migration 0036).
                             "txr.move_copy": "on"},
        )
        if held is not None:
            if self._lock is not None and self._lock[0] == shard:  # also again after a lost connection
                await _take_lock(conn, shard, self._lock[1])
            held[shard] = conn
            yield conn
            return
        try:
            yield conn
        finally:
            await conn.close()


async def _take_lock(conn: asyncpg.Connection, shard: str, move_id: str) -> None:
    """The move's session advisory lock on the source's connection, or MoveRefused at once (the connection is
    closed: nothing was done)."""
    if not await conn.fetchval("select pg_try_advisory_lock(hashtextextended($1, $2))", move_id, MOVE_LOCK_SEED):
        await conn.close()
        raise MoveRefused(f"move {move_id}: another mover is running it (it holds the move's lock on shard "
                          f"{shard}); nothing was done: let that mover finish, or stop its process and run this again")


async def _lag(src: asyncpg.Connection, move_id: str) -> int:
    """The change-log entries of the move not consumed yet."""
    return int(await src.fetchval("select count(*) from slot_move_changes where move_id = $1", move_id))


def _changed(source: dict[str, int], target: dict[str, tuple[int, int]]) -> dict[str, int]:
    """The accounts whose balance on the source (id -> balance) differs from the target's (id -> balance, pre-booked;
    an account not there yet counts as zero)."""
    return {k: v for k, v in source.items() if v != target.get(k, (0, 0))[0]}


def _key_sql(table: SlotTable) -> str:
    """A row's primary key as the JSON text the change log records (`txr_move_log`: jsonb, so one text per key)."""
    return "jsonb_build_object(" + ", ".join(f"'{c}', t.{c}" for c in table.key) + ")::text"


def _compared_sql(table: SlotTable, spec: MoveSpec) -> str:
    """The rows of the range a verify compares (alias t): those the move carries, less the target's own rows
    ($3: a JSON array of their keys, as _key_sql gives them; an anti-join, so no row pays for building its key).
    $1, $2: the range."""
    match = " and ".join(f"o.{c} = t.{c}" for c in table.key)
    return (f"{table.slot_sql('t')} between $1 and $2 and ({table.rows(spec.source_shard)}) and not exists "  # noqa: S608
            f"(select 1 from jsonb_populate_recordset(null::{table.name}, $3::jsonb) o where {match})")


def _keys_json(keys: Iterable[str]) -> str:
    """Keys as _key_sql gives them (JSON objects), as one JSON array."""
    return "[" + ",".join(keys) + "]"


async def _own_keys(dst: asyncpg.Connection, table: SlotTable, spec: MoveSpec) -> set[str]:
    """The target's own rows of the range (SlotTable.target_own), by key."""
    if table.target_own is None:
        return set()
    rows = await dst.fetch(
        f"select {_key_sql(table)} from {table.name} t "  # noqa: S608 (registry constants)
        f"where {table.slot_sql('t')} between $1 and $2 and ({table.target_own})", spec.slot_lo, spec.slot_hi)
    return {r[0] for r in rows}


async def _row_hashes(conn: asyncpg.Connection, table: SlotTable, spec: MoveSpec, own: set[str],
                      keys: list[str] | None = None) -> dict[str, int]:
    """key -> a hash of the row's compared columns (all but SlotTable.unchecked, as Mover.verify sums them), for
    the compared rows of the range, or only those of `keys`."""
    select = (f"select {_key_sql(table)}, hashtextextended((to_jsonb(t) - $4::text[])::text, 0) "  # noqa: S608
              f"from {table.name} t")
    args: list[Any] = [spec.slot_lo, spec.slot_hi, _keys_json(own), list(table.unchecked)]
    if keys is None:
        return {r[0]: r[1] for r in await conn.fetch(f"{select} where {_compared_sql(table, spec)}", *args)}
    hashes: dict[str, int] = {}
    for at in range(0, len(keys), limits.MOVE_COPY_BATCH_ROWS):
        batch = _keys_json(keys[at:at + limits.MOVE_COPY_BATCH_ROWS])
        rows = await conn.fetch(
            f"{select} join jsonb_populate_recordset(null::{table.name}, $5::jsonb) k "
            f"using ({', '.join(table.key)}) where {_compared_sql(table, spec)}", *args, batch)
        hashes.update((r[0], r[1]) for r in rows)
    return hashes


def _keys_to_compare(pre: PreVerify, table: SlotTable, own: set[str], consumed: dict[str, set[str]]) -> list[str]:
    """D, the keys consumed (C), and those whose standing as the target's own changed since the pre-verify."""
    return sorted(pre.differing.get(table.name, set()) | consumed.get(table.name, set())
                  | (own ^ pre.own.get(table.name, set())))


async def _differing(src: asyncpg.Connection, dst: asyncpg.Connection, table: SlotTable, spec: MoveSpec,
                     own: set[str], keys: list[str]) -> list[str]:
    """Those of `keys` whose rows differ between the sides (or stand on one side only), both read at once."""
    if not keys:
        return []
    left, right = await asyncio.gather(*(_row_hashes(c, table, spec, own, keys) for c in (src, dst)))
    return [k for k in keys if left.get(k) != right.get(k)]


async def _delete_gone(src: asyncpg.Connection, dst: asyncpg.Connection, table: SlotTable,
                       keys: list[dict[str, Any]]) -> None:
    """Delete on the target the logged rows the source no longer has (deleted while the range moves)."""
    match = " and ".join(f"t.{c} = k.{c}" for c in table.key)
    gone = await src.fetchval(
        f"select coalesce(jsonb_agg(to_jsonb(k)), '[]')::text "  # noqa: S608 (registry constants)
        f"from jsonb_populate_recordset(null::{table.name}, $1::jsonb) k "
        f"where not exists (select 1 from {table.name} t where {match})", json.dumps(keys))
    await dst.execute(
        f"delete from {table.name} t using jsonb_populate_recordset(null::{table.name}, $1::jsonb) k "  # noqa: S608
        f"where {match}", gone)


async def _columns(conn: asyncpg.Connection, table: str) -> list[str]:
    rows = await conn.fetch(
        """select column_name from information_schema.columns
           where table_schema = 'public' and table_name = $1 order by ordinal_position""", table)
    return [r[0] for r in rows]


def _json_array(rows: list[asyncpg.Record]) -> str:
    """The rows' JSON texts (each `to_jsonb(t)::text`) as one JSON array, passed through undecoded."""
    return "[" + ",".join(r[0] for r in rows) + "]"


async def _import(conn: asyncpg.Connection, table: SlotTable, columns: list[str], rows: str,
                  source_shard: str) -> None:
    """Upsert rows (a JSON array of objects) into `table`, overriding the columns the registry says."""
    if rows == "[]":
        return
    values = ", ".join(table.overrides.get(c, f"r.{c}") for c in columns)
    keys = ", ".join(table.key)
    if table.on_conflict == "nothing":
        conflict = "do nothing"
    else:
        others = [c for c in columns if c not in table.key and c not in table.insert_only]
        conflict = (f"do update set ({', '.join(others)}) = row({', '.join('excluded.' + c for c in others)}) "
                    f"where {table.update_where}")
    await conn.execute(
        f"insert into {table.name} ({', '.join(columns)}) "  # noqa: S608 (registry constants)
        f"select {values} from jsonb_populate_recordset(null::{table.name}, $1::jsonb) r "
        f"where $2::text is not null on conflict ({keys}) {conflict}",
        rows, source_shard)
    if table.own_merged:  # the source's side joins a row of the target's own under the same key
        match = " and ".join(f"t.{c} = r.{c}" for c in table.key)
        ours = ", ".join(f"t.{c}" for c in table.own_merged)
        theirs = ", ".join(f"r.{c}" for c in table.own_merged)
        await conn.execute(
            f"update {table.name} t set ({', '.join(table.own_merged)}) = row({theirs}) "  # noqa: S608
            f"from jsonb_populate_recordset(null::{table.name}, $1::jsonb) r "
            f"where {match} and ({table.own_merged_where}) and ({ours}) is distinct from ({theirs})",
            rows, source_shard)


def _spec(row: asyncpg.Record) -> MoveSpec:
    return MoveSpec(
        id=row["id"], slot_lo=row["slot_lo"], slot_hi=row["slot_hi"], source_shard=row["source_shard"],
        source_region=row["source_region"], target_shard=row["target_shard"], target_region=row["target_region"],
        epoch=row["epoch"],
    )


def _seconds(start: dt.datetime | None, end: dt.datetime | None) -> float | None:
    return None if start is None or end is None else (end - start).total_seconds()


def _unfinished(move: dict[str, Any]) -> bool:
    """A move a re-run resumes: under way on its source, or done there while its target's record still says
    `switched` (a mover that died between the cleanup's two commits)."""
    if move.get("phase") in (*ACTIVE, "switched"):
        return True
    return move.get("phase") == "done" and move.get("target", {}).get("phase") == "switched"


def _next_step(phase: str) -> str:
    return {
        "copying": "re-run `txroute slots move` to copy again and go on, or `txroute slots cancel`",
        "catching_up": "re-run `txroute slots move` to catch up and freeze, or `txroute slots cancel`",
        "frozen": "re-run `txroute slots move` to verify and switch, or `txroute slots cancel` (unfreezes)",
        "switching": "re-run `txroute slots move`: past the switch the move only completes",
        "switched": "re-run `txroute slots move` to clean up the source",
    }.get(phase, "nothing: the move is over")


async def _pause(seconds: float) -> None:
    await asyncio.sleep(seconds)
