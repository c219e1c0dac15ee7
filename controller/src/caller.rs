//! Who calls the API (the admin token, or a browser session with its CSRF token) and
//! what an API error answers: shared by the JSON API and the device consoles.

use axum::Json;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

/// An API error: a status and a message for people.
#[derive(Debug)]
pub struct ApiError(pub(crate) StatusCode, pub(crate) String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(thymis_api::ErrorBody { error: self.1 })).into_response()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        let status = if e.downcast_ref::<crate::sql::Unavailable>().is_some() {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::BAD_REQUEST
        };
        ApiError(status, format!("{e:#}"))
    }
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError(status, message.into())
    }
}

/// Who made an API request.
#[derive(Debug, Clone)]
pub enum Caller {
    /// The admin token.
    Token,
    /// A browser session, with its CSRF token.
    Session { csrf: String },
}

impl Caller {
    pub fn describe(&self) -> &'static str {
        match self {
            Caller::Token => "the admin token",
            Caller::Session { .. } => "a web UI session",
        }
    }

    /// For what a page must not read or open by a cross-site request even with a GET (a
    /// device's journal, its terminal): a session's request carries its CSRF token (in
    /// `X-CSRF-Token`, or, for the terminal's WebSocket, which cannot send headers, in
    /// `ws_csrf`: an offered subprotocol) and, if the browser sent an Origin, it is this
    /// controller's.
    pub fn check_session(&self, headers: &HeaderMap, ws_csrf: Option<&str>) -> Result<(), ApiError> {
        let Caller::Session { csrf } = self else { return Ok(()) };
        let sent = headers.get("x-csrf-token").and_then(|v| v.to_str().ok()).or(ws_csrf).unwrap_or("");
        if !bool::from(sent.as_bytes().ct_eq(csrf.as_bytes())) {
            return Err(ApiError(StatusCode::FORBIDDEN, "missing or wrong CSRF token".into()));
        }
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
        if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
            let authority = origin.split_once("://").map_or(origin, |(_, a)| a);
            if authority != host {
                return Err(ApiError(StatusCode::FORBIDDEN, format!("origin {origin} is not this controller")));
            }
        }
        Ok(())
    }
}
