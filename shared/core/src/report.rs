//! The joint-meeting compliance report (CQ-3.11): per agency and rule, counts, on-time rates and time to meet.
