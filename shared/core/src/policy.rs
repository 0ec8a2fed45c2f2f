//! The policy catalogue: the obligations each message kind creates, their deadlines and whom to notify when overdue.
