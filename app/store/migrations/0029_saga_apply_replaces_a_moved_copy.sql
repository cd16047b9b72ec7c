-- A saga from a moving range to the move's own target is applied there, whatever came first (issue 11).
--
-- The copy brings the range's transfers to the target, the debit side of a saga from the range among them
-- (`moved_from` naming the source). When the saga's credit account is on the target too and the copy of its row
-- came before the message, txr_saga_apply (0015) inserted the credit side's row with the same id: a unique
-- violation, every delivery again. The target answered 500, the message was dead-lettered after its failures,
-- the saga stayed pending, and a move freezing the range aborted after its wait (seen in clean-clone CI runs:
-- `test_slot_move_crashes`, "expected the mover to pause", the mover naming the saga: "dead-lettered True,
-- attempts 5, failures 5, last error region us-east-1 answered 500"; and, last session, a saga pending for
-- 60 s). When the message comes first, the credit side's row is the target's own and the copy leaves it alone
-- (its update is only for rows that are copies, and the verify leaves such rows out on both sides: slotdata
-- `target_own`). Now a copy found in the way is deleted with its copied history, and the credit side's row
-- inserted, which is the state the other order reaches.

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
        -- the copy came first: the credit side's row replaces it, as if the message had come before the copy
        -- (the copy's later imports leave a row of the target's own alone, slotdata `update_where`).
        delete from transfer_events e using transfers t
        where e.transfer_id = v_id and t.id = v_id and t.moved_from is not null;
        delete from transfers where id = v_id and moved_from is not null;
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
