-- Issue 18. What the centres are asked to serve and how they serve it
-- (CQ-1.3b), the lawyers' ratings of meetings (CQ-3.11b), and which
-- verification queries hold up which meeting request (CQ-1.3d). One schema
-- for SQLite and PostgreSQL, as before: TEXT, BIGINT and INTEGER; times in
-- Unix milliseconds (UTC).

-- CQ-1.3b: each lawyer_meeting_request and interrogation_request addressed
-- to a detention centre, with its acceptance time (its submitted_at), and
-- the policy's [[order]] rule that queues it at that centre ('' when none
-- binds the centre's region for that kind).
CREATE TABLE centre_requests (
    request_id  TEXT PRIMARY KEY,
    centre      TEXT NOT NULL,
    kind        TEXT NOT NULL,
    accepted_at BIGINT NOT NULL,
    rule        TEXT NOT NULL
);
CREATE INDEX centre_requests_centre ON centre_requests (centre, accepted_at);

-- The centre's answers that take a request off its queue: `held` (served:
-- the feedback with OUTCOME_HELD; its submitted_at is the service time) or
-- `refused`. Recorded with the answering agency, in whatever order it comes
-- relative to its request; a service counts only from the request's centre.
CREATE TABLE centre_services (
    request_id TEXT NOT NULL,
    centre     TEXT NOT NULL,
    outcome    TEXT NOT NULL,          -- held | refused
    at         BIGINT NOT NULL,
    message_id TEXT NOT NULL,
    PRIMARY KEY (request_id, message_id)
);

-- CQ-3.11b: a lawyer's rating of a meeting (through the lawyer service),
-- filed under the centre it was sent to.
CREATE TABLE meeting_ratings (
    rating_id          TEXT PRIMARY KEY,
    centre             TEXT NOT NULL,
    meeting_request_id TEXT NOT NULL,
    score              BIGINT NOT NULL,   -- 1 to 5
    rated_at           BIGINT NOT NULL
);
CREATE INDEX meeting_ratings_centre ON meeting_ratings (centre, rated_at);

-- CQ-1.3d: a verification query linked to the meeting request it holds up.
CREATE TABLE verification_links (
    query_id           TEXT PRIMARY KEY,
    meeting_request_id TEXT NOT NULL,
    centre             TEXT NOT NULL,     -- the query's sender
    asked_at           BIGINT NOT NULL
);
CREATE INDEX verification_links_request ON verification_links (meeting_request_id);
