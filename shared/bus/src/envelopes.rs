//! Signed envelopes on their way to the broker, alone or in batches
//! (issue 17).
//!
//! Every envelope goes to `NS.deliveries` with its routing key
//! (`RECIPIENT.KIND`, and CC for `also_to`), so the broker's fan-out puts
//! it in the recipient's inbox and in the tracker's tap alike: nobody who
//! may publish can reach an inbox and skip the tracker's copy. What changes
//! under load is how many envelopes one AMQP message carries:
//!
//! - **A lane per sender and route**: envelopes of the same sender for the
//!   same routing key and CC list share a lane. A lane has at most
//!   [`LANE_IN_FLIGHT`] publishes waiting for their confirms.
//! - **Alone while the lane has room**: the envelope is signed and
//!   published as it always was (its own message, signature header,
//!   `message-id`, `type`), from the caller's own task; at a light load
//!   nothing changes, on the wire or in latency (an envelope never waits
//!   for another's confirm while fewer than [`LANE_IN_FLIGHT`] are in
//!   flight).
//! - **Batched behind a full lane**: an envelope that finds its lane full
//!   waits; when one of the publishes in flight is confirmed, everything
//!   that waited goes out as one `refbus.v1.EnvelopeBatch` (up to
//!   [`PUBLISH_BATCH_ENVELOPES`] envelopes or [`PUBLISH_BATCH_BYTES`]),
//!   from a task of the lane's own, so that a caller that gives up never
//!   takes the others' publish with it. Group commit, no timer.
//! - **A batch is signed once**: the lane signs the list of its envelopes'
//!   SHA-256 digests with the sender's key (`digests_signature`), one
//!   Ed25519 signature for the batch instead of one per envelope; only an
//!   envelope that must keep a signature of its own
//!   ([`EnvelopeOut::keeps_own_signature`]) is signed alone as well.
//! - **Each envelope's own confirm**: a caller's publish returns when the
//!   broker has confirmed the message that carries its envelope, and fails
//!   when that message fails.
//!
//! Consumers unpack a batch into its envelopes, each checked on its own
//! (see [`crate::subscription`]).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use prost::Message;
use refbus_core::signing::{SIGNATURE_HEADER, Signed, SignerKey, digest_list};
use refbus_proto::v1::{EnvelopeBatch, SignedEnvelope};
use tokio::sync::oneshot;

use crate::subscription::{ENVELOPE_BATCH_CONTENT_TYPE, ENVELOPE_BATCH_TYPE};
use crate::{Bus, BusError, Outgoing};

/// The most publishes of one route waiting for their confirms at once;
/// more envelopes wait for the next batch. One in flight made an envelope
/// that came while another's confirm was awaited wait for it at a light
/// load too (at 500 msg/s, one in six). Four (the seventh to fifteenth
/// stops of issue 17) put 9 envelopes in a message at saturation, two put
/// 15: every AMQP message costs the broker, the inbox and the tracker
/// alike, and with two refbus carried about 6 % more at saturation
/// (BENCHMARKS.md, issue 17, fifteenth stop), while at 500 msg/s the
/// latency did not change.
pub const LANE_IN_FLIGHT: usize = 2;
/// The most envelopes a publisher puts in one batch.
pub const PUBLISH_BATCH_ENVELOPES: usize = 256;
/// The most envelope bytes a publisher puts in one batch (an envelope
/// larger than this goes alone).
pub const PUBLISH_BATCH_BYTES: usize = 1024 * 1024;

/// One envelope to publish, with the key it is signed with.
#[derive(Clone, Debug)]
pub struct EnvelopeOut {
    /// `RECIPIENT.KIND`.
    pub routing_key: String,
    /// Further routing keys (the envelope's `also_to`).
    pub cc: Vec<String>,
    /// The envelope's id (AMQP `message-id`).
    pub id: String,
    /// The kind's code name (AMQP `type`).
    pub kind: String,
    /// The encoded envelope, exactly the bytes signed.
    pub body: Vec<u8>,
    /// The sender's key (the envelope's `sender`).
    pub key: SignerKey,
    /// Whether the envelope keeps a signature of its own in a batch too:
    /// what a recipient keeps as proof on its own (a lawyer registration,
    /// which the register stores with its registrar's signature).
    pub keeps_own_signature: bool,
}

impl EnvelopeOut {
    /// The sender's signature of the envelope alone.
    fn own_signature(&self) -> String {
        self.key.sign(Signed::Envelope, &self.body)
    }

