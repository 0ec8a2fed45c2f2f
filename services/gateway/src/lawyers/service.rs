//! The tonic face of the lawyer service: `LawyerService` (every call
//! authenticated as the lawyer it names) and the public `LawyerRegistry`,
//! with the gRPC health of both; errors mapped to `Status` once, in
//! [`super::LawyerError`].

use std::sync::Arc;

use refbus_proto::v1::lawyer_registry_server::{LawyerRegistry, LawyerRegistryServer};
use refbus_proto::v1::lawyer_service_server::{LawyerService, LawyerServiceServer};
use refbus_proto::v1::{
    AcknowledgeResponse, FileComplaintRequest, GetLawyerRequest, LawyerAcknowledgeRequest,
    LawyerDelivery, LawyerEntry, LawyerInboxRequest, RateMeetingRequest, Receipt,
    RequestMeetingRequest,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::server::NamedService;
use tonic::transport::server::Router;
use tonic::{Request, Response, Status};

use super::{LawyerCore, LawyerError};
use crate::app::MAX_GRPC_MESSAGE;
use crate::observe;

/// `LawyerService` over a [`LawyerCore`].
#[derive(Clone)]
pub struct LawyerRpcs(pub Arc<LawyerCore>);

/// `LawyerRegistry` over a [`LawyerCore`]: public, no credentials.
#[derive(Clone)]
pub struct RegistryRpcs(pub Arc<LawyerCore>);

/// Adds the lawyer service's gRPC services and their health to `router`.
pub async fn routes(router: Router, lawyers: &Arc<LawyerCore>) -> Router {
    let health = observe::health_service(
        lawyers.core.bus.clone(),
        vec![
            <LawyerServiceServer<LawyerRpcs> as NamedService>::NAME,
            <LawyerRegistryServer<RegistryRpcs> as NamedService>::NAME,
        ],
        lawyers.core.shutdown.clone(),
    )
    .await;
    router
        .add_service(health)
        .add_service(
            LawyerServiceServer::new(LawyerRpcs(lawyers.clone()))
                .max_decoding_message_size(MAX_GRPC_MESSAGE),
        )
        .add_service(LawyerRegistryServer::new(RegistryRpcs(lawyers.clone())))
}

impl LawyerRpcs {
    /// Runs one call, counting it in `rejected` if it fails.
    async fn counted<T>(
        &self,
        rpc: &'static str,
        call: impl Future<Output = Result<T, LawyerError>>,
    ) -> Result<Response<T>, Status> {
        let result = call.await.map_err(Status::from);
        if let Err(status) = &result {
            self.0.core.metrics.reject(rpc, status);
        }
        result.map(Response::new)
    }
}

#[tonic::async_trait]
impl LawyerService for LawyerRpcs {
    async fn request_meeting(
        &self,
        request: Request<RequestMeetingRequest>,
    ) -> Result<Response<Receipt>, Status> {
        self.counted("RequestMeeting", async {
            let licence = request.get_ref().licence_number.clone();
            let (lawyer, _) = self
                .0
                .authenticate(&request, "licence_number", &licence)
                .await?;
            self.0.request_meeting(&lawyer, request.into_inner()).await
        })
        .await
    }

    async fn file_complaint(
        &self,
        request: Request<FileComplaintRequest>,
    ) -> Result<Response<Receipt>, Status> {
        self.counted("FileComplaint", async {
            let licence = request.get_ref().licence_number.clone();
            let (lawyer, _) = self
                .0
                .authenticate(&request, "licence_number", &licence)
                .await?;
            self.0.file_complaint(&lawyer, request.into_inner()).await
        })
        .await
    }

    async fn rate_meeting(
        &self,
        request: Request<RateMeetingRequest>,
    ) -> Result<Response<Receipt>, Status> {
        self.counted("RateMeeting", async {
            let licence = request.get_ref().licence_number.clone();
            let (lawyer, _) = self
                .0
                .authenticate(&request, "licence_number", &licence)
                .await?;
            self.0.rate_meeting(&lawyer, request.into_inner()).await
        })
        .await
    }

    type InboxStream = ReceiverStream<Result<LawyerDelivery, Status>>;

    async fn inbox(
        &self,
        request: Request<LawyerInboxRequest>,
    ) -> Result<Response<Self::InboxStream>, Status> {
        self.counted("Inbox", async {
            let licence = request.get_ref().licence_number.clone();
            let (lawyer, credential) = self
                .0
                .authenticate(&request, "licence_number", &licence)
                .await?;
            Ok(self
                .0
                .inbox(lawyer.licence, credential, request.get_ref().window))
        })
        .await
    }

    async fn acknowledge(
        &self,
        request: Request<LawyerAcknowledgeRequest>,
    ) -> Result<Response<AcknowledgeResponse>, Status> {
        self.counted("Acknowledge", async {
            let licence = request.get_ref().licence_number.clone();
            let (lawyer, _) = self
                .0
                .authenticate(&request, "licence_number", &licence)
                .await?;
            let not_pending = self
                .0
                .acknowledge(&lawyer.licence, request.into_inner())
                .await?;
            Ok(AcknowledgeResponse { not_pending })
        })
        .await
    }
}

#[tonic::async_trait]
impl LawyerRegistry for RegistryRpcs {
    async fn get_lawyer(
        &self,
        request: Request<GetLawyerRequest>,
    ) -> Result<Response<LawyerEntry>, Status> {
        let licence = request.into_inner().licence_number;
        Ok(Response::new(self.0.entry(&licence).await?))
    }
}
