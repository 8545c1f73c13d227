use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use flywheel_proto::v1::server::ControlService;
use flywheel_proto::v1::*;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::convert;
use crate::auth::Scope;
use crate::error::{Error, parse_id};
use crate::spec::CampaignSpec;
use crate::{Controller, limits, ops, schedules, store};
use flywheel_proto::state::Steer;

pub(crate) struct ControlApi {
    pub(crate) ctl: Arc<Controller>,
}

impl ControlApi {
    async fn rounds(&self, campaign_id: uuid::Uuid) -> Result<Vec<Round>, Error> {
        let mut conn = self.ctl.pool.acquire().await?;
        let rounds = store::rounds::list(&mut conn, campaign_id).await?;
        let tasks = store::tasks::list_for_campaign(&mut conn, campaign_id).await?;
        let campaign = store::campaigns::get(&mut conn, campaign_id)
            .await?
            .ok_or_else(|| Error::NotFound {
                what: "campaign",
                id: campaign_id.to_string(),
            })?;
        let needs = CampaignSpec::stored(campaign.id, &campaign.spec)?
            .stages
            .into_iter()
            .map(|st| (st.name, st.needs))
            .collect();
        Ok(convert::rounds(
            rounds,
            tasks,
            &self.ctl.registry.connected_capabilities(),
            &needs,
        ))
    }
}

#[tonic::async_trait]
impl ControlService for ControlApi {
    type StreamEventsStream = Pin<Box<dyn Stream<Item = Result<Event, Status>> + Send>>;

    async fn create_campaign(
        &self,
        req: Request<CreateCampaignRequest>,
    ) -> Result<Response<Campaign>, Status> {
        let who = self.ctl.auth.require(&req, Scope::Admin).await?;
        let r = req.into_inner();
        limits::text("spec_yaml", &r.spec_yaml, limits::MAX_SPEC_BYTES)?;
        limits::entries("params", r.params.len())?;
        for (k, v) in &r.params {
            limits::name("params", k)?;
            limits::text("params", v, limits::MAX_TEXT_BYTES)?;
        }
        if !r.request_id.is_empty() {
            limits::name("request_id", &r.request_id)?;
        }
        let params = r.params.into_iter().collect();
        let spec_yaml = r.spec_yaml;
        let (spec_yaml, spec) = crate::off_runtime(move || {
            let yaml = schedules::render_submission(&spec_yaml, &params)?;
            let spec = CampaignSpec::from_yaml(&yaml)?;
            Ok((yaml, spec))
        })
        .await?;
        let request_id = Some(r.request_id).filter(|id| !id.is_empty());
        let c =
            ops::create_campaign(&self.ctl, &spec_yaml, &spec, request_id.as_deref(), &who).await?;
        Ok(Response::new(convert::campaign(c)))
    }

    async fn get_campaign(
        &self,
        req: Request<CampaignRef>,
    ) -> Result<Response<CampaignDetail>, Status> {
        self.ctl.auth.require(&req, Scope::Read).await?;
        let id = parse_id("campaign_id", &req.get_ref().campaign_id)?;
        let c = ops::get(&self.ctl, id).await?;
        let spec_yaml = c.spec_yaml.clone();
        let rounds = self.rounds(id).await?;
        Ok(Response::new(CampaignDetail {
            campaign: Some(convert::campaign(c)),
            rounds,
            spec_yaml,
        }))
    }

