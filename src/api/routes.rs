//! The routing table (path + method → handler, 404 / 405 with `Allow`) and the user and
//! status handlers. A mutating handler validates its input, hands one [`Change`] to the
//! `Persister` (which makes it durable, then applies it to the table), and only then tells
//! the tunnel loop and answers: a change that could not be saved is answered 507 (disk full)
//! or 503 and is not applied, so a retry does the right thing.

use serde::Serialize;
use serde_json::{Map, Value};

use super::errors::ApiError;
use super::http::{Request, Response};
use super::{ApiContext, auth, bulk, subscribe};
use crate::control::ControlMsg;
use crate::keys;
use crate::users::persist::lock_users;
use crate::users::{
    Applied, Change, CommitError, MAX_NOTE_CHARS, Patch, ResetStrategy, Settings, TableError, User,
    now_unix,
};

/// Longest accepted user name (characters).
pub const MAX_NAME_CHARS: usize = 128;
/// Latest accepted `expire_at`: 9999-12-31T23:59:59Z (a larger value is most likely
/// milliseconds).
pub const MAX_EXPIRE_AT: u64 = 253_402_300_799;
/// Largest accepted `max_devices`.
pub const MAX_DEVICES: u64 = 65_535;

/// A resolved API path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    Status,
    Users,
    User(&'a str),
    UserLimit(&'a str),
    UserReset(&'a str),
    UserKick(&'a str),
    UsersBulk,
    UsersBulkDelete,
    UserIps(&'a str),
    Subscribe(&'a str),
}

impl Route<'_> {
    /// The methods this path supports (the `Allow` header of a 405).
    pub fn allow(self) -> &'static str {
        match self {
            Route::Status | Route::Subscribe(_) | Route::UserIps(_) => "GET",
            Route::Users => "GET, POST",
            Route::User(_) => "GET, PATCH, DELETE",
            Route::UserLimit(_) => "PUT",
            Route::UserReset(_)
            | Route::UserKick(_)
            | Route::UsersBulk
            | Route::UsersBulkDelete => "POST",
        }
    }

    /// Whether the route needs the bearer token (all but the subscribe endpoint).
    pub fn needs_token(self) -> bool {
        !matches!(self, Route::Subscribe(_))
    }
}

/// Maps a path (without query) to a route.
pub fn resolve(path: &str) -> Option<Route<'_>> {
    let rest = path.strip_prefix("/api/")?;
    let mut parts = rest.split('/');
    let route = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("server"), Some("status"), None, None) => Route::Status,
        (Some("users"), None, None, None) => Route::Users,
        (Some("users"), Some("bulk"), None, None) => Route::UsersBulk,
        (Some("users"), Some("bulk-delete"), None, None) => Route::UsersBulkDelete,
        (Some("users"), Some(k), None, None) if !k.is_empty() => Route::User(k),
        (Some("users"), Some(k), Some("limit"), None) if !k.is_empty() => Route::UserLimit(k),
        (Some("users"), Some(k), Some("reset"), None) if !k.is_empty() => Route::UserReset(k),
        (Some("users"), Some(k), Some("kick"), None) if !k.is_empty() => Route::UserKick(k),
        (Some("users"), Some(k), Some("ips"), None) if !k.is_empty() => Route::UserIps(k),
        (Some("subscribe"), Some(k), None, None) if !k.is_empty() => Route::Subscribe(k),
        _ => return None,
    };
    Some(route)
}

/// Answers one request.
pub fn handle(ctx: &ApiContext, request: &Request) -> Response {
    match dispatch(ctx, request) {
        Ok(r) => r,
        Err(e) => e.to_response(),
    }
}

