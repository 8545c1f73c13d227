//! The HTTP side of the controller: the web dashboard (static pages bundled into the binary),
//! its JSON API, a Server-Sent Events stream for live updates, and Prometheus `/metrics`.
//!
//! The JSON API is the control API over HTTP: each handler builds the gRPC request, with the
//! caller's bearer token as its metadata, and calls the same [`ControlService`] method, so
//! authentication, validation and the response shapes (the `control.proto` messages, snake_case
//! fields) are the gRPC ones.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flywheel_proto::v1::server::ControlService;
use flywheel_proto::v1::*;
use serde::Deserialize;
use serde_json::json;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use crate::Controller;
use crate::api::ControlApi;
use crate::auth::Scope;

/// Static files of the dashboard, compiled in so that nothing is fetched at run time.
const STATIC_FILES: &[(&str, &str, &str)] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../dashboards/web/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../../dashboards/web/style.css"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_str!("../../dashboards/web/vendor/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_str!("../../dashboards/web/vendor/uPlot.min.css"),
    ),
];
const INDEX_HTML: &str = include_str!("../../dashboards/web/index.html");

#[derive(Clone)]
struct Http {
    ctl: Arc<Controller>,
    api: Arc<ControlApi>,
}

pub(crate) fn router(ctl: Arc<Controller>) -> Router {
    let state = Http {
        api: Arc::new(ControlApi { ctl: ctl.clone() }),
        ctl,
    };
    Router::new()
        .route("/", get(index))
        .route("/static/{file}", get(static_file))
        .route("/metrics", get(metrics))
        .route("/api/v1/whoami", get(whoami))
        .route("/api/v1/campaigns", get(list_campaigns))
        .route("/api/v1/campaigns/{id}", get(get_campaign))
        .route("/api/v1/campaigns/{id}/artifacts", get(list_artifacts))
        .route("/api/v1/campaigns/{id}/endpoints", get(list_endpoints))
        .route(
            "/api/v1/campaigns/{id}/rounds/{round_index}/cards",
            get(get_round_cards),
        )
        .route("/api/v1/campaigns/{id}/events", get(list_events))
        .route("/api/v1/campaigns/{id}/retry-stage", post(retry_stage))
        .route("/api/v1/campaigns/{id}/extend", post(extend))
        .route("/api/v1/campaigns/{id}/{action}", post(campaign_action))
        .route("/api/v1/workers", get(list_workers))
        .route("/api/v1/tasks/{id}", get(get_task))
        .route("/api/v1/schedules", get(list_schedules))
        .route("/api/v1/stream", get(stream))
        .fallback(not_found)
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(state)
}

/// The page may load only its own bundled files (no inline scripts, no other origins), may not be
/// framed, and API answers, which carry campaign data, are never cached.
async fn security_headers(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let api = req.uri().path().starts_with("/api/");
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
             img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; \
             form-action 'self'; object-src 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if api {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    res
}

/// A gRPC status as an HTTP error with a JSON body `{"error", "code"}`.
struct ApiError(Status);

impl From<Status> for ApiError {
    fn from(s: Status) -> Self {
        Self(s)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self.0.code() {
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::InvalidArgument => StatusCode::BAD_REQUEST,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::FailedPrecondition | Code::AlreadyExists => StatusCode::CONFLICT,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let code = format!("{:?}", self.0.code());
        let body = Json(json!({ "error": self.0.message(), "code": code }));
        (status, body).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// The gRPC request the control API expects: the message plus the caller's bearer token.
fn grpc<T>(headers: &HeaderMap, message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
    {
        req.metadata_mut().insert("authorization", value);
    }
    req
}

/// A query string that does not parse is a 400 with the JSON error body, like any other.
fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t).map_err(|e| {
        ApiError(Status::invalid_argument(format!(
            "query string: {}",
            e.body_text()
        )))
    })
}

fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(t)| t).map_err(|e| {
        ApiError(Status::invalid_argument(format!(
            "request body: {}",
            e.body_text()
        )))
    })
}

