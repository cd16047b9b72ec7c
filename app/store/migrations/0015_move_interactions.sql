-- Where slot moves (0008), holds (0009), batches (0010) and events (0011) meet: fixes found by a review of the
-- five landed together. Nothing here changes a function another migration of this session redefines after 0011
-- (0014 redefines the move's switch functions only), so the order of 0014 and this file does not matter.
--
-- 1. An atomic batch is a request of its own, forwarded to the home of its first item (app/router/routes.py):
--    it passes the ownership fence of that slot first (while frozen: 503 slot_moving, nothing stored), and its
--    stored answer records that slot, so it moves with it. Before, it recorded the slot of whichever item
--    txr_owns saw last, or none at all once the refused items were rolled back (the answer then stayed on the
--    source after a move, and a replay on the new owner executed the batch again). The batch's own rollback has
--    a SQLSTATE of its own (TXR03): migration 0014's moved-account fence raises TXR02 under an item, which the
--    batch took for its own "an item was refused" and stored a 201 with no items, having posted nothing; now
--    that exception aborts the call (answered 503 slot_moving, app/store/shard.py). Items refused for a cause
--    that passes are rolled back by the store (app/store/shard.py, _TRANSIENT_ITEM_CODES).
-- 2. A posting whose reference is declared unique checks its key and reference before txr_post_one: it passes
--    the fence of its own slot first, so that refusal is neither written on a frozen or moved range nor stored
--    under another item's slot (or none).
-- 3. Events of a frozen range are still its source's to write: the sagas the mover waits for under the freeze
--    settle there (txr_saga_settle), and their transfer.posted or transfer.returned was dropped because the
--    event triggers counted only `owned` slots. The target's copies still write none (it neither owns the range
--    nor has it frozen until the switch).

create or replace function txr_post_atomic(
    p_client text, p_key text, p_fingerprint text, p_items jsonb, p_lock_wait_ms integer
) returns jsonb language plpgsql as $$
declare
    v_slot integer := (p_items -> 0 ->> 'slot')::integer;
    v_prior jsonb;
    v_results jsonb;
    v_refused boolean := false;
    v_outcome jsonb;
begin
    assert jsonb_array_length(p_items) > 0, 'an atomic batch has items';
    if not txr_owns(v_slot) then
        return txr_misdirected(v_slot);
    end if;
    v_prior := txr_idempotency_check(p_client, p_key, p_fingerprint);
    if v_prior is not null then
        return v_prior;
    end if;
    begin
        v_results := txr_post_together(p_items, p_lock_wait_ms);
        if v_results ? 'busy' then
            return v_results;
        end if;
        v_refused := exists (select 1 from jsonb_array_elements(v_results) r where (r ->> 'status')::integer >= 400);
        if v_refused then
            -- Rolls back every item's effect and stored answer; the variables keep their values.
            raise exception using errcode = 'TXR03';
        end if;
    exception when sqlstate 'TXR03' then
        null;
    end;
    if v_refused then
        v_outcome := jsonb_build_object('status', 422, 'body', jsonb_build_object(
            'code', 'batch_refused',
            'detail', 'an item of the atomic batch was refused; nothing was posted',
            'items', (select jsonb_agg(
                        case when (r ->> 'status')::integer >= 400
                             then jsonb_build_object('status', (r ->> 'status')::integer,
                                                     'code', r -> 'body' ->> 'code', 'detail', r -> 'body' ->> 'detail')
                             else jsonb_build_object('status', 422, 'code', 'batch_item_not_posted',
                                                     'detail', 'another item of the atomic batch was refused')
                        end order by n)
                      from jsonb_array_elements(v_results) with ordinality as x(r, n))));
    else
        v_outcome := jsonb_build_object('status', 201, 'body', jsonb_build_object(
            'atomic', true,
            'items', (select jsonb_agg(jsonb_build_object('status', (r ->> 'status')::integer, 'transfer', r -> 'body')
                                       order by n)
                      from jsonb_array_elements(v_results) with ordinality as x(r, n))));
    end if;
    -- Each item's txr_owns left its own slot in txr.slot (or the rollback cleared it): the batch's answer is
    -- stored under the batch's slot (migration 0008's idempotency_slot trigger reads it).
    perform set_config('txr.slot', v_slot::text, true);
    return txr_idempotency_store(p_client, p_key, p_fingerprint, v_outcome);
end $$;

create or replace function txr_post_item(p jsonb) returns jsonb language plpgsql as $$
declare
    v_result jsonb;
begin
    if not txr_owns((p ->> 'slot')::integer) then
        return txr_misdirected((p ->> 'slot')::integer);
    end if;
    v_result := txr_system_bound_refusal(p);
    if v_result is not null then
        return v_result;
    end if;
    if coalesce((p ->> 'unique_reference')::boolean, false) then
        v_result := txr_idempotency_check(p ->> 'client', p ->> 'key', p ->> 'fingerprint');
        if v_result is not null then
            return v_result;
        end if;
        v_result := txr_reference_refusal(p);
        if v_result is not null then
            return txr_idempotency_store(p ->> 'client', p ->> 'key', p ->> 'fingerprint', v_result);
        end if;
    end if;
    v_result := txr_post_one(p);
    if coalesce((p ->> 'unique_reference')::boolean, false) and (v_result ->> 'status')::integer in (201, 202) then
        update transfers set reference_unique = true where id = p ->> 'id';
    end if;
    if v_result ? 'message' and p ? 'traceparent' then
        update outbox set traceparent = p ->> 'traceparent' where transfer_id = v_result -> 'message' ->> 'transfer_id';
    end if;
    return v_result;
end $$;

