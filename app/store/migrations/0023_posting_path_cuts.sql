-- What a posting costs PostgreSQL (issue 14, item 3): work the per-row triggers did on every write although
-- nothing needed it. Measured with pg_stat_statements (track = all) and per-function timings on this 2-core
-- machine (README, Benchmarks): a plain transfer fired the change-log trigger of slot moves (migration 0019) four
-- times, and each built `to_jsonb` of its whole row (an account, the transfer, the stored answer with its body),
-- found its slot (a transfer's by a regular expression over its id), and looked for a move, although a move is
-- almost never running; the event trigger's id took three PL/pgSQL loops (26 iterations); the transfer's body was built with
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
-- 2. An event's id (`evt_` + slot + a ULID, migration 0011) is built in one expression instead of three loops.
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

-- 4. The relay's batches (migrations 0017, 0020) answered every message by a call of the one-message function
--    (the settle: 200 calls that only read a transfer already posted, and its body) and grew their answer with
--    `||`, which copies the whole array each time (quadratic in the batch). The settle now answers every transfer
--    no longer pending in one query and calls txr_saga_settle only for those still pending after the bulk (a
--    refusal to return), in order as before; the apply asks txr_owns once per distinct credit slot instead of
--    twice per message (the first ask takes the ownership row FOR SHARE, so the answer holds to the commit);
--    both gather their answers in an array.
create or replace function txr_saga_settle_batch(p_answers jsonb) returns jsonb language plpgsql as $$
declare
    v_posted text[];
    v_results jsonb[];
    v_answer jsonb;
    v_n integer;
begin
    assert jsonb_typeof(p_answers) = 'array', 'a batch is an array of answers';
    perform 1 from transfers
    where id in (select a ->> 'transfer_id' from jsonb_array_elements(p_answers) a)
    order by id
    for update;
    -- A return books the debit account and the transit account (only for transfers still pending).
    perform 1 from accounts
    where id in (select x.id
                 from transfers t
                 join jsonb_array_elements(p_answers) a on a ->> 'transfer_id' = t.id
                 cross join lateral (values (t.debit_account),
                                            ('trn_' || t.debit_shard || '_' || t.credit_shard || '_' || t.currency)) x(id)
                 where t.state = 'pending' and a ->> 'outcome' = 'refused')
    order by id
    for update;
    -- `applied` to a transfer still pending, in bulk: what txr_saga_settle's `applied` branch writes.
    with posted as (
        update transfers t set state = 'posted'
        where t.state = 'pending'
          and t.id in (select a ->> 'transfer_id' from jsonb_array_elements(p_answers) a
                       where a ->> 'outcome' = 'applied')
        returning t.id)
    select coalesce(array_agg(id order by id), '{}') into v_posted from posted;
    if cardinality(v_posted) > 0 then
        insert into transfer_events (transfer_id, seq, state, reason)
        select t.id, coalesce((select max(e.seq) from transfer_events e where e.transfer_id = t.id), 0) + 1,
               t.state, t.reason
        from transfers t where t.id = any(v_posted);
        update outbox set delivered_at = clock_timestamp() where transfer_id = any(v_posted);
        update idempotency i set status_code = 201, body = txr_transfer_body(t)
        from transfers t cross join lateral (values (t.idempotency_key), (t.resolution_key)) k (key)
        where t.id = any(v_posted) and k.key is not null and i.client = t.client and i.key = k.key;
    end if;
    -- Every answer's body: a transfer no longer pending answers it here (what txr_saga_settle returns for it);
    -- one still pending (a refusal to return) settles one by one, in order. An unknown transfer is left to
    -- txr_saga_settle, whose assertion fails the batch as before.
    select array_agg(case when t.state <> 'pending' then txr_transfer_body(t) end order by a.n)
    into v_results
    from jsonb_array_elements(p_answers) with ordinality a (x, n)
    left join transfers t on t.id = a.x ->> 'transfer_id';
    for v_answer, v_n in select a.x, a.n from jsonb_array_elements(p_answers) with ordinality a (x, n) loop
        if v_results[v_n] is null then
            v_results[v_n] := txr_saga_settle(v_answer ->> 'transfer_id', v_answer ->> 'outcome', v_answer ->> 'reason');
        end if;
    end loop;
    return coalesce(to_jsonb(v_results), '[]'::jsonb);
end $$;

create or replace function txr_saga_apply_batch(p_messages jsonb) returns jsonb language plpgsql as $$
declare
    v_shard text;
    v_owned integer[];
    v_bulk bigint[];
    v_rows jsonb;
    v_results jsonb[] := '{}';
    v_message jsonb;
    v_n bigint;
begin
    assert jsonb_typeof(p_messages) = 'array', 'a batch is an array of messages';
    select shard into strict v_shard from shard_info;
    -- Once-only per message (txr_saga_apply takes the same lock again: it is the session's already).
    perform pg_advisory_xact_lock(k)
    from (select distinct hashtextextended(m ->> 'transfer_id', 11) as k
          from jsonb_array_elements(p_messages) m order by 1) keys;
    -- The credit slots owned here, each asked once (the fence's row lock holds the answer to the commit).
    select coalesce(array_agg(s), '{}') into v_owned
    from (select distinct (m ->> 'credit_slot')::integer as s from jsonb_array_elements(p_messages) m) slots
    where txr_owns(s);
    -- The transit accounts exist before any account is locked (as txr_saga_apply would create them).
    insert into accounts (id, slot, kind, owner_client, currency)
    select distinct on (t.id) t.id, t.slot, 'transit', 'txroute', t.currency
    from (select 'trn_' || v_shard || '_' || (m ->> 'source_shard') || '_' || (m ->> 'currency') as id,
                 (m ->> 'credit_slot')::integer as slot, m ->> 'currency' as currency
          from jsonb_array_elements(p_messages) m
          where (m ->> 'credit_slot')::integer = any(v_owned)) t
    order by t.id
    on conflict (id) do nothing;
    perform 1 from accounts
    where id in (select m ->> 'credit_account' from jsonb_array_elements(p_messages) m
                 union
                 select 'trn_' || v_shard || '_' || (m ->> 'source_shard') || '_' || (m ->> 'currency')
                 from jsonb_array_elements(p_messages) m)
    order by id
    for update;

    -- The messages applied in bulk (migration 0017 says which); the rest go one by one below.
    select coalesce(array_agg(x.n), '{}') into v_bulk
    from (select e.m, e.n, row_number() over (partition by e.m ->> 'transfer_id' order by e.n) as occurrence
          from jsonb_array_elements(p_messages) with ordinality e(m, n)) x
    join accounts c on c.id = x.m ->> 'credit_account'
    where x.occurrence = 1
      and (x.m ->> 'credit_slot')::integer = any(v_owned)
      and not exists (select 1 from inbox i where i.transfer_id = x.m ->> 'transfer_id')
      and not exists (select 1 from transfers t where t.id = x.m ->> 'transfer_id')
      and txr_customer_refusal(c, x.m ->> 'credit_account', x.m ->> 'client', x.m ->> 'currency') is null;
    select coalesce(array_agg(y.n), '{}') into v_bulk
    from (select e.n, c.balance + sum((e.m ->> 'amount')::bigint) over (partition by c.id) as total
          from jsonb_array_elements(p_messages) with ordinality e(m, n)
          join accounts c on c.id = e.m ->> 'credit_account'
          where e.n = any(v_bulk)) y
    where y.total <= 9007199254740991;
    select jsonb_agg(e.m || jsonb_build_object(
                         'n', e.n,
                         'transit', 'trn_' || v_shard || '_' || (e.m ->> 'source_shard') || '_' || (e.m ->> 'currency'))
                     order by e.n)
    into v_rows
    from jsonb_array_elements(p_messages) with ordinality e(m, n)
    where e.n = any(v_bulk);

    if v_rows is not null then
        insert into transfers (id, client, kind, debit_account, credit_account, amount, currency, reference, state,
                               debit_shard, credit_shard)
        select b.transfer_id, b.client, 'transfer', b.debit_account, b.credit_account, b.amount, b.currency,
               b.reference, 'posted', b.source_shard, v_shard
        from jsonb_to_recordset(v_rows) as b(n bigint, transfer_id text, client text, debit_account text,
                                             credit_account text, amount bigint, currency text, reference text,
                                             source_shard text)
        order by b.n;
        -- Per message, as txr_saga_apply writes them: the transit's entry, then the credit's, each with the
        -- balance its account has after it (balances before the batch plus the running sum, in message order).
        insert into entries (transfer_id, account_id, amount, balance_after)
        select x.transfer_id, x.account_id, x.amount, x.balance_after
        from (select b.n, 0 as k, b.transfer_id, b.transit as account_id, -b.amount as amount,
                     t.balance - sum(b.amount) over (partition by b.transit order by b.n) as balance_after
              from jsonb_to_recordset(v_rows) as b(n bigint, transfer_id text, transit text, amount bigint)
              join accounts t on t.id = b.transit
              union all
              select b.n, 1, b.transfer_id, b.credit_account, b.amount,
                     c.balance + sum(b.amount) over (partition by b.credit_account order by b.n)
              from jsonb_to_recordset(v_rows) as b(n bigint, transfer_id text, credit_account text, amount bigint)
              join accounts c on c.id = b.credit_account) x
        order by x.n, x.k;
        update accounts a set balance = a.balance + s.amount, version = a.version + s.messages
        from (select b.credit_account as id, sum(b.amount) as amount, count(*) as messages
              from jsonb_to_recordset(v_rows) as b(credit_account text, amount bigint) group by b.credit_account
              union all
              select b.transit, -sum(b.amount), count(*)
              from jsonb_to_recordset(v_rows) as b(transit text, amount bigint) group by b.transit) s
        where a.id = s.id;
        insert into inbox (transfer_id, source_shard, outcome, credit_account, amount, currency)
        select b.transfer_id, b.source_shard, 'applied', b.credit_account, b.amount, b.currency
        from jsonb_to_recordset(v_rows) as b(n bigint, transfer_id text, source_shard text, credit_account text,
                                             amount bigint, currency text)
        order by b.n;
    end if;

    for v_message, v_n in select e.m, e.n from jsonb_array_elements(p_messages) with ordinality e(m, n) order by e.n loop
        if v_n = any(v_bulk) then
            v_results := v_results || '{"outcome": "applied"}'::jsonb;
        else
            v_results := v_results || txr_saga_apply(v_message);
        end if;
    end loop;
    return to_jsonb(v_results);
end $$;
