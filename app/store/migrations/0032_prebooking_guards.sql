-- Guards around the target's pre-booking (migration 0031), from its review (issue 11).
--
-- 1. A move into a shard is refused (`target_move_unfinished`) while an earlier move of an overlapping range into
--    it is neither done nor cancelled there: a cancel whose source side committed but whose target side did not
--    (the mover died between the two) leaves that move's pre-booked balances on the target, which a new move's
--    pre-booking would skip and its switch-in refuse, after the source had already booked the range out.
-- 2. The pre-booking goes by chunks of account ids, each in its own transaction (and its own posting prefix,
--    mvp<call>_): a single transaction over a range of 100,000 accounts took 44-64 s, longer than the audit's
--    horizon assumes any ledger transaction takes (migration 0007: entries created two margins, 20 s, before a
--    snapshot are all committed), so an incremental audit meanwhile could set its horizon past entries not yet
--    committed and never read them. It reports the accounts it skipped (a balance that is not what this move
--    pre-booked), and the mover aborts the move before its freeze when there are any.
-- 3. The switch-in and the cancel's booking back (each account to zero) end with the move's range accounts at zero,
--    or raise: an account that did not hold what was pre-booked shows there; the switch-in raises (not answers)
--    when a balance differs after its booking.

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
        where role = 'target' and phase = 'copying' and slot_lo <= v_hi and slot_hi >= v_lo limit 1;
        if found then
            return jsonb_build_object('ok', false, 'code', 'target_move_unfinished',
                'detail', format('move %s of slots %s-%s into shard %s is neither done nor cancelled there (it may '
                                 'hold pre-booked balances); run it again or cancel it first (txroute slots move, '
                                 'txroute slots cancel)', v_prior.id, v_prior.slot_lo, v_prior.slot_hi,
                                 p ->> 'target_shard'));
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

drop function txr_move_prebook(text, jsonb);

