-- Issue 16. Who may reply to each referral, from its addressees and its
-- route only (never from its hops): `receive` (report it delivered or
-- acknowledged, acknowledge it), `answer` (feed back: the recipient, or a
-- lead's handling organ) and `relay` (pass a lead on: a route agency that
-- is not the last). A reply to a referral with rights rows from an agency
-- without that right is refused; a referral recorded before this
-- migration has none, and its replies are taken as before.
CREATE TABLE reply_rights (
    referral_id TEXT NOT NULL,
    agency      TEXT NOT NULL,
    reply       TEXT NOT NULL,          -- receive | answer | relay
    PRIMARY KEY (referral_id, agency, reply)
);

-- Replies recorded before their referral whose agency turned out, when the
-- referral came, to have no right to them: moved here from `hops`, so they
-- meet nothing and show on no timeline (the ledger event of the message
-- stays in the chain, and a `reply_refused` event records the refusal).
CREATE TABLE refused_replies (
    referral_id TEXT NOT NULL,
    hop         TEXT NOT NULL,
    agency      TEXT NOT NULL,
    at          BIGINT NOT NULL,
    message_id  TEXT NOT NULL,
    reason      TEXT NOT NULL,
    PRIMARY KEY (referral_id, hop, agency, message_id)
);

-- How far each tracker instance has recorded: every message it was
-- delivered before a marker stamped `recorded_through` (+ the gateways'
-- confirm timeout) has committed. The deadline engine marks only what is
-- due before the least of the instances seen lately (`seen_at`).
CREATE TABLE tracker_watermarks (
    instance         TEXT PRIMARY KEY,
    recorded_through BIGINT NOT NULL,
    seen_at          BIGINT NOT NULL
);
