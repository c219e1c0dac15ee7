//! The HTTP JSON API (`/api/v1/...`), authenticated with the admin token.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use thymis_api::{
    AddDevice, Artifact, ArtifactRequest, BuildRequest, CommitRequest, Committed, Device, Enrollment, FileChange,
    Identity, LogLine, ProjectStatus, TaskState,
};

pub use crate::caller::{ApiError, Caller};
use crate::controller::Controller;
use crate::deploy::{self, DeployRequest};
use crate::project::valid_name;

fn not_found(what: String) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, what)
}

type ApiResult<T = Json<Value>> = Result<T, ApiError>;

pub fn router(ctl: Arc<Controller>) -> Router {
    let api = Router::new()
        .route("/devices", get(devices).post(add_device))
        .route("/devices/{name}", get(device_detail))
        .route("/devices/{name}/journal", get(crate::console::journal))
        .route("/devices/{name}/terminal", get(crate::console::terminal))
        .route("/devices/{name}/reenroll", post(reenroll))
        .route("/devices/{name}/revoke", post(revoke))
        .route("/devices/{name}/image", post(device_image))
        .route("/bundles", post(bundle_start))
        .route("/tasks/{id}/artifacts", get(artifacts_list).delete(artifacts_delete))
        .route("/tasks/{id}/artifacts/{file}", get(artifact_download))
        .route("/project/status", get(project_status))
        .route("/project/diff", get(project_diff))
        .route("/project/commit", post(project_commit))
        .route("/project/log", get(project_log))
        .route("/project/configs", get(project_configs))
        .route("/project/files/{*path}", get(read_file).put(write_file).delete(delete_file))
        .route("/deploy/preview", post(deploy_preview))
        .route("/deploy", post(deploy_start))
        .route("/deploy/dry-run", post(deploy_dry_run))
        .route("/build", post(build_start))
        .route("/tasks", get(tasks))
        .route("/tasks/{id}", get(task))
        .route("/tasks/{id}/logs", get(task_logs))
        .route("/tasks/{id}/cancel", post(task_cancel))
        .route("/tasks/{id}/resume", post(task_resume))
        .route("/tasks/{id}/activate", post(task_activate))
        .route("/tasks/{id}/events", get(task_events))
        .route("/secrets", get(secrets_list).post(secret_set))
        .route("/secrets/remove", post(secret_remove))
        .route("/identity", get(identity))
        .route("/stats", get(stats))
        .layer(middleware::from_fn_with_state(ctl.clone(), require_token));
    Router::new()
        .nest("/api/v1", api)
        .route("/", get(crate::ui::index))
        .route("/ui/app.js", get(crate::ui::app_js))
        .route("/ui/style.css", get(crate::ui::style))
        .route("/ui/device.js", get(crate::ui::device_js))
        .route("/ui/vendor/xterm.js", get(crate::ui::xterm_js))
        .route("/ui/vendor/xterm.css", get(crate::ui::xterm_css))
        .route("/ui/login", post(crate::ui::login))
        .route("/ui/logout", post(crate::ui::logout))
        .route("/ui/session", get(crate::ui::session))
        .route("/agent/v1", get(crate::agents::upgrade))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(ctl)
}

/// The admin token (`Authorization: Bearer`), or a browser session whose CSRF token
/// comes with every request that changes something.
async fn require_token(
    State(ctl): State<Arc<Controller>>,
    headers: HeaderMap,
    mut req: Request,
    next: Next,
) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !presented.is_empty() && bool::from(presented.as_bytes().ct_eq(ctl.admin_token.as_bytes())) {
        req.extensions_mut().insert(Caller::Token);
        return next.run(req).await;
    }
    let csrf = crate::ui::session_id(&headers).and_then(|id| ctl.db.session_csrf(&id).ok().flatten());
    if let Some(csrf) = csrf {
        let safe = matches!(*req.method(), axum::http::Method::GET | axum::http::Method::HEAD);
        let sent = headers.get("x-csrf-token").and_then(|v| v.to_str().ok()).unwrap_or("");
        if safe || bool::from(sent.as_bytes().ct_eq(csrf.as_bytes())) {
            req.extensions_mut().insert(Caller::Session { csrf });
            return next.run(req).await;
        }
        return ApiError(StatusCode::FORBIDDEN, "missing or wrong CSRF token".into()).into_response();
    }
    ApiError(StatusCode::UNAUTHORIZED, "missing or wrong token (Authorization: Bearer ...)".into()).into_response()
}