    fn alone<'a>(&'a self, exchange: &'a str) -> Outgoing<'a> {
        let mut message = Outgoing::new(exchange, &self.routing_key, &self.body);
        message.message_id = Some(&self.id);
        message.kind = Some(&self.kind);
        message.headers = vec![(SIGNATURE_HEADER, self.own_signature())];
        message.cc.clone_from(&self.cc);
        message
    }
}

/// A lane: the sender, the routing key and the CC list.
type Route = (String, String, Vec<String>);

/// An envelope waiting for its lane, and where its outcome goes.
struct Waiting {
    envelope: EnvelopeOut,
    outcome: oneshot::Sender<Result<(), BusError>>,
}

/// A route with publishes in flight, and the envelopes waiting for room.
#[derive(Default)]
struct Lane {
    in_flight: usize,
    waiting: Vec<Waiting>,
}

/// The lanes of one bus: present while a publish is in flight on it.
#[derive(Default)]
pub(crate) struct Lanes {
    busy: Mutex<HashMap<Route, Lane>>,
}

impl Lanes {
    fn lock(&self) -> MutexGuard<'_, HashMap<Route, Lane>> {
        self.busy.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One publish of `route` is over: takes the next batch of what waits,
    /// the lane's room passing to it, or gives the room back (and forgets
    /// the lane once nothing is in flight).
    fn next_batch(&self, route: &Route) -> Option<Vec<Waiting>> {
        let mut busy = self.lock();
        let lane = busy.get_mut(route)?;
        if lane.waiting.is_empty() {
            lane.in_flight = lane.in_flight.saturating_sub(1);
            if lane.in_flight == 0 {
                busy.remove(route);
            }
            return None;
        }
        Some(take_batch(&mut lane.waiting))
    }
}

/// A copy of an error for each envelope a failed batch carried.
fn replicate(error: &BusError) -> BusError {
    match error {
        BusError::Unavailable(reason) => BusError::Unavailable(reason.clone()),
        BusError::Unroutable {
            exchange,
            routing_key,
        } => BusError::Unroutable {
            exchange: exchange.clone(),
            routing_key: routing_key.clone(),
        },
        BusError::Nacked => BusError::Nacked,
        other => BusError::Unavailable(other.to_string()),
    }
}

/// A place in the lane's room, taken by a caller that found room: when it
/// ends, what waited meanwhile goes out from a task of the lane's own (also
/// when the caller gave up half-way), or the place is given back.
struct Turn {
    bus: Bus,
    route: Option<Route>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        let Some(route) = self.route.take() else {
            return;
        };
        let Some(batch) = self.bus.lanes().next_batch(&route) else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(drain(self.bus.clone(), route, batch));
            }
            // No runtime: the process is ending, and the waiting callers'
            // publishes fail with it (their outcome senders are dropped).
            Err(_) => {
                drop(batch);
                self.bus.lanes().lock().remove(&route);
            }
        }
    }
}

/// Publishes `batch`, then what waits on `route`, a batch at a time, until
/// nothing does.
async fn drain(bus: Bus, route: Route, mut batch: Vec<Waiting>) {
    let exchange = bus.topology().deliveries_exchange();
    loop {
        let result = match batch.as_slice() {
            [one] => bus.publish(one.envelope.alone(&exchange)).await,
            _ => publish_batch(&bus, &exchange, &route, &batch).await,
        };
        for waiting in batch {
            let outcome = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(replicate(e)),
            };
            // A caller that gave up is not there to hear it.
            let _ = waiting.outcome.send(outcome);
        }
        match bus.lanes().next_batch(&route) {
            Some(next) => batch = next,
            None => return,
        }
    }
}

/// The oldest envelopes waiting, up to a batch's limits (at least one).
fn take_batch(waiting: &mut Vec<Waiting>) -> Vec<Waiting> {
    let mut count = 0;
    let mut bytes = 0;
    for w in waiting.iter() {
        if count > 0
            && (count == PUBLISH_BATCH_ENVELOPES
                || bytes + w.envelope.body.len() > PUBLISH_BATCH_BYTES)
        {
            break;
        }
        count += 1;
        bytes += w.envelope.body.len();
    }
    waiting.drain(..count).collect()
}

/// The `envelope_batch` message carrying `taken` (all of one sender),
/// signed once: the sender's signature over its envelopes' digests.
fn batch_of(taken: &[Waiting]) -> EnvelopeBatch {
    let digests = digest_list(taken.iter().map(|w| w.envelope.body.as_slice()));
    let digests_signature = taken.first().map_or_else(String::new, |w| {
        w.envelope.key.sign(Signed::EnvelopeDigests, &digests)
    });
    EnvelopeBatch {
        digests,
        envelopes: taken
            .iter()
            .map(|w| SignedEnvelope {
                signature: if w.envelope.keeps_own_signature {
                    w.envelope.own_signature()
                } else {
                    String::new()
                },
                envelope: w.envelope.body.clone(),
                id: w.envelope.id.clone(),
                kind: w.envelope.kind.clone(),
            })
            .collect(),
        digests_signature,
    }
}

