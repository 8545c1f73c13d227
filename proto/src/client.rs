use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status, Streaming};

use crate::pb::control_service_client::ControlServiceClient;
use crate::pb::worker_service_client::WorkerServiceClient;
use crate::pb::*;

/// Errors from building a client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid controller address {addr:?}: {source}")]
    Address {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error("cannot connect to controller at {addr}: {source}")]
    Connect {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error("token is not valid in a header")]
    Token,
}

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub(crate) struct BearerToken(MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

fn bearer(token: &str) -> Result<BearerToken, ClientError> {
    format!("Bearer {token}")
        .parse()
        .map(BearerToken)
        .map_err(|_| ClientError::Token)
}

/// Connects a channel to the controller (`http://host:port`).
pub async fn connect_channel(addr: &str) -> Result<Channel, ClientError> {
    Endpoint::from_shared(addr.to_string())
        .map_err(|source| ClientError::Address {
            addr: addr.to_string(),
            source,
        })?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|source| ClientError::Connect {
            addr: addr.to_string(),
            source,
        })
}

type Authed = InterceptedService<Channel, BearerToken>;

/// Client of the worker protocol, one method per RPC.
#[derive(Clone)]
pub struct WorkerClient {
    inner: WorkerServiceClient<Authed>,
}

impl WorkerClient {
    pub fn new(channel: Channel, token: &str) -> Result<Self, ClientError> {
        Ok(Self {
            inner: WorkerServiceClient::with_interceptor(channel, bearer(token)?),
        })
    }

    #[tracing::instrument(skip_all)]
    pub async fn register(&mut self, req: RegisterRequest) -> Result<RegisterResponse, Status> {
        Ok(self.inner.register(req).await?.into_inner())
    }

    #[tracing::instrument(skip_all)]
    pub async fn stream_assignments(
        &mut self,
        worker_id: String,
    ) -> Result<Streaming<Assignment>, Status> {
        Ok(self
            .inner
            .stream_assignments(StreamAssignmentsRequest { worker_id })
            .await?
            .into_inner())
    }

    pub async fn heartbeat(&mut self, req: HeartbeatRequest) -> Result<HeartbeatResponse, Status> {
        Ok(self.inner.heartbeat(req).await?.into_inner())
    }

    #[tracing::instrument(skip_all, fields(task_id = %req.task_id, attempt = req.attempt))]
    pub async fn complete_task(&mut self, req: CompleteTaskRequest) -> Result<(), Status> {
        self.inner.complete_task(req).await?;
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(task_id = %req.task_id, attempt = req.attempt))]
    pub async fn fail_task(&mut self, req: FailTaskRequest) -> Result<FailTaskResponse, Status> {
        Ok(self.inner.fail_task(req).await?.into_inner())
    }

    /// Heartbeats, completions and failures in one call; see `Report` in `worker.proto`.
    pub async fn report(&mut self, req: ReportRequest) -> Result<ReportResponse, Status> {
        Ok(self.inner.report(req).await?.into_inner())
    }
}

/// Client of the control API, one method per RPC.
#[derive(Clone)]
pub struct ControlClient {
    inner: ControlServiceClient<Authed>,
}

impl ControlClient {
    pub fn new(channel: Channel, token: &str) -> Result<Self, ClientError> {
        Ok(Self {
            inner: ControlServiceClient::with_interceptor(channel, bearer(token)?),
        })
    }

    /// Connects to `addr` and authenticates with `token`.
    pub async fn connect(addr: &str, token: &str) -> Result<Self, ClientError> {
        Self::new(connect_channel(addr).await?, token)
    }

    pub async fn create_campaign(&mut self, spec_yaml: String) -> Result<Campaign, Status> {
        let req = CreateCampaignRequest {
            spec_yaml,
            params: Default::default(),
            request_id: String::new(),
        };
        Ok(self.inner.create_campaign(req).await?.into_inner())
    }

    /// Creates a campaign from a template and its parameter values.
    pub async fn create_campaign_from(
        &mut self,
        req: CreateCampaignRequest,
    ) -> Result<Campaign, Status> {
        Ok(self.inner.create_campaign(req).await?.into_inner())
    }

    pub async fn get_campaign(&mut self, campaign_id: String) -> Result<CampaignDetail, Status> {
        let req = CampaignRef { campaign_id };
        Ok(self.inner.get_campaign(req).await?.into_inner())
    }

