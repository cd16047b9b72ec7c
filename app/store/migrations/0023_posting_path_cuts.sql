-- What a posting costs PostgreSQL (issue 14, item 3): work the per-row triggers did on every write although
-- nothing needed it. Measured with pg_stat_statements (track = all) and per-function timings on this 2-core
-- machine (README, Performance): a plain transfer fired the change-log trigger of slot moves (migration 0019) four
-- times, and each built `to_jsonb` of its whole row (an account, the transfer, the stored answer with its body),
-- parsed the slot out of an id with a regular expression, and looked for a move, although a move is almost never
-- running; the event trigger's id took two PL/pgSQL loops of 26 iterations; the transfer's body was built with
-- three jsonb concatenations. Every invariant stays where it was: the same rows, the same triggers (only their
-- functions change), the same events in the same transaction, the same fences.
--
-- 1. The change log decides once per transaction that no move can need it. The first logged row a transaction
--    writes takes a shared advisory lock (the "move gate") and looks for a source move in a logging phase
--    (copying, catching_up, frozen). None: the transaction records that in a transaction-local setting (bound to
--    its own transaction id, so a stale or session-wide value is never trusted) and every later row it writes
--    returns at once, without `to_jsonb`. One: every row takes the full path as before.
--
--    Why this never lets a move's copy miss a change. A move enters a logging phase only through
--    txr_move_begin (source), which now takes the same gate exclusively before it records the move. So:
--    - a writer that found no move holds the gate (shared) until it commits, so the move's begin waits for
--      that writer's commit before it can commit itself; the mover takes the copy's snapshot after its begin
--      committed, so the copy sees every row such a writer wrote;
--    - a writer that asks for the gate while a begin holds it waits for the begin to commit, then looks (a new
--      statement, a new snapshot in READ COMMITTED), finds the move and logs as before.
--    The lookup needs a snapshot taken after the gate: a transaction at REPEATABLE READ or SERIALIZABLE (whose
--    snapshot may predate the move) never takes the shortcut. A move leaving the logging phases only makes the
--    log unneeded; no phase goes back to copying. The price: a move's begin waits for the writing transactions
--    in flight (milliseconds; the mover's lock_timeout bounds it).
--
-- 2. An event's id (`evt_` + slot + a ULID, migration 0011) is built in one expression instead of two loops.
-- 3. A transfer's body (migration 0009) is one jsonb_build_object, plus keys only where a transfer has them.
--    jsonb orders its keys itself, so the result is the same value, byte for byte.

create or replace function txr_move_log() returns trigger language plpgsql as $$
declare
    v_gate text := current_setting('txr.move_log', true);
    v_row jsonb;
    v_slot integer;
    v_move text;
begin
    if current_setting('txr.move_switch', true) = 'on' then
        return null;
    end if;
    if v_gate is null or v_gate not like 'active:%' then
        if v_gate = 'idle:' || pg_current_xact_id()::text then
            return null;
        end if;
        -- First logged row of this transaction: the gate, then the look (see the header, 1).
        perform pg_advisory_xact_lock_shared(7472, 23);
        if current_setting('transaction_isolation') = 'read committed' and not exists (
            select 1 from slot_moves where role = 'source' and phase in ('copying', 'catching_up', 'frozen')
        ) then
            perform set_config('txr.move_log', 'idle:' || pg_current_xact_id()::text, true);
            return null;
        end if;
        perform set_config('txr.move_log', 'active:' || pg_current_xact_id()::text, true);
    end if;
    v_row := case when tg_op = 'DELETE' then to_jsonb(old) else to_jsonb(new) end;
    v_slot := case tg_argv[0]
        when 'id' then txr_id_slot(v_row ->> tg_argv[1])
        else (v_row ->> tg_argv[1])::integer end;
    if v_slot is null then
        return null;
    end if;
    select id into v_move from slot_moves
    where role = 'source' and phase in ('copying', 'catching_up', 'frozen') and v_slot between slot_lo and slot_hi;
    if v_move is null then
        return null;
    end if;
    insert into slot_move_changes (move_id, tbl, key)
    select v_move, tg_table_name, jsonb_object_agg(k, v_row -> k) from unnest(tg_argv[2:tg_nargs - 1]) k;
    return null;
end $$;

-- Migration 0008's begin, with the move gate taken (exclusively) before a source move is recorded (header, 1).
create or replace function txr_move_begin(p jsonb) returns jsonb language plpgsql as $$
declare
    v_lo integer := (p ->> 'slot_lo')::integer;
    v_hi integer := (p ->> 'slot_hi')::integer;
    v_role text := p ->> 'role';
    v_prior slot_moves;
    v_owned integer;
    v_row slot_moves;
begin
    perform 1 from shard_info for update;  -- one move begins at a time per shard
    select * into v_prior from slot_moves where id = p ->> 'id';
    if found then
        return jsonb_build_object('ok', true, 'move', to_jsonb(v_prior));
    end if;
    if v_role = 'source' then
        -- Waits for every writing transaction that decided no move needs its changes logged.
        perform pg_advisory_xact_lock(7472, 23);
    end if;
    select coalesce(sum(least(slot_hi, v_hi) - greatest(slot_lo, v_lo) + 1), 0) into v_owned
    from slot_ownership where slot_lo <= v_hi and slot_hi >= v_lo and state in ('owned', 'moving');
    if v_role = 'source' then
        if exists (select 1 from slot_ownership where slot_lo <= v_hi and slot_hi >= v_lo and state = 'moving')
           or exists (select 1 from slot_moves where role = 'source'
                      and phase in ('copying', 'catching_up', 'frozen', 'switching')) then
            return jsonb_build_object('ok', false, 'code', 'move_in_progress',
                'detail', 'a move is already in progress on this shard');
        end if;
        if v_owned <> v_hi - v_lo + 1 then
            return jsonb_build_object('ok', false, 'code', 'range_not_owned',
                'detail', format('shard %s does not own all of slots %s-%s', p ->> 'source_shard', v_lo, v_hi));
        end if;
        perform txr_slot_split(v_lo, v_hi);
    else
        if v_owned > 0 then
            return jsonb_build_object('ok', false, 'code', 'target_owns_range',
                'detail', format('shard %s already owns slots of %s-%s', p ->> 'target_shard', v_lo, v_hi));
        end if;
    end if;
    insert into slot_moves (id, role, slot_lo, slot_hi, source_shard, source_region, target_shard, target_region,
                            phase, epoch)
    values (p ->> 'id', v_role, v_lo, v_hi, p ->> 'source_shard', p ->> 'source_region', p ->> 'target_shard',
            p ->> 'target_region', 'copying', (p ->> 'epoch')::bigint)
    returning * into v_row;
    return jsonb_build_object('ok', true, 'move', to_jsonb(v_row));
end $$;

-- `evt_` + the slot (3 hex digits) + a ULID: 48 bits of milliseconds in 10 characters, 80 random bits in 16
-- (two draws of 40 bits, 8 characters each), Crockford base32 as txr_base32 writes it (migration 0011).
create or replace function txr_event_id(p_slot integer) returns text language plpgsql volatile as $$
declare
    a constant text := '0123456789ABCDEFGHJKMNPQRSTVWXYZ';
    t bigint := (extract(epoch from clock_timestamp()) * 1000)::bigint;
    r1 bigint := floor(random() * 1099511627776)::bigint;
    r2 bigint := floor(random() * 1099511627776)::bigint;
begin
    return 'evt_' || lpad(to_hex(p_slot), 3, '0')
        || substr(a, ((t >> 45) & 31)::integer + 1, 1) || substr(a, ((t >> 40) & 31)::integer + 1, 1)
        || substr(a, ((t >> 35) & 31)::integer + 1, 1) || substr(a, ((t >> 30) & 31)::integer + 1, 1)
        || substr(a, ((t >> 25) & 31)::integer + 1, 1) || substr(a, ((t >> 20) & 31)::integer + 1, 1)
        || substr(a, ((t >> 15) & 31)::integer + 1, 1) || substr(a, ((t >> 10) & 31)::integer + 1, 1)
        || substr(a, ((t >> 5) & 31)::integer + 1, 1) || substr(a, (t & 31)::integer + 1, 1)
        || substr(a, ((r1 >> 35) & 31)::integer + 1, 1) || substr(a, ((r1 >> 30) & 31)::integer + 1, 1)
        || substr(a, ((r1 >> 25) & 31)::integer + 1, 1) || substr(a, ((r1 >> 20) & 31)::integer + 1, 1)
        || substr(a, ((r1 >> 15) & 31)::integer + 1, 1) || substr(a, ((r1 >> 10) & 31)::integer + 1, 1)
        || substr(a, ((r1 >> 5) & 31)::integer + 1, 1) || substr(a, (r1 & 31)::integer + 1, 1)
        || substr(a, ((r2 >> 35) & 31)::integer + 1, 1) || substr(a, ((r2 >> 30) & 31)::integer + 1, 1)
        || substr(a, ((r2 >> 25) & 31)::integer + 1, 1) || substr(a, ((r2 >> 20) & 31)::integer + 1, 1)
        || substr(a, ((r2 >> 15) & 31)::integer + 1, 1) || substr(a, ((r2 >> 10) & 31)::integer + 1, 1)
        || substr(a, ((r2 >> 5) & 31)::integer + 1, 1) || substr(a, (r2 & 31)::integer + 1, 1);
end $$;

-- Migration 0009's body of a transfer, built in one object (a hold past its time still reads as `expired`).
create or replace function txr_transfer_body(t transfers) returns jsonb language plpgsql stable as $$
declare
    v_state text := case when t.state = 'held' and t.hold_expires_at <= clock_timestamp() then 'expired'
                         else t.state end;
    v_body jsonb;
begin
    if t.kind = 'transfer' then
        v_body := jsonb_build_object(
            'id', t.id, 'kind', t.kind, 'debit_account', t.debit_account, 'credit_account', t.credit_account,
            'amount', t.amount, 'currency', t.currency, 'reference', t.reference, 'state', v_state,
            'created_at', txr_ts(t.created_at), 'metadata', coalesce(t.metadata, '{}'::jsonb));
    else
        v_body := jsonb_build_object(
            'id', t.id, 'kind', t.kind,
            'account', case t.kind when 'deposit' then t.credit_account else t.debit_account end,
            'amount', t.amount, 'currency', t.currency, 'reference', t.reference, 'state', v_state,
            'created_at', txr_ts(t.created_at), 'metadata', coalesce(t.metadata, '{}'::jsonb));
    end if;
    if t.reason is not null then
        v_body := v_body || jsonb_build_object('reason', t.reason);
    end if;
    if t.hold_amount is not null then
        v_body := v_body || jsonb_build_object('hold', jsonb_build_object(
            'amount', t.hold_amount, 'expires_at', txr_ts(t.hold_expires_at)));
    end if;
    return v_body;
end $$;