fn dispatch(ctx: &ApiContext, request: &Request) -> Result<Response, ApiError> {
    let Some(route) = resolve(request.path()) else {
        return match request.path() {
            super::metrics::PATH => Ok(super::metrics::handle(ctx, request)),
            _ => Err(ApiError::not_found("no such endpoint")),
        };
    };
    if route.needs_token() {
        auth::check(request, &ctx.token)?;
    }
    let method = request.method();
    match (route, method) {
        (Route::Status, "GET") => Ok(status(ctx)),
        (Route::Users, "GET") => bulk::list(ctx, request),
        (Route::UsersBulk, "POST") => bulk::create(ctx, &request.body),
        (Route::UsersBulkDelete, "POST") => bulk::delete(ctx, &request.body),
        (Route::UserKick(k), "POST") => bulk::kick(ctx, k),
        (Route::Users, "POST") => create_user(ctx, &request.body),
        (Route::User(k), "GET") => get_user(ctx, k),
        (Route::User(k), "PATCH") => patch_user(ctx, k, &request.body),
        (Route::User(k), "DELETE") => delete_user(ctx, k),
        (Route::UserLimit(k), "PUT") => set_limit(ctx, k, &request.body),
        (Route::UserReset(k), "POST") => reset_user(ctx, k),
        (Route::UserIps(k), "GET") => user_ips(ctx, k),
        (Route::Subscribe(k), "GET") => subscribe::handle(ctx, request, k),
        (route, _) => {
            let e = ApiError::method_not_allowed(method, route.allow());
            Err(if matches!(route, Route::Subscribe(_)) {
                e.for_subscribe()
            } else {
                e
            })
        }
    }
}

/// A user as it appears in `GET /api/users` (spec fields first, then additive ones).
#[derive(Debug, Clone, Serialize)]
pub struct UserView {
    pub key: String,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub connections: u64,
    pub limit_bytes: Option<u64>,
    pub name: Option<String>,
    pub source: &'static str,
    pub online_sessions: u32,
    pub last_seen: Option<u64>,
    pub created_at: u64,
    pub expire_at: Option<u64>,
    pub enabled: bool,
    pub reset_strategy: &'static str,
    pub last_reset_at: Option<u64>,
    pub next_reset_at: Option<u64>,
    pub note: Option<String>,
    pub max_devices: Option<u32>,
}

impl UserView {
    pub fn of(u: &User) -> UserView {
        UserView {
            key: u.key.clone(),
            bytes_up: u.bytes_up,
            bytes_down: u.bytes_down,
            connections: u.connections,
            limit_bytes: u.limit_bytes,
            name: u.name.clone(),
            source: u.source.as_str(),
            online_sessions: u.online_sessions,
            last_seen: u.last_seen,
            created_at: u.created_at,
            expire_at: u.settings.expire_at,
            enabled: u.settings.enabled,
            reset_strategy: u.settings.reset_strategy.as_str(),
            last_reset_at: u.last_reset_at,
            next_reset_at: u.next_reset_at(),
            note: u.settings.note.clone(),
            max_devices: u.settings.max_devices,
        }
    }
}

fn status(ctx: &ApiContext) -> Response {
    #[derive(Serialize)]
    struct Status {
        version: &'static str,
        uptime_seconds: u64,
        total_users: usize,
        status: &'static str,
        online_sessions: u64,
        listen: Vec<String>,
        api_bind: String,
        online_users: usize,
        sessions: u64,
        bytes_up: u64,
        bytes_down: u64,
    }
    let (total_users, online_sessions, online_users, (bytes_up, bytes_down)) = {
        let t = lock_users(&ctx.users);
        let traffic = t.traffic_since_start();
        (t.len(), t.online_sessions(), t.online_users(), traffic)
    };
    Response::json(
        200,
        &Status {
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: ctx.started_at.elapsed().as_secs(),
            total_users,
            status: "running",
            online_sessions,
            listen: ctx.config.listen.iter().map(|a| a.to_string()).collect(),
            api_bind: ctx.local_addr.to_string(),
            online_users,
            sessions: online_sessions,
            bytes_up,
            bytes_down,
        },
    )
}

/// Validates a key taken from the path.
pub(super) fn path_key(key: &str) -> Result<&str, ApiError> {
    keys::validate_key(key)
        .map(|()| key)
        .map_err(|e| ApiError::bad_request(format!("invalid key in the path: {e}")))
}

fn not_found_user() -> ApiError {
    ApiError::not_found("no user with this key")
}

fn get_user(ctx: &ApiContext, key: &str) -> Result<Response, ApiError> {
    let key = path_key(key)?;
    let view = lock_users(&ctx.users).get_by_key(key).map(UserView::of);
    view.map(|v| Response::json(200, &v))
        .ok_or_else(not_found_user)
}

