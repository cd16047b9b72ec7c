-- Fault isolation (issue 10): one stuck account must not fail the postings it happens to be batched with.
--
-- Group commit (DESIGN D11) locks every account of a batch in one pass in id order. Before this migration
-- that pass waited up to the session's lock_timeout for each row, and a timeout aborted the whole batch:
-- postings on healthy accounts failed with the one whose account was held by a stuck session.
-- Now the pass waits at most p_lock_wait_ms for a row while holding the rows before it; a row still locked
-- then is waited for holding no lock at all (the pass lets go, probes that row: takes its lock and gives it
-- straight back, then starts again) for at most p_patience_ms in total. Past that the account is "busy":
-- the postings that need it leave the batch with a `busy` result (409 account_busy, NOT stored as their
-- idempotent answer: a retry must be able to succeed) and the rest of the batch commits. The caller retries
-- a busy posting alone with more patience (app/store/shard.py, app/limits.py). So a stuck account keeps
-- no other account locked for more than p_lock_wait_ms at a time, and hot rows shared by every batch (a
-- settlement account) are still simply waited for.
--
-- The pass is still one ordered walk (skipping a busy account keeps the order), so batches cannot deadlock.
-- It runs inside one exception block: a lock timeout rolls the block back, which releases the locks taken
-- in it, and the walk starts again. That is one subtransaction per batch (plus one per busy account or
-- probe), never one per row: a transaction with more than 64 subtransactions that hold an xid overflows
-- PostgreSQL's per-backend subxid cache and slows every snapshot on the server.
create function txr_post(p_batch jsonb, p_lock_wait_ms integer, p_patience_ms integer default 0)
returns jsonb language plpgsql as $$
declare
    v_results jsonb := '[]'::jsonb;
    v_item jsonb;
    v_result jsonb;
    v_ids text[];
    v_id text;
    v_blocked text;
    v_busy text[] := '{}';
    v_lock_timeout text := current_setting('lock_timeout');
    v_patience_until timestamptz := clock_timestamp() + make_interval(secs => p_patience_ms / 1000.0);
    v_left_ms integer;
begin
    assert p_lock_wait_ms > 0, 'a lock wait of 0 would wait forever';
    -- Transit accounts are created on first use, before the lock pass so that they are locked in it.
    insert into accounts (id, slot, kind, owner_client, currency)
    select distinct x ->> 'transit', (x ->> 'slot')::integer, 'transit', 'txroute', x ->> 'currency'
    from jsonb_array_elements(p_batch) x where (x ->> 'transit') is not null
    on conflict (id) do nothing;
    select array_agg(id order by id) into v_ids from (
        select x ->> 'debit' as id from jsonb_array_elements(p_batch) x
        union
        select coalesce(x ->> 'transit', x ->> 'credit') from jsonb_array_elements(p_batch) x
    ) ids;
    -- Bounded: a pass that fails either marks one more account busy, or probes one while patience lasts.
    loop
        v_blocked := null;
        perform set_config('lock_timeout', p_lock_wait_ms::text, true);
        begin
            foreach v_id in array v_ids loop
                continue when v_id = any(v_busy);
                perform 1 from accounts where id = v_id for update;
            end loop;
        exception when lock_not_available then
            v_blocked := v_id;
        end;
        exit when v_blocked is null;
        v_left_ms := floor(extract(epoch from v_patience_until - clock_timestamp()) * 1000)::integer;
        if v_left_ms <= 0 then
            v_busy := v_busy || v_blocked;
            continue;
        end if;
        -- Wait for the blocked account holding nothing, then let go of it again (the block is rolled back).
        perform set_config('lock_timeout', v_left_ms::text, true);
        begin
            perform 1 from accounts where id = v_blocked for update;
            raise exception using errcode = 'TXR01';
        exception
            when sqlstate 'TXR01' then null;
            when lock_not_available then v_busy := v_busy || v_blocked;
        end;
    end loop;
    perform set_config('lock_timeout', v_lock_timeout, true);
    for v_item in select value from jsonb_array_elements(p_batch) loop
        if v_item ->> 'debit' = any(v_busy) or coalesce(v_item ->> 'transit', v_item ->> 'credit') = any(v_busy) then
            v_results := v_results || jsonb_build_array(jsonb_build_object(
                'status', 409, 'busy', true,
                'busy_account', case when v_item ->> 'debit' = any(v_busy) then v_item ->> 'debit'
                                     else coalesce(v_item ->> 'transit', v_item ->> 'credit') end,
                'body', jsonb_build_object(
                    'code', 'account_busy',
                    'detail', 'an account of this posting is locked by another operation; nothing was posted')));
        else
            -- A system account at its bound refuses the posting before anything is written (item 2 below).
            v_result := txr_system_bound_refusal(v_item);
            if v_result is null then
                v_result := txr_post_one(v_item);
                -- A saga message keeps its request's trace context, for every later delivery to link to.
                if v_result ? 'message' and v_item ? 'traceparent' then
                    update outbox set traceparent = v_item ->> 'traceparent'
                    where transfer_id = v_result -> 'message' ->> 'transfer_id';
                end if;
            end if;
            v_results := v_results || jsonb_build_array(v_result);
        end if;
    end loop;
    return v_results;
end $$;

-- The one-argument form (migration 0002) keeps working for any caller left, with the pool's default lock
-- wait (app/limits.py DB_LOCK_TIMEOUT_MS).
create or replace function txr_post(p_batch jsonb) returns jsonb language plpgsql as $$
begin
    return txr_post(p_batch, 2000, 0);
end $$;

