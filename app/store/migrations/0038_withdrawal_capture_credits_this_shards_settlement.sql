-- A withdrawal hold captured after its slot moved credits the capturing shard's settlement account (issue 12,
-- from a review).
--
-- A withdrawal's credit account is its shard's settlement account (`set_<shard>_<currency>`). A slot move copies
-- an open hold as it is (app/store/slotdata.py), so on the new owner the hold still named the old shard's
-- settlement account, which does not exist there: its capture read no credit row and its entry insert failed (a
-- 500). Rewriting the account in the copy would make the copy differ from the source row the move's verify
-- compares it with; instead the capture resolves the settlement account where it runs, credits it and records it
-- on the transfer, so the transfer names the account its entry credits (the audit's expected entries) and the
-- shard's deposits minus withdrawals still equal what its settlement account holds.
--
-- The row's credit account was immutable (0009's trigger, last 0035). The one change allowed now: a withdrawal
-- hold leaving `held` for `posted` may name the settlement account of the shard whose journal holds the capture:
-- this shard's, or, on a copy a later move imports (`moved_from`), the shard it was captured on. The void and the
-- sweeper's expiry read only the debit account, and a withdrawal is never the debit side of a saga.

create or replace function transfers_check_transition() returns trigger language plpgsql as $$
begin
    if new.state is distinct from old.state and not exists (
        select 1 from transfer_transitions where from_state = old.state and to_state = new.state
    ) then
        raise exception 'transfer % cannot go from % to %', old.id, old.state, new.state
            using errcode = 'check_violation';
    end if;
    if (new.id, new.client, new.kind, new.debit_account, new.currency)
        is distinct from
       (old.id, old.client, old.kind, old.debit_account, old.currency)
       or (new.credit_account is distinct from old.credit_account
           and not (old.kind = 'withdrawal' and old.state = 'held' and new.state = 'posted'
                    and new.credit_account = 'set_' || coalesce(new.moved_from, (select shard from shard_info))
                                             || '_' || new.currency))
       or (new.amount <> old.amount
           and not (old.state = 'held' and new.state in ('posted', 'pending') and new.amount < old.amount)) then
        raise exception 'transfer % is immutable but for its state', old.id using errcode = 'check_violation';
    end if;
    if (new.hold_amount, new.hold_expires_at, new.metadata)
       is distinct from (old.hold_amount, old.hold_expires_at, old.metadata) then
        if not (old.state = 'posted' and new.state = 'posted' and old.moved_from is null
                and old.hold_amount is null and old.hold_expires_at is null and old.metadata is null
                and old.debit_shard <> (select shard from shard_info)
                and old.credit_shard = (select shard from shard_info)) then
            raise exception 'transfer % is immutable but for its state', old.id using errcode = 'check_violation';
        end if;
    end if;
    return new;
end $$;

create or replace function txr_hold_capture(p jsonb) returns jsonb language plpgsql as $$
declare
    v_client text := p ->> 'client';
    v_saga boolean := (p ->> 'transit') is not null;
    v_amount bigint;
    v_prior jsonb;
    v_refusal jsonb;
    v_hold transfers;
    v_debit accounts;
    v_credit accounts;
    v_credit_id text;
    v_body jsonb;
    v_message jsonb;
    v_status integer;
    v_at timestamptz;
