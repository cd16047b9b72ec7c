-- Holds, closing accounts, balance as of a time, metadata (issue 12; DESIGN D14).
--
-- A hold is a transfer in state `held`: it moves no money and writes no entry, it reserves its amount on the
-- debit account (`accounts.held`, the sum of the account's transfers in state `held`, kept in the same
-- transaction like `balance`). It is resolved at most once, by the transfer state machine of migration 0001:
--     held -> posted | pending   captured (all or part; the rest is released); pending when the credit is on
--                                another shard (the capture is the debit side of a saga, DESIGN D6)
--     held -> voided             released by the client
--     held -> expired            released at `hold_expires_at` (recorded by the sweeper)
-- Each transition writes its row in transfer_events, and the stored responses of the hold's create and
-- resolve requests follow the transfer like a saga's (DESIGN D5).
--
-- Expiry takes effect at its time without the sweeper: what an account holds is computed (txr_held) from its
-- open holds whose time has not come, and a capture or void checks the time after taking its locks. The
-- sweeper only records `expired` and gives `held` back.
--
-- Lock order (no deadlocks): capture, void and expiry lock the hold's transfer row first, then its accounts in
-- id order; postings (txr_post) lock accounts in id order and never an existing transfer row; the saga's
-- settle locks its transfer row first as well.

insert into transfer_states values ('held', false), ('voided', true), ('expired', true);
insert into transfer_transitions values
    ('held', 'posted'), ('held', 'pending'), ('held', 'voided'), ('held', 'expired');

