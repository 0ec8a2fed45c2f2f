-- Issue 17. A referral's hops, reply rights and obligations are keyed first
-- by `referral_at`, the time its referral was submitted (its
-- `referrals.submitted_at`), then by the referral's id. Keyed by the id
-- alone (a UUID, as random as can be), every referral's rows went to a page
-- of their own in each of these indexes; once an index outgrew a batch,
-- each referral dirtied one page per index, written to the WAL and again
-- by the checkpoint, and recording slowed as the ledger grew (BENCHMARKS.md,
-- issue 17, ninth and tenth stops). Keyed by time, a batch's rows land
-- together at the end of each index. Only `referrals.id` and
-- `ledger_events.message_id` are still written at random: what is looked up
-- by id goes through them (`JOIN referrals r ON x.referral_at =
-- r.submitted_at AND x.referral_id = r.id`).
--
-- A hop recorded before its referral (trackers sharing a ledger record in
-- any order; a reply can race its referral) has `referral_at` 0 until the
-- referral is recorded, which moves it to the referral's time in the same
-- transaction.

CREATE TABLE hops_in_order (
    referral_at BIGINT NOT NULL,        -- the referral's submitted_at; 0 until it is recorded
    referral_id TEXT NOT NULL,
    hop         TEXT NOT NULL,
    agency      TEXT NOT NULL,
    at          BIGINT NOT NULL,
    message_id  TEXT NOT NULL,
    meets       TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (referral_at, referral_id, hop, agency, message_id)
);
INSERT INTO hops_in_order (referral_at, referral_id, hop, agency, at, message_id, meets)
    SELECT COALESCE((SELECT r.submitted_at FROM referrals r WHERE r.id = h.referral_id), 0),
           h.referral_id, h.hop, h.agency, h.at, h.message_id, h.meets
    FROM hops h;
DROP TABLE hops;
ALTER TABLE hops_in_order RENAME TO hops;

CREATE TABLE reply_rights_in_order (
    referral_at BIGINT NOT NULL,
    referral_id TEXT NOT NULL,
    agency      TEXT NOT NULL,
    reply       TEXT NOT NULL,          -- receive | answer | relay
    PRIMARY KEY (referral_at, referral_id, agency, reply)
);
INSERT INTO reply_rights_in_order (referral_at, referral_id, agency, reply)
    SELECT COALESCE((SELECT r.submitted_at FROM referrals r WHERE r.id = x.referral_id), 0),
           x.referral_id, x.agency, x.reply
    FROM reply_rights x;
DROP TABLE reply_rights;
ALTER TABLE reply_rights_in_order RENAME TO reply_rights;

-- Each overdue notice names its obligation's full key (filled in while
-- `obligations` still has its index on `id`).
ALTER TABLE overdue_notices ADD COLUMN referral_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE overdue_notices ADD COLUMN referral_id TEXT NOT NULL DEFAULT '';
UPDATE overdue_notices SET
    referral_at = COALESCE((SELECT r.submitted_at FROM obligations o JOIN referrals r ON r.id = o.referral_id WHERE o.id = overdue_notices.obligation_id), 0),
    referral_id = COALESCE((SELECT o.referral_id FROM obligations o WHERE o.id = overdue_notices.obligation_id), '');

-- An obligation's id starts with its referral's id, so it is unique under
-- (referral_at, referral_id) too; the deadline engine and the overdue
-- notices find an obligation by all three.
CREATE TABLE obligations_in_order (
    referral_at      BIGINT NOT NULL,
    referral_id      TEXT NOT NULL,
    id               TEXT NOT NULL,
    rule             TEXT NOT NULL,
    kind             TEXT NOT NULL,
    duty             TEXT NOT NULL,
    bearer           TEXT NOT NULL,
    meets_agency     TEXT NOT NULL,
    met_by           TEXT NOT NULL,
    clock_started_at BIGINT NOT NULL,
    due_at           BIGINT NOT NULL,
    met_at           BIGINT,
    overdue_at       BIGINT,
    notify           TEXT NOT NULL,
    PRIMARY KEY (referral_at, referral_id, id)
);
INSERT INTO obligations_in_order (referral_at, referral_id, id, rule, kind, duty, bearer,
        meets_agency, met_by, clock_started_at, due_at, met_at, overdue_at, notify)
    SELECT COALESCE((SELECT r.submitted_at FROM referrals r WHERE r.id = o.referral_id), 0),
           o.referral_id, o.id, o.rule, o.kind, o.duty, o.bearer, o.meets_agency, o.met_by,
           o.clock_started_at, o.due_at, o.met_at, o.overdue_at, o.notify
    FROM obligations o;
DROP TABLE obligations;
ALTER TABLE obligations_in_order RENAME TO obligations;
CREATE INDEX obligations_pending_due ON obligations (due_at) WHERE met_at IS NULL AND overdue_at IS NULL;
CREATE INDEX obligations_bearer ON obligations (bearer, due_at);
CREATE INDEX obligations_clock ON obligations (clock_started_at);