-- The range's accounts on the target whose id is in [p_first, p_last) (null: unbounded), each booked what it lacks
-- to hold its balance in p_balances (account id -> the source's balance; absent: zero).
create function txr_move_prebook(p_move text, p_balances jsonb, p_first text, p_last text)
returns jsonb language plpgsql as $$
declare
    m slot_moves;
    v_round integer;
    v_rows jsonb;
    v_skipped integer;
begin
    select * into strict m from slot_moves where id = p_move and role = 'target' for update;
    if m.phase <> 'copying' then
        return jsonb_build_object('booked', 0, 'skipped', 0);
    end if;
    v_round := coalesce((select max(round) from slot_move_prebooked where move_id = p_move), 0) + 1;
    create temp table if not exists txr_prebook (id text primary key, currency text not null, amount bigint not null)
        on commit drop;
    truncate txr_prebook;
    insert into txr_prebook (id, currency, amount)
    select a.id, a.currency, coalesce((p_balances ->> a.id)::bigint, 0) - a.balance
    from accounts a left join slot_move_prebooked p on p.move_id = p_move and p.account_id = a.id
    where a.kind = 'customer' and a.slot between m.slot_lo and m.slot_hi
      and (p_first is null or a.id >= p_first) and (p_last is null or a.id < p_last)
      and a.balance = coalesce(p.amount, 0) and coalesce((p_balances ->> a.id)::bigint, 0) <> a.balance;
    select count(*) into v_skipped
    from accounts a left join slot_move_prebooked p on p.move_id = p_move and p.account_id = a.id
    where a.kind = 'customer' and a.slot between m.slot_lo and m.slot_hi
      and (p_first is null or a.id >= p_first) and (p_last is null or a.id < p_last)
      and a.balance <> coalesce(p.amount, 0);
    perform 1 from accounts where id in (select id from txr_prebook) order by id for update;
    select coalesce(jsonb_agg(jsonb_build_object('id', id, 'currency', currency, 'amount', amount)), '[]'::jsonb)
    into v_rows from txr_prebook;
    insert into slot_move_prebooked (move_id, account_id, amount, round)
    select p_move, id, amount, v_round from txr_prebook
    on conflict (move_id, account_id) do update set amount = slot_move_prebooked.amount + excluded.amount,
                                                    round = excluded.round;
    perform set_config('txr.move_switch', 'on', true);
    perform txr_move_book(p_move, 'mvp' || v_round || '_', m.target_shard, m.source_shard, m.slot_lo, v_rows,
                          'range');
    return jsonb_build_object('booked', jsonb_array_length(v_rows), 'skipped', v_skipped);
end $$;

-- A move's range accounts (on this shard) at zero, or an exception: what the switch-in and the booking back leave.
create function txr_move_range_at_zero(p_move text) returns void language plpgsql as $$
begin
    if exists (select 1 from accounts where kind = 'range' and id like 'mvr\_' || substr(p_move, 4) || '\_%'
               and balance <> 0) then
        raise exception 'move %: a range account is not at zero after the booking (a bug)', p_move;
    end if;
end $$;

create or replace function txr_move_unbook(p_move text) returns jsonb language plpgsql as $$
declare
    m slot_moves;
    v_rows jsonb;
begin
    select * into strict m from slot_moves where id = p_move and role = 'target' for update;
    if m.phase in ('switched', 'done') then
        return jsonb_build_object('booked', 0);
    end if;
    perform 1 from accounts a join slot_move_prebooked p on p.account_id = a.id and p.move_id = p_move
    order by a.id for update of a;
    select coalesce(jsonb_agg(jsonb_build_object('id', a.id, 'currency', a.currency, 'amount', -a.balance)),
                    '[]'::jsonb)
    into v_rows
    from accounts a join slot_move_prebooked p on p.account_id = a.id and p.move_id = p_move
    where a.balance <> 0;
    delete from slot_move_prebooked where move_id = p_move;
    perform set_config('txr.move_switch', 'on', true);
    perform txr_move_book(p_move, 'mvc_', m.target_shard, m.source_shard, m.slot_lo, v_rows, 'range');
    perform txr_move_range_at_zero(p_move);
    return jsonb_build_object('booked', jsonb_array_length(v_rows));
end $$;

create or replace function txr_move_switch_in(p_move text, p_balances jsonb) returns jsonb language plpgsql as $$
declare
    m slot_moves;
    v_totals jsonb;
    v_rows jsonb;
begin
    select * into strict m from slot_moves where id = p_move and role = 'target' for update;
    if m.phase in ('switched', 'done') then
        return jsonb_build_object('ok', true);
    end if;
    assert m.phase = 'copying', m.phase;
    create temp table if not exists txr_switch_in (id text primary key, balance bigint not null) on commit drop;
    truncate txr_switch_in;
    insert into txr_switch_in (id, balance) select key, value::bigint from jsonb_each_text(p_balances);
    analyze txr_switch_in;
    if exists (select 1 from txr_switch_in b
               left join accounts a on a.id = b.id
               left join slot_move_prebooked p on p.move_id = p_move and p.account_id = b.id
               where a.id is null or a.kind <> 'customer' or a.balance <> coalesce(p.amount, 0)) then
        return jsonb_build_object('ok', false,
                                  'detail', 'a moved account is missing on the target or not at what was pre-booked');
    end if;
    -- The range first (a shard the range once left records it `moved`, whose fence refuses the booking: 0018).
    perform txr_slot_split(m.slot_lo, m.slot_hi);
    delete from slot_ownership where slot_lo between m.slot_lo and m.slot_hi;
    insert into slot_ownership (slot_lo, slot_hi, epoch, state) values (m.slot_lo, m.slot_hi, m.epoch, 'owned');
    perform set_config('txr.move_switch', 'on', true);
    -- Per currency, the range account credited with the range's total from the transit account.
    select coalesce(jsonb_agg(jsonb_build_object('id', 'mvr_' || substr(p_move, 4) || '_' || currency,
                                                 'currency', currency, 'amount', total)), '[]'::jsonb)
    into v_totals
    from (select a.currency, sum(b.balance) as total
          from txr_switch_in b join accounts a on a.id = b.id group by a.currency) c
    where total <> 0;
    insert into accounts (id, slot, kind, owner_client, currency)
    select t ->> 'id', m.slot_lo, 'range', 'txroute', t ->> 'currency' from jsonb_array_elements(v_totals) t
    on conflict (id) do nothing;
    perform 1 from accounts where id in (select t ->> 'id' from jsonb_array_elements(v_totals) t) order by id for update;
    perform txr_move_book(p_move, 'mvi_', m.target_shard, m.source_shard, m.slot_lo, v_totals);
    -- Each account that changed since the pre-booking: the difference, from the range account.
    select coalesce(jsonb_agg(jsonb_build_object('id', a.id, 'currency', a.currency,
                                                 'amount', b.balance - a.balance)), '[]'::jsonb)
    into v_rows
    from txr_switch_in b join accounts a on a.id = b.id
    where b.balance <> a.balance;
    perform 1 from accounts where id in (select r ->> 'id' from jsonb_array_elements(v_rows) r) order by id for update;
    perform txr_move_book(p_move, 'mvd_', m.target_shard, m.source_shard, m.slot_lo, v_rows, 'range');
    -- Every account now holds what the source booked out (a difference here is a bug: the caller rolls back).
    if exists (select 1 from txr_switch_in b join accounts a on a.id = b.id where a.balance <> b.balance) then
        raise exception 'move %: balances differ from those the source booked out after the switch-in (a bug)', p_move;
    end if;
    perform txr_move_range_at_zero(p_move);
    delete from slot_move_prebooked where move_id = p_move;
    update slot_moves set balances = p_balances where id = p_move;
    perform txr_move_phase(p_move, 'switched');
    return jsonb_build_object('ok', true, 'changed', jsonb_array_length(v_rows));
end $$;