/// Devices as people read them: online, their commit's subject and distance from HEAD,
/// and their deployment under way.
fn annotate_devices(ctl: &Controller, devices: &mut [Device]) -> anyhow::Result<()> {
    let online = ctl.online();
    let head = ctl.project.head().ok();
    let mut open: std::collections::HashMap<String, thymis_api::OpenDeployment> = Default::default();
    for c in ctl.db.open_children()? {
        open.insert(c.device.clone(), thymis_api::OpenDeployment { task: c.task, state: c.stage.state() });
    }
    for d in devices {
        d.online = online.contains(&d.name);
        if let (Some(commit), Some(head)) = (d.commit.as_deref(), head.as_deref()) {
            if let Some(info) = ctl.commits.info(&ctl.project, commit, head) {
                d.commit_subject = Some(info.subject);
                d.behind_head = Some(info.behind);
            }
        }
        d.deployment = open.remove(&d.name);
    }
    Ok(())
}

/// A task as people read it: its commit's subject, and which of its devices are online.
pub(crate) fn annotated_task(ctl: &Controller, id: i64) -> anyhow::Result<Option<thymis_api::Task>> {
    let Some(mut t) = ctl.db.task(id)? else { return Ok(None) };
    if let Some(commit) = t.commit.as_deref() {
        let head = ctl.project.head().unwrap_or_default();
        t.commit_subject = ctl.commits.info(&ctl.project, commit, &head).map(|i| i.subject);
    }
    if !t.children.is_empty() {
        let online = ctl.online();
        for c in &mut t.children {
            c.online = online.contains(&c.device);
            c.copy = ctl.copies.get(c.id);
        }
    }
    Ok(Some(t))
}

async fn device_detail(State(ctl): State<Arc<Controller>>, Path(name): Path<String>) -> ApiResult {
    let Some(row) = ctl.db.device(&name)? else { return Err(not_found(format!("no device {name:?}"))) };
    let mut device = [row.info];
    annotate_devices(&ctl, &mut device)?;
    let [device] = device;
    let toml = ctl.project.toml_worktree()?;
    let config = toml.configs.get(&device.config);
    let detail = thymis_api::DeviceDetail {
        tags: config.map(|c| c.tags.clone()).unwrap_or_default(),
        config_exists: config.is_some(),
        history: ctl.db.device_history(&name, 50)?,
        device,
    };
    typed(&detail)
}

async fn devices(State(ctl): State<Arc<Controller>>) -> ApiResult {
    let mut list: Vec<Device> = ctl.db.devices()?.into_iter().map(|d| d.info).collect();
    annotate_devices(&ctl, &mut list)?;
    typed(&list)
}

/// An answer of the API's types (`thymis_api`).
fn typed(v: &impl serde::Serialize) -> ApiResult {
    Ok(Json(serde_json::to_value(v).map_err(anyhow::Error::from)?))
}

async fn add_device(State(ctl): State<Arc<Controller>>, Json(req): Json<AddDevice>) -> ApiResult {
    if !valid_name(&req.name) {
        return Err(anyhow::anyhow!("device name {:?} must be [A-Za-z0-9_-]{{1,64}}", req.name).into());
    }
    let toml = ctl.project.toml_worktree()?;
    if !toml.configs.contains_key(&req.config) {
        return Err(anyhow::anyhow!("no configuration {:?} in thymis.toml", req.config).into());
    }
    ctl.db.add_device(&req.name, &req.config)?;
    let token = ctl.db.issue_token(&req.name, ctl.settings.token_ttl.as_secs() as i64)?;
    Ok(Json(enrollment(&ctl, &req.name, &token)))
}

fn enrollment(ctl: &Controller, name: &str, token: &str) -> Value {
    let e =
        Enrollment { name: name.into(), enrollment_token: token.into(), agent_config: ctl.agent_config(name, token) };
    serde_json::to_value(e).unwrap_or_default()
}

