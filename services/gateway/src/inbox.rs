//! Open `Inbox` streams and the deliveries each holds unacknowledged.
//!
//! Each stream has its own AMQP channel and consumer. A delivery token names
//! this process (a random instance number, so a token from before a restart
//! matches nothing), the stream, the channel and the delivery tag: tags
//! restart on every channel, so after the broker closed a channel and the
//! stream opened another, an old token still names its own delivery and
//! never a new one (issue 16).
//!
//! A message is handed over once while it is pending. Another delivery of
//! the same message id that arrives meanwhile (a second publish of a
//! retried `Submit`, or the broker's redelivery after it closed the channel
//! the first came on) is not handed over again and not acked: it is held
//! with the pending one, and the client's `Acknowledge` of the first token
//! acks every copy. So the token the client holds stays good across a
//! channel the broker closed, and nothing is acked that the client did not
//! acknowledge. When a stream ends, whatever it held goes back to the queue
//! (its channel closes; copies held from other channels are returned with
//! `nack`), which costs nothing: the queues have no delivery limit.
//!
//! An envelope of a batch message (issue 17) is a delivery of its own here:
//! its token adds its index in the batch (`.N`), and the stream's window
//! counts it (each pending delivery holds one of the stream's permits),
//! since one AMQP message may carry many.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, Utc};
use refbus_bus::Acker;
use refbus_bus::subscription::{Part, return_to_queue};
use tokio::sync::OwnedSemaphorePermit;

use crate::GatewayError;

/// What the gateway learnt from a verified delivery about the referral it
/// belongs to: enough to check a reply to it without trusting the client's
/// copy. Kept while the delivery is pending, and on disk once acknowledged
/// (see [`crate::acknowledged`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    /// The id the referral is tracked under (a relayed lead's original id).
    pub referral: String,
    /// The message kind's code name.
    pub kind: String,
    /// Where an answer goes: the referral's sender, or a lead's finder.
    pub reply_to: String,
    /// A lead's relays an answer passes back through (DZ-8), nearest first.
    pub relays: Vec<String>,
    /// Whether this agency answers it: every addressee of a referral, and
    /// of a lead only its handling organ, the last hop of its route (DZ-8).
    pub answers: bool,
    /// SHA-256 (hex) of the payload as delivered: a relayed lead or the
    /// referral passed back with `Feedback` must be exactly this one.
    pub payload_digest: String,
    /// The lawyer who submitted the referral through the lawyer service
    /// (its `from_lawyer`): an answer to the lawyer service is addressed to
    /// them (`to_lawyers`). Empty for a referral from an agency.
    pub from_lawyer: String,
    /// CQ-3.13: the complaining lawyer (licence number) of a rights
    /// complaint a body entered, which no lawyer service sent: the result
    /// is fed back to the lawyer as well. Empty otherwise.
    pub complainant: String,
}

/// A pending delivery, taken to be acknowledged.
pub struct Taken {
    /// The token it was taken by.
    pub token: String,
    /// Every delivery of the message held: the one handed over and copies.
    pub ackers: Vec<Acker>,
    /// The envelope's id.
    pub message_id: String,
    pub received: Received,
    /// When it was handed over on the stream.
    pub handed_at: DateTime<Utc>,
    /// Held until its broker acks have gone out (or it is pending again):
    /// its stream's channel is not closed before (see [`SessionGuard::end`]).
    pub in_flight: InFlight,
}

/// An acknowledgement in flight on a stream's session: counted from
/// [`Sessions::take`] until dropped.
pub struct InFlight {
    sessions: Arc<Sessions>,
    session: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        {
            let mut state = self.sessions.state();
            if let Some(n) = state.acknowledging.get_mut(&self.session) {
                *n -= 1;
                if *n == 0 {
                    state.acknowledging.remove(&self.session);
                }
            }
        }
        self.sessions.settled.notify_waiters();
    }
}