/// One `envelope_batch` message carrying `taken`, confirmed.
async fn publish_batch(
    bus: &Bus,
    exchange: &str,
    route: &Route,
    taken: &[Waiting],
) -> Result<(), BusError> {
    let body = batch_of(taken).encode_to_vec();
    let mut message = Outgoing::new(exchange, &route.1, &body);
    message.kind = Some(ENVELOPE_BATCH_TYPE);
    message.content_type = ENVELOPE_BATCH_CONTENT_TYPE;
    message.cc.clone_from(&route.2);
    // Counted as the envelopes it carries, under their kind.
    let kind = taken.first().map(|w| w.envelope.kind.as_str());
    bus.publish_counted(message, kind, taken.len() as u64).await
}

impl Bus {
    /// Publishes an envelope to `NS.deliveries`, signed with its sender's
    /// key, and waits for the broker's confirm of the message that carries
    /// it: alone while its lane has room, else in the next batch of that
    /// lane, signed once (see the module's doc).
    ///
    /// # Errors
    /// As [`Bus::publish`], for the message that carried the envelope.
    pub async fn publish_envelope(&self, envelope: EnvelopeOut) -> Result<(), BusError> {
        let route = (
            envelope.key.signer().to_owned(),
            envelope.routing_key.clone(),
            envelope.cc.clone(),
        );
        let lanes = self.lanes();
        let outcome = {
            let mut busy = lanes.lock();
            let lane = busy.entry(route.clone()).or_default();
            if lane.in_flight < LANE_IN_FLIGHT && lane.waiting.is_empty() {
                lane.in_flight += 1;
                Ok(envelope)
            } else {
                let (outcome, heard) = oneshot::channel();
                lane.waiting.push(Waiting { envelope, outcome });
                Err(heard)
            }
        };
        match outcome {
            Ok(envelope) => {
                let _turn = Turn {
                    bus: self.clone(),
                    route: Some(route),
                };
                let exchange = self.topology().deliveries_exchange();
                self.publish(envelope.alone(&exchange)).await
            }
            Err(heard) => heard.await.unwrap_or_else(|_| {
                Err(BusError::Unavailable(
                    "the bus shut down before the envelope's batch was published".into(),
                ))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(bytes: usize) -> Waiting {
        sent_by("a", vec![0; bytes], false)
    }

    fn sent_by(signer: &str, body: Vec<u8>, keeps_own_signature: bool) -> Waiting {
        let (outcome, _) = oneshot::channel();
        Waiting {
            envelope: EnvelopeOut {
                routing_key: "a.k".into(),
                cc: Vec::new(),
                id: String::new(),
                kind: "k".into(),
                body,
                key: SignerKey::development(signer),
                keeps_own_signature,
            },
            outcome,
        }
    }

    fn directory() -> refbus_core::directory::Directory {
        refbus_core::directory::Directory::load(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/local/directory.toml"
        ))
        .unwrap()
    }

    /// Only verdict `index` is a refusal, and it says `why`.
    fn refused_alone(
        verdicts: &[Result<(), refbus_core::signing::SignatureError>],
        index: usize,
        why: &str,
    ) {
        for (i, verdict) in verdicts.iter().enumerate() {
            match verdict {
                Err(e) if i == index => assert!(e.to_string().contains(why), "{e}"),
                _ => assert_eq!(verdict.is_ok(), i != index, "verdict {i}: {verdict:?}"),
            }
        }
    }

    /// Issue 17: a batch carries one signature, over its envelopes'
    /// digests, and each envelope is believed by its entry; only what keeps
    /// its own signature carries one too. One envelope altered, or claimed
    /// by another sender, is refused alone.
    #[test]
    fn a_batch_is_signed_once_and_each_envelope_believed_by_its_entry() {
        use refbus_core::signing::{Claim, Proof, Seal, SignedDigests, verify_many};
        const CENTRE: &str = "dz-detention-centre";
        let taken: Vec<Waiting> = (0..5u8)
            .map(|i| sent_by(CENTRE, vec![i; 300], i == 4))
            .collect();
        let batch = batch_of(&taken);
        assert!(!batch.digests_signature.is_empty(), "the batch is signed");
        let own: Vec<bool> = batch
            .envelopes
            .iter()
            .map(|e| !e.signature.is_empty())
            .collect();
        assert_eq!(own, [false, false, false, false, true]);

        let list = std::sync::Arc::new(SignedDigests {
            signature: batch.digests_signature.clone(),
            digests: batch.digests.clone(),
        });
        assert_eq!(
            list.digests,
            refbus_core::signing::digest_list(
                batch.envelopes.iter().map(|e| e.envelope.as_slice())
            ),
            "the list of the envelopes' digests, in order"
        );
        let proofs: Vec<Proof> = (0..5)
            .map(|index| Proof::Listed {
                list: list.clone(),
                index,
            })
            .collect();
        let mut bodies: Vec<Vec<u8>> = batch.envelopes.iter().map(|e| e.envelope.clone()).collect();
        let directory = directory();
        let judge = |bodies: &[Vec<u8>], signers: &[&str]| {
            let claims: Vec<Claim<'_>> = bodies
                .iter()
                .zip(&proofs)
                .zip(signers)
                .map(|((body, proof), signer)| Claim {
                    signer,
                    what: Signed::Envelope,
                    body,
                    seal: proof.as_seal(),
                })
                .collect();
            verify_many(&directory, &claims)
        };
        let signers = [CENTRE; 5];
        assert!(judge(&bodies, &signers).iter().all(Result::is_ok));
        // The own signature verifies alone too.
        assert_eq!(
            refbus_core::signing::verify(
                &directory,
                CENTRE,
                Signed::Envelope,
                &bodies[4],
                Some(&batch.envelopes[4].signature)
            ),
            Ok(())
        );

        // Altered after signing: that one alone.
        bodies[1][0] ^= 1;
        refused_alone(&judge(&bodies, &signers), 1, "not entry 1");
        bodies[1][0] ^= 1;

        // Claimed by another sender: the list does not verify with its key.
        let verdicts = judge(&bodies, &[CENTRE, CENTRE, "dz-court", CENTRE, CENTRE]);
        refused_alone(&verdicts, 2, "`dz-court`");

        // A list signed by another key: every envelope on it refused.
        let forged = std::sync::Arc::new(SignedDigests {
            signature: SignerKey::development("dz-court")
                .sign(Signed::EnvelopeDigests, &list.digests),
            digests: list.digests.clone(),
        });
        let seal = Seal::Listed {
            list: &forged,
            index: 0,
        };
        let claims = [Claim {
            signer: CENTRE,
            what: Signed::Envelope,
            body: &bodies[0],
            seal,
        }];
        assert!(verify_many(&directory, &claims)[0].is_err());
    }

    #[test]
    fn a_publish_that_ends_passes_its_room_to_what_waits_or_gives_it_back() {
        let lanes = Lanes::default();
        let route: Route = ("a".into(), "a.k".into(), Vec::new());
        lanes.lock().insert(
            route.clone(),
            Lane {
                in_flight: 2,
                waiting: vec![waiting(1), waiting(1)],
            },
        );
        let batch = lanes.next_batch(&route).expect("what waited goes next");
        assert_eq!(batch.len(), 2);
        assert_eq!(
            lanes.lock()[&route].in_flight,
            2,
            "the room passed to the batch"
        );
        assert!(lanes.next_batch(&route).is_none());
        assert_eq!(lanes.lock()[&route].in_flight, 1, "a place given back");
        assert!(lanes.next_batch(&route).is_none());
        assert!(
            lanes.lock().is_empty(),
            "a lane with nothing in flight is forgotten"
        );
    }

    #[test]
    fn a_batch_stops_at_its_count_or_its_bytes_and_never_comes_out_empty() {
        let mut many: Vec<Waiting> = (0..PUBLISH_BATCH_ENVELOPES + 3)
            .map(|_| waiting(10))
            .collect();
        assert_eq!(take_batch(&mut many).len(), PUBLISH_BATCH_ENVELOPES);
        assert_eq!(take_batch(&mut many).len(), 3);
        assert!(many.is_empty());

        let mut large = vec![
            waiting(PUBLISH_BATCH_BYTES / 2 + 1),
            waiting(PUBLISH_BATCH_BYTES / 2),
            waiting(1),
        ];
        assert_eq!(
            take_batch(&mut large).len(),
            1,
            "the second would pass the byte limit"
        );
        assert_eq!(take_batch(&mut large).len(), 2);

        let mut huge = vec![waiting(PUBLISH_BATCH_BYTES * 2), waiting(1)];
        assert_eq!(
            take_batch(&mut huge).len(),
            1,
            "an envelope over the limit goes alone"
        );
        assert_eq!(take_batch(&mut huge).len(), 1);
    }
}