/// `GET /api/users/{key}/ips`: the client addresses seen in the last 24 h (this process run).
fn user_ips(ctx: &ApiContext, key: &str) -> Result<Response, ApiError> {
    #[derive(Serialize)]
    struct Ips {
        ips: Vec<crate::users::devices::IpView>,
    }
    let key = path_key(key)?;
    let ips = lock_users(&ctx.users)
        .get_by_key(key)
        .map(|u| u.recent_ips.view(now_unix()));
    ips.map(|ips| Response::json(200, &Ips { ips }))
        .ok_or_else(not_found_user)
}

/// Parses a body as a JSON object, whatever the Content-Type says.
/// `None` for an empty (or whitespace-only) body when `allow_empty`.
pub fn json_object(body: &[u8], allow_empty: bool) -> Result<Option<Map<String, Value>>, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::bad_request("the request body is not valid UTF-8"))?;
    if text.trim().is_empty() {
        return if allow_empty {
            Ok(None)
        } else {
            Err(ApiError::bad_request(
                "the request body is empty; expected a JSON object",
            ))
        };
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(Some(m)),
        Ok(_) => Err(ApiError::bad_request(
            "the request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::bad_request(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

pub(super) fn reject_unknown_fields(
    map: &Map<String, Value>,
    allowed: &[&str],
) -> Result<(), ApiError> {
    if let Some(k) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        let shown: String = k.chars().take(40).collect();
        return Err(ApiError::bad_request(format!(
            "unknown field {shown:?}; allowed fields: {}",
            allowed.join(", ")
        )));
    }
    Ok(())
}

/// `limit_bytes`: a whole number ≥ 0 or null.
pub(super) fn limit_value(v: &Value) -> Result<Option<u64>, ApiError> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => n.as_u64().map(Some).ok_or_else(|| {
            ApiError::bad_request(format!(
                "limit_bytes must be a whole number of bytes ≥ 0 (or null), not {n}"
            ))
        }),
        _ => Err(ApiError::bad_request(
            "limit_bytes must be a whole number of bytes ≥ 0 (or null)",
        )),
    }
}

/// A text field (`name`, `note`): a string of at most `max` characters without control
/// characters, or null.
pub(super) fn text_value(field: &str, v: &Value, max: usize) -> Result<Option<String>, ApiError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) if s.chars().count() <= max && !s.chars().any(char::is_control) => {
            Ok(Some(s.clone()))
        }
        _ => Err(ApiError::bad_request(format!(
            "{field} must be a string of at most {max} characters without control characters (or null)"
        ))),
    }
}

/// `expire_at`: unix seconds (a whole number ≤ [`MAX_EXPIRE_AT`]) or null.
fn expire_value(v: &Value) -> Result<Option<u64>, ApiError> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => match n.as_u64() {
            Some(t) if t <= MAX_EXPIRE_AT => Ok(Some(t)),
            Some(_) => Err(ApiError::bad_request(format!(
                "expire_at must be unix time in seconds (at most {MAX_EXPIRE_AT}); {n} looks like milliseconds"
            ))),
            None => Err(ApiError::bad_request(format!(
                "expire_at must be a whole number of unix seconds ≥ 0 (or null), not {n}"
            ))),
        },
        _ => Err(ApiError::bad_request(
            "expire_at must be a whole number of unix seconds (or null for never)",
        )),
    }
}

/// `max_devices`: a whole number in 1..=[`MAX_DEVICES`] or null (no limit).
fn devices_value(v: &Value) -> Result<Option<u32>, ApiError> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => match n.as_u64() {
            Some(d @ 1..=MAX_DEVICES) => Ok(u32::try_from(d).ok()),
            _ => Err(ApiError::bad_request(format!(
                "max_devices must be a whole number from 1 to {MAX_DEVICES} (or null for no limit), not {n}"
            ))),
        },
        _ => Err(ApiError::bad_request(
            "max_devices must be a whole number of devices ≥ 1 (or null for no limit)",
        )),
    }
}

