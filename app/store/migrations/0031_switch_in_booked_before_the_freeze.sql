-- The target books the range's balances in before the freeze; under it, only what changed since (issue 11: the
-- freeze bar).
--
-- Since migration 0028 the switch-out books a range out in one posting per currency, and the freeze was then the
-- target's switch-in: one `move` posting per account of the range (a transfer, two entries, an account update,
-- each with its triggers and foreign-key checks), 4.4-5.5 s of a 5.5-6 s freeze at 10,000 accounts, growing with
-- the range.
--
-- Now, before the freeze, the mover reads the source's balances (no lock: they may still change) and the target
-- books each account's balance against its range account `mvr_<move>_<currency>` (kind `range`, as on the
-- source; prefix `mvp1_`), remembering what it booked (slot_move_prebooked); while many accounts changed during a
-- round, the mover reads again and the target books the differences (`mvp2_`, ...). The target does not own the
-- range yet, so nothing serves or writes those accounts; every invariant holds on the target as on the source
-- (the audit counts range accounts with customers). Under the freeze the switch-in books, per currency, the total
-- the source booked out from the transit account into the range account (one posting), and for each account
-- whose balance changed since the last round only the difference against the range account (`mvd_`); each
-- range account then ends at zero. A range of mostly idle accounts switches in a few postings, whatever its size.
--
-- Run again (a mover resumed before its freeze), the pre-booking books only the differences. A move cancelled or
-- aborted before its switch books each pre-booked account back to zero (`mvc_`) before the target's copies are
-- dropped; those accounts keep their journal, at zero, on a shard that does not own their slots (a later move of
-- the range in finds them and books them in again).
--
-- The copy no longer resets an existing account's balance to zero on the target (app/store/slotdata.py: balance
-- and version are set on insert only): a pre-booked balance stays what its entries say.

create table slot_move_prebooked (
    move_id text not null references slot_moves (id),
    account_id text not null,
    amount bigint not null,
    round integer not null,
    primary key (move_id, account_id)
);

-- Pre-booking (target, before the freeze): p_balances maps account id -> the source's balance as read (accounts
-- at zero left out). Books, against the range account, what each account of the range on the target lacks to
-- hold that balance: all of it the first time, the differences on a later round (the mover repeats while many
-- changed meanwhile; a resumed mover does the same). An account the copy has not brought yet is booked in whole
-- by the switch-in, and one whose balance is not what this move pre-booked (zero if nothing) is left alone (the
-- switch-in refuses it). Each round's postings have their own prefix: mvp<round>_.
create function txr_move_prebook(p_move text, p_balances jsonb) returns jsonb language plpgsql as $$
declare
    m slot_moves;
    v_round integer;
    v_rows jsonb;
begin
    select * into strict m from slot_moves where id = p_move and role = 'target' for update;
    if m.phase <> 'copying' then
        return jsonb_build_object('booked', 0);
    end if;
    v_round := coalesce((select max(round) from slot_move_prebooked where move_id = p_move), 0) + 1;
    create temp table if not exists txr_prebook (id text primary key, currency text not null, amount bigint not null)
        on commit drop;
    truncate txr_prebook;
    insert into txr_prebook (id, currency, amount)
    select a.id, a.currency, coalesce((p_balances ->> a.id)::bigint, 0) - a.balance
    from accounts a left join slot_move_prebooked p on p.move_id = p_move and p.account_id = a.id
    where a.kind = 'customer' and a.slot between m.slot_lo and m.slot_hi
      and a.balance = coalesce(p.amount, 0) and coalesce((p_balances ->> a.id)::bigint, 0) <> a.balance;
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
    return jsonb_build_object('booked', jsonb_array_length(v_rows), 'round', v_round);
end $$;

-- Cancel or abort before the switch (target): each pre-booked account back to zero against its range account,
-- which ends at zero. Idempotent (what it books back it forgets).
create function txr_move_unbook(p_move text) returns jsonb language plpgsql as $$
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
    return jsonb_build_object('booked', jsonb_array_length(v_rows));
end $$;

-- The switch-in (0019) on top of the pre-booking: each account must hold what was pre-booked for it (zero if
-- nothing was); per currency the source's total comes from the transit account into the range account, and each
-- account whose balance differs from what it holds is booked the difference against the range account. The
-- recorded balances are read once into a temporary table, and checked against the accounts after the booking,
-- in this transaction (before, the mover read every balance back).
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
        return jsonb_build_object('ok', false, 'bug', true,
                                  'detail', 'balances differ from those the source booked out after the switch-in');
    end if;
    delete from slot_move_prebooked where move_id = p_move;
    update slot_moves set balances = p_balances where id = p_move;
    perform txr_move_phase(p_move, 'switched');
    return jsonb_build_object('ok', true, 'changed', jsonb_array_length(v_rows));
end $$;
