//! The web UI: static assets embedded in the binary (no build step), and browser
//! sessions. A session is an HttpOnly, SameSite=Strict cookie (Secure under https) whose
//! hash the database keeps; every state-changing request made with it must carry the
//! session's CSRF token in `X-CSRF-Token`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::controller::Controller;

const INDEX: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/style.css");
const DEVICE_JS: &str = include_str!("ui/device.js");
/// xterm.js, vendored with its licence (docs/ui.md says which version).
const XTERM_JS: &str = include_str!("ui/vendor/xterm/xterm.js");
const XTERM_CSS: &str = include_str!("ui/vendor/xterm/xterm.css");
pub const COOKIE: &str = "thymis_session";
const SESSION_TTL: i64 = 12 * 3600;

fn asset(kind: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

pub async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

pub async fn device_js() -> Response {
    asset("text/javascript; charset=utf-8", DEVICE_JS)
}

pub async fn xterm_js() -> Response {
    asset("text/javascript; charset=utf-8", XTERM_JS)
}

pub async fn xterm_css() -> Response {
    asset("text/css; charset=utf-8", XTERM_CSS)
}

/// The session id from the request's cookies.
pub fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

#[derive(Deserialize)]
pub struct Login {
    token: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Login(<redacted>)")
    }
}

pub async fn login(State(ctl): State<Arc<Controller>>, Json(req): Json<Login>) -> Response {
    if !bool::from(req.token.trim().as_bytes().ct_eq(ctl.admin_token.as_bytes())) {
        return (StatusCode::UNAUTHORIZED, Json(json!({ "error": "wrong token" }))).into_response();
    }
    match ctl.db.create_session(SESSION_TTL) {
        Ok((id, csrf)) => {
            // Secure wherever browsers reach it over https (TLS here, or a proxy's).
            let url = &ctl.settings.public_url;
            let https = ctl.settings.tls_sha256.is_some() || url.starts_with("https://") || url.starts_with("wss://");
            let secure = if https { "; Secure" } else { "" };
            let cookie = format!("{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={SESSION_TTL}{secure}");
            ([(header::SET_COOKIE, cookie)], Json(json!({ "csrf": csrf }))).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({ "error": format!("{e:#}") }))).into_response(),
    }
}

pub async fn logout(State(ctl): State<Arc<Controller>>, headers: HeaderMap) -> Response {
    if let Some(id) = session_id(&headers) {
        let _ = ctl.db.delete_session(&id);
    }
    let cookie = format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    ([(header::SET_COOKIE, cookie)], Json(json!({ "logged_out": true }))).into_response()
}

/// The CSRF token of the caller's session (the UI fetches it after a reload).
pub async fn session(State(ctl): State<Arc<Controller>>, headers: HeaderMap) -> Response {
    match session_id(&headers).and_then(|id| ctl.db.session_csrf(&id).ok().flatten()) {
        Some(csrf) => Json(json!({ "csrf": csrf })).into_response(),
        // Not an error for the page that asks at load (a 401 would log one in the
        // browser's console on every visit to the log-in form).
        None => Json(json!({ "csrf": null })).into_response(),
    }
}
