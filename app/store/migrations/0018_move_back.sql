-- A range moves back to a shard it once left (evacuate a region, then return after its maintenance). That shard
-- still records the range `moved`, and the moved-account fence (migration 0014) refused the switch's own
-- booking of the balances in: the switch failed on every run and the range stayed with no owner taking writes
-- (the source had already booked it out). The switch now takes the range over first, then books the balances
-- in, in the same transaction.
create or replace function txr_move_switch_in(p_move text, p_balances jsonb) returns jsonb language plpgsql as $$
declare
    m slot_moves;
    b record;
    v_account accounts;
    v_transit text;
    v_transit_balance bigint;
    v_id text;
begin
    select * into strict m from slot_moves where id = p_move and role = 'target' for update;
    if m.phase in ('switched', 'done') then
        return jsonb_build_object('ok', true);
    end if;
    assert m.phase = 'copying', m.phase;
    if exists (select 1 from jsonb_object_keys(p_balances) k left join accounts a on a.id = k
               where a.id is null or a.balance <> 0 or a.kind <> 'customer') then
        return jsonb_build_object('ok', false, 'detail', 'a moved account is missing on the target or not at zero');
    end if;
    perform txr_slot_split(m.slot_lo, m.slot_hi);
    delete from slot_ownership where slot_lo between m.slot_lo and m.slot_hi;
    insert into slot_ownership (slot_lo, slot_hi, epoch, state) values (m.slot_lo, m.slot_hi, m.epoch, 'owned');
    for b in select key as id, value::bigint as balance from jsonb_each_text(p_balances) order by key loop
        continue when b.balance = 0;
        select * into strict v_account from accounts where id = b.id for update;
        v_transit := 'trn_' || m.target_shard || '_' || m.source_shard || '_' || v_account.currency;
        insert into accounts (id, slot, kind, owner_client, currency)
        values (v_transit, m.slot_lo, 'transit', 'txroute', v_account.currency) on conflict (id) do nothing;
        update accounts set balance = balance - b.balance, version = version + 1
        where id = v_transit returning balance into v_transit_balance;
        update accounts set balance = b.balance, version = version + 1 where id = b.id;
        v_id := 'mvi_' || substr(p_move, 4) || '_' || b.id;
        insert into transfers (id, client, kind, debit_account, credit_account, amount, currency, reference, state)
        values (v_id, 'txroute', 'move',
                case when b.balance > 0 then v_transit else b.id end,
                case when b.balance > 0 then b.id else v_transit end,
                abs(b.balance), v_account.currency, p_move, 'posted');
        insert into entries (transfer_id, account_id, amount, balance_after)
        values (v_id, v_transit, -b.balance, v_transit_balance), (v_id, b.id, b.balance, b.balance);
    end loop;
    update slot_moves set balances = p_balances where id = p_move;
    perform txr_move_phase(p_move, 'switched');
    return jsonb_build_object('ok', true);
end $$;
