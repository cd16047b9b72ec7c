-- Batches, unique references and lookups (issue 12, DESIGN D15).
--
-- Nothing here redefines a function of an earlier migration: every posting still runs txr_post_one (with the
-- rules later migrations give it) and txr_system_bound_refusal, exactly as in group commit (txr_post). What is
-- new is a second way to call them, `txr_post_together`: several postings in ONE transaction of their own,
-- all their accounts locked first in one ordered pass. It serves the atomic batch (all items or none) and any
-- posting whose reference is declared unique (the reference check and the posting must share a transaction
-- and the account locks, which a group-commit batch of other clients' postings has no business waiting on).

-- A reference declared unique (`"unique_reference": true`) is unique per client and per customer account:
-- the account debited (transfers, withdrawals) or credited (deposits). That scope is enforceable in the
-- transaction that posts, on the one shard that holds the account, under the account's row lock: no
-- cross-shard reservation, no 2PC. It is also placement-independent: an account's transfers move with its
-- slot (DESIGN D13), so two transfers of one account can never meet on a shard with the same unique
-- reference, which a per-shard scope could not promise once slots move. The same reference on two accounts
-- is two different payments and is allowed.
alter table transfers add column reference_unique boolean not null default false;
create unique index transfers_unique_reference
    on transfers (client, (case when kind = 'deposit' then credit_account else debit_account end), reference)
    where reference_unique;

-- GET /v1/transfers?reference=R (client-scoped): newest first.
create index transfers_client_reference on transfers (client, reference, created_at desc, id desc)
    where reference is not null;
-- GET /v1/accounts/{id}/transfers: an account's transfers, newest first, keyset-paginated on (created_at, id)
-- (debit_account <> credit_account is a CHECK, so the two sides never list one transfer twice).
create index transfers_debit_account on transfers (debit_account, created_at desc, id desc);
create index transfers_credit_account on transfers (credit_account, created_at desc, id desc);

-- The reference of posting `p` declared unique is already taken: its refusal, or null.
create function txr_reference_refusal(p jsonb) returns jsonb language plpgsql stable as $$
declare
    v_account text := case p ->> 'kind' when 'deposit' then p ->> 'credit' else p ->> 'debit' end;
    v_taken text;
begin
    if not coalesce((p ->> 'unique_reference')::boolean, false) then
        return null;
    end if;
    select id into v_taken from transfers
    where client = p ->> 'client' and reference_unique and reference = p ->> 'reference'
      and (case when kind = 'deposit' then credit_account else debit_account end) = v_account;
    if v_taken is null then
        return null;
    end if;
    return jsonb_build_object('status', 409, 'body', jsonb_build_object(
        'code', 'reference_in_use',
        'detail', format('reference %s is already used by transfer %s of account %s', p ->> 'reference', v_taken,
                         v_account),
        'transfer_id', v_taken));
end $$;

-- One posting whose accounts are locked: the system bound, the idempotency check, the unique reference, then
-- txr_post_one (which checks the key again: advisory locks are re-entrant within a session, and nothing was
-- stored in between). A refusal for a taken reference is stored under the key like any business refusal.
create function txr_post_item(p jsonb) returns jsonb language plpgsql as $$
declare
    v_result jsonb;
begin
    v_result := txr_system_bound_refusal(p);
    if v_result is not null then
        return v_result;
    end if;
    if coalesce((p ->> 'unique_reference')::boolean, false) then
        v_result := txr_idempotency_check(p ->> 'client', p ->> 'key', p ->> 'fingerprint');
        if v_result is not null then
            return v_result;
        end if;
        v_result := txr_reference_refusal(p);
        if v_result is not null then
            return txr_idempotency_store(p ->> 'client', p ->> 'key', p ->> 'fingerprint', v_result);
        end if;
    end if;
    v_result := txr_post_one(p);
    if coalesce((p ->> 'unique_reference')::boolean, false) and (v_result ->> 'status')::integer in (201, 202) then
        update transfers set reference_unique = true where id = p ->> 'id';
    end if;
    if v_result ? 'message' and p ? 'traceparent' then
        update outbox set traceparent = p ->> 'traceparent' where transfer_id = v_result -> 'message' ->> 'transfer_id';
    end if;
    return v_result;
end $$;

-- Postings in one transaction: transit accounts created, then every account locked in one pass in id order
-- (the order txr_post locks in, so the two never deadlock), each row waited for at most p_lock_wait_ms.
-- An account still locked then makes the whole call answer one `busy` result (nothing posted, nothing
-- stored): all-or-nothing callers cannot leave a posting out the way group commit does.
create function txr_post_together(p_items jsonb, p_lock_wait_ms integer) returns jsonb language plpgsql as $$
declare
    -- A PL/pgSQL array grows in place; appending to a jsonb array copies it, O(n^2) over 1,000 items.
    v_results jsonb[] := '{}';
    v_item jsonb;
    v_id text;
    v_lock_timeout text := current_setting('lock_timeout');
begin
    assert p_lock_wait_ms > 0, 'a lock wait of 0 would wait forever';
    insert into accounts (id, slot, kind, owner_client, currency)
    select distinct x ->> 'transit', (x ->> 'slot')::integer, 'transit', 'txroute', x ->> 'currency'
    from jsonb_array_elements(p_items) x where (x ->> 'transit') is not null
    on conflict (id) do nothing;
    perform set_config('lock_timeout', p_lock_wait_ms::text, true);
    begin
        for v_id in
            select x ->> 'debit' from jsonb_array_elements(p_items) x
            union
            select coalesce(x ->> 'transit', x ->> 'credit') from jsonb_array_elements(p_items) x
            order by 1
        loop
            perform 1 from accounts where id = v_id for update;
        end loop;
    exception when lock_not_available then
        perform set_config('lock_timeout', v_lock_timeout, true);
        return jsonb_build_object('busy', true, 'busy_account', v_id);
    end;
    perform set_config('lock_timeout', v_lock_timeout, true);
    for v_item in select value from jsonb_array_elements(p_items) loop
        v_results := array_append(v_results, txr_post_item(v_item));
    end loop;
    return to_jsonb(v_results);
end $$;

-- An atomic batch (DESIGN D15): every item posted in this transaction, or none. The batch is one idempotent
-- request under its own key; each item also runs under a key derived from it (stored only when the batch
-- posts). One refused item rolls every item back (their stored answers too) and the batch answers 422
-- batch_refused naming each item's outcome: the refused items their own code, the others
-- batch_item_not_posted. Items are judged in order, each seeing the ones before it (a later item may be
-- refused for funds an earlier one moved).
-- Returns {"status", "body", "replayed"?} as the other ledger functions, or {"busy": true, ...}.
create function txr_post_atomic(
    p_client text, p_key text, p_fingerprint text, p_items jsonb, p_lock_wait_ms integer
) returns jsonb language plpgsql as $$
declare
    v_prior jsonb;
    v_results jsonb;
    v_refused boolean;
    v_outcome jsonb;
begin
    v_prior := txr_idempotency_check(p_client, p_key, p_fingerprint);
    if v_prior is not null then
        return v_prior;
    end if;
    begin
        v_results := txr_post_together(p_items, p_lock_wait_ms);
        if v_results ? 'busy' then
            return v_results;
        end if;
        v_refused := exists (select 1 from jsonb_array_elements(v_results) r where (r ->> 'status')::integer >= 400);
        if v_refused then
            -- Rolls back every item's effect and stored answer; the variables keep their values.
            raise exception using errcode = 'TXR02';
        end if;
    exception when sqlstate 'TXR02' then
        null;
    end;
    if v_refused then
        v_outcome := jsonb_build_object('status', 422, 'body', jsonb_build_object(
            'code', 'batch_refused',
            'detail', 'an item of the atomic batch was refused; nothing was posted',
            'items', (select jsonb_agg(
                        case when (r ->> 'status')::integer >= 400
                             then jsonb_build_object('status', (r ->> 'status')::integer,
                                                     'code', r -> 'body' ->> 'code', 'detail', r -> 'body' ->> 'detail')
                             else jsonb_build_object('status', 422, 'code', 'batch_item_not_posted',
                                                     'detail', 'another item of the atomic batch was refused')
                        end order by n)
                      from jsonb_array_elements(v_results) with ordinality as x(r, n))));
    else
        v_outcome := jsonb_build_object('status', 201, 'body', jsonb_build_object(
            'atomic', true,
            'items', (select jsonb_agg(jsonb_build_object('status', (r ->> 'status')::integer, 'transfer', r -> 'body')
                                       order by n)
                      from jsonb_array_elements(v_results) with ordinality as x(r, n))));
    end if;
    return txr_idempotency_store(p_client, p_key, p_fingerprint, v_outcome);
end $$;