/// A message handed over on a stream and not yet acknowledged.
struct Pending {
    session: u64,
    agency: String,
    message_id: String,
    received: Received,
    handed_at: DateTime<Utc>,
    ackers: Vec<Acker>,
    /// Taken by an `Acknowledge` whose record is not yet on disk: still
    /// pending for copies that arrive meanwhile (held, then acked with it),
    /// no longer for a second `Acknowledge`.
    acknowledging: bool,
    /// Its place in the stream's window, given back when it is forgotten.
    _window: Option<OwnedSemaphorePermit>,
}

#[derive(Default)]
struct State {
    /// Open streams: session id → agency.
    sessions: HashMap<u64, String>,
    /// Acknowledgements in flight ([`InFlight`]) by session.
    acknowledging: HashMap<u64, usize>,
    /// Pending deliveries by token.
    pending: HashMap<String, Pending>,
    /// The token of each pending (agency, message id).
    by_message: HashMap<(String, String), String>,
    /// Recently acknowledged (agency, message id), oldest first: a copy
    /// that passed the on-disk check just before its twin's record landed
    /// is still not handed over again.
    recent: std::collections::VecDeque<(String, String)>,
    recent_set: std::collections::HashSet<(String, String)>,
}

/// How many acknowledged ids [`State::recent`] keeps.
const RECENT: usize = 65_536;

/// The open streams of a service and what they hold.
pub struct Sessions {
    /// Random per process: tokens of an earlier run match nothing.
    instance: u32,
    next_id: AtomicU64,
    state: Mutex<State>,
    /// Woken whenever an acknowledgement in flight settles.
    settled: tokio::sync::Notify,
}

impl Default for Sessions {
    fn default() -> Self {
        // The random low bits of a UUIDv7.
        let random = uuid::Uuid::now_v7().as_u128() & u128::from(u32::MAX);
        Self {
            instance: u32::try_from(random).unwrap_or_default(),
            next_id: AtomicU64::new(0),
            state: Mutex::new(State::default()),
            settled: tokio::sync::Notify::new(),
        }
    }
}

/// Whether a delivery was held with one already pending, or is new.
pub enum Offer {
    /// Held as a copy of the pending delivery; not handed over again.
    Held,
    /// Not pending anywhere: here is its acker back.
    New(Acker),
}

