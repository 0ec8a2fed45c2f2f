-- What each hop meets (an obligation's met_by), recorded with the hop, so
-- that a hop recorded before its referral (trackers sharing a ledger
-- record in any order) meets, when the referral's obligations come, what
-- it met: an answer that heard the lawyer in person meets the hearing of
-- CQ-3.13, not the feedback. '' for a hop that meets nothing.
ALTER TABLE hops ADD COLUMN meets TEXT NOT NULL DEFAULT '';

-- Hops recorded before: what their name says (as the tracker read them
-- then); an answer meets the feedback.
UPDATE hops SET meets = CASE hop
    WHEN 'delivered' THEN 'delivered'
    WHEN 'acknowledged' THEN 'acknowledged'
    WHEN 'answered' THEN 'feedback'
    WHEN 'relayed' THEN 'relayed'
    ELSE ''
END;