fn enabled_value(v: &Value) -> Result<bool, ApiError> {
    v.as_bool()
        .ok_or_else(|| ApiError::bad_request("enabled must be true or false"))
}

fn strategy_value(v: &Value) -> Result<ResetStrategy, ApiError> {
    v.as_str().and_then(ResetStrategy::parse).ok_or_else(|| {
        let names: Vec<&str> = ResetStrategy::ALL.iter().map(|s| s.as_str()).collect();
        ApiError::bad_request(format!(
            "reset_strategy must be one of \"{}\"",
            names.join("\", \"")
        ))
    })
}

/// The settings a create request gives (defaults for the fields it leaves out).
pub(super) fn settings_value(map: &Map<String, Value>) -> Result<Settings, ApiError> {
    let mut settings = Settings::default();
    if let Some(v) = map.get("expire_at") {
        settings.expire_at = expire_value(v)?;
    }
    if let Some(v) = map.get("enabled") {
        settings.enabled = enabled_value(v)?;
    }
    if let Some(v) = map.get("reset_strategy") {
        settings.reset_strategy = strategy_value(v)?;
    }
    if let Some(v) = map.get("note") {
        settings.note = text_value("note", v, MAX_NOTE_CHARS)?;
    }
    if let Some(v) = map.get("max_devices") {
        settings.max_devices = devices_value(v)?;
    }
    Ok(settings)
}

/// The fields a `PATCH` may set.
const PATCH_FIELDS: [&str; 7] = [
    "name",
    "note",
    "limit_bytes",
    "expire_at",
    "enabled",
    "reset_strategy",
    "max_devices",
];

/// A `PATCH` body: every field present is validated; at least one must be given.
fn patch_value(map: &Map<String, Value>) -> Result<Patch, ApiError> {
    reject_unknown_fields(map, &PATCH_FIELDS)?;
    let mut patch = Patch::default();
    for (field, v) in map {
        match field.as_str() {
            "name" => patch.name = Some(text_value("name", v, MAX_NAME_CHARS)?),
            "note" => patch.note = Some(text_value("note", v, MAX_NOTE_CHARS)?),
            "limit_bytes" => patch.limit_bytes = Some(limit_value(v)?),
            "expire_at" => patch.expire_at = Some(expire_value(v)?),
            "enabled" => patch.enabled = Some(enabled_value(v)?),
            "max_devices" => patch.max_devices = Some(devices_value(v)?),
            _ => patch.reset_strategy = Some(strategy_value(v)?),
        }
    }
    if patch.is_empty() {
        return Err(ApiError::bad_request(format!(
            "the body names no field to change; fields: {}",
            PATCH_FIELDS.join(", ")
        )));
    }
    Ok(patch)
}

fn patch_user(ctx: &ApiContext, key: &str, body: &[u8]) -> Result<Response, ApiError> {
    let key = path_key(key)?;
    let map = json_object(body, false)?.unwrap_or_default();
    let patch = patch_value(&map)?;
    let fields: Vec<&str> = map.keys().map(String::as_str).collect();
    let change = Change::Update {
        key: key.into(),
        patch,
        at: now_unix(),
    };
    let applied = commit(ctx, change)?;
    log::info!(
        "api: updated user {} ({})",
        keys::mask(key),
        fields.join(", ")
    );
    changed(ctx, applied)
}

/// Makes `change` durable and applies it; the caller answers (and tells the tunnel loop)
/// only after this returns.
fn commit(ctx: &ApiContext, change: Change) -> Result<Applied, ApiError> {
    ctx.persister.commit(change).map_err(commit_error)
}

/// The answer to a change that was not made.
pub(super) fn commit_error(e: CommitError) -> ApiError {
    match e {
        CommitError::Table(TableError::KeyExists) => {
            ApiError::conflict("a user with this key already exists")
        }
        CommitError::Table(TableError::ConfigDeclared) => ApiError::conflict(
            "this key is declared in config.json; remove it from config.json and reload the server (SIGHUP) to delete it",
        ),
        CommitError::Table(TableError::NotFound) => not_found_user(),
        CommitError::Table(e @ TableError::ConfigName) => ApiError::conflict(e.to_string()),
        CommitError::Table(e @ TableError::Full) => ApiError::new(503, e.to_string()),
        CommitError::Persist(e) if e.is_storage_full() => {
            log::error!("api: {e}");
            ApiError::new(
                507,
                "the disk holding the state file is full; the change was not made (free some space and retry)",
            )
        }
        CommitError::Persist(e) => {
            log::error!("api: {e}");
            ApiError::new(
                503,
                "the change could not be saved to the state file and was not made; see the server log, then retry",
            )
        }
    }
}