begin
    if not txr_owns((p ->> 'slot')::integer) then
        return txr_misdirected((p ->> 'slot')::integer);
    end if;
    v_prior := txr_idempotency_check(v_client, p ->> 'key', p ->> 'fingerprint');
    if v_prior is not null then
        return v_prior;
    end if;
    select * into v_hold from transfers where id = p ->> 'id' and client = v_client for update;
    if v_hold.id is not null then
        if v_saga then
            assert p ->> 'credit' = v_hold.credit_account, 'the saga leg names another credit account';
            insert into accounts (id, slot, kind, owner_client, currency)
            values (p ->> 'transit', (p ->> 'slot')::integer, 'transit', 'txroute', v_hold.currency)
            on conflict (id) do nothing;
        end if;
        -- A withdrawal credits the settlement account of the shard that captures it, which is not the one its
        -- row names when the hold came here by a slot move (that shard's own stays there).
        v_credit_id := case when v_hold.kind = 'withdrawal'
                            then 'set_' || (select shard from shard_info) || '_' || v_hold.currency
                            else coalesce(p ->> 'transit', v_hold.credit_account) end;
        perform 1 from accounts where id in (v_hold.debit_account, v_credit_id) order by id for update;
    end if;
    v_refusal := txr_hold_refusal(v_hold, p ->> 'id');
    v_amount := coalesce((p ->> 'amount')::bigint, v_hold.amount);
    if v_refusal is null and v_amount > v_hold.amount then
        v_refusal := txr_refusal(422, 'capture_exceeds_hold',
            format('hold %s holds %s %s, %s requested', v_hold.id, v_hold.amount, v_hold.currency, v_amount));
    end if;
    if v_refusal is null then
        select * into v_debit from accounts where id = v_hold.debit_account;
        select * into v_credit from accounts where id = v_credit_id;
        if v_hold.kind = 'transfer' and not v_saga then
            v_refusal := txr_customer_refusal(v_credit, v_hold.credit_account, v_client, v_hold.currency);
        end if;
    end if;
    if v_refusal is null and v_credit.kind = 'customer' and v_credit.balance > 9007199254740991 - v_amount then
        v_refusal := txr_refusal(422, 'balance_limit_exceeded',
            format('account %s would exceed the largest balance, 9007199254740991', v_credit.id));
    end if;
    if v_refusal is null then
        v_refusal := txr_system_bound_refusal(jsonb_build_object(
            'amount', v_amount, 'debit', v_debit.id, 'credit', v_credit.id));
        if v_refusal is not null then
            return v_refusal;  -- not stored: nothing happened, and the same request can succeed later
        end if;
    end if;
    if v_refusal is not null then
        return txr_idempotency_store(v_client, p ->> 'key', p ->> 'fingerprint', v_refusal);
    end if;
    -- The hold was counted in what the account could spend, so its capture keeps the balance within limit.
    assert v_debit.balance - v_amount >= -v_debit.overdraft_limit or v_debit.kind <> 'customer', 'capture overdraws';

    update accounts set balance = balance - v_amount, held = held - v_hold.amount, version = version + 1
    where id = v_debit.id returning balance into v_debit.balance;
    update accounts set balance = balance + v_amount, version = version + 1
    where id = v_credit.id returning balance into v_credit.balance;
    -- A hold copied here by a slot move (migration 0008, `moved_from`) has its journal here from its capture on.
    update transfers set state = case when v_saga then 'pending' else 'posted' end, amount = v_amount,
                         resolution_key = p ->> 'key', moved_from = null,
                         credit_account = case when kind = 'withdrawal' then v_credit.id else credit_account end,
                         debit_shard = case when v_saga then (select shard from shard_info) end,
                         credit_shard = case when v_saga then p ->> 'credit_shard' end
    where id = v_hold.id returning * into v_hold;
    -- One instant for the entries and the hold's resolution, so a read as of any time sees the capture whole.
    v_at := clock_timestamp();
    insert into entries (transfer_id, account_id, amount, balance_after, created_at)
    values (v_hold.id, v_debit.id, -v_amount, v_debit.balance, v_at),
           (v_hold.id, v_credit.id, v_amount, v_credit.balance, v_at);
    v_body := txr_hold_follow(v_hold, v_at);
    v_status := case when v_saga then 202 else 201 end;
    perform txr_idempotency_store(v_client, p ->> 'key', p ->> 'fingerprint',
        jsonb_build_object('status', v_status, 'body', v_body));
    if not v_saga then
        return jsonb_build_object('status', v_status, 'body', v_body);
    end if;
    v_message := txr_saga_message(v_hold, p);
    return jsonb_build_object('status', v_status, 'body', v_body,
        'message', v_message || jsonb_build_object('destination_region', p ->> 'credit_region'));
end $$;
