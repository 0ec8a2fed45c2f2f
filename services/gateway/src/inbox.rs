//! Open `Inbox` streams and the deliveries each holds unacknowledged.
//!
//! Each stream has its own AMQP channel and consumer. A delivery token names
//! the stream, the connection generation and the delivery tag; `Acknowledge`
//! finds the stream's acker by it. When a stream ends, its channel closes and
//! the broker returns every unacknowledged delivery to the queue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use lapin::Acker;

use crate::GatewayError;

/// The open streams of a service.
#[derive(Default)]
pub struct Sessions {
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Session>>>,
}

/// A delivery handed to the client and not yet acknowledged.
struct Pending {
    generation: u64,
    acker: Acker,
    message_id: String,
    referral: String,
}

/// A pending delivery, taken to be acknowledged.
pub struct Taken {
    pub acker: Acker,
    /// The envelope's id.
    pub message_id: String,
    /// The referral its hops are filed under.
    pub referral: String,
}

/// One open `Inbox` stream.
pub struct Session {
    pub id: u64,
    pub agency: String,
    pending: Mutex<HashMap<String, Pending>>,
}

impl Sessions {
    /// Registers a new stream for `agency`.
    pub fn open(self: &Arc<Self>, agency: &str) -> SessionGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let session = Arc::new(Session {
            id,
            agency: agency.to_owned(),
            pending: Mutex::new(HashMap::new()),
        });
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, session.clone());
        SessionGuard {
            sessions: self.clone(),
            session,
        }
    }

    /// The number of open streams.
    #[must_use]
    pub fn len(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a delivery of `message_id` on the connection `generation` is
    /// pending (handed over, not yet acknowledged) on an open stream of
    /// `agency`. A pending delivery of an earlier connection does not count:
    /// it can no longer be acknowledged, and the broker delivers it again.
    #[must_use]
    pub fn is_pending(&self, agency: &str, message_id: &str, generation: u64) -> bool {
        let sessions: Vec<Arc<Session>> = self
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|s| s.agency == agency)
            .cloned()
            .collect();
        sessions.iter().any(|s| {
            s.pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
                .any(|p| p.message_id == message_id && p.generation >= generation)
        })
    }

    /// Takes the acker of a pending delivery of `agency`.
    ///
    /// # Errors
    /// [`GatewayError::DeliveryGone`] when the token is malformed, names
    /// another agency's stream, a stream that has ended, or a delivery
    /// already acknowledged.
    pub fn take(&self, agency: &str, token: &str) -> Result<Taken, GatewayError> {
        let session_id: u64 = token
            .split('-')
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                GatewayError::DeliveryGone(format!("`{token}` is not a delivery token"))
            })?;
        let session = self
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&session_id)
            .cloned()
            .filter(|s| s.agency == agency)
            .ok_or_else(|| {
                GatewayError::DeliveryGone(format!(
                    "`{token}` belongs to no open Inbox stream of `{agency}`; if its stream ended, the message went back to the queue and will be delivered again"
                ))
            })?;
        session
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(token)
            .map(|p| Taken {
                acker: p.acker,
                message_id: p.message_id,
                referral: p.referral,
            })
            .ok_or_else(|| GatewayError::DeliveryGone(format!("`{token}` is not pending: already acknowledged, or lost with the broker connection (it will be delivered again)")))
    }
}

/// Removes its session from the open set when the stream ends.
pub struct SessionGuard {
    sessions: Arc<Sessions>,
    pub session: Arc<Session>,
}

impl Session {
    /// Records an unacknowledged delivery and returns its token. Deliveries
    /// from an earlier connection are forgotten: the broker redelivers them.
    pub fn register(
        &self,
        generation: u64,
        delivery_tag: u64,
        acker: Acker,
        message_id: String,
        referral: String,
    ) -> String {
        let token = format!("{}-{generation}-{delivery_tag}", self.id);
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.retain(|_, p| p.generation >= generation);
        pending.insert(
            token.clone(),
            Pending {
                generation,
                acker,
                message_id,
                referral,
            },
        );
        token
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.sessions
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.session.id);
    }
}