fn create_user(ctx: &ApiContext, body: &[u8]) -> Result<Response, ApiError> {
    let map = json_object(body, true)?.unwrap_or_default();
    reject_unknown_fields(
        &map,
        &[
            "key",
            "limit_bytes",
            "name",
            "expire_at",
            "enabled",
            "reset_strategy",
            "note",
            "max_devices",
        ],
    )?;
    let custom_key = match map.get("key") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => {
            keys::validate_key(s).map_err(|e| ApiError::bad_request(e.to_string()))?;
            Some(s.clone())
        }
        Some(_) => return Err(ApiError::bad_request("key must be a string")),
    };
    let limit_bytes = match map.get("limit_bytes") {
        None => None,
        Some(v) => limit_value(v)?,
    };
    let name = match map.get("name") {
        None => None,
        Some(v) => text_value("name", v, MAX_NAME_CHARS)?,
    };
    let settings = settings_value(&map)?;

    let generated = custom_key.is_none();
    let mut attempts = 0;
    let (applied, key) = loop {
        let key = match &custom_key {
            Some(k) => k.clone(),
            None => keys::generate_key().map_err(|e| ApiError::internal(e.to_string()))?,
        };
        let change = Change::Create {
            key: key.clone(),
            name: name.clone(),
            limit_bytes,
            created_at: now_unix(),
            settings: settings.clone(),
        };
        match commit(ctx, change) {
            Ok(applied) => break (applied, key),
            Err(e) if e.status == 409 && generated && attempts < 3 => attempts += 1,
            Err(e) => return Err(e),
        }
    };
    log::info!(
        "api: created user {} (limit {})",
        keys::mask(&key),
        limit_text(limit_bytes)
    );
    ctx.control.send(ControlMsg::UserAdded(applied.id));

    Ok(Response::json(
        200,
        &Created::new(key, limit_bytes, name, settings),
    ))
}

/// A created user as `POST /api/users` (and each entry of `POST /api/users/bulk`) answers it.
#[derive(Debug, Serialize)]
pub(super) struct Created {
    key: String,
    created: bool,
    limit_bytes: Option<u64>,
    name: Option<String>,
    expire_at: Option<u64>,
    enabled: bool,
    reset_strategy: &'static str,
    note: Option<String>,
    max_devices: Option<u32>,
}

impl Created {
    pub(super) fn new(
        key: String,
        limit_bytes: Option<u64>,
        name: Option<String>,
        settings: Settings,
    ) -> Created {
        Created {
            key,
            created: true,
            limit_bytes,
            name,
            expire_at: settings.expire_at,
            enabled: settings.enabled,
            reset_strategy: settings.reset_strategy.as_str(),
            note: settings.note,
            max_devices: settings.max_devices,
        }
    }

    pub(super) fn of(u: &User) -> Created {
        Created::new(
            u.key.clone(),
            u.limit_bytes,
            u.name.clone(),
            u.settings.clone(),
        )
    }
}

fn limit_text(limit: Option<u64>) -> String {
    limit.map_or_else(|| "none".to_string(), |l| format!("{l} bytes"))
}

fn delete_user(ctx: &ApiContext, key: &str) -> Result<Response, ApiError> {
    let key = path_key(key)?;
    let applied = commit(ctx, Change::Delete { key: key.into() })?;
    log::info!("api: deleted user {}", keys::mask(key));
    ctx.control.send(ControlMsg::UserRemoved(applied.id));
    Ok(Response::json(
        200,
        &serde_json::json!({"key": key, "deleted": true}),
    ))
}