async fn reenroll(State(ctl): State<Arc<Controller>>, Path(name): Path<String>) -> ApiResult {
    let token = ctl.db.reenroll(&name, ctl.settings.token_ttl.as_secs() as i64)?;
    // Its key was revoked: a connection made with it ends.
    if let Some(conn) = ctl.conn(&name) {
        ctl.unregister(&conn);
    }
    Ok(Json(enrollment(&ctl, &name, &token)))
}

async fn revoke(State(ctl): State<Arc<Controller>>, Path(name): Path<String>) -> ApiResult {
    ctl.db.revoke(&name)?;
    if let Some(conn) = ctl.conn(&name) {
        ctl.unregister(&conn);
    }
    typed(&thymis_api::Revoked { name, revoked: true })
}

async fn device_image(
    State(ctl): State<Arc<Controller>>,
    Path(name): Path<String>,
    body: Option<Json<ArtifactRequest>>,
) -> ApiResult {
    let req = body.map(|b| b.0).unwrap_or_default();
    let task = crate::artifacts::start_image(&ctl, &name, req.commit.as_deref(), req.replace_key).await?;
    task_json(&ctl, task)
}

async fn bundle_start(State(ctl): State<Arc<Controller>>, Json(req): Json<ArtifactRequest>) -> ApiResult {
    let target = match (req.device, req.config) {
        (Some(d), None) => thymis_store::bundle::Target::Device(d),
        (None, Some(c)) => thymis_store::bundle::Target::Config(c),
        _ => return Err(anyhow::anyhow!("give either device or config").into()),
    };
    let task = crate::artifacts::start_bundle(&ctl, target, req.commit.as_deref(), req.expires_in).await?;
    task_json(&ctl, task)
}

async fn artifacts_list(State(ctl): State<Arc<Controller>>, Path(id): Path<i64>) -> ApiResult {
    let files: Vec<Artifact> = crate::artifacts::list(&ctl, id)
        .map_err(|e| not_found(format!("{e:#}")))?
        .into_iter()
        .map(|(name, size)| Artifact { name, size })
        .collect();
    typed(&files)
}

async fn artifacts_delete(State(ctl): State<Arc<Controller>>, Path(id): Path<i64>) -> ApiResult {
    crate::artifacts::delete(&ctl, id).map_err(|e| not_found(format!("{e:#}")))?;
    typed(&thymis_api::ArtifactsDeleted { task: id, deleted: true })
}

async fn artifact_download(
    State(ctl): State<Arc<Controller>>,
    Path((id, file)): Path<(i64, String)>,
) -> Result<Response, ApiError> {
    let path = crate::artifacts::path(&ctl, id, &file).map_err(|e| not_found(format!("{e:#}")))?;
    let f = tokio::fs::File::open(&path).await.map_err(|e| not_found(e.to_string()))?;
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    let body = axum::body::Body::from_stream(tokio_util_stream(f));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, len.to_string()),
            (header::CONTENT_DISPOSITION, format!("attachment; filename=\"{file}\"")),
        ],
        body,
    )
        .into_response())
}

/// A file as a stream of chunks, without loading it into memory.
fn tokio_util_stream(
    f: tokio::fs::File,
) -> impl futures_util::Stream<Item = Result<axum::body::Bytes, std::io::Error>> {
    futures_util::stream::unfold(f, |mut f| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 256 * 1024];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(axum::body::Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    })
}

async fn project_status(State(ctl): State<Arc<Controller>>) -> ApiResult {
    let changes: Vec<FileChange> =
        ctl.project.status()?.into_iter().map(|c| FileChange { path: c.path, status: c.status.to_owned() }).collect();
    typed(&ProjectStatus {
        head: ctl.project.head()?,
        dirty: !changes.is_empty(),
        changes,
        default_message: ctl.project.default_message()?,
    })
}

#[derive(Deserialize)]
struct DiffQuery {
    path: String,
}

async fn project_diff(State(ctl): State<Arc<Controller>>, Query(q): Query<DiffQuery>) -> ApiResult {
    Ok(Json(json!({ "path": q.path, "diff": ctl.project.diff(&q.path)? })))
}

