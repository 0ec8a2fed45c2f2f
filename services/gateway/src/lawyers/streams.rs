//! Open lawyer `Inbox` streams and the deliveries each holds
//! unacknowledged, in memory (the deliveries themselves are on disk,
//! [`super::store`]).
//!
//! A delivery is handed over on one open stream at a time: while it is
//! pending there, no other stream of the same lawyer gets it. Its token is
//! 128 random bits bound to the lawyer it was handed to: another lawyer's
//! `Acknowledge` finds nothing under it. When a stream ends, what it held
//! unacknowledged is free again and comes on the next stream
//! (`redelivered`). Each lawyer with an open stream has a [`Notify`] that
//! the consumer and `Acknowledge` wake: new deliveries and freed window
//! room are handed over at once, without polling.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, Utc};
use tokio::sync::Notify;

/// A delivery handed over and not yet acknowledged.
#[derive(Clone, Debug)]
pub struct Pending {
    pub session: u64,
    pub licence: String,
    pub envelope_id: String,
    /// The id hops are reported on.
    pub referral: String,
    pub kind: String,
    pub handed_at: DateTime<Utc>,
    /// Taken by an `Acknowledge` whose record is not yet on disk.
    acknowledging: bool,
}

#[derive(Default)]
struct State {
    /// Open streams: session → (licence, deliveries outstanding on it).
    sessions: HashMap<u64, (String, usize)>,
    pending: HashMap<String, Pending>,
    /// (licence, envelope id) → token of its pending delivery.
    held: HashMap<(String, String), String>,
    /// Lawyers with an open stream: what wakes them.
    notifiers: HashMap<String, Arc<Notify>>,
}

/// The open streams of the lawyer service.
#[derive(Default)]
pub struct Streams {
    next_id: AtomicU64,
    state: Mutex<State>,
}

/// 128 random bits, hex: a delivery token nobody guesses.
fn random_token() -> Option<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).ok()?;
    Some(hex::encode(bytes))
}

impl Streams {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens a stream for `licence`; it ends when the guard is dropped.
    pub fn open(self: &Arc<Self>, licence: &str) -> (StreamGuard, Arc<Notify>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let mut state = self.state();
        state.sessions.insert(id, (licence.to_owned(), 0));
        let notify = state
            .notifiers
            .entry(licence.to_owned())
            .or_default()
            .clone();
        (
            StreamGuard {
                streams: self.clone(),
                id,
            },
            notify,
        )
    }

    /// Wakes `licence`'s open streams, if any.
    pub fn notify(&self, licence: &str) {
        if let Some(notify) = self.state().notifiers.get(licence) {
            notify.notify_waiters();
        }
    }

    /// How many deliveries stream `session` holds unacknowledged.
    #[must_use]
    pub fn outstanding(&self, session: u64) -> usize {
        self.state().sessions.get(&session).map_or(0, |s| s.1)
    }

    /// How many deliveries of `licence` are pending on any open stream.
    #[must_use]
    pub fn held_of(&self, licence: &str) -> usize {
        self.state()
            .pending
            .values()
            .filter(|p| p.licence == licence)
            .count()
    }

    /// Holds a delivery for stream `session` and returns its token, or
    /// `None` when it is pending on another stream (or the stream ended).
    #[must_use]
    pub fn hold(
        &self,
        session: u64,
        envelope_id: &str,
        referral: &str,
        kind: &str,
    ) -> Option<String> {
        let mut state = self.state();
        let licence = state.sessions.get(&session)?.0.clone();
        let key = (licence.clone(), envelope_id.to_owned());
        if state.held.contains_key(&key) {
            return None;
        }
        let token = random_token()?;
        state.held.insert(key, token.clone());
        state.pending.insert(
            token.clone(),
            Pending {
                session,
                licence,
                envelope_id: envelope_id.to_owned(),
                referral: referral.to_owned(),
                kind: kind.to_owned(),
                handed_at: Utc::now(),
                acknowledging: false,
            },
        );
        if let Some(s) = state.sessions.get_mut(&session) {
            s.1 += 1;
        }
        Some(token)
    }