fn set_limit(ctx: &ApiContext, key: &str, body: &[u8]) -> Result<Response, ApiError> {
    let key = path_key(key)?;
    let map = json_object(body, false)?.unwrap_or_default();
    reject_unknown_fields(&map, &["limit_bytes"])?;
    let limit = match map.get("limit_bytes") {
        Some(v) => limit_value(v)?,
        None => {
            return Err(ApiError::bad_request(
                "the field limit_bytes is required (a whole number of bytes, or null to remove the limit)",
            ));
        }
    };
    let change = Change::Limit {
        key: key.into(),
        limit_bytes: limit,
    };
    let applied = commit(ctx, change)?;
    log::info!(
        "api: set the limit of user {} to {}",
        keys::mask(key),
        limit_text(limit)
    );
    changed(ctx, applied)
}

fn reset_user(ctx: &ApiContext, key: &str) -> Result<Response, ApiError> {
    let key = path_key(key)?;
    let change = Change::Reset {
        key: key.into(),
        at: Some(now_unix()),
    };
    let applied = commit(ctx, change)?;
    log::info!("api: reset the counters of user {}", keys::mask(key));
    changed(ctx, applied)
}

/// Tells the tunnel loop about a changed user and answers with the user as it is now.
fn changed(ctx: &ApiContext, applied: Applied) -> Result<Response, ApiError> {
    ctx.control.send(ControlMsg::UserChanged(applied.id));
    applied
        .user
        .as_ref()
        .map(|u| Response::json(200, &UserView::of(u)))
        .ok_or_else(not_found_user)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_resolve() {
        assert_eq!(resolve("/api/server/status"), Some(Route::Status));
        assert_eq!(resolve("/api/users"), Some(Route::Users));
        assert_eq!(resolve("/api/users/abc"), Some(Route::User("abc")));
        assert_eq!(
            resolve("/api/users/abc/limit"),
            Some(Route::UserLimit("abc"))
        );
        assert_eq!(
            resolve("/api/users/abc/reset"),
            Some(Route::UserReset("abc"))
        );
        assert_eq!(resolve("/api/users/abc/ips"), Some(Route::UserIps("abc")));
        assert_eq!(resolve("/api/subscribe/abc"), Some(Route::Subscribe("abc")));
        assert_eq!(resolve("/api/users/abc/kick"), Some(Route::UserKick("abc")));
        assert_eq!(resolve("/api/users/bulk"), Some(Route::UsersBulk));
        assert_eq!(
            resolve("/api/users/bulk-delete"),
            Some(Route::UsersBulkDelete)
        );
        for bad in [
            "/",
            "/api",
            "/api/",
            "/api/users/",
            "/api/users//limit",
            "/api/users/a/b",
            "/api/users/a/limit/x",
            "/api/server",
            "/api/subscribe/",
            "/apix/users",
        ] {
            assert_eq!(resolve(bad), None, "{bad}");
        }
    }

    #[test]
    fn body_parsing() {
        assert_eq!(json_object(b"  ", true), Ok(None));
        assert_eq!(json_object(b"", false).unwrap_err().status, 400);
        assert_eq!(json_object(b"\xff", true).unwrap_err().status, 400);
        assert_eq!(json_object(b"[1]", true).unwrap_err().status, 400);
        assert_eq!(json_object(b"{", true).unwrap_err().status, 400);
        let deep = "[".repeat(100_000);
        assert_eq!(json_object(deep.as_bytes(), true).unwrap_err().status, 400);
        assert!(json_object(b"{\"a\":1}", true).unwrap().is_some());
    }

    #[test]
    fn limit_values() {
        assert_eq!(limit_value(&serde_json::json!(null)), Ok(None));
        assert_eq!(limit_value(&serde_json::json!(0)), Ok(Some(0)));
        assert_eq!(
            limit_value(&serde_json::json!(u64::MAX)),
            Ok(Some(u64::MAX))
        );
        for bad in [
            serde_json::json!(-1),
            serde_json::json!(1.5),
            serde_json::json!(1e3),
            serde_json::json!("5"),
            serde_json::json!(true),
            serde_json::json!([1]),
        ] {
            assert_eq!(limit_value(&bad).unwrap_err().status, 400, "{bad}");
        }
    }
}
