-- Webhook claims per endpoint (issue 13, from a review). 0011's txr_webhook_claim took the p_limit * 4 due
-- deliveries with the earliest next_attempt_at first and applied each endpoint's in-flight room after: an
-- endpoint with that many older due deliveries that had used its room (a slow receiver with a backlog) filled
-- the whole window, so no other endpoint of the shard was claimed until its backlog drained. Now each enabled
-- endpoint with room contributes at most its room of due deliveries, its oldest first (one probe of the index
-- below per endpoint, bounded by the endpoints a shard holds), and the oldest p_limit of those are claimed: a
-- slow endpoint holds up only its own deliveries. As since 0011 (and 0021's fences), only endpoints of slots
-- this shard owns are claimed, so no row of a slot it does not own is written.

create index webhook_deliveries_endpoint_due on webhook_deliveries (endpoint_id, next_attempt_at)
    where state = 'pending';

create or replace function txr_webhook_claim(p_rooms jsonb, p_limit integer, p_lease_ms integer)
returns table (endpoint_id text, event_id text, body text, attempts integer, url text, secret text,
               previous_secret text, event_created_at timestamptz)
language plpgsql as $$
begin
    return query
    with rooms as (
        select w.id, coalesce((p_rooms ->> w.id)::integer, (p_rooms ->> '*')::integer) as room
        from webhook_endpoints w
        where w.state = 'enabled'
          and txr_event_slot_owned(w.slot)  -- a moved endpoint is delivered by its new shard only
    ), due as (
        select d.endpoint_id, d.event_id, d.next_attempt_at
        from rooms r
        cross join lateral (
            select x.endpoint_id, x.event_id, x.next_attempt_at from webhook_deliveries x
            where x.endpoint_id = r.id and x.state = 'pending' and x.next_attempt_at <= clock_timestamp()
            order by x.next_attempt_at
            limit r.room
        ) d
        where r.room > 0
    ), chosen as (
        select due.endpoint_id, due.event_id from due order by due.next_attempt_at limit p_limit
    )
    update webhook_deliveries d
    set next_attempt_at = clock_timestamp() + make_interval(secs => p_lease_ms / 1000.0),
        attempts = d.attempts + 1
    from chosen, webhook_endpoints w
    where d.endpoint_id = chosen.endpoint_id and d.event_id = chosen.event_id and w.id = d.endpoint_id
    returning d.endpoint_id, d.event_id, d.body, d.attempts, w.url, w.secret,
              case when w.previous_secret_until > clock_timestamp() then w.previous_secret end,
              d.event_created_at;
end $$;