impl Sessions {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a new stream for `agency`.
    pub fn open(self: &Arc<Self>, agency: &str) -> SessionGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.state().sessions.insert(id, agency.to_owned());
        SessionGuard {
            sessions: self.clone(),
            id,
            agency: agency.to_owned(),
            ended: false,
        }
    }

    /// The number of open streams.
    #[must_use]
    pub fn len(&self) -> usize {
        self.state().sessions.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The number of messages pending on open streams (handed over, not
    /// yet acknowledged).
    #[must_use]
    pub fn pending(&self) -> usize {
        self.state().pending.len()
    }

    /// Holds a delivery of `message_id` with the pending delivery of the
    /// same message on any open stream of `agency`, if there is one.
    pub fn offer(&self, agency: &str, message_id: &str, acker: Acker) -> Offer {
        let mut state = self.state();
        let key = (agency.to_owned(), message_id.to_owned());
        let Some(token) = state.by_message.get(&key).cloned() else {
            return Offer::New(acker);
        };
        match state.pending.get_mut(&token) {
            Some(pending) => {
                pending.ackers.push(acker);
                Offer::Held
            }
            None => Offer::New(acker),
        }
    }

    /// Registers a delivery handed over on stream `session` and returns its
    /// token, or, when another delivery of the same message became pending
    /// meanwhile, holds it with that one (`None`).
    pub fn register(&self, session: u64, delivery: Handed) -> Option<String> {
        let mut state = self.state();
        let Some(agency) = state.sessions.get(&session).cloned() else {
            // The stream ended: the delivery goes back with its channel.
            return None;
        };
        let key = (agency.clone(), delivery.message_id.clone());
        if let Some(token) = state.by_message.get(&key).cloned()
            && let Some(pending) = state.pending.get_mut(&token)
        {
            pending.ackers.push(delivery.acker);
            return None;
        }
        if state.recent_set.contains(&key) {
            // Acknowledged a moment ago: ack this copy, hand nothing over.
            let acker = delivery.acker;
            tokio::spawn(async move {
                let _ = acker.ack().await;
            });
            return None;
        }
        let mut token = format!(
            "{:08x}-{session}-{}-{}",
            self.instance, delivery.channel, delivery.delivery_tag
        );
        if let Some(part) = delivery.part {
            use std::fmt::Write as _;
            let _ = write!(token, ".{}", part.index);
        }
        state.by_message.insert(key, token.clone());
        state.pending.insert(
            token.clone(),
            Pending {
                session,
                agency,
                message_id: delivery.message_id,
                received: delivery.received,
                handed_at: Utc::now(),
                ackers: vec![delivery.acker],
                acknowledging: false,
                _window: delivery.window,
            },
        );
        Some(token)
    }

    /// What a pending delivery of `agency` says about `referral`, if one is
    /// pending on an open stream.
    #[must_use]
    pub fn received(&self, agency: &str, referral: &str) -> Option<Received> {
        self.state()
            .pending
            .values()
            .find(|p| p.agency == agency && p.received.referral == referral)
            .map(|p| p.received.clone())
    }

    /// Takes a pending delivery of `agency` to acknowledge it. The entry
    /// stays, marked, until [`Sessions::acknowledged`] or
    /// [`Sessions::not_acknowledged`]: a copy that arrives while the
    /// acknowledgement is being recorded is held, not handed over again.
    ///
    /// # Errors
    /// [`GatewayError::DeliveryGone`] when the token is malformed, names
    /// another agency's stream, a stream that has ended, or a delivery
    /// already acknowledged (or being acknowledged).
    pub fn take(self: &Arc<Self>, agency: &str, token: &str) -> Result<Taken, GatewayError> {
        let mut state = self.state();
        let state = &mut *state;
        let pending = state.pending.get_mut(token).filter(|p| {
            p.agency == agency && !p.acknowledging && state.sessions.contains_key(&p.session)
        });
        let Some(pending) = pending else {
            let shown: String = token.chars().take(80).collect();
            return Err(GatewayError::DeliveryGone(format!(
                "`{shown}` is not pending on an open Inbox stream of `{agency}`: already acknowledged, or its stream ended (the message went back to the queue and will be delivered again)"
            )));
        };
        pending.acknowledging = true;
        let session = pending.session;
        let taken = Taken {
            token: token.to_owned(),
            ackers: std::mem::take(&mut pending.ackers),
            message_id: pending.message_id.clone(),
            received: pending.received.clone(),
            handed_at: pending.handed_at,
            in_flight: InFlight {
                sessions: self.clone(),
                session,
            },
        };
        *state.acknowledging.entry(session).or_default() += 1;
        Ok(taken)
    }

    /// The acknowledgement of `token` is on disk: forgets the entry and
    /// returns the copies held with it meanwhile, to be acked too.
    pub fn acknowledged(&self, token: &str) -> Vec<Acker> {
        let mut state = self.state();
        match state.pending.remove(token) {
            Some(p) => {
                let key = (p.agency, p.message_id);
                state.by_message.remove(&key);
                if state.recent_set.insert(key.clone()) {
                    state.recent.push_back(key);
                }
                while state.recent.len() > RECENT {
                    if let Some(old) = state.recent.pop_front() {
                        state.recent_set.remove(&old);
                    }
                }
                p.ackers
            }
            None => Vec::new(),
        }
    }

    /// The acknowledgement of `taken` could not be recorded: its delivery
    /// is pending again, so that the client may retry.
    pub fn not_acknowledged(&self, taken: Taken) {
        let mut returned = None;
        {
            let mut state = self.state();
            match state.pending.get_mut(&taken.token) {
                Some(p) => {
                    p.acknowledging = false;
                    p.ackers.extend(taken.ackers);
                }
                // The stream ended meanwhile: back to the queue.
                None => returned = Some(taken.ackers),
            }
        }
        if let Some(ackers) = returned {
            nack_all(ackers);
        }
    }

    /// Ends a stream: forgets its pending deliveries and returns every copy
    /// they held to the queue (in the background: see [`SessionGuard::end`]
    /// for the order a stream that ends normally keeps).
    fn close(&self, session: u64) {
        nack_all(self.forget(session));
    }

    /// Forgets a stream and its pending deliveries, and gives back every
    /// copy they held.
    fn forget(&self, session: u64) -> Vec<Acker> {
        let mut returned = Vec::new();
        {
            let mut state = self.state();
            state.sessions.remove(&session);
            let tokens: Vec<String> = state
                .pending
                .iter()
                .filter(|(_, p)| p.session == session)
                .map(|(t, _)| t.clone())
                .collect();
            for token in tokens {
                if let Some(p) = state.pending.remove(&token) {
                    state.by_message.remove(&(p.agency, p.message_id));
                    returned.extend(p.ackers);
                }
            }
        }
        // Copies held from other streams' channels would stay unacknowledged
        // there until those streams end: they are returned now. The
        // stream's own deliveries go back when its channel closes, whether
        // or not their nack reaches the broker first.
        returned
    }
}

/// Returns deliveries to their queue (in the background).
fn nack_all(ackers: Vec<Acker>) {
    if ackers.is_empty() {
        return;
    }
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            for acker in ackers {
                return_to_queue(acker).await;
            }
        });
    }
}