-- System accounts cannot wedge a shard (issue 10, item 2). Settlement and transit accounts are single rows per
-- shard and currency, and their balances are the negated sum of many customers': unbounded, they would
-- eventually overflow bigint (2^63-1), and from then on every deposit (or saga) of that currency would fail.
-- They are kept one row each (group commit already makes a hot row cheap: every batch updates it once per
-- posting under one lock, measured at the same rate as two customer accounts), and bounded at +-2^62, half of
-- bigint: a posting is at most 2^53-1, so the check before each update leaves a margin no arithmetic crosses.
-- A posting that would cross the bound is refused (503 ledger_limit_reached, not stored: nothing happened and
-- the same request can succeed once the account is rebalanced); a gauge (txroute_system_account_usage_ratio)
-- and an alert fire long before (runbooks/system-accounts.md).
alter table accounts add constraint system_balance_within_bound check (
    kind = 'customer' or balance between -4611686018427387904 and 4611686018427387904
);
-- The metrics read the system accounts of a shard at every scrape: a partial index keeps that off a scan of
-- every customer account.
create index accounts_system on accounts (id) where kind <> 'customer';

-- The refusal of a posting that would push one of its system accounts past the bound, or null.
create function txr_system_bound_refusal(p jsonb) returns jsonb language plpgsql stable as $$
declare
    v_amount bigint := (p ->> 'amount')::bigint;
    v_debit text := p ->> 'debit';
    v_credit text := coalesce(p ->> 'transit', p ->> 'credit');
    v_balance bigint;
begin
    if left(v_debit, 4) in ('set_', 'trn_') then
        select balance into v_balance from accounts where id = v_debit;
        if v_balance - v_amount < -4611686018427387904 then
            return jsonb_build_object('status', 503, 'body', jsonb_build_object('code', 'ledger_limit_reached',
                'detail', 'a system account of this shard is at its limit; nothing was posted'));
        end if;
    end if;
    if left(v_credit, 4) in ('set_', 'trn_') then
        select balance into v_balance from accounts where id = v_credit;
        if v_balance + v_amount > 4611686018427387904 then
            return jsonb_build_object('status', 503, 'body', jsonb_build_object('code', 'ledger_limit_reached',
                'detail', 'a system account of this shard is at its limit; nothing was posted'));
        end if;
    end if;
    return null;
end $$;

-- Saga messages that can never be delivered go to a dead letter (issue 10, item 2). A failure that cannot
-- heal by waiting (the credit side answers the message is malformed or fails on it; the source cannot settle
-- the answer, e.g. a return that would push the source account over 2^53-1) is counted in `failures`; after
-- SAGA_POISON_FAILURES_MAX of them the message is dead-lettered: never claimed again, listed by
-- `txroute ops sagas list`, counted in /metrics and alarmed. Failures that heal (a region or database
-- unreachable, a timeout) are only retried, however long: the saga backlog alert covers them.
-- Money is never lost: the transfer stays `pending` at the source, its amount stays in the transit account
-- and the audit counts it in flight; `txroute ops sagas retry` puts a dead letter back in the queue.
--
-- The relay is fair (item 3): it claims per destination region, so a slow region fills only its own share of
-- deliveries. And each message keeps the trace context of the request that committed it (`traceparent`), so
-- every later delivery, however late, links to that trace.
alter table outbox
    add column failures integer not null default 0 check (failures >= 0),
    add column dead_lettered_at timestamptz,
    add column traceparent text check (traceparent is null or traceparent ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$');
create index outbox_due_by_destination on outbox (destination_region, next_attempt_at)
    where delivered_at is null and dead_lettered_at is null;
create index outbox_dead_letters on outbox (dead_lettered_at) where dead_lettered_at is not null and delivered_at is null;

-- The relay claims per destination now (below); the claim of migration 0002 would also take dead letters.
drop function txr_outbox_claim(integer, integer);

-- Claims due messages: up to p_limits[i] for destination region p_regions[i], each leased for p_lease_ms and its
-- attempt counted. One round trip for every destination; a region at its limit is simply left out by the caller.
create function txr_outbox_claim(p_regions text[], p_limits integer[], p_lease_ms integer)
returns table (transfer_id text, destination_region text, message jsonb, attempts integer, traceparent text)
language plpgsql as $$
begin
    assert cardinality(p_regions) = cardinality(p_limits), 'one limit per region';
    return query
    update outbox o
    set next_attempt_at = clock_timestamp() + make_interval(secs => p_lease_ms / 1000.0),
        attempts = o.attempts + 1
    where o.transfer_id in (
        select c.transfer_id
        from unnest(p_regions, p_limits) as r(region, n)
        cross join lateral (
            select d.transfer_id from outbox d
            where d.destination_region = r.region and d.delivered_at is null and d.dead_lettered_at is null
              and d.next_attempt_at <= clock_timestamp()
            order by d.next_attempt_at
            limit r.n
            for update skip locked
        ) c
    )
    returning o.transfer_id, o.destination_region, o.message, o.attempts, o.traceparent;
end $$;

-- A delivery failed: try again after p_delay_ms; a poison failure is counted, and the p_failures_max-th one
-- dead-letters the message. Returns true when it did.
create function txr_outbox_failed(
    p_transfer_id text, p_delay_ms integer, p_error text, p_poison boolean, p_failures_max integer
) returns boolean language plpgsql as $$
declare
    v_dead boolean;
begin
    update outbox
    set next_attempt_at = clock_timestamp() + make_interval(secs => p_delay_ms / 1000.0),
        last_error = left(p_error, 200),
        failures = failures + case when p_poison then 1 else 0 end,
        dead_lettered_at = case when p_poison and failures + 1 >= p_failures_max then clock_timestamp() end
    where transfer_id = p_transfer_id and delivered_at is null and dead_lettered_at is null
    returning dead_lettered_at is not null into v_dead;
    return coalesce(v_dead, false);
end $$;