async fn index() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        INDEX_HTML,
    )
}

async fn static_file(Path(file): Path<String>) -> Response {
    match STATIC_FILES.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, body)) => (
            [
                (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            ],
            *body,
        )
            .into_response(),
        None => not_found().await.into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError(Status::not_found("no such page or endpoint"))
}

async fn metrics(State(s): State<Http>) -> Response {
    match crate::metrics::render(&s.ctl).await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => ApiError(Status::from(e)).into_response(),
    }
}

async fn whoami(State(s): State<Http>, headers: HeaderMap) -> ApiResult<serde_json::Value> {
    let who = s.ctl.auth.require(&grpc(&headers, ()), Scope::Read).await?;
    Ok(Json(
        json!({ "name": who.name, "scope": who.scope.as_str() }),
    ))
}

async fn list_campaigns(
    State(s): State<Http>,
    headers: HeaderMap,
) -> ApiResult<ListCampaignsResponse> {
    let req = grpc(&headers, ListCampaignsRequest {});
    Ok(Json(s.api.list_campaigns(req).await?.into_inner()))
}

async fn get_campaign(
    State(s): State<Http>,
    Path(campaign_id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<CampaignDetail> {
    let req = grpc(&headers, CampaignRef { campaign_id });
    Ok(Json(s.api.get_campaign(req).await?.into_inner()))
}

#[derive(Deserialize)]
struct ArtifactsQuery {
    #[serde(default)]
    kind: String,
}

async fn list_artifacts(
    State(s): State<Http>,
    Path(campaign_id): Path<String>,
    q: Result<Query<ArtifactsQuery>, QueryRejection>,
    headers: HeaderMap,
) -> ApiResult<ListArtifactsResponse> {
    let q = query(q)?;
    let req = grpc(
        &headers,
        ListArtifactsRequest {
            campaign_id,
            kind: q.kind,
        },
    );
    Ok(Json(s.api.list_artifacts(req).await?.into_inner()))
}

async fn list_endpoints(
    State(s): State<Http>,
    Path(campaign_id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<ListEndpointsResponse> {
    let req = grpc(&headers, CampaignRef { campaign_id });
    Ok(Json(s.api.list_endpoints(req).await?.into_inner()))
}

async fn get_round_cards(
    State(s): State<Http>,
    Path((campaign_id, round_index)): Path<(String, i32)>,
    headers: HeaderMap,
) -> ApiResult<RoundCards> {
    let req = grpc(
        &headers,
        RoundRef {
            campaign_id,
            round_index,
        },
    );
    Ok(Json(s.api.get_round_cards(req).await?.into_inner()))
}

#[derive(Deserialize)]
struct EventsQuery {
    #[serde(default)]
    after_id: i64,
    #[serde(default)]
    limit: u32,
}

async fn list_events(
    State(s): State<Http>,
    Path(campaign_id): Path<String>,
    q: Result<Query<EventsQuery>, QueryRejection>,
    headers: HeaderMap,
) -> ApiResult<ListEventsResponse> {
    let q = query(q)?;
    let req = grpc(
        &headers,
        ListEventsRequest {
            campaign_id,
            after_id: q.after_id,
            limit: q.limit,
        },
    );
    Ok(Json(s.api.list_events(req).await?.into_inner()))
}

#[derive(Deserialize, Default)]
struct ActionBody {
    #[serde(default)]
    reason: String,
}

async fn campaign_action(
    State(s): State<Http>,
    Path((campaign_id, action)): Path<(String, String)>,
    headers: HeaderMap,
    b: Result<Json<ActionBody>, JsonRejection>,
) -> ApiResult<Campaign> {
    let reason = match b {
        // An empty body is fine: no reason given.
        Err(JsonRejection::MissingJsonContentType(_)) => String::new(),
        other => body(other)?.reason,
    };
    let req = grpc(
        &headers,
        CampaignAction {
            campaign_id,
            reason,
        },
    );
    let campaign = match action.as_str() {
        "pause" => s.api.pause_campaign(req).await?,
        "resume" => s.api.resume_campaign(req).await?,
        "cancel" => s.api.cancel_campaign(req).await?,
        other => {
            return Err(ApiError(Status::not_found(format!(
                "unknown campaign action {other:?} (pause, resume, cancel, retry-stage, extend)"
            ))));
        }
    };
    Ok(Json(campaign.into_inner()))
}

#[derive(Deserialize)]
struct RetryBody {
    round_index: i32,
    stage: String,
}

async fn retry_stage(
    State(s): State<Http>,
    Path(campaign_id): Path<String>,
    headers: HeaderMap,
    b: Result<Json<RetryBody>, JsonRejection>,
) -> ApiResult<RetryStageResponse> {
    let b = body(b)?;
    let req = grpc(
        &headers,
        RetryStageRequest {
            campaign_id,
            round_index: b.round_index,
            stage: b.stage,
        },
    );
    Ok(Json(s.api.retry_stage(req).await?.into_inner()))
}

#[derive(Deserialize)]
struct ExtendBody {
    rounds: u32,
    #[serde(default)]
    reason: String,
}

async fn extend(
    State(s): State<Http>,
    Path(campaign_id): Path<String>,
    headers: HeaderMap,
    b: Result<Json<ExtendBody>, JsonRejection>,
) -> ApiResult<Campaign> {
    let b = body(b)?;
    let req = grpc(
        &headers,
        ExtendCampaignRequest {
            campaign_id,
            rounds: b.rounds,
            reason: b.reason,
        },
    );
    Ok(Json(s.api.extend_campaign(req).await?.into_inner()))
}

async fn list_workers(State(s): State<Http>, headers: HeaderMap) -> ApiResult<ListWorkersResponse> {
    let req = grpc(&headers, ListWorkersRequest {});
    Ok(Json(s.api.list_workers(req).await?.into_inner()))
}

async fn get_task(
    State(s): State<Http>,
    Path(task_id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<TaskDetail> {
    let req = grpc(&headers, TaskRef { task_id });
    Ok(Json(s.api.get_task(req).await?.into_inner()))
}

async fn list_schedules(
    State(s): State<Http>,
    headers: HeaderMap,
) -> ApiResult<ListSchedulesResponse> {
    let req = grpc(&headers, ListSchedulesRequest {});
    Ok(Json(s.api.list_schedules(req).await?.into_inner()))
}

#[derive(Deserialize)]
struct StreamQuery {
    /// Browsers' EventSource cannot send headers, so the stream also takes the token here.
    #[serde(default)]
    access_token: String,
}

/// Server-Sent Events: `change` (with the controller's change counter) after every commit that
/// wrote events, and `tick` every 2 s so that progress and heartbeat ages refresh too.
async fn stream(
    State(s): State<Http>,
    q: Result<Query<StreamQuery>, QueryRejection>,
    mut headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let q = query(q)?;
    if !q.access_token.is_empty()
        && let Ok(v) = HeaderValue::from_str(&format!("Bearer {}", q.access_token))
    {
        headers.insert(header::AUTHORIZATION, v);
    }
    s.ctl.auth.require(&grpc(&headers, ()), Scope::Read).await?;
    let mut changed = s.ctl.events.subscribe();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                r = changed.changed() => {
                    if r.is_err() {
                        return;
                    }
                    let n = *changed.borrow_and_update();
                    SseEvent::default().event("change").data(n.to_string())
                }
                _ = tokio::time::sleep(Duration::from_secs(2)) => {
                    SseEvent::default().event("tick").data("")
                }
                _ = tx.closed() => return,
            };
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
    });
    Ok(Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default()))
}
