-- The switch books a range's balances out (source) and in (target) in a handful of set-based statements instead
-- of a loop of five statements per account (issue 11). The loop's cost grew with the range, and worse than
-- linearly (the balances object was rebuilt for each account, the transit account's row updated once per
-- account): 2 to 9 ms per account, so the freeze of a 10,000-account range outlasted the mover's statement
-- timeout and the move failed. The postings are the same as before, one `move` transfer and its two entries per
-- account with a balance, so the audit sees what it saw; the transit account's entries are numbered in account
-- order, their balance_after a running sum in that order (entries ids come from the sequence in a sorted subquery,
-- so its chain holds). The switch's own rows are not written to the change log (the catch-up is over; the log
-- is dropped at the switch), and the metadata check runs only on rows that have metadata (every posting paid a
-- PL/pgSQL call for it).

create or replace function txr_move_log() returns trigger language plpgsql as $$
declare
    v_row jsonb;
    v_slot integer;
    v_move text;
begin
    if current_setting('txr.move_switch', true) = 'on' then
        return null;
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

alter table accounts drop constraint accounts_metadata_check,
    add constraint accounts_metadata_check check (metadata is null or txr_metadata_ok(metadata));
alter table transfers drop constraint transfers_metadata_check,
    add constraint transfers_metadata_check check (metadata is null or txr_metadata_ok(metadata));

-- Books the accounts in `p_rows` (id, currency, amount: what the account's balance changes by) against the transit
-- account `trn_<p_shard>_<p_peer>_<currency>`, which changes by the opposite; one transfer `<p_prefix><move>_<id>`
-- per row. The accounts must be locked by the caller; the transit accounts are created and locked here.
create function txr_move_book(p_move text, p_prefix text, p_shard text, p_peer text, p_slot integer, p_rows jsonb)
returns void language plpgsql as $$
begin
    create temp table if not exists txr_move_rows (
        id text primary key, currency text not null, amount bigint not null, transit text not null, tid text not null
    ) on commit drop;
    truncate txr_move_rows;
    insert into txr_move_rows (id, currency, amount, transit, tid)
    select r.id, r.currency, r.amount, 'trn_' || p_shard || '_' || p_peer || '_' || r.currency,
           p_prefix || substr(p_move, 4) || '_' || r.id
    from jsonb_to_recordset(p_rows) as r(id text, currency text, amount bigint)
    where r.amount <> 0;
    analyze txr_move_rows;
    insert into accounts (id, slot, kind, owner_client, currency)
    select distinct transit, p_slot, 'transit', 'txroute', currency from txr_move_rows
    on conflict (id) do nothing;
    perform 1 from accounts where id in (select transit from txr_move_rows) order by id for update;
    insert into transfers (id, client, kind, debit_account, credit_account, amount, currency, reference, state)
    select tid, 'txroute', 'move',
           case when amount < 0 then id else transit end,
           case when amount < 0 then transit else id end,
           abs(amount), currency, p_move, 'posted'
    from txr_move_rows order by id;
    -- Each account's entry, then the transit account's, in account order per transit account.
    insert into entries (id, transfer_id, account_id, amount, balance_after)
    select nextval(pg_get_serial_sequence('entries', 'id')), s.tid, s.account_id, s.amount, s.balance_after
    from (
        select r.tid, r.id as account_id, r.amount, a.balance + r.amount as balance_after, r.transit, r.id as ord, 0 as leg
        from txr_move_rows r join accounts a on a.id = r.id
        union all
        select r.tid, r.transit, -r.amount,
               t.balance - sum(r.amount) over (partition by r.transit order by r.id), r.transit, r.id, 1
        from txr_move_rows r join accounts t on t.id = r.transit
        order by transit, ord, leg
    ) s;
    update accounts a set balance = a.balance - x.total, version = a.version + 1
    from (select transit, sum(amount) as total from txr_move_rows group by transit) x
    where a.id = x.transit;
    update accounts a set balance = a.balance + r.amount, version = a.version + 1
    from txr_move_rows r where a.id = r.id;
end $$;

create or replace function txr_move_switch_out(p_move text) returns jsonb language plpgsql as $$
declare
    m slot_moves;
    v_balances jsonb;
    v_rows jsonb;
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
    perform 1 from accounts where kind = 'customer' and slot between m.slot_lo and m.slot_hi order by id for update;
    select coalesce(jsonb_object_agg(id, balance), '{}'::jsonb),
           coalesce(jsonb_agg(jsonb_build_object('id', id, 'currency', currency, 'amount', -balance))
                    filter (where balance <> 0), '[]'::jsonb)
    into v_balances, v_rows
    from accounts where kind = 'customer' and slot between m.slot_lo and m.slot_hi;
    perform set_config('txr.move_switch', 'on', true);
    perform txr_move_book(p_move, 'mvo_', m.source_shard, m.target_shard, m.slot_lo, v_rows);
    -- In the same transaction the range is `moved`: no later write can change what was booked out (0014).
    update slot_ownership set state = 'moved', epoch = m.epoch, owner_shard = m.target_shard,
                              owner_region = m.target_region, move_id = p_move
    where slot_lo between m.slot_lo and m.slot_hi;
    update slot_moves set balances = v_balances where id = p_move;
    perform txr_move_phase(p_move, 'switching');
    return jsonb_build_object('ok', true, 'balances', v_balances);
end $$;

create or replace function txr_move_switch_in(p_move text, p_balances jsonb) returns jsonb language plpgsql as $$
declare
    m slot_moves;
    v_rows jsonb;
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
    -- The range first (a shard the range once left records it `moved`, whose fence refuses the booking: 0018).
    perform txr_slot_split(m.slot_lo, m.slot_hi);
    delete from slot_ownership where slot_lo between m.slot_lo and m.slot_hi;
    insert into slot_ownership (slot_lo, slot_hi, epoch, state) values (m.slot_lo, m.slot_hi, m.epoch, 'owned');
    perform 1 from accounts where id in (select jsonb_object_keys(p_balances)) order by id for update;
    select coalesce(jsonb_agg(jsonb_build_object('id', a.id, 'currency', a.currency, 'amount', b.value::bigint)),
                    '[]'::jsonb)
    into v_rows
    from jsonb_each_text(p_balances) b join accounts a on a.id = b.key
    where b.value::bigint <> 0;
    perform set_config('txr.move_switch', 'on', true);
    perform txr_move_book(p_move, 'mvi_', m.target_shard, m.source_shard, m.slot_lo, v_rows);
    update slot_moves set balances = p_balances where id = p_move;
    perform txr_move_phase(p_move, 'switched');
    return jsonb_build_object('ok', true);
end $$;