    pub async fn list_campaigns(&mut self) -> Result<Vec<Campaign>, Status> {
        let req = ListCampaignsRequest {};
        Ok(self.inner.list_campaigns(req).await?.into_inner().campaigns)
    }

    pub async fn pause_campaign(&mut self, req: CampaignAction) -> Result<Campaign, Status> {
        Ok(self.inner.pause_campaign(req).await?.into_inner())
    }

    pub async fn resume_campaign(&mut self, req: CampaignAction) -> Result<Campaign, Status> {
        Ok(self.inner.resume_campaign(req).await?.into_inner())
    }

    pub async fn cancel_campaign(&mut self, req: CampaignAction) -> Result<Campaign, Status> {
        Ok(self.inner.cancel_campaign(req).await?.into_inner())
    }

    pub async fn retry_stage(&mut self, req: RetryStageRequest) -> Result<Vec<String>, Status> {
        Ok(self.inner.retry_stage(req).await?.into_inner().task_ids)
    }

    pub async fn list_rounds(&mut self, campaign_id: String) -> Result<Vec<Round>, Status> {
        let req = CampaignRef { campaign_id };
        Ok(self.inner.list_rounds(req).await?.into_inner().rounds)
    }

    /// The data card and model card of a finished round (`round_index` 0-based).
    pub async fn round_cards(
        &mut self,
        campaign_id: String,
        round_index: i32,
    ) -> Result<Vec<RoundCard>, Status> {
        let req = RoundRef {
            campaign_id,
            round_index,
        };
        Ok(self.inner.get_round_cards(req).await?.into_inner().cards)
    }

    pub async fn list_workers(&mut self) -> Result<Vec<Worker>, Status> {
        let req = ListWorkersRequest {};
        Ok(self.inner.list_workers(req).await?.into_inner().workers)
    }

    pub async fn list_artifacts(
        &mut self,
        req: ListArtifactsRequest,
    ) -> Result<Vec<Artifact>, Status> {
        Ok(self.inner.list_artifacts(req).await?.into_inner().artifacts)
    }

    pub async fn list_endpoints(
        &mut self,
        campaign_id: String,
    ) -> Result<Vec<ServedEndpoint>, Status> {
        let req = CampaignRef { campaign_id };
        Ok(self.inner.list_endpoints(req).await?.into_inner().endpoints)
    }

    pub async fn stream_events(
        &mut self,
        campaign_id: String,
        after_id: i64,
    ) -> Result<Streaming<Event>, Status> {
        let req = StreamEventsRequest {
            campaign_id,
            after_id,
        };
        Ok(self.inner.stream_events(req).await?.into_inner())
    }

    pub async fn extend_campaign(
        &mut self,
        req: ExtendCampaignRequest,
    ) -> Result<Campaign, Status> {
        Ok(self.inner.extend_campaign(req).await?.into_inner())
    }

    pub async fn set_promotion_gate(
        &mut self,
        req: SetPromotionGateRequest,
    ) -> Result<Campaign, Status> {
        Ok(self.inner.set_promotion_gate(req).await?.into_inner())
    }

    pub async fn create_schedule(
        &mut self,
        req: CreateScheduleRequest,
    ) -> Result<Schedule, Status> {
        Ok(self.inner.create_schedule(req).await?.into_inner())
    }

    pub async fn list_schedules(&mut self) -> Result<Vec<Schedule>, Status> {
        let req = ListSchedulesRequest {};
        Ok(self.inner.list_schedules(req).await?.into_inner().schedules)
    }

    /// A schedule (by id or name) with its most recent runs.
    pub async fn get_schedule(&mut self, schedule: String) -> Result<ScheduleDetail, Status> {
        Ok(self
            .inner
            .get_schedule(ScheduleRef { schedule })
            .await?
            .into_inner())
    }

    pub async fn pause_schedule(&mut self, schedule: String) -> Result<Schedule, Status> {
        Ok(self
            .inner
            .pause_schedule(ScheduleRef { schedule })
            .await?
            .into_inner())
    }

    pub async fn resume_schedule(&mut self, schedule: String) -> Result<Schedule, Status> {
        Ok(self
            .inner
            .resume_schedule(ScheduleRef { schedule })
            .await?
            .into_inner())
    }

    pub async fn delete_schedule(&mut self, schedule: String) -> Result<(), Status> {
        self.inner.delete_schedule(ScheduleRef { schedule }).await?;
        Ok(())
    }
}
