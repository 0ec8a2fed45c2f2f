//! A lawyer register for tests of the agency side of lawyers, while the
//! lawyer service runs elsewhere: a `LawyerRegistry` server that answers
//! with the registrations it is given exactly as they were published on the
//! bus (the envelope's bytes and its signature header, taken off the
//! `lawyer-service` inbox queue), as the lawyer service keeps them.
//! Nothing is re-signed: what an agency service believes of it, it believes
//! of the registrar's signature.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use lapin::message::BasicGetMessage;
use prost::Message;
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::lawyer_registry_server::{LawyerRegistry, LawyerRegistryServer};
use refbus_proto::v1::{Envelope, GetLawyerRequest, LawyerEntry};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// The entries served, by licence number.
type Entries = Arc<Mutex<HashMap<String, LawyerEntry>>>;

/// A running register on a free loopback port.
pub struct PublishedRegister {
    pub addr: SocketAddr,
    entries: Entries,
    shutdown: CancellationToken,
}

#[derive(Clone)]
struct Served(Entries);

#[tonic::async_trait]
impl LawyerRegistry for Served {
    async fn get_lawyer(
        &self,
        request: Request<GetLawyerRequest>,
    ) -> Result<Response<LawyerEntry>, Status> {
        let licence = request.into_inner().licence_number;
        self.0
            .lock()
            .unwrap()
            .get(&licence)
            .cloned()
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("lawyer `{licence}` is not registered")))
    }
}

/// The signature header of a message taken off a queue.
#[must_use]
pub fn signature_of(message: &BasicGetMessage) -> String {
    let headers = message.properties.headers().clone().unwrap_or_default();
    match headers.inner().get(refbus_core::signing::SIGNATURE_HEADER) {
        Some(lapin::types::AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("no signature header: {other:?}"),
    }
}

/// The register entry of a `LawyerRegistration` message as published.
#[must_use]
pub fn entry_of(message: &BasicGetMessage) -> LawyerEntry {
    let envelope = Envelope::decode(message.data.as_slice()).unwrap();
    let Some(Payload::LawyerRegistration(registration)) = envelope.payload else {
        panic!("not a lawyer registration: {envelope:?}");
    };
    LawyerEntry {
        registration: Some(registration),
        registered_by: envelope.sender,
        signed_registration: message.data.clone(),
        signature: signature_of(message),
        updated_at: envelope.submitted_at,
    }
}

impl PublishedRegister {
    /// Serves an empty register.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let entries: Entries = Arc::default();
        let shutdown = CancellationToken::new();
        let served = Served(entries.clone());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(LawyerRegistryServer::new(served))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    stop.cancelled_owned(),
                )
                .await
                .unwrap();
        });
        Self {
            addr,
            entries,
            shutdown,
        }
    }

    /// `http://` and the address, for `LawyerServiceSettings::url`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Serves `entry` from now on, replacing the lawyer's earlier one.
    pub fn insert(&self, entry: LawyerEntry) {
        let licence = entry
            .registration
            .as_ref()
            .and_then(|r| r.lawyer.as_ref())
            .map(|l| l.licence_number.clone())
            .unwrap();
        self.entries.lock().unwrap().insert(licence, entry);
    }

    pub fn stop(&self) {
        self.shutdown.cancel();
    }
}
