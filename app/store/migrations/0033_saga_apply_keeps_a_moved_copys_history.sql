-- A saga's credit on the target of a move of its debit's range keeps the history the copy brought (issue 11).
--
-- Migration 0029 made the credit side's row replace a move's copy of the debit side's row found in the way, and
-- deleted the copy's history (transfer_events) with it. The source keeps that history, and the catch-up imports
-- only the events written after, so the target ended with fewer events than the source and the move's verify
-- aborted it ("transfer_events: 40 rows on euw1-a, 39 on euw1-b", about one clean-clone CI run in five of
-- tests/e2e/test_slot_moves.py). When the message comes before the copy, the target's own credit row stands and the
-- copy brings the history beside it (transfer_events' copy inserts what is missing): the verify compares it
-- equal. Now the copy-first order reaches that same state: the copy's row is updated in place into the credit
-- side's row (posted, naming both shards, no longer a copy: the verify leaves it out on both sides as the
-- target's own), and its history stays.

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
        -- A move's copy of the debit side's row, when this shard is the target of a move of the debit's range and
        -- the copy came first: it becomes the credit side's row, keeping the history copied with it, which is
        -- the state the other order reaches (migration 0033).
        update transfers set state = 'posted', debit_shard = m ->> 'source_shard', credit_shard = v_shard,
                             moved_from = null
        where id = v_id and moved_from is not null;
    end if;
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
