-- The cleanup's booking out and a cancel's booking back go by chunks of accounts, each its own transaction
-- (issue 11).
--
-- After the switch the source books each account of the range to zero against its range account (0028), and a
-- cancel books the target's pre-booked accounts back to zero (0031). Each was one transaction over the whole
-- range: 36 s at 100,000 accounts, past the 20 s the audit's incremental horizon assumes of any transaction that
-- writes entries (migration 0007), as the pre-booking was before 0032. Now each call books at most p_limit
-- accounts, after p_after in id order (null: from the first), and answers the last account it looked at (null
-- when none was left); the mover calls again until then. Every chunk keeps the audit's invariants (each posting
-- balances against the range account), a crash between chunks leaves the move where it was (the source's
-- cleanup still `switched`, the cancel's target still pre-booked for the accounts not yet booked back), and
-- running it again books only what is left. The range account is checked at zero once no account is left.
--
-- The pre-booking's round is now the mover's to say (p_round). 0032 numbered it one past the highest recorded,
-- which counted each chunk as a round of its own: the second chunk of round 1 booked `mvp2_` postings (found by
-- tests/e2e/test_move_verify.py with chunks of two accounts). The mover starts past the highest round recorded, so
-- a mover run again after a crash never reuses a posting's id.

drop function txr_move_book_out(text);
create function txr_move_book_out(p_move text, p_after text, p_limit integer) returns jsonb language plpgsql as $$
declare
    m slot_moves;
    v_rows jsonb;
    v_last text;
begin
    select * into strict m from slot_moves where id = p_move and role = 'source' for update;
    if m.phase <> 'switched' then
        return jsonb_build_object('booked', 0, 'last', null);
    end if;
    -- Only while the range is still `moved` by this move (a move into this shard waits for this cleanup, so the
    -- range cannot have come back; if it had, its accounts would be live and must not be touched).
    if exists (select 1 from slot_ownership where slot_lo <= m.slot_hi and slot_hi >= m.slot_lo
               and (state <> 'moved' or move_id is distinct from p_move)) then
        raise exception 'move %: slots %-% are no longer moved away by it; nothing booked', p_move, m.slot_lo, m.slot_hi;
    end if;
    create temp table if not exists txr_book_out (id text primary key, currency text not null, amount bigint not null)
        on commit drop;
    truncate txr_book_out;
    insert into txr_book_out (id, currency, amount)
    select id, currency, -balance from (
        select id, currency, balance from accounts
        where kind = 'customer' and slot between m.slot_lo and m.slot_hi and balance <> 0
          and (p_after is null or id > p_after)
        order by id limit p_limit for update) a;
    v_last := (select max(id) from txr_book_out);
    select coalesce(jsonb_agg(jsonb_build_object('id', id, 'currency', currency, 'amount', amount)), '[]'::jsonb)
    into v_rows from txr_book_out;
    perform set_config('txr.move_switch', 'on', true);
    perform txr_move_book(p_move, 'mvb_', m.source_shard, m.target_shard, m.slot_lo, v_rows, 'range');
    if v_last is null then
        perform txr_move_range_at_zero(p_move);
    end if;
    return jsonb_build_object('booked', jsonb_array_length(v_rows), 'last', v_last);
end $$;

drop function txr_move_unbook(text);
create function txr_move_unbook(p_move text, p_after text, p_limit integer) returns jsonb language plpgsql as $$
declare
    m slot_moves;
    v_rows jsonb;
    v_last text;
begin
    select * into m from slot_moves where id = p_move and role = 'target' for update;
    if not found or m.phase in ('switched', 'done') then  -- a cancel before the target began, or past the switch
        return jsonb_build_object('booked', 0, 'last', null);
    end if;
    create temp table if not exists txr_unbook (id text primary key, currency text not null, amount bigint not null)
        on commit drop;
    truncate txr_unbook;
    insert into txr_unbook (id, currency, amount)
    select id, currency, -balance from (
        select a.id, a.currency, a.balance
        from accounts a join slot_move_prebooked p on p.account_id = a.id and p.move_id = p_move
        where p_after is null or a.id > p_after
        order by a.id limit p_limit for update of a) a;
    v_last := (select max(id) from txr_unbook);
    select coalesce(jsonb_agg(jsonb_build_object('id', id, 'currency', currency, 'amount', amount)), '[]'::jsonb)
    into v_rows from txr_unbook where amount <> 0;
    delete from slot_move_prebooked where move_id = p_move and account_id in (select id from txr_unbook);
    perform set_config('txr.move_switch', 'on', true);
    perform txr_move_book(p_move, 'mvc_', m.target_shard, m.source_shard, m.slot_lo, v_rows, 'range');
    if v_last is null then
        perform txr_move_range_at_zero(p_move);
    end if;
    return jsonb_build_object('booked', jsonb_array_length(v_rows), 'last', v_last);
end $$;

drop function txr_move_prebook(text, jsonb, text, text);
-- The range's accounts on the target whose id is in [p_first, p_last) (null: unbounded), each booked what it lacks
-- to hold its balance in p_balances (account id -> the source's balance; absent: zero), as round p_round.
create function txr_move_prebook(p_move text, p_round integer, p_balances jsonb, p_first text, p_last text)
returns jsonb language plpgsql as $$
declare
    m slot_moves;
    v_rows jsonb;
    v_skipped integer;
begin
    select * into strict m from slot_moves where id = p_move and role = 'target' for update;
    if m.phase <> 'copying' then
        return jsonb_build_object('booked', 0, 'skipped', 0);
    end if;
    -- A round below one recorded would reuse a posting's id (a mover that read the rounds before a killed
    -- mover's last chunk committed): refused whole, and the move run again.
    if p_round < (select coalesce(max(round), 0) from slot_move_prebooked where move_id = p_move) then
        raise exception 'move %: pre-booking round % is below one already recorded; run the move again', p_move, p_round;
    end if;
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
    select p_move, id, amount, p_round from txr_prebook
    on conflict (move_id, account_id) do update set amount = slot_move_prebooked.amount + excluded.amount,
                                                    round = excluded.round;
    perform set_config('txr.move_switch', 'on', true);
    perform txr_move_book(p_move, 'mvp' || p_round || '_', m.target_shard, m.source_shard, m.slot_lo, v_rows,
                          'range');
    return jsonb_build_object('booked', jsonb_array_length(v_rows), 'skipped', v_skipped);
end $$;


-- Names the balances when it raises: after a chunked booking the earlier chunks have committed, so the message is
-- what an operator has to go on (runbooks/move-slots.md).
create or replace function txr_move_range_at_zero(p_move text) returns void language plpgsql as $$
declare
    v_left text;
begin
    select string_agg(id || ' ' || balance, ', ' order by id) into v_left
    from accounts where kind = 'range' and id like 'mvr\_' || substr(p_move, 4) || '\_%' and balance <> 0;
    if v_left is not null then
        raise exception 'move %: range accounts not at zero after the booking (a bug; the move stays where it is): %',
            p_move, v_left;
    end if;
end $$;
