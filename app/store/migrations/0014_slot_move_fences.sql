-- Slot moves, second part (issue 11): fences found by the workload test after migration 0008 landed (0008 is
-- not edited: a database that applied it would refuse a changed file). Number 0014: the move helper's own number
-- (0008) was spent; no other change of this session was given 0014.
--
-- 1. The switch-out marks the range `moved` in its own transaction (0008 did it one step later, in
--    txr_move_switch_done), and a trigger refuses any later balance change of an account of a moved range: a
--    same-shard transfer could credit a moved account after the switch had booked it out (money that the target
--    never received). Such a posting fails with SQLSTATE TXR02 and its client is answered 503 slot_moving.
-- 2. A saga whose credit slot moved into its own source shard is applied there (txr_saga_apply_own).
-- 3. (No SQL.) `slot_moves.log_cursor` counts the changes the catch-up applied: the mover consumes (deletes)
--    the change log instead of reading it past a cursor over ids, which skipped changes committed late.

-- Switch, first step (source, frozen): book every account of the range to zero against the transit account
-- towards the target, record the balances, and mark the range `moved` (421 naming the target; until the target's
-- step commits, a few milliseconds, the target answers 421 too and clients retry). Refuses while sagas debited from the range are still pending
-- (their settlement must happen where their stored answers are; the mover waits, bounded, or aborts).
-- Idempotent: once `switching`, returns the balances recorded the first time.
create or replace function txr_move_switch_out(p_move text) returns jsonb language plpgsql as $$
declare
    m slot_moves;
    a record;
    v_transit text;
    v_transit_balance bigint;
    v_balances jsonb := '{}'::jsonb;
    v_id text;
    v_pending integer;
begin
    select * into strict m from slot_moves where id = p_move and role = 'source' for update;
    if m.phase in ('switching', 'switched', 'done') then
        return jsonb_build_object('ok', true, 'balances', m.balances);
    end if;
    assert m.phase = 'frozen', m.phase;
    select count(*) into v_pending from transfers
    where state = 'pending' and debit_shard = m.source_shard and txr_id_slot(debit_account) between m.slot_lo and m.slot_hi;
    if v_pending > 0 then
        return jsonb_build_object('ok', false, 'pending_sagas', v_pending);
    end if;
    for a in select id, currency, balance from accounts
             where kind = 'customer' and slot between m.slot_lo and m.slot_hi
             order by id for update loop
        v_balances := v_balances || jsonb_build_object(a.id, a.balance);
        continue when a.balance = 0;
        v_transit := 'trn_' || m.source_shard || '_' || m.target_shard || '_' || a.currency;
        insert into accounts (id, slot, kind, owner_client, currency)
        values (v_transit, m.slot_lo, 'transit', 'txroute', a.currency) on conflict (id) do nothing;
        update accounts set balance = balance + a.balance, version = version + 1
        where id = v_transit returning balance into v_transit_balance;
        update accounts set balance = 0, version = version + 1 where id = a.id;
        v_id := 'mvo_' || substr(p_move, 4) || '_' || a.id;
        insert into transfers (id, client, kind, debit_account, credit_account, amount, currency, reference, state)
        values (v_id, 'txroute', 'move',
                case when a.balance > 0 then a.id else v_transit end,
                case when a.balance > 0 then v_transit else a.id end,
                abs(a.balance), a.currency, p_move, 'posted');
        insert into entries (transfer_id, account_id, amount, balance_after)
        values (v_id, a.id, -a.balance, 0), (v_id, v_transit, a.balance, v_transit_balance);
    end loop;
    -- In the same transaction the range is `moved`: no later write can change what was booked out (below).
    update slot_ownership set state = 'moved', epoch = m.epoch, owner_shard = m.target_shard,
                              owner_region = m.target_region, move_id = p_move
    where slot_lo between m.slot_lo and m.slot_hi;
    update slot_moves set balances = v_balances where id = p_move;
    perform txr_move_phase(p_move, 'switching');
    return jsonb_build_object('ok', true, 'balances', v_balances);
end $$;