    async fn list_campaigns(
        &self,
        req: Request<ListCampaignsRequest>,
    ) -> Result<Response<ListCampaignsResponse>, Status> {
        self.ctl.auth.require(&req, Scope::Read).await?;
        let mut conn = self.ctl.pool.acquire().await.map_err(Error::from)?;
        let rows = store::campaigns::list(&mut conn)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(ListCampaignsResponse {
            campaigns: rows.into_iter().map(convert::campaign).collect(),
        }))
    }

    async fn pause_campaign(
        &self,
        req: Request<CampaignAction>,
    ) -> Result<Response<Campaign>, Status> {
        let who = self.ctl.auth.require(&req, Scope::Admin).await?;
        let id = parse_id("campaign_id", &req.get_ref().campaign_id)?;
        Ok(Response::new(convert::campaign(
            ops::steer(&self.ctl, id, Steer::Pause, &req.get_ref().reason, &who).await?,
        )))
    }

    async fn resume_campaign(
        &self,
        req: Request<CampaignAction>,
    ) -> Result<Response<Campaign>, Status> {
        let who = self.ctl.auth.require(&req, Scope::Admin).await?;
        let id = parse_id("campaign_id", &req.get_ref().campaign_id)?;
        Ok(Response::new(convert::campaign(
            ops::steer(&self.ctl, id, Steer::Resume, &req.get_ref().reason, &who).await?,
        )))
    }

    async fn cancel_campaign(
        &self,
        req: Request<CampaignAction>,
    ) -> Result<Response<Campaign>, Status> {
        let who = self.ctl.auth.require(&req, Scope::Admin).await?;
        let id = parse_id("campaign_id", &req.get_ref().campaign_id)?;
        Ok(Response::new(convert::campaign(
            ops::steer(&self.ctl, id, Steer::Cancel, &req.get_ref().reason, &who).await?,
        )))
    }

    async fn retry_stage(
        &self,
        req: Request<RetryStageRequest>,
    ) -> Result<Response<RetryStageResponse>, Status> {
        let who = self.ctl.auth.require(&req, Scope::Admin).await?;
        let r = req.get_ref();
        let id = parse_id("campaign_id", &r.campaign_id)?;
        if r.stage.trim().is_empty() {
            return Err(Error::invalid("stage", "must name a stage of the recipe").into());
        }
        let ids = ops::retry_stage(&self.ctl, id, r.round_index, &r.stage, &who).await?;
        Ok(Response::new(RetryStageResponse {
            task_ids: ids.iter().map(ToString::to_string).collect(),
        }))
    }

    async fn list_rounds(
        &self,
        req: Request<CampaignRef>,
    ) -> Result<Response<ListRoundsResponse>, Status> {
        self.ctl.auth.require(&req, Scope::Read).await?;
        let id = parse_id("campaign_id", &req.get_ref().campaign_id)?;
        ops::get(&self.ctl, id).await?;
        Ok(Response::new(ListRoundsResponse {
            rounds: self.rounds(id).await?,
        }))
    }

    async fn get_round_cards(
        &self,
        req: Request<RoundRef>,
    ) -> Result<Response<RoundCards>, Status> {
        self.ctl.auth.require(&req, Scope::Read).await?;
        let r = req.get_ref();
        let id = parse_id("campaign_id", &r.campaign_id)?;
        ops::get(&self.ctl, id).await?;
        let mut conn = self.ctl.pool.acquire().await.map_err(Error::from)?;
        let round = store::rounds::find(&mut conn, id, r.round_index)
            .await
            .map_err(Error::from)?
            .ok_or_else(|| Error::NotFound {
                what: "round",
                id: format!("index {} of campaign {id}", r.round_index),
            })?;
        let cards = store::round_cards::list_for_round(&mut conn, round.id)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(RoundCards {
            cards: cards
                .into_iter()
                .map(|c| RoundCard {
                    kind: c.kind,
                    markdown: c.markdown,
                    content_hash: c.content_hash,
                })
                .collect(),
        }))
    }

    async fn list_workers(
        &self,
        req: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        self.ctl.auth.require(&req, Scope::Read).await?;
        let mut conn = self.ctl.pool.acquire().await.map_err(Error::from)?;
        // A worker silent for three lease periods is shown offline, whichever controller it
        // was connected to.
        let stale_after_ms = 3 * self.ctl.config.lease_ttl_ms as i64;
        let mut rows = store::workers::list(&mut conn, stale_after_ms)
            .await
            .map_err(Error::from)?;
        // This controller's own workers: their heartbeats, from memory.
        for w in &mut rows {
            if let Some((age_s, connected)) = self.ctl.registry.liveness(w.id) {
                w.heartbeat_age_s = age_s;
                let online = connected && age_s * 1000.0 < stale_after_ms as f64;
                w.status = if online { "online" } else { "offline" }.into();
            }
        }
        Ok(Response::new(ListWorkersResponse {
            workers: rows.into_iter().map(convert::worker).collect(),
        }))
    }

    async fn list_artifacts(
        &self,
        req: Request<ListArtifactsRequest>,
    ) -> Result<Response<ListArtifactsResponse>, Status> {
        self.ctl.auth.require(&req, Scope::Read).await?;
        let r = req.get_ref();
        let id = parse_id("campaign_id", &r.campaign_id)?;
        let kind = match r.kind.as_str() {
            "" => None,
            k @ ("dataset" | "model") => Some(k),
            other => {
                return Err(Error::invalid(
                    "kind",
                    format!("{other:?} must be \"dataset\", \"model\" or empty"),
                )
                .into());
            }
        };
        ops::get(&self.ctl, id).await?;
        let mut conn = self.ctl.pool.acquire().await.map_err(Error::from)?;
        let rows = store::artifacts::list(&mut conn, id, kind)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(ListArtifactsResponse {
            artifacts: rows.into_iter().map(convert::artifact).collect(),
        }))
    }

    async fn list_endpoints(
        &self,
        req: Request<CampaignRef>,
    ) -> Result<Response<ListEndpointsResponse>, Status> {
        self.ctl.auth.require(&req, Scope::Read).await?;
        let id = parse_id("campaign_id", &req.get_ref().campaign_id)?;
        ops::get(&self.ctl, id).await?;
        let mut conn = self.ctl.pool.acquire().await.map_err(Error::from)?;
        let rows = store::endpoints::list(&mut conn, id)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(ListEndpointsResponse {
            endpoints: rows.into_iter().map(convert::endpoint).collect(),
        }))
    }

    async fn stream_events(
        &self,
        req: Request<StreamEventsRequest>,
    ) -> Result<Response<Self::StreamEventsStream>, Status> {
        self.ctl.auth.require(&req, Scope::Read).await?;
        let id = parse_id("campaign_id", &req.get_ref().campaign_id)?;
        ops::get(&self.ctl, id).await?;
        let mut after = req.get_ref().after_id;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let ctl = self.ctl.clone();
        let mut changed = ctl.events.subscribe();
        let mut stopping = ctl.stopping.clone();
        tokio::spawn(async move {
            loop {
                let rows = match ctl.pool.acquire().await {
                    Ok(mut conn) => store::events::list_after(&mut conn, id, after, 500).await,
                    Err(e) => Err(e),
                };
                let rows = match rows {
                    Ok(rows) => rows,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(Error::from(e)))).await;
                        return;
                    }
                };
                let full = rows.len() == 500;
                for row in rows {
                    after = row.id;
                    if tx.send(Ok(convert::event(row))).await.is_err() {
                        return;
                    }
                }
                if full {
                    continue;
                }
                tokio::select! {
                    _ = changed.changed() => {}
                    // Events written by another controller on the same database.
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = tx.closed() => return,
                    _ = stopping.wait_for(|s| *s) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_events(
        &self,
        req: Request<ListEventsRequest>,
    ) -> Result<Response<ListEventsResponse>, Status> {
        self.ctl.auth.require(&req, Scope::Read).await?;
        let r = req.get_ref();
        let id = parse_id("campaign_id", &r.campaign_id)?;
        ops::get(&self.ctl, id).await?;
        let limit = if r.limit == 0 { 500 } else { r.limit.min(5000) };
        let mut conn = self.ctl.pool.acquire().await.map_err(Error::from)?;
        let rows = store::events::list_after(&mut conn, id, r.after_id, limit as i64)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(ListEventsResponse {
            events: rows.into_iter().map(convert::event).collect(),
        }))
    }

    async fn get_task(&self, req: Request<TaskRef>) -> Result<Response<TaskDetail>, Status> {
        self.ctl.auth.require(&req, Scope::Read).await?;
        let id = parse_id("task_id", &req.get_ref().task_id)?;
        let mut conn = self.ctl.pool.acquire().await.map_err(Error::from)?;
        let task = store::tasks::get(&mut conn, id)
            .await
            .map_err(Error::from)?
            .ok_or_else(|| Error::NotFound {
                what: "task",
                id: id.to_string(),
            })?;
        let attempts = store::attempts::list_for_task(&mut conn, id)
            .await
            .map_err(Error::from)?;
        let depends_on = store::task_edges::dependencies(&mut conn, id)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(convert::task_detail(
            task,
            attempts,
            depends_on,
            &self.ctl.registry.connected_capabilities(),
        )))
    }

    async fn extend_campaign(
        &self,
        req: Request<ExtendCampaignRequest>,
    ) -> Result<Response<Campaign>, Status> {
        let who = self.ctl.auth.require(&req, Scope::Admin).await?;
        let r = req.get_ref();
        let id = parse_id("campaign_id", &r.campaign_id)?;
        let c = ops::extend(&self.ctl, id, r.rounds, &r.reason, &who).await?;
        Ok(Response::new(convert::campaign(c)))
    }

    async fn set_promotion_gate(
        &self,
        req: Request<SetPromotionGateRequest>,
    ) -> Result<Response<Campaign>, Status> {
        let who = self.ctl.auth.require(&req, Scope::Admin).await?;
        let r = req.get_ref();
        let id = parse_id("campaign_id", &r.campaign_id)?;
        let require = r
            .require
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let c = ops::set_gate(&self.ctl, id, &r.stage, &require, &r.reason, &who).await?;
        Ok(Response::new(convert::campaign(c)))
    }

    async fn create_schedule(
        &self,
        req: Request<CreateScheduleRequest>,
    ) -> Result<Response<Schedule>, Status> {
        let who = self.ctl.auth.require(&req, Scope::Admin).await?;
        let new = convert::new_schedule(req.into_inner());
        let now = chrono::Utc::now();
        let s = schedules::create(&self.ctl.pool, &new, &who.name, now).await?;
        Ok(Response::new(convert::schedule(s, now)))
    }

    async fn list_schedules(
        &self,
        req: Request<ListSchedulesRequest>,
    ) -> Result<Response<ListSchedulesResponse>, Status> {
        self.ctl.auth.require(&req, Scope::Read).await?;
        let now = chrono::Utc::now();
        let rows = schedules::list(&self.ctl.pool).await?;
        Ok(Response::new(ListSchedulesResponse {
            schedules: rows
                .into_iter()
                .map(|s| convert::schedule(s, now))
                .collect(),
        }))
    }

    async fn get_schedule(
        &self,
        req: Request<ScheduleRef>,
    ) -> Result<Response<ScheduleDetail>, Status> {
        self.ctl.auth.require(&req, Scope::Read).await?;
        let s = schedules::get(&self.ctl.pool, &req.get_ref().schedule).await?;
        let runs = schedules::recent_runs(&self.ctl.pool, s.id, 100).await?;
        Ok(Response::new(ScheduleDetail {
            schedule: Some(convert::schedule(s, chrono::Utc::now())),
            runs: runs.into_iter().map(convert::schedule_run).collect(),
        }))
    }

    async fn pause_schedule(
        &self,
        req: Request<ScheduleRef>,
    ) -> Result<Response<Schedule>, Status> {
        let who = self.ctl.auth.require(&req, Scope::Admin).await?;
        let s = schedules::pause(&self.ctl.pool, &req.get_ref().schedule, &who.name).await?;
        Ok(Response::new(convert::schedule(s, chrono::Utc::now())))
    }

    async fn resume_schedule(
        &self,
        req: Request<ScheduleRef>,
    ) -> Result<Response<Schedule>, Status> {
        let who = self.ctl.auth.require(&req, Scope::Admin).await?;
        let now = chrono::Utc::now();
        let s = schedules::resume(&self.ctl.pool, &req.get_ref().schedule, &who.name, now).await?;
        Ok(Response::new(convert::schedule(s, now)))
    }

    async fn delete_schedule(
        &self,
        req: Request<ScheduleRef>,
    ) -> Result<Response<DeleteScheduleResponse>, Status> {
        let who = self.ctl.auth.require(&req, Scope::Admin).await?;
        schedules::delete(&self.ctl.pool, &req.get_ref().schedule, &who.name).await?;
        Ok(Response::new(DeleteScheduleResponse {}))
    }
}