/// A delivery about to be handed over.
pub struct Handed {
    pub channel: u64,
    pub delivery_tag: u64,
    /// Which envelope of a batch message it is, if it is one.
    pub part: Option<Part>,
    pub acker: Acker,
    /// Its place in the stream's window, held while it is pending.
    pub window: Option<OwnedSemaphorePermit>,
    pub message_id: String,
    pub received: Received,
}

/// How long a stream that ends waits for the acknowledgements in flight
/// on it ([`SessionGuard::end`]).
const SETTLE: std::time::Duration = std::time::Duration::from_secs(5);

/// Ends its stream's session: with [`SessionGuard::end`], or when dropped.
pub struct SessionGuard {
    sessions: Arc<Sessions>,
    pub id: u64,
    pub agency: String,
    ended: bool,
}

impl SessionGuard {
    /// Ends the session and returns every copy its pending deliveries held
    /// to the queue, each `nack` handed to the connection before this
    /// returns. A stream calls this before it drops its subscription, which
    /// closes the stream's channel: a `nack` that went out after that
    /// `channel.close` would be a frame on a channel the broker has closed,
    /// a connection error ("expected 'channel.open'") that ends every other
    /// stream and `Submit` of the service with it (seen in a test of
    /// streams dropped again and again, `stream_churn`).
    ///
    /// First it waits (up to [`SETTLE`]) for the acknowledgements of its
    /// deliveries already in flight: their broker acks go out on this
    /// channel too, and must not follow its close either. No new one is
    /// taken meanwhile: the session is closed to `Acknowledge` at once.
    pub async fn end(mut self) {
        self.ended = true;
        self.sessions.state().sessions.remove(&self.id);
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            let settled = self.sessions.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            if !self.sessions.state().acknowledging.contains_key(&self.id) {
                break;
            }
            if tokio::time::timeout_at(deadline, settled).await.is_err() {
                tracing::debug!(
                    session = self.id,
                    "acknowledgements still in flight as the stream ends"
                );
                break;
            }
        }
        for acker in self.sessions.forget(self.id) {
            return_to_queue(acker).await;
        }
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if !self.ended {
            self.sessions.close(self.id);
        }
    }
}