    /// Forgets a delivery that could not be handed over after all.
    pub fn release(&self, token: &str) {
        let mut state = self.state();
        if let Some(p) = state.pending.remove(token) {
            state.held.remove(&(p.licence, p.envelope_id));
            if let Some(s) = state.sessions.get_mut(&p.session) {
                s.1 = s.1.saturating_sub(1);
            }
        }
    }

    /// Takes `licence`'s pending delivery `token` to acknowledge it; it
    /// stays held (no other stream gets it) until [`Streams::done`] or
    /// [`Streams::undo`].
    #[must_use]
    pub fn take(&self, licence: &str, token: &str) -> Option<Pending> {
        let mut state = self.state();
        let pending = state
            .pending
            .get_mut(token)
            .filter(|p| p.licence == licence && !p.acknowledging)?;
        pending.acknowledging = true;
        Some(pending.clone())
    }

    /// The acknowledgements of `tokens` are on disk: forgets them.
    pub fn done(&self, tokens: &[String]) {
        let mut licences = Vec::new();
        {
            let mut state = self.state();
            for token in tokens {
                if let Some(p) = state.pending.remove(token) {
                    state.held.remove(&(p.licence.clone(), p.envelope_id));
                    if let Some(s) = state.sessions.get_mut(&p.session) {
                        s.1 = s.1.saturating_sub(1);
                    }
                    licences.push(p.licence);
                }
            }
        }
        licences.dedup();
        for licence in licences {
            self.notify(&licence);
        }
    }

    /// The acknowledgements of `tokens` could not be recorded: pending
    /// again (or, if their stream ended meanwhile, free for the next).
    pub fn undo(&self, tokens: &[String]) {
        let mut state = self.state();
        for token in tokens {
            let open = match state.pending.get(token) {
                Some(p) => state.sessions.contains_key(&p.session),
                None => continue,
            };
            if open {
                if let Some(p) = state.pending.get_mut(token) {
                    p.acknowledging = false;
                }
            } else if let Some(p) = state.pending.remove(token) {
                state.held.remove(&(p.licence, p.envelope_id));
            }
        }
    }

    /// Ends a stream: what it held unacknowledged is free again (an
    /// acknowledgement being recorded stays until it is).
    fn close(&self, session: u64) {
        let mut state = self.state();
        let Some((licence, _)) = state.sessions.remove(&session) else {
            return;
        };
        let tokens: Vec<String> = state
            .pending
            .iter()
            .filter(|(_, p)| p.session == session && !p.acknowledging)
            .map(|(t, _)| t.clone())
            .collect();
        for token in tokens {
            if let Some(p) = state.pending.remove(&token) {
                state.held.remove(&(p.licence, p.envelope_id));
            }
        }
        if !state.sessions.values().any(|(l, _)| *l == licence) {
            state.notifiers.remove(&licence);
        }
    }
}

/// Ends its stream when dropped.
pub struct StreamGuard {
    streams: Arc<Streams>,
    pub id: u64,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.streams.close(self.id);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_is_held_by_one_stream_and_free_again_when_it_ends() {
        let streams = Arc::new(Streams::default());
        let (one, _) = streams.open("L1");
        let (two, _) = streams.open("L1");
        let token = streams.hold(one.id, "e1", "e1", "letter").unwrap();
        assert_eq!(token.len(), 32);
        assert!(streams.hold(two.id, "e1", "e1", "letter").is_none());
        assert_eq!(streams.outstanding(one.id), 1);
        assert!(streams.take("L2", &token).is_none(), "bound to its lawyer");
        drop(one);
        let again = streams.hold(two.id, "e1", "e1", "letter").unwrap();
        assert_ne!(again, token);
        assert!(
            streams.take("L1", &token).is_none(),
            "the old token is gone"
        );
        assert!(streams.take("L1", &again).is_some());
        assert!(streams.take("L1", &again).is_none(), "taken once");
        streams.undo(std::slice::from_ref(&again));
        assert!(streams.take("L1", &again).is_some());
        streams.done(std::slice::from_ref(&again));
        assert_eq!(streams.outstanding(two.id), 0);
        assert_eq!(streams.held_of("L1"), 0);
    }
}