async fn project_commit(State(ctl): State<Arc<Controller>>, Json(req): Json<CommitRequest>) -> ApiResult {
    let message = if req.message.trim().is_empty() { ctl.project.default_message()? } else { req.message };
    typed(&Committed { commit: ctl.project.commit(&message)? })
}

async fn project_log(State(ctl): State<Arc<Controller>>) -> ApiResult {
    let log: Vec<Value> = ctl.project.log(50)?.into_iter().map(|(c, s)| json!({ "commit": c, "subject": s })).collect();
    Ok(Json(json!(log)))
}

async fn project_configs(State(ctl): State<Arc<Controller>>) -> ApiResult {
    let t = ctl.project.toml_worktree()?;
    Ok(Json(json!({ "configs": t.configs, "tags": t.tags() })))
}

async fn read_file(State(ctl): State<Arc<Controller>>, Path(path): Path<String>) -> Result<Vec<u8>, ApiError> {
    ctl.project.read_file(&path).map_err(|e| not_found(format!("{e:#}")))
}

async fn write_file(State(ctl): State<Arc<Controller>>, Path(path): Path<String>, body: Bytes) -> ApiResult {
    ctl.project.write_file(&path, &body)?;
    Ok(Json(json!({ "path": path, "written": body.len() })))
}

async fn delete_file(State(ctl): State<Arc<Controller>>, Path(path): Path<String>) -> ApiResult {
    ctl.project.delete_file(&path)?;
    Ok(Json(json!({ "path": path, "deleted": true })))
}

async fn deploy_preview(State(ctl): State<Arc<Controller>>, Json(req): Json<DeployRequest>) -> ApiResult {
    Ok(Json(serde_json::to_value(deploy::preview(&ctl, &req)?).unwrap_or_default()))
}

async fn deploy_start(State(ctl): State<Arc<Controller>>, Json(req): Json<DeployRequest>) -> ApiResult {
    let task = deploy::start(&ctl, req).await?;
    task_json(&ctl, task)
}

async fn build_start(State(ctl): State<Arc<Controller>>, Json(req): Json<BuildRequest>) -> ApiResult {
    let task = deploy::start_build(&ctl, &req.config, req.commit.as_deref()).await?;
    task_json(&ctl, task)
}

fn task_json(ctl: &Controller, task: i64) -> ApiResult {
    typed(&annotated_task(ctl, task)?.ok_or_else(|| not_found(format!("no task {task}")))?)
}

async fn tasks(State(ctl): State<Arc<Controller>>) -> ApiResult {
    typed(&ctl.db.tasks(100)?)
}

async fn task(State(ctl): State<Arc<Controller>>, Path(id): Path<i64>) -> ApiResult {
    task_json(&ctl, id)
}

#[derive(Deserialize)]
struct LogsQuery {
    #[serde(default)]
    after: i64,
}

async fn task_logs(State(ctl): State<Arc<Controller>>, Path(id): Path<i64>, Query(q): Query<LogsQuery>) -> ApiResult {
    let lines: Vec<LogLine> =
        ctl.db.logs(id, q.after)?.into_iter().map(|(id, child, line)| LogLine { id, child, line }).collect();
    typed(&lines)
}

/// Server-sent events for a task: `task` (its JSON) on every change and `log` per new
/// log line, until it is finished or cancelled.
async fn task_events(
    State(ctl): State<Arc<Controller>>,
    Path(id): Path<i64>,
) -> Result<
    axum::response::sse::Sse<
        impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
    >,
    ApiError,
> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    if ctl.db.task(id)?.is_none() {
        return Err(not_found(format!("no task {id}")));
    }
    struct St {
        ctl: Arc<Controller>,
        rx: tokio::sync::broadcast::Receiver<i64>,
        after: i64,
        queue: std::collections::VecDeque<Event>,
        first: bool,
        /// The last page of log lines was not empty: there may be more at once.
        more: bool,
        done: bool,
    }
    let rx = ctl.task_changed.subscribe();
    let st = St { ctl, rx, after: 0, queue: Default::default(), first: true, more: false, done: false };
    let stream = futures_util::stream::unfold(st, move |mut st| async move {
        loop {
            if let Some(e) = st.queue.pop_front() {
                return Some((Ok(e), st));
            }
            if st.done {
                return None;
            }
            if !st.first && !st.more {
                // Wake on a change of this task, or every few seconds regardless.
                let wait = async {
                    loop {
                        match st.rx.recv().await {
                            Ok(t) if t == id => return,
                            Ok(_) => continue,
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
                            Err(_) => std::future::pending::<()>().await,
                        }
                    }
                };
                let _ = tokio::time::timeout(std::time::Duration::from_secs(5), wait).await;
            }
            st.first = false;
            let page = st.ctl.db.logs(id, st.after).unwrap_or_default();
            // A page at a time: the next one right after this one is sent.
            st.more = !page.is_empty();
            for (lid, _, line) in page {
                st.after = lid;
                st.queue.push_back(Event::default().event("log").data(line));
            }
            if st.more {
                continue;
            }
            if let Ok(Some(t)) = annotated_task(&st.ctl, id) {
                st.done = matches!(t.state, TaskState::Finished | TaskState::Cancelled | TaskState::Halted);
                st.queue.push_back(Event::default().event("task").data(serde_json::to_string(&t).unwrap_or_default()));
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

async fn task_cancel(State(ctl): State<Arc<Controller>>, Path(id): Path<i64>) -> ApiResult {
    deploy::cancel(&ctl, id).await?;
    task_json(&ctl, id)
}

/// A soaking rollout's next wave now, or a halted one's rest as a new task (the answer
/// is the task that goes on).
async fn task_resume(State(ctl): State<Arc<Controller>>, Path(id): Path<i64>) -> ApiResult {
    let next = deploy::resume(&ctl, id).await?;
    task_json(&ctl, next)
}

/// What a deployment would change and cost, built but not sent.
async fn deploy_dry_run(State(ctl): State<Arc<Controller>>, Json(req): Json<DeployRequest>) -> ApiResult {
    typed(&deploy::dry_run(&ctl, &req).await?)
}

/// Staged devices of a deployment switch now (all, or those named).
async fn task_activate(
    State(ctl): State<Arc<Controller>>,
    Path(id): Path<i64>,
    Json(req): Json<thymis_api::ActivateRequest>,
) -> ApiResult {
    typed(&deploy::activate(&ctl, id, &req.devices).await?)
}

/// Secrets, without their values.
async fn secrets_list(State(ctl): State<Arc<Controller>>) -> ApiResult {
    typed(&crate::secrets::list(&ctl)?)
}

async fn secret_set(State(ctl): State<Arc<Controller>>, Json(req): Json<thymis_api::secrets::SetSecret>) -> ApiResult {
    let secret = crate::secrets::set(&ctl, &req)?;
    let tasks = if req.deploy { crate::deploy::secret_changed(&ctl, &req.name, &req.scope).await? } else { vec![] };
    typed(&thymis_api::secrets::SecretChanged { secret, tasks })
}

async fn secret_remove(
    State(ctl): State<Arc<Controller>>,
    Json(req): Json<thymis_api::secrets::RemoveSecret>,
) -> ApiResult {
    if !ctl.db.remove_secret(&req.name, &req.scope)? {
        return Err(not_found(format!("no secret {:?} for {}", req.name, req.scope)));
    }
    let tasks = if req.deploy { crate::deploy::secret_changed(&ctl, &req.name, &req.scope).await? } else { vec![] };
    Ok(Json(json!({ "removed": true, "tasks": tasks })))
}

/// Counters for benchmarks and monitoring.
async fn stats(State(ctl): State<Arc<Controller>>) -> ApiResult {
    use std::sync::atomic::Ordering;
    Ok(Json(json!({
        "builds": ctl.build_count.load(Ordering::Relaxed),
        "compressions": ctl.nar_cache.compressions.load(Ordering::Relaxed),
        "deltas": ctl.nar_cache.deltas.load(Ordering::Relaxed),
        "connected_agents": ctl.online().len(),
    })))
}

async fn identity(State(ctl): State<Arc<Controller>>) -> ApiResult {
    typed(&Identity {
        identity_key: ctl.identity.public().to_string(),
        nix_signing_key: ctl.nix_key.public().to_string(),
    })
}
