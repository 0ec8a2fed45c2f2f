-- Issue 17. An envelope's id was indexed twice, at random: as the key of
-- its `referrals` row and as the UNIQUE `message_id` of its ledger event.
-- Each is a random leaf dirtied by every envelope recorded. The referral's
-- row is inserted in the same transaction as its event, and only when it
-- goes in (`ON CONFLICT (id) DO NOTHING RETURNING id`) is the envelope new
-- and its event chained: `referrals.id` alone tells a repeated envelope,
-- so `ledger_events.message_id` loses its index, and is renamed
-- `chained_id`: a tracker of an older build still running on the ledger
-- (a rolling upgrade) told a repeated envelope by that index, and would
-- chain an envelope a newer tracker is recording at the same moment a
-- second time; its statements now fail, and it retries its batch, unacked,
-- until it is stopped and its deliveries go to the newer trackers.
-- Hop batches were already told new by their `hops` rows, overdue events
-- by their obligations' `overdue_at`, refusals by their `hops` rows; the
-- chain's head serialises every writer that chains. The audit (`tracker verify`) reaches an
-- envelope's referral from its event (`referrals.id`), not the other way.
--
-- One schema for SQLite and PostgreSQL: the table is made again, its rows
-- copied in `seq` order.

CREATE TABLE ledger_events_chained (
    seq         BIGINT PRIMARY KEY,
    chained_id  TEXT NOT NULL,          -- the id of what is chained: envelope, hop batch, overdue/<obligation> ...
    event       TEXT NOT NULL,          -- message kind code, or hop_batch, hop_report, overdue ...
    referral_id TEXT NOT NULL,
    recorded_at BIGINT NOT NULL,
    body        TEXT NOT NULL,          -- canonical JSON of what was recorded
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL
);
INSERT INTO ledger_events_chained (seq, chained_id, event, referral_id, recorded_at, body, prev_hash, hash)
    SELECT seq, message_id, event, referral_id, recorded_at, body, prev_hash, hash
    FROM ledger_events ORDER BY seq;
DROP TABLE ledger_events;
ALTER TABLE ledger_events_chained RENAME TO ledger_events;