-- The fence on the credit side. A posting checks the ownership of its debit slot (txr_owns); a same-shard
-- transfer may credit an account of a range that is moving, which is right until the switch books that account
-- out (its balance then includes the credit). After it, the account belongs to the target: no write may change
-- it here. The posting fails (SQLSTATE TXR02: nothing committed) and its client is answered 503 slot_moving.
create function txr_accounts_moved_fence() returns trigger language plpgsql as $$
begin
    if exists (select 1 from slot_ownership where new.slot between slot_lo and slot_hi and state = 'moved') then
        raise exception 'account % belongs to a slot that moved away', new.id using errcode = 'TXR02';
    end if;
    return new;
end $$;
create trigger accounts_moved_fence before update of balance on accounts
    for each row when (new.kind = 'customer' and new.balance is distinct from old.balance)
    execute function txr_accounts_moved_fence();

-- Switch, last step (source): the move is recorded switched once the target owns the range. Idempotent.
create or replace function txr_move_switch_done(p_move text) returns void language plpgsql as $$
declare
    m slot_moves;
begin
    select * into strict m from slot_moves where id = p_move and role = 'source' for update;
    if m.phase in ('switched', 'done') then
        return;
    end if;
    assert m.phase = 'switching', m.phase;
    delete from slot_move_changes where move_id = p_move;
    perform txr_move_phase(p_move, 'switched');
end $$;

-- A saga whose credit slot moved INTO its own source shard (the move's target was the debit side of a saga
-- towards the range) comes back here re-addressed: this shard applies it itself, once. The credit is booked
-- against the transit account the debit credited (trn_<this>_<shard first addressed>), on the transfer's own
-- row, with an inbox row marked `applied_by_source`; the audit expects these two more entries on such a
-- saga (app/ops/audit.py). The relay then settles it as any applied saga.
alter table inbox add column applied_by_source boolean not null default false;
create function txr_saga_apply_own(m jsonb) returns jsonb language plpgsql as $$
declare
    v_id text := m ->> 'transfer_id';
    v_amount bigint := (m ->> 'amount')::bigint;
    v_currency text := m ->> 'currency';
    v_transfer transfers;
    v_transit text;
    v_prior inbox;
    v_credit accounts;
    v_transit_balance bigint;
    v_refusal jsonb;
begin
    if not txr_owns((m ->> 'credit_slot')::integer) then
        return txr_misdirected((m ->> 'credit_slot')::integer);
    end if;
    perform pg_advisory_xact_lock(hashtextextended(v_id, 11));
    select * into v_prior from inbox where transfer_id = v_id;
    if found then
        return jsonb_build_object('outcome', v_prior.outcome, 'reason', v_prior.reason, 'duplicate', true);
    end if;
    select * into strict v_transfer from transfers where id = v_id;
    assert v_transfer.debit_shard = (select shard from shard_info), 'only a saga debited here is applied here';
    v_transit := 'trn_' || v_transfer.debit_shard || '_' || v_transfer.credit_shard || '_' || v_currency;
    select * into v_credit from accounts where id = m ->> 'credit_account' for update;
    perform 1 from accounts where id = v_transit for update;
    v_refusal := txr_customer_refusal(v_credit, m ->> 'credit_account', m ->> 'client', v_currency);
    if v_refusal is null and v_credit.balance > 9007199254740991 - v_amount then
        v_refusal := txr_refusal(422, 'balance_limit_exceeded', 'the credit account would exceed its limit');
    end if;
    if v_refusal is not null then
        insert into inbox (transfer_id, source_shard, outcome, reason, credit_account, amount, currency)
        values (v_id, v_transfer.debit_shard, 'refused', v_refusal -> 'body' ->> 'code', m ->> 'credit_account',
                v_amount, v_currency);
        return jsonb_build_object('outcome', 'refused', 'reason', v_refusal -> 'body' ->> 'code');
    end if;
    update accounts set balance = balance + v_amount, version = version + 1
    where id = v_credit.id returning balance into v_credit.balance;
    update accounts set balance = balance - v_amount, version = version + 1
    where id = v_transit returning balance into v_transit_balance;
    insert into entries (transfer_id, account_id, amount, balance_after)
    values (v_id, v_transit, -v_amount, v_transit_balance),
           (v_id, v_credit.id, v_amount, v_credit.balance);
    insert into inbox (transfer_id, source_shard, outcome, credit_account, amount, currency, applied_by_source)
    values (v_id, v_transfer.debit_shard, 'applied', v_credit.id, v_amount, v_currency, true);
    return jsonb_build_object('outcome', 'applied');
end $$;
