-- Issue 17. `referrals_in_reply_to` was made with the ledger and no query
-- has ever read it: replies are found by their referral's hops and reply
-- rights, not by this column. Every envelope recorded still paid an insert
-- into it (BENCHMARKS.md, issue 17, eighteenth stop).
DROP INDEX IF EXISTS referrals_in_reply_to;