-- Metadata: at most 20 keys, each 1..40 characters, every value a string of at most 500 characters. The API
-- refuses more before anything is written (app/api/schemas.py); the database holds the same bound.
create function txr_metadata_ok(m jsonb) returns boolean language plpgsql immutable as $$
begin
    return m is null or (
        jsonb_typeof(m) = 'object'
        and (select count(*) from jsonb_object_keys(m)) <= 20
        and not exists (
            select 1 from jsonb_each(m) e
            where length(e.key) not between 1 and 40 or jsonb_typeof(e.value) <> 'string'
               or length(e.value #>> '{}') > 500
        )
    );
end $$;

alter table accounts
    add column held bigint not null default 0 check (held >= 0),
    add column metadata jsonb check (txr_metadata_ok(metadata)),
    add column closed_at timestamptz,
    add constraint closed_has_time check (closed_at is null or status = 'closed');

alter table transfers
    add column hold_amount bigint check (hold_amount between 1 and 9007199254740991),
    add column hold_expires_at timestamptz,
    -- The key of the request that resolved the hold (capture or void): its stored response follows the
    -- transfer too (a captured cross-shard hold settles later).
    add column resolution_key text,
    add column metadata jsonb check (txr_metadata_ok(metadata)),
    add constraint hold_has_expiry check ((hold_amount is null) = (hold_expires_at is null)),
    add constraint hold_states check (hold_amount is not null or state not in ('held', 'voided', 'expired')),
    add constraint hold_amount_covers check (hold_amount is null or amount <= hold_amount);

-- An account's open holds (for txr_held, closing, and the audit) and the sweeper's due holds.
create index transfers_open_holds on transfers (debit_account, hold_expires_at) where state = 'held';
create index transfers_holds_due on transfers (hold_expires_at) where state = 'held';
-- Closing checks for money still in flight from the account; the audit and as-of read an account's holds.
create index transfers_pending_debit on transfers (debit_account) where state = 'pending';
create index transfers_holds_by_account on transfers (debit_account, created_at) where hold_amount is not null;

-- Balance as of a time (GET /v1/accounts/{id}?as_of=): the account's last entry at or before it, one index
-- probe. Entries are stamped when written (clock_timestamp(), after the account's row lock), not at their
-- transaction's start (now()): then one account's entries are in time order as they are in id order, and
-- an entry's time is after everything it follows.
alter table entries alter column created_at set default clock_timestamp();
create index entries_account_time on entries (account_id, created_at desc, id desc);

-- A transfer's amount is immutable but for one change: a partial capture posts less than was held.
create or replace function transfers_check_transition() returns trigger language plpgsql as $$
begin
    if new.state is distinct from old.state and not exists (
        select 1 from transfer_transitions where from_state = old.state and to_state = new.state
    ) then
        raise exception 'transfer % cannot go from % to %', old.id, old.state, new.state
            using errcode = 'check_violation';
    end if;
    if (new.id, new.client, new.kind, new.debit_account, new.credit_account, new.currency,
        new.hold_amount, new.hold_expires_at, new.metadata)
        is distinct from
       (old.id, old.client, old.kind, old.debit_account, old.credit_account, old.currency,
        old.hold_amount, old.hold_expires_at, old.metadata)
       or (new.amount <> old.amount
           and not (old.state = 'held' and new.state in ('posted', 'pending') and new.amount < old.amount)) then
        raise exception 'transfer % is immutable but for its state', old.id using errcode = 'check_violation';
    end if;
    return new;
end $$;

-- What an account holds at p_at: its open holds whose time has not come. An account that never held
-- anything costs no query.
create function txr_held(a accounts, p_at timestamptz) returns bigint language plpgsql stable as $$
begin
    if a.held = 0 then
        return 0;
    end if;
    return coalesce((
        select sum(t.amount) from transfers t
        where t.debit_account = a.id and t.state = 'held' and t.hold_expires_at > p_at
    ), 0);
end $$;

create or replace function txr_account_body(a accounts) returns jsonb language plpgsql stable as $$
declare
    v_held bigint := txr_held(a, clock_timestamp());
begin
    return jsonb_build_object(
        'id', a.id,
        'currency', a.currency,
        'balance', a.balance,
        'held', v_held,
        'available', a.balance - v_held + a.overdraft_limit,
        'overdraft_limit', a.overdraft_limit,
        'status', a.status,
        'region', (select region from shard_info),
        'metadata', coalesce(a.metadata, '{}'::jsonb),
        'created_at', txr_ts(a.created_at)
    ) || case when a.closed_at is null then '{}'::jsonb else jsonb_build_object('closed_at', txr_ts(a.closed_at)) end;
end $$;

-- A hold past its time reads as `expired` before the sweeper has recorded it.
create or replace function txr_transfer_body(t transfers) returns jsonb language plpgsql stable as $$
declare
    v_state text := case when t.state = 'held' and t.hold_expires_at <= clock_timestamp() then 'expired'
                         else t.state end;
begin
    return case t.kind
        when 'transfer' then jsonb_build_object(
            'id', t.id, 'kind', t.kind, 'debit_account', t.debit_account, 'credit_account', t.credit_account,
            'amount', t.amount, 'currency', t.currency, 'reference', t.reference, 'state', v_state,
            'created_at', txr_ts(t.created_at))
        else jsonb_build_object(
            'id', t.id, 'kind', t.kind,
            'account', case t.kind when 'deposit' then t.credit_account else t.debit_account end,
            'amount', t.amount, 'currency', t.currency, 'reference', t.reference, 'state', v_state,
            'created_at', txr_ts(t.created_at))
    end
    || jsonb_build_object('metadata', coalesce(t.metadata, '{}'::jsonb))
    || case when t.reason is null then '{}'::jsonb else jsonb_build_object('reason', t.reason) end
    || case when t.hold_amount is null then '{}'::jsonb else jsonb_build_object('hold', jsonb_build_object(
           'amount', t.hold_amount, 'expires_at', txr_ts(t.hold_expires_at))) end;
end $$;

-- Opens a customer account (migration 0002), now with its metadata.
create or replace function txr_open_account(p jsonb) returns jsonb language plpgsql as $$
declare
    v_slot integer := (p ->> 'slot')::integer;
    v_prior jsonb;
    v_account accounts;
    v_shard text;
begin
    if not txr_owns(v_slot) then
        return txr_misdirected(v_slot);
    end if;
    v_prior := txr_idempotency_check(p ->> 'client', p ->> 'key', p ->> 'fingerprint');
    if v_prior is not null then
        return v_prior;
    end if;
    select shard into strict v_shard from shard_info;
    insert into accounts (id, slot, kind, owner_client, currency, overdraft_limit, metadata)
    values (p ->> 'id', v_slot, 'customer', p ->> 'client', p ->> 'currency', (p ->> 'overdraft_limit')::bigint,
            case when jsonb_typeof(p -> 'metadata') = 'object' then p -> 'metadata' end)
    returning * into v_account;
    insert into accounts (id, slot, kind, owner_client, currency)
    values ('set_' || v_shard || '_' || (p ->> 'currency'), v_slot, 'settlement', 'txroute', p ->> 'currency')
    on conflict (id) do nothing;
    return txr_idempotency_store(p ->> 'client', p ->> 'key', p ->> 'fingerprint',
        jsonb_build_object('status', 201, 'body', txr_account_body(v_account)));
end $$;

-- The refusal of a posting that would take the debit account's available funds below zero, or null.
create function txr_funds_refusal(a accounts, p_amount bigint) returns jsonb language plpgsql stable as $$
declare
    v_held bigint := txr_held(a, clock_timestamp());
begin
    if a.balance - v_held - p_amount >= -a.overdraft_limit then
        return null;
    end if;
    return txr_refusal(422, 'insufficient_funds',
        format('account %s has %s %s available, %s requested',
            a.id, a.balance - v_held + a.overdraft_limit, a.currency, p_amount));
end $$;

-- Posts one transfer, deposit or withdrawal whose accounts the caller (txr_post) has already locked (migration
-- 0002), now also: a hold (`hold_expires_in_s` set: reserves the amount, moves nothing; its credit may be on
-- another shard, `credit_remote`), the debit account's open holds counted against its funds, and metadata.
create or replace function txr_post_one(p jsonb) returns jsonb language plpgsql as $$
declare
    v_kind text := p ->> 'kind';
    v_client text := p ->> 'client';
    v_amount bigint := (p ->> 'amount')::bigint;
    v_currency text := p ->> 'currency';
    v_transit text := p ->> 'transit';
    v_saga boolean := (p ->> 'transit') is not null;
    v_hold boolean := (p ->> 'hold_expires_in_s') is not null;
    v_remote boolean := coalesce((p ->> 'credit_remote')::boolean, false);
    v_metadata jsonb := case when jsonb_typeof(p -> 'metadata') = 'object' then p -> 'metadata' end;
    v_message jsonb;
    v_prior jsonb;
    v_refusal jsonb;
    v_debit accounts;
    v_credit accounts;
    v_transfer transfers;
    v_at timestamptz;
begin
    if not txr_owns((p ->> 'slot')::integer) then
        return txr_misdirected((p ->> 'slot')::integer);
    end if;
    v_prior := txr_idempotency_check(v_client, p ->> 'key', p ->> 'fingerprint');
    if v_prior is not null then
        return v_prior;
    end if;
    assert not (v_hold and (v_saga or v_kind = 'deposit')), 'a hold is a transfer or a withdrawal, never a saga';
    select * into v_debit from accounts where id = p ->> 'debit';
    select * into v_credit from accounts where id = coalesce(v_transit, p ->> 'credit');
    if v_kind <> 'deposit' then
        v_refusal := txr_customer_refusal(v_debit, p ->> 'debit', v_client, v_currency);
    end if;
    if v_refusal is null and v_kind <> 'withdrawal' and not v_saga and not v_remote then
        v_refusal := txr_customer_refusal(v_credit, p ->> 'credit', v_client, v_currency);
    end if;
    if v_refusal is null and v_kind <> 'deposit' then
        v_refusal := txr_funds_refusal(v_debit, v_amount);
    end if;
    if v_refusal is null and v_credit.kind = 'customer' and v_credit.balance > 9007199254740991 - v_amount then
        v_refusal := txr_refusal(422, 'balance_limit_exceeded',
            format('account %s would exceed the largest balance, 9007199254740991', v_credit.id));
    end if;
    if v_refusal is not null then
        return txr_idempotency_store(v_client, p ->> 'key', p ->> 'fingerprint', v_refusal);
    end if;
    -- System accounts (settlement, transit) exist before this runs (txr_open_account, txr_post).
    assert v_debit.id is not null and (v_credit.id is not null or v_remote), 'posting names a missing system account';
    assert v_debit.currency = v_currency and (v_remote or v_credit.currency = v_currency), 'system account currency';

    if v_hold then
        -- One instant for the hold's creation, its history and its expiry, so a read as of any time sees it whole.
        v_at := clock_timestamp();
        update accounts set held = held + v_amount, version = version + 1 where id = v_debit.id;
        insert into transfers (id, client, kind, debit_account, credit_account, amount, currency, reference, state,
                               hold_amount, hold_expires_at, idempotency_key, metadata, created_at)
        values (p ->> 'id', v_client, v_kind, v_debit.id, p ->> 'credit', v_amount, v_currency, p ->> 'reference',
                'held', v_amount, v_at + make_interval(secs => (p ->> 'hold_expires_in_s')::integer),
                p ->> 'key', v_metadata, v_at)
        returning * into v_transfer;
        insert into transfer_events (transfer_id, seq, state, at) values (v_transfer.id, 1, 'held', v_at);
        return txr_idempotency_store(v_client, p ->> 'key', p ->> 'fingerprint',
            jsonb_build_object('status', 201, 'body', txr_transfer_body(v_transfer)));
    end if;

    update accounts set balance = balance - v_amount, version = version + 1
    where id = v_debit.id returning balance into v_debit.balance;
    update accounts set balance = balance + v_amount, version = version + 1
    where id = v_credit.id returning balance into v_credit.balance;
    insert into transfers (id, client, kind, debit_account, credit_account, amount, currency, reference, state,
                           debit_shard, credit_shard, idempotency_key, metadata)
    values (p ->> 'id', v_client, v_kind, v_debit.id, p ->> 'credit', v_amount, v_currency, p ->> 'reference',
            case when v_saga then 'pending' else 'posted' end,
            case when v_saga then (select shard from shard_info) end,
            p ->> 'credit_shard',
            case when v_saga then p ->> 'key' end,
            v_metadata)
    returning * into v_transfer;
    insert into entries (transfer_id, account_id, amount, balance_after)
    values (v_transfer.id, v_debit.id, -v_amount, v_debit.balance),
           (v_transfer.id, v_credit.id, v_amount, v_credit.balance);
    if not v_saga then
        return txr_idempotency_store(v_client, p ->> 'key', p ->> 'fingerprint',
            jsonb_build_object('status', 201, 'body', txr_transfer_body(v_transfer)));
    end if;
    insert into transfer_events (transfer_id, seq, state) values (v_transfer.id, 1, 'pending');
    v_message := txr_saga_message(v_transfer, p);
    -- The message goes back to the caller too (not into the stored response), for the fast path.
    return txr_idempotency_store(v_client, p ->> 'key', p ->> 'fingerprint',
            jsonb_build_object('status', 202, 'body', txr_transfer_body(v_transfer)))
        || jsonb_build_object('message', v_message || jsonb_build_object('destination_region', p ->> 'credit_region'));
end $$;

-- The debit side's saga message for a transfer just made pending, written to the outbox (migration 0002's
-- txr_post_one, shared with a captured cross-shard hold). `p` carries the saga leg (credit_shard,
-- credit_region, credit_slot, relay_delay_ms).
create function txr_saga_message(t transfers, p jsonb) returns jsonb language plpgsql as $$
declare
    v_message jsonb;
begin
    v_message := jsonb_build_object(
        'transfer_id', t.id, 'client', t.client,
        'debit_account', t.debit_account, 'credit_account', t.credit_account,
        'credit_slot', (p ->> 'credit_slot')::integer,
        'amount', t.amount, 'currency', t.currency, 'reference', t.reference,
        'source_shard', t.debit_shard, 'destination_shard', t.credit_shard);
    insert into outbox (transfer_id, destination_shard, destination_region, message, next_attempt_at)
    values (t.id, p ->> 'credit_shard', p ->> 'credit_region', v_message,
            clock_timestamp() + make_interval(secs => (p ->> 'relay_delay_ms')::integer / 1000.0));
    return v_message;
end $$;

-- Records a hold's transition at p_at: its history row, and the stored responses of the requests that created
-- and resolved it now say what it is (202 while a captured cross-shard hold is pending).
create function txr_hold_follow(t transfers, p_at timestamptz) returns jsonb language plpgsql as $$
declare
    v_body jsonb := txr_transfer_body(t);
begin
    insert into transfer_events (transfer_id, seq, state, reason, at)
    select t.id, coalesce(max(seq), 0) + 1, t.state, t.reason, p_at from transfer_events where transfer_id = t.id;
    update idempotency set body = v_body, status_code = case when t.state = 'pending' then 202 else 201 end
    where client = t.client and key = t.idempotency_key;
    return v_body;
end $$;

-- The hold `p_id` of `p_client`, locked, or a refusal: not found (404), not a hold or no longer held, also when
-- its time has come (409 transfer_not_held). The time is read after every lock the caller takes.
create function txr_hold_refusal(t transfers, p_id text) returns jsonb language plpgsql stable as $$
begin
    return case
        when t.id is null then
            txr_refusal(404, 'transfer_not_found', format('transfer %s was not found', p_id))
        when t.hold_amount is null then
            txr_refusal(409, 'transfer_not_held', format('transfer %s is not a hold', p_id))
        when t.state <> 'held' then
            txr_refusal(409, 'transfer_not_held', format('hold %s is %s already', p_id,
                case t.state when 'posted' then 'captured' when 'pending' then 'captured' else t.state end))
        when t.hold_expires_at <= clock_timestamp() then
            txr_refusal(409, 'transfer_not_held', format('hold %s expired at %s', p_id, txr_ts(t.hold_expires_at)))
    end;
end $$;

-- POST /v1/transfers/{id}/capture: posts `amount` (default: all) of the hold and releases the rest. A credit on
-- another shard (`transit` set) makes it the debit side of a saga: 202 pending with its message.
create function txr_hold_capture(p jsonb) returns jsonb language plpgsql as $$
declare
    v_client text := p ->> 'client';
    v_saga boolean := (p ->> 'transit') is not null;
    v_amount bigint;
    v_prior jsonb;
    v_refusal jsonb;
    v_hold transfers;
    v_debit accounts;
    v_credit accounts;
    v_body jsonb;
    v_message jsonb;
    v_status integer;
    v_at timestamptz;
begin
    if not txr_owns((p ->> 'slot')::integer) then
        return txr_misdirected((p ->> 'slot')::integer);
    end if;
    v_prior := txr_idempotency_check(v_client, p ->> 'key', p ->> 'fingerprint');
    if v_prior is not null then
        return v_prior;
    end if;
    select * into v_hold from transfers where id = p ->> 'id' and client = v_client for update;
    if v_hold.id is not null then
        if v_saga then
            assert p ->> 'credit' = v_hold.credit_account, 'the saga leg names another credit account';
            insert into accounts (id, slot, kind, owner_client, currency)
            values (p ->> 'transit', (p ->> 'slot')::integer, 'transit', 'txroute', v_hold.currency)
            on conflict (id) do nothing;
        end if;
        perform 1 from accounts where id in (v_hold.debit_account, coalesce(p ->> 'transit', v_hold.credit_account))
        order by id for update;
    end if;
    v_refusal := txr_hold_refusal(v_hold, p ->> 'id');
    v_amount := coalesce((p ->> 'amount')::bigint, v_hold.amount);
    if v_refusal is null and v_amount > v_hold.amount then
        v_refusal := txr_refusal(422, 'capture_exceeds_hold',
            format('hold %s holds %s %s, %s requested', v_hold.id, v_hold.amount, v_hold.currency, v_amount));
    end if;
    if v_refusal is null then
        select * into v_debit from accounts where id = v_hold.debit_account;
        select * into v_credit from accounts where id = coalesce(p ->> 'transit', v_hold.credit_account);
        if v_hold.kind = 'transfer' and not v_saga then
            v_refusal := txr_customer_refusal(v_credit, v_hold.credit_account, v_client, v_hold.currency);
        end if;
    end if;
    if v_refusal is null and v_credit.kind = 'customer' and v_credit.balance > 9007199254740991 - v_amount then
        v_refusal := txr_refusal(422, 'balance_limit_exceeded',
            format('account %s would exceed the largest balance, 9007199254740991', v_credit.id));
    end if;
    if v_refusal is null then
        v_refusal := txr_system_bound_refusal(jsonb_build_object(
            'amount', v_amount, 'debit', v_debit.id, 'credit', v_credit.id));
        if v_refusal is not null then
            return v_refusal;  -- not stored: nothing happened, and the same request can succeed later
        end if;
    end if;
    if v_refusal is not null then
        return txr_idempotency_store(v_client, p ->> 'key', p ->> 'fingerprint', v_refusal);
    end if;
    -- The hold was counted in what the account could spend, so its capture keeps the balance within limit.
    assert v_debit.balance - v_amount >= -v_debit.overdraft_limit or v_debit.kind <> 'customer', 'capture overdraws';

    update accounts set balance = balance - v_amount, held = held - v_hold.amount, version = version + 1
    where id = v_debit.id returning balance into v_debit.balance;
    update accounts set balance = balance + v_amount, version = version + 1
    where id = v_credit.id returning balance into v_credit.balance;
    -- A hold copied here by a slot move (migration 0008, `moved_from`) has its journal here from its capture on.
    update transfers set state = case when v_saga then 'pending' else 'posted' end, amount = v_amount,
                         resolution_key = p ->> 'key', moved_from = null,
                         debit_shard = case when v_saga then (select shard from shard_info) end,
                         credit_shard = case when v_saga then p ->> 'credit_shard' end
    where id = v_hold.id returning * into v_hold;
    -- One instant for the entries and the hold's resolution, so a read as of any time sees the capture whole.
    v_at := clock_timestamp();
    insert into entries (transfer_id, account_id, amount, balance_after, created_at)
    values (v_hold.id, v_debit.id, -v_amount, v_debit.balance, v_at),
           (v_hold.id, v_credit.id, v_amount, v_credit.balance, v_at);
    v_body := txr_hold_follow(v_hold, v_at);
    v_status := case when v_saga then 202 else 201 end;
    perform txr_idempotency_store(v_client, p ->> 'key', p ->> 'fingerprint',
        jsonb_build_object('status', v_status, 'body', v_body));
    if not v_saga then
        return jsonb_build_object('status', v_status, 'body', v_body);
    end if;
    v_message := txr_saga_message(v_hold, p);
    return jsonb_build_object('status', v_status, 'body', v_body,
        'message', v_message || jsonb_build_object('destination_region', p ->> 'credit_region'));
end $$;

-- POST /v1/transfers/{id}/void: releases the whole hold. 200 voided.
create function txr_hold_void(p jsonb) returns jsonb language plpgsql as $$
declare
    v_client text := p ->> 'client';
    v_prior jsonb;
    v_refusal jsonb;
    v_hold transfers;
    v_body jsonb;
begin
    if not txr_owns((p ->> 'slot')::integer) then
        return txr_misdirected((p ->> 'slot')::integer);
    end if;
    v_prior := txr_idempotency_check(v_client, p ->> 'key', p ->> 'fingerprint');
    if v_prior is not null then
        return v_prior;
    end if;
    select * into v_hold from transfers where id = p ->> 'id' and client = v_client for update;
    if v_hold.id is not null then
        perform 1 from accounts where id = v_hold.debit_account for update;
    end if;
    v_refusal := txr_hold_refusal(v_hold, p ->> 'id');
    if v_refusal is not null then
        return txr_idempotency_store(v_client, p ->> 'key', p ->> 'fingerprint', v_refusal);
    end if;
    update accounts set held = held - v_hold.amount, version = version + 1 where id = v_hold.debit_account;
    update transfers set state = 'voided', resolution_key = p ->> 'key' where id = v_hold.id returning * into v_hold;
    v_body := txr_hold_follow(v_hold, clock_timestamp());
    return txr_idempotency_store(v_client, p ->> 'key', p ->> 'fingerprint',
        jsonb_build_object('status', 200, 'body', v_body));
end $$;

-- The sweeper: records `expired` for up to p_limit holds whose time has come (their expiry has taken effect
-- already, txr_held). Holds another transaction is resolving are skipped (the next round sees them), and so
-- are those of slots this shard does not own (frozen by a move, or moved away: the owner records them). Their
-- accounts are locked in id order, as every posting locks them. Returns how many it expired.
create function txr_holds_expire(p_limit integer) returns integer language plpgsql as $$
declare
    v_ids text[];
    v_hold transfers;
begin
    assert p_limit between 1 and 10000, 'a bounded batch';
    select array_agg(id) into v_ids from (
        select t.id from transfers t
        where t.state = 'held' and t.hold_expires_at <= clock_timestamp()
          and exists (select 1 from slot_ownership o
                      where txr_id_slot(t.id) between o.slot_lo and o.slot_hi and o.state = 'owned')
        order by t.hold_expires_at limit p_limit for update of t skip locked
    ) due;
    -- The ownership fence under its row lock (txr_owns, migration 0008), so a move's freeze waits for this.
    select array_agg(id) into v_ids from unnest(v_ids) id where txr_owns(txr_id_slot(id));
    if v_ids is null then
        return 0;
    end if;
    perform 1 from accounts where id in (select debit_account from transfers where id = any(v_ids))
    order by id for update;
    for v_hold in select * from transfers where id = any(v_ids) order by id loop
        update accounts set held = held - v_hold.amount, version = version + 1 where id = v_hold.debit_account;
        update transfers set state = 'expired' where id = v_hold.id returning * into v_hold;
        perform txr_hold_follow(v_hold, clock_timestamp());
    end loop;
    return cardinality(v_ids);
end $$;

-- POST /v1/accounts/{id}/close: only an empty account (balance 0, nothing held, nothing of its own in flight
-- to another shard) closes; a closed account refuses postings (account_closed), still reads, and returns
-- saga credits sent to it. Closing a closed account answers it as it is.
create function txr_close_account(p jsonb) returns jsonb language plpgsql as $$
declare
    v_client text := p ->> 'client';
    v_prior jsonb;
    v_account accounts;
    v_held bigint;
    v_pending boolean;
    v_outcome jsonb;
begin
    if not txr_owns((p ->> 'slot')::integer) then
        return txr_misdirected((p ->> 'slot')::integer);
    end if;
    v_prior := txr_idempotency_check(v_client, p ->> 'key', p ->> 'fingerprint');
    if v_prior is not null then
        return v_prior;
    end if;
    select * into v_account from accounts
    where id = p ->> 'id' and kind = 'customer' and owner_client = v_client for update;
    if not found then
        v_outcome := txr_refusal(404, 'account_not_found', format('account %s was not found', p ->> 'id'));
    elsif v_account.status = 'closed' then
        v_outcome := jsonb_build_object('status', 200, 'body', txr_account_body(v_account));
    else
        v_held := txr_held(v_account, clock_timestamp());
        v_pending := exists (select 1 from transfers where debit_account = v_account.id and state = 'pending');
        if v_account.balance <> 0 or v_held <> 0 or v_pending then
            v_outcome := txr_refusal(409, 'account_not_empty', format(
                'account %s has balance %s, holds %s and %s; only an empty account closes', v_account.id,
                v_account.balance, v_held,
                case when v_pending then 'transfers in flight' else 'no transfer in flight' end));
        else
            update accounts set status = 'closed', closed_at = clock_timestamp(), version = version + 1
            where id = v_account.id returning * into v_account;
            v_outcome := jsonb_build_object('status', 200, 'body', txr_account_body(v_account));
        end if;
    end if;
    return txr_idempotency_store(v_client, p ->> 'key', p ->> 'fingerprint', v_outcome);
end $$;

-- GET /v1/accounts/{id}?as_of=: the balance and what was held at p_at, from the journal, in one statement:
-- the account's last entry at or before p_at (entries_account_time), and its holds open at p_at (created by
-- then, not yet past their time, not resolved by then: transfer_events records each resolution's time).
create function txr_account_as_of(p_id text, p_client text, p_at timestamptz) returns jsonb
language plpgsql stable as $$
declare
    v_account accounts;
    v_balance bigint;
    v_held bigint;
begin
    select * into v_account from accounts where id = p_id and owner_client = p_client and kind = 'customer';
    if not found then
        return null;
    end if;
    select coalesce((select e.balance_after from entries e
                     where e.account_id = p_id and e.created_at <= p_at
                     order by e.created_at desc, e.id desc limit 1), 0),
           coalesce((select sum(t.hold_amount) from transfers t
                     where t.debit_account = p_id and t.hold_amount is not null
                       and t.created_at <= p_at and t.hold_expires_at > p_at
                       and not exists (select 1 from transfer_events ev
                                       where ev.transfer_id = t.id and ev.seq > 1 and ev.at <= p_at)), 0)
    into v_balance, v_held;
    return txr_account_body(v_account) || jsonb_build_object(
        'balance', v_balance, 'held', v_held, 'available', v_balance - v_held + v_account.overdraft_limit,
        'as_of', txr_ts(p_at));
end $$;

-- The saga's settle (migration 0002) updates the stored responses of both requests of a captured hold.
create or replace function txr_saga_settle(p_transfer_id text, p_outcome text, p_reason text) returns jsonb
language plpgsql as $$
declare
    v_transfer transfers;
    v_transit text;
    v_source_balance bigint;
    v_transit_balance bigint;
    v_body jsonb;
begin
    assert p_outcome in ('applied', 'refused'), p_outcome;
    select * into v_transfer from transfers where id = p_transfer_id for update;
    assert found, 'settling an unknown transfer';
    if v_transfer.state <> 'pending' then
        return txr_transfer_body(v_transfer);
    end if;
    if p_outcome = 'applied' then
        update transfers set state = 'posted' where id = p_transfer_id returning * into v_transfer;
    else
        v_transit := 'trn_' || v_transfer.debit_shard || '_' || v_transfer.credit_shard || '_' || v_transfer.currency;
        perform 1 from accounts where id in (v_transfer.debit_account, v_transit) order by id for update;
        update accounts set balance = balance + v_transfer.amount, version = version + 1
        where id = v_transfer.debit_account returning balance into v_source_balance;
        update accounts set balance = balance - v_transfer.amount, version = version + 1
        where id = v_transit returning balance into v_transit_balance;
        insert into entries (transfer_id, account_id, amount, balance_after)
        values (p_transfer_id, v_transit, -v_transfer.amount, v_transit_balance),
               (p_transfer_id, v_transfer.debit_account, v_transfer.amount, v_source_balance);
        update transfers set state = 'returned', reason = coalesce(p_reason, 'refused')
        where id = p_transfer_id returning * into v_transfer;
    end if;
    insert into transfer_events (transfer_id, seq, state, reason)
    select p_transfer_id, coalesce(max(seq), 0) + 1, v_transfer.state, v_transfer.reason
    from transfer_events where transfer_id = p_transfer_id;
    update outbox set delivered_at = clock_timestamp() where transfer_id = p_transfer_id;
    v_body := txr_transfer_body(v_transfer);
    update idempotency set status_code = 201, body = v_body
    where client = v_transfer.client and key in (v_transfer.idempotency_key, v_transfer.resolution_key);
    return v_body;
end $$;