-- The shard that writes a slot's events: its owner, and its source while a move has it frozen (the sagas
-- settled under the freeze are changes of that range, made there). A move's target copies before it owns.
create function txr_event_slot_writer(p_slot integer) returns boolean language plpgsql stable as $$
begin
    return exists (select 1 from slot_ownership
                   where p_slot between slot_lo and slot_hi and state in ('owned', 'moving'));
end $$;

create or replace function txr_transfer_event() returns trigger language plpgsql as $$
declare
    v_type text;
    v_slot integer := txr_id_slot(new.id);
begin
    if new.kind = 'move' or not txr_event_slot_writer(v_slot) then
        return null;
    end if;
    if tg_op = 'INSERT' then
        if new.debit_shard is not null and new.state = 'posted'
           and new.debit_shard is distinct from (select shard from shard_info) then
            return null;
        end if;
        v_type := 'transfer.' || new.state;
    elsif old.state = 'held' and new.state in ('posted', 'pending') then
        v_type := 'transfer.captured';
    else
        v_type := 'transfer.' || new.state;
    end if;
    perform txr_event_write(v_type, new.client, v_slot, new.id, txr_transfer_body(new));
    return null;
end $$;

create or replace function txr_account_event() returns trigger language plpgsql as $$
begin
    if not txr_event_slot_writer(new.slot) then
        return null;
    end if;
    perform txr_event_write(
        case when tg_op = 'INSERT' then 'account.opened' else 'account.' || new.status end,
        new.owner_client, new.slot, new.id, txr_account_body(new));
    return null;
end $$;

-- 4. A hold whose debit slot moved away and whose credit account stayed here is captured on its new shard as a
--    saga back to this one (txr_hold_capture). This shard still has the hold's own row, archived by the move
--    (transfers stay on the source, its slot `moved`), so the credit side's insert of the transfer failed on
--    its id, every delivery again: the money stayed in transit and the capture pending. The credit side takes
--    the archived row over (held -> posted, the captured amount), as the row it would have inserted; its slot
--    is not this shard's to announce, so it writes no event, as no credit side does.
create or replace function txr_saga_apply(m jsonb) returns jsonb language plpgsql as $$
declare
    v_id text := m ->> 'transfer_id';
    v_amount bigint := (m ->> 'amount')::bigint;
    v_currency text := m ->> 'currency';
    v_shard text;
    v_transit text;
    v_prior inbox;
    v_credit accounts;
    v_transit_balance bigint;
    v_refusal jsonb;
begin
    if not txr_owns((m ->> 'credit_slot')::integer) then
        return txr_misdirected((m ->> 'credit_slot')::integer);
    end if;
    -- Serialises concurrent deliveries of one message: the second reads the first's outcome.
    perform pg_advisory_xact_lock(hashtextextended(v_id, 11));
    select * into v_prior from inbox where transfer_id = v_id;
    if found then
        return jsonb_build_object('outcome', v_prior.outcome, 'reason', v_prior.reason, 'duplicate', true);
    end if;
    select shard into strict v_shard from shard_info;
    v_transit := 'trn_' || v_shard || '_' || (m ->> 'source_shard') || '_' || v_currency;
    insert into accounts (id, slot, kind, owner_client, currency)
    values (v_transit, (m ->> 'credit_slot')::integer, 'transit', 'txroute', v_currency)
    on conflict (id) do nothing;
    -- Same order as txr_post's lock pass (by id: 'acc_' sorts before 'trn_').
    select * into v_credit from accounts where id = m ->> 'credit_account' for update;
    perform 1 from accounts where id = v_transit for update;
    v_refusal := txr_customer_refusal(v_credit, m ->> 'credit_account', m ->> 'client', v_currency);
    if v_refusal is null and v_credit.balance > 9007199254740991 - v_amount then
        v_refusal := txr_refusal(422, 'balance_limit_exceeded', 'the credit account would exceed its limit');
    end if;
    if v_refusal is not null then
        insert into inbox (transfer_id, source_shard, outcome, reason, credit_account, amount, currency)
        values (v_id, m ->> 'source_shard', 'refused', v_refusal -> 'body' ->> 'code', m ->> 'credit_account',
                v_amount, v_currency);
        return jsonb_build_object('outcome', 'refused', 'reason', v_refusal -> 'body' ->> 'code');
    end if;
    update accounts set balance = balance + v_amount, version = version + 1
    where id = v_credit.id returning balance into v_credit.balance;
    update accounts set balance = balance - v_amount, version = version + 1
    where id = v_transit returning balance into v_transit_balance;
    update transfers set state = 'posted', amount = v_amount, debit_shard = m ->> 'source_shard', credit_shard = v_shard
    where id = v_id and state = 'held' and client = m ->> 'client' and credit_account = v_credit.id
      and not txr_event_slot_writer(txr_id_slot(id));
    if not found then
        insert into transfers (id, client, kind, debit_account, credit_account, amount, currency, reference, state,
                               debit_shard, credit_shard)
        values (v_id, m ->> 'client', 'transfer', m ->> 'debit_account', v_credit.id, v_amount, v_currency,
                m ->> 'reference', 'posted', m ->> 'source_shard', v_shard);
    end if;
    insert into entries (transfer_id, account_id, amount, balance_after)
    values (v_id, v_transit, -v_amount, v_transit_balance),
           (v_id, v_credit.id, v_amount, v_credit.balance);
    insert into inbox (transfer_id, source_shard, outcome, credit_account, amount, currency)
    values (v_id, m ->> 'source_shard', 'applied', v_credit.id, v_amount, v_currency);
    return jsonb_build_object('outcome', 'applied');
end $$;
