-- A batch's Idempotency-Key bound to its whole body (DESIGN D15, issue 12 review). A non-atomic batch's items
-- post on many shards and regions under keys derived from the batch's; nothing tied the batch's key to the
-- batch's body, so the same key with other items replayed the old items and posted the new ones. Before any
-- item is sent, a router now claims the key at the key's home slot (a hash of client and key, whichever
-- accounts the batch names): the first claim stores the body's fingerprint there under `<key> batch` (a
-- client's key has no space, so this meets neither a client's key nor an item's derived `<key> #<n>`); the
-- same body again finds it (a replay: go on), another body is refused `422 idempotency_key_reused` before
-- anything is sent. The record carries the home slot (txr_owns sets it), so it moves with the slot (D13).
create function txr_batch_claim(p_client text, p_key text, p_slot integer, p_fingerprint text)
returns jsonb language plpgsql volatile as $$
declare
    v_key text := p_key || ' batch';
    v_prior jsonb;
begin
    if not txr_owns(p_slot) then
        return txr_misdirected(p_slot);
    end if;
    v_prior := txr_idempotency_check(p_client, v_key, p_fingerprint);
    if v_prior is not null then
        return v_prior;
    end if;
    return txr_idempotency_store(p_client, v_key, p_fingerprint, jsonb_build_object(
        'status', 200, 'body', jsonb_build_object('batch_key', p_key, 'home_slot', p_slot)));
end $$;
