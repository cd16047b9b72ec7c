-- The switch-out books a range out in one posting per currency; each account is booked to zero after the switch,
-- outside the freeze (issue 11: the freeze bar).
--
-- Since migration 0019 the switch-out booked every account of the range to zero against the transit account
-- towards the target, one `move` transfer and two entries per account, inside the freeze: 4.5-8 s of a 9.6-16.7 s
-- freeze at 10,000 accounts (`txroute bench move`), growing with the range. Nothing needs those per-account
-- postings while the range is frozen: once the range is `moved` no write reaches its accounts on this shard
-- again (txr_owns, the moved-account fence), and the target books in from the balances recorded here.
--
-- Now the switch-out, under the freeze, records the balances as before and books the range's total per currency
-- in one posting: the transit account towards the target is credited, the range account
-- `mvr_<move>_<currency>` (kind `range`, in the range's first slot) debited. Every invariant holds at once: each
-- transfer's entries sum to zero, each account's balance is the sum of its entries, the shard's accounts sum to
-- zero, and customers plus range accounts plus transit hold what deposits minus withdrawals put there (the audit
-- counts range accounts with customers). The range's customer accounts keep their balances for a while, offset
-- by the range account: never served (their slots are `moved`).
--
-- The cleanup (after the switch, which is durable on both sides) books each of those accounts to zero against
-- the range account, set-based, as the switch-out did before, and the range account ends at zero: the source's
-- rows are then what they were after migration 0019's switch-out. It runs in the cleanup's transaction, so a crash
-- leaves it done or not; run again it finds nothing left to book.
--
-- A range may move back to a shard it left. The target's copy resets its accounts' balances to zero (they arrive by
-- the switch-in's postings), which would lose a balance not yet booked out: a move INTO a shard is refused while a
-- move of an overlapping range AWAY from it is switching or waits for its cleanup (`cleanup_pending`: re-run that
-- move), and the cleanup books nothing unless the range is still `moved` by its move.

alter table accounts drop constraint accounts_kind_check,
    add constraint accounts_kind_check check (kind in ('customer', 'settlement', 'transit', 'range'));

-- The moved-account fence (0014) lets the switch's own postings through (the cleanup books a moved range's
-- accounts to zero).
create or replace function txr_accounts_moved_fence() returns trigger language plpgsql as $$
begin
    if current_setting('txr.move_switch', true) = 'on' then
        return new;
    end if;
    if exists (select 1 from slot_ownership where new.slot between slot_lo and slot_hi and state = 'moved') then
        raise exception 'account % belongs to a slot that moved away', new.id using errcode = 'TXR02';
    end if;
    return new;
end $$;

-- txr_move_book (0019) with the counterpart's kind: 'transit' (trn_<p_shard>_<p_peer>_<currency>, as before) or
-- 'range' (mvr_<move>_<currency>).
drop function txr_move_book(text, text, text, text, integer, jsonb);
create function txr_move_book(p_move text, p_prefix text, p_shard text, p_peer text, p_slot integer, p_rows jsonb,
                              p_counter_kind text default 'transit')
returns void language plpgsql as $$
begin
    assert p_counter_kind in ('transit', 'range'), p_counter_kind;
    create temp table if not exists txr_move_rows (
        id text primary key, currency text not null, amount bigint not null, transit text not null, tid text not null
    ) on commit drop;
    truncate txr_move_rows;
    insert into txr_move_rows (id, currency, amount, transit, tid)
    select r.id, r.currency, r.amount,
           case p_counter_kind when 'transit' then 'trn_' || p_shard || '_' || p_peer || '_' || r.currency
                               else 'mvr_' || substr(p_move, 4) || '_' || r.currency end,
           p_prefix || substr(p_move, 4) || '_' || r.id
    from jsonb_to_recordset(p_rows) as r(id text, currency text, amount bigint)
    where r.amount <> 0;
    analyze txr_move_rows;
    insert into accounts (id, slot, kind, owner_client, currency)
    select distinct transit, p_slot, p_counter_kind, 'txroute', currency from txr_move_rows
    on conflict (id) do nothing;
    perform 1 from accounts where id in (select transit from txr_move_rows) order by id for update;
    insert into transfers (id, client, kind, debit_account, credit_account, amount, currency, reference, state)
    select tid, 'txroute', 'move',
           case when amount < 0 then id else transit end,
           case when amount < 0 then transit else id end,
           abs(amount), currency, p_move, 'posted'
    from txr_move_rows order by id;
    -- Each account's entry, then the counterpart's, in account order per counterpart.
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
    v_totals jsonb;
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
    -- No balance of the range changes until this commits (a same-shard credit would wait), nor after (`moved`).
    perform 1 from accounts where kind = 'customer' and slot between m.slot_lo and m.slot_hi order by id for share;
    select coalesce(jsonb_object_agg(id, balance), '{}'::jsonb) into v_balances
    from accounts where kind = 'customer' and slot between m.slot_lo and m.slot_hi;
    -- The range account of each currency is debited with the range's total (the rows txr_move_book books are
    -- "the range account changes by amount", against the transit account).
    select coalesce(jsonb_agg(jsonb_build_object('id', 'mvr_' || substr(p_move, 4) || '_' || currency,
                                                 'currency', currency, 'amount', -total)), '[]'::jsonb)
    into v_totals
    from (select currency, sum(balance) as total from accounts
          where kind = 'customer' and slot between m.slot_lo and m.slot_hi group by currency) c
    where total <> 0;
    insert into accounts (id, slot, kind, owner_client, currency)
    select t ->> 'id', m.slot_lo, 'range', 'txroute', t ->> 'currency' from jsonb_array_elements(v_totals) t
    on conflict (id) do nothing;
    perform 1 from accounts where id in (select t ->> 'id' from jsonb_array_elements(v_totals) t) order by id for update;
    perform set_config('txr.move_switch', 'on', true);
    perform txr_move_book(p_move, 'mvo_', m.source_shard, m.target_shard, m.slot_lo, v_totals);
    -- In the same transaction the range is `moved`: no later write can change what was booked out (0014).
    update slot_ownership set state = 'moved', epoch = m.epoch, owner_shard = m.target_shard,
                              owner_region = m.target_region, move_id = p_move
    where slot_lo between m.slot_lo and m.slot_hi;
    update slot_moves set balances = v_balances where id = p_move;
    perform txr_move_phase(p_move, 'switching');
    return jsonb_build_object('ok', true, 'balances', v_balances);
