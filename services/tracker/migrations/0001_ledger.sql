-- The tracker's ledger. One schema for SQLite and PostgreSQL: only TEXT,
-- BIGINT and INTEGER columns; times are Unix milliseconds (UTC).

-- Every message seen on the bus, in the order recorded; each row's hash
-- chains it to the one before (audit: `tracker verify`).
CREATE TABLE ledger_events (
    seq         BIGINT PRIMARY KEY,
    message_id  TEXT NOT NULL UNIQUE,   -- envelope id or hop report id: the same message twice is recorded once
    event       TEXT NOT NULL,          -- message kind code, or hop_report
    referral_id TEXT NOT NULL,
    recorded_at BIGINT NOT NULL,
    body        TEXT NOT NULL,          -- canonical JSON of what was recorded
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL
);

-- The head of the chain: one row, updated by every recording transaction
-- (its row lock serialises writers sharing a PostgreSQL database).
CREATE TABLE ledger_head (
    id   INTEGER PRIMARY KEY,
    seq  BIGINT NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO ledger_head (id, seq, hash) VALUES (1, 0, '');

-- Every envelope: referrals, notices and replies.
CREATE TABLE referrals (
    id               TEXT PRIMARY KEY,
    kind             TEXT NOT NULL,
    sender           TEXT NOT NULL,
    recipient        TEXT NOT NULL,
    in_reply_to      TEXT NOT NULL,
    sender_region    TEXT NOT NULL,
    recipient_region TEXT NOT NULL,
    clock_started_at BIGINT NOT NULL,
    submitted_at     BIGINT NOT NULL,
    kind_known       INTEGER NOT NULL,  -- 0: the policy catalogue does not know the kind (flagged)
    envelope         TEXT NOT NULL      -- base64 of the encoded envelope, payload included
);
CREATE INDEX referrals_in_reply_to ON referrals (in_reply_to);

-- The hops of each referral.
CREATE TABLE hops (
    referral_id TEXT NOT NULL,
    hop         TEXT NOT NULL,
    agency      TEXT NOT NULL,
    at          BIGINT NOT NULL,
    message_id  TEXT NOT NULL,
    PRIMARY KEY (referral_id, hop, agency, message_id)
);

-- What each referral obliges, by when, and whether it was met.
CREATE TABLE obligations (
    id               TEXT PRIMARY KEY,
    referral_id      TEXT NOT NULL,
    rule             TEXT NOT NULL,
    kind             TEXT NOT NULL,
    duty             TEXT NOT NULL,
    bearer           TEXT NOT NULL,
    meets_agency     TEXT NOT NULL,     -- whose hop meets it
    met_by           TEXT NOT NULL,     -- delivered | acknowledged | feedback
    clock_started_at BIGINT NOT NULL,
    due_at           BIGINT NOT NULL,
    met_at           BIGINT,
    overdue_at       BIGINT,
    notify           TEXT NOT NULL      -- agency ids, comma-separated
);
-- The deadline scan reads only what is due: cost grows with the due, not the open.
CREATE INDEX obligations_pending_due ON obligations (due_at) WHERE met_at IS NULL AND overdue_at IS NULL;
CREATE INDEX obligations_referral ON obligations (referral_id);
CREATE INDEX obligations_bearer ON obligations (bearer, due_at);
CREATE INDEX obligations_clock ON obligations (clock_started_at);

-- Overdue notices to publish (an outbox): one per obligation and agency,
-- published once, not again after a restart.
CREATE TABLE overdue_notices (
    notice_id     TEXT PRIMARY KEY,
    obligation_id TEXT NOT NULL,
    agency        TEXT NOT NULL,
    published_at  BIGINT
);
CREATE INDEX overdue_notices_unpublished ON overdue_notices (notice_id) WHERE published_at IS NULL;
