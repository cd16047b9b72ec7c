-- Migration 0036's mover pre-books only the accounts it lists (txr_move_prebook_listed); nothing calls 0034's
-- txr_move_prebook (every account of an id range) any more, so it goes.
drop function txr_move_prebook(text, integer, jsonb, text, text);