end $$;

-- The cleanup's booking (source, after the switch): each account of the moved range to zero against its
-- currency's range account, which ends at zero. Idempotent: once booked nothing is left to book.
create function txr_move_book_out(p_move text) returns jsonb language plpgsql as $$
declare
    m slot_moves;
    v_rows jsonb;
begin
    select * into strict m from slot_moves where id = p_move and role = 'source' for update;
    if m.phase <> 'switched' then
        return jsonb_build_object('booked', 0);
    end if;
    -- Only while the range is still `moved` by this move (a move into this shard waits for this cleanup, so the
    -- range cannot have come back; if it had, its accounts would be live and must not be touched).
    if exists (select 1 from slot_ownership where slot_lo <= m.slot_hi and slot_hi >= m.slot_lo
               and (state <> 'moved' or move_id is distinct from p_move)) then
        raise exception 'move %: slots %-% are no longer moved away by it; nothing booked', p_move, m.slot_lo, m.slot_hi;
    end if;
    perform 1 from accounts where kind = 'customer' and slot between m.slot_lo and m.slot_hi and balance <> 0
    order by id for update;
    select coalesce(jsonb_agg(jsonb_build_object('id', id, 'currency', currency, 'amount', -balance)), '[]'::jsonb)
    into v_rows
    from accounts where kind = 'customer' and slot between m.slot_lo and m.slot_hi and balance <> 0;
    perform set_config('txr.move_switch', 'on', true);
    perform txr_move_book(p_move, 'mvb_', m.source_shard, m.target_shard, m.slot_lo, v_rows, 'range');
    return jsonb_build_object('booked', jsonb_array_length(v_rows));
end $$;

-- txr_move_begin (0024, which restated 0008) refuses a move into a shard while a move of an overlapping range away
-- from it waits for its cleanup (see above).
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
        select * into v_prior from slot_moves
        where role = 'source' and phase in ('switching', 'switched') and slot_lo <= v_hi and slot_hi >= v_lo limit 1;
        if found then
            return jsonb_build_object('ok', false, 'code', 'cleanup_pending',
                'detail', format('move %s of slots %s-%s away from shard %s has not finished its cleanup; re-run '
                                 'it first (txroute slots move)', v_prior.id, v_prior.slot_lo, v_prior.slot_hi,
                                 p ->> 'target_shard'));
        end if;
    end if;
    insert into slot_moves (id, role, slot_lo, slot_hi, source_shard, source_region, target_shard, target_region,
                            phase, epoch)
    values (p ->> 'id', v_role, v_lo, v_hi, p ->> 'source_shard', p ->> 'source_region', p ->> 'target_shard',
            p ->> 'target_region', 'copying', (p ->> 'epoch')::bigint)
    returning * into v_row;
    return jsonb_build_object('ok', true, 'move', to_jsonb(v_row));
end $$;
