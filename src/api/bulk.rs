//! The operator endpoints that act on many users or on live sessions: bulk create and bulk
//! delete (all-or-nothing, one durable write), kick, and the filters and paging of
//! `GET /api/users`.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

use super::ApiContext;
use super::errors::ApiError;
use super::http::{Request, Response};
use super::routes::{
    Created, MAX_NAME_CHARS, UserView, commit_error, json_object, limit_value, path_key,
    reject_unknown_fields, settings_value, text_value,
};
use crate::control::{AskError, ControlMsg};
use crate::keys;
use crate::users::persist::lock_users;
use crate::users::{Applied, Change, CommitError, TableError, User, now_unix};

/// Most users one bulk request creates or deletes.
pub const MAX_BULK: usize = 1000;
/// How long a kick waits for the tunnel loop's answer.
pub const KICK_TIMEOUT: Duration = Duration::from_secs(2);

/// The fields of one user a bulk create accepts (as `POST /api/users`); `count` defaults
/// take all of them but `key`.
const USER_FIELDS: [&str; 8] = [
    "key",
    "limit_bytes",
    "name",
    "expire_at",
    "enabled",
    "reset_strategy",
    "note",
    "max_devices",
];

/// Prefixes an error with the entry it concerns (`users[3]: ...`).
fn at(entry: &str, e: ApiError) -> ApiError {
    ApiError::bad_request(format!("{entry}: {}", e.message))
}

/// One entry of a bulk create: the change, and whether its key was generated.
fn user_entry(map: &Map<String, Value>, with_key: bool) -> Result<(Change, bool), ApiError> {
    let allowed = if with_key {
        &USER_FIELDS[..]
    } else {
        &USER_FIELDS[1..]
    };
    reject_unknown_fields(map, allowed)?;
    let key = match map.get("key") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => {
            keys::validate_key(s).map_err(|e| ApiError::bad_request(format!("key: {e}")))?;
            Some(s.clone())
        }
        Some(_) => return Err(ApiError::bad_request("key must be a string")),
    };
    let generated = key.is_none();
    let key = match key {
        Some(k) => k,
        None => keys::generate_key().map_err(|e| ApiError::internal(e.to_string()))?,
    };
    let change = Change::Create {
        key,
        name: map
            .get("name")
            .map(|v| text_value("name", v, MAX_NAME_CHARS))
            .transpose()?
            .flatten(),
        limit_bytes: map
            .get("limit_bytes")
            .map(limit_value)
            .transpose()?
            .flatten(),
        created_at: now_unix(),
        settings: settings_value(map)?,
    };
    Ok((change, generated))
}

/// The changes of a bulk create body; each error names its entry.
fn bulk_changes(map: &Map<String, Value>) -> Result<Vec<(Change, bool)>, ApiError> {
    let many = |n: usize| {
        ApiError::bad_request(format!(
            "a bulk request creates 1 to {MAX_BULK} users, not {n}"
        ))
    };
    match (map.get("count"), map.get("users")) {
        (Some(count), None) => {
            let n = count
                .as_u64()
                .ok_or_else(|| ApiError::bad_request("count must be a whole number 1 to 1000"))?;
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if n == 0 || n > MAX_BULK {
                return Err(many(n));
            }
            let mut defaults = map.clone();
            defaults.remove("count");
            let first = user_entry(&defaults, false).map_err(|e| at("defaults", e))?;
            let mut out = vec![first];
            for _ in 1..n {
                out.push(user_entry(&defaults, false)?);
            }
            Ok(out)
        }
        (None, Some(Value::Array(users))) => {
            if users.is_empty() || users.len() > MAX_BULK {
                return Err(many(users.len()));
            }
            if let Some(k) = map.keys().find(|k| *k != "users") {
                let shown: String = k.chars().take(40).collect();
                return Err(ApiError::bad_request(format!(
                    "unknown field {shown:?} next to users (give each user its fields)"
                )));
            }
            let mut seen: HashMap<&str, usize> = HashMap::new();
            let mut out = Vec::with_capacity(users.len());
            for (i, u) in users.iter().enumerate() {
                let entry = format!("users[{i}]");
                let Value::Object(m) = u else {
                    return Err(ApiError::bad_request(format!(
                        "{entry}: must be a JSON object"
                    )));
                };
                let (change, generated) = user_entry(m, true).map_err(|e| at(&entry, e))?;
                if let Some(Value::String(k)) = m.get("key").filter(|_| !generated) {
                    if let Some(j) = seen.insert(k, i) {
                        return Err(ApiError::bad_request(format!(
                            "{entry}.key: the same key as users[{j}]"
                        )));
                    }
                }
                out.push((change, generated));
            }
            Ok(out)
        }
        (None, Some(_)) => Err(ApiError::bad_request(
            "users must be an array of user objects",
        )),
        _ => Err(ApiError::bad_request(
            "give either count (with optional defaults) or users (an array), not both",
        )),
    }
}

/// A failed group commit as an answer naming the entry (`users[i]` / `keys[i]`).
fn group_error(list: &str, i: usize, e: CommitError) -> ApiError {
    match e {
        CommitError::Table(TableError::KeyExists) => ApiError::bad_request(format!(
            "{list}[{i}].key: a user with this key already exists; nothing was changed"
        )),
        CommitError::Table(t) => {
            ApiError::bad_request(format!("{list}[{i}]: {t}; nothing was changed"))
        }
        e => commit_error(e),
    }
}

/// `POST /api/users/bulk`.
pub fn create(ctx: &ApiContext, body: &[u8]) -> Result<Response, ApiError> {
    let map = json_object(body, false)?.unwrap_or_default();
    let mut entries = bulk_changes(&map)?;
    let mut attempts = 0;
    let applied: Vec<Applied> = loop {
        let changes = entries.iter().map(|(c, _)| c.clone()).collect();
        match ctx.persister.commit_all(changes) {
            Ok(applied) => break applied,
            // A generated key met an existing one (astronomically rare): draw it again.
            Err((i, CommitError::Table(TableError::KeyExists))) if entries[i].1 && attempts < 3 => {
                attempts += 1;
                if let Change::Create { key, .. } = &mut entries[i].0 {
                    *key = keys::generate_key().map_err(|e| ApiError::internal(e.to_string()))?;
                }
            }
            Err((i, e)) => return Err(group_error("users", i, e)),
        }
    };
    log::info!("api: created {} users in one bulk request", applied.len());
    for a in &applied {
        ctx.control.send(ControlMsg::UserAdded(a.id));
    }
    #[derive(Serialize)]
    struct Answer {
        created: usize,
        users: Vec<Created>,
    }
    let users: Vec<Created> = applied
        .iter()
        .filter_map(|a| a.user.as_ref().map(Created::of))
        .collect();
    Ok(Response::json(
        200,
        &Answer {
            created: users.len(),
            users,
        },
    ))
}

/// `POST /api/users/bulk-delete`.
pub fn delete(ctx: &ApiContext, body: &[u8]) -> Result<Response, ApiError> {
    let map = json_object(body, false)?.unwrap_or_default();
    reject_unknown_fields(&map, &["keys"])?;
    let Some(Value::Array(list)) = map.get("keys") else {
        return Err(ApiError::bad_request(
            "the field keys is required: an array of 1 to 1000 access keys",
        ));
    };
    if list.is_empty() || list.len() > MAX_BULK {
        return Err(ApiError::bad_request(format!(
            "a bulk request deletes 1 to {MAX_BULK} users, not {}",
            list.len()
        )));
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut changes = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let Value::String(k) = v else {
            return Err(ApiError::bad_request(format!(
                "keys[{i}]: must be a string"
            )));
        };
        keys::validate_key(k)
            .map_err(|e| ApiError::bad_request(format!("keys[{i}]: invalid key: {e}")))?;
        if let Some(j) = seen.insert(k, i) {
            return Err(ApiError::bad_request(format!(
                "keys[{i}]: the same key as keys[{j}]"
            )));
        }
        changes.push(Change::Delete { key: k.clone() });
    }
    let applied = ctx
        .persister
        .commit_all(changes)
        .map_err(|(i, e)| group_error("keys", i, e))?;
    log::info!("api: deleted {} users in one bulk request", applied.len());
    for a in &applied {
        ctx.control.send(ControlMsg::UserRemoved(a.id));
    }
    Ok(Response::json(
        200,
        &serde_json::json!({"deleted": applied.len()}),
    ))
}

/// `POST /api/users/{key}/kick`: asks the tunnel loop (which owns the sessions) to close the
/// user's sessions and answers how many it closed.
pub fn kick(ctx: &ApiContext, key: &str) -> Result<Response, ApiError> {
    let key = path_key(key)?;
    let id = lock_users(&ctx.users)
        .user_id(key)
        .ok_or_else(|| ApiError::not_found("no user with this key"))?;
    let closed = match ctx
        .control
        .ask(|reply| ControlMsg::Kick(id, reply), KICK_TIMEOUT)
    {
        Ok(n) => n,
        // No tunnel loop runs (API-only): no session exists.
        Err(AskError::NoLoop) => 0,
        Err(AskError::Timeout) => {
            return Err(ApiError::new(
                503,
                "the tunnel loop did not answer within 2 s; the sessions may still close; retry",
            ));
        }
    };
    log::info!("api: kicked user {} ({closed} sessions)", keys::mask(key));
    Ok(Response::json(
        200,
        &serde_json::json!({"key": key, "closed": closed}),
    ))
}

/// The optional filters and paging of `GET /api/users`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// Case-insensitive substring of the name (users without a name never match).
    pub name: Option<String>,
    pub enabled: Option<bool>,
    pub offset: usize,
    pub limit: Option<usize>,
}

impl ListQuery {
    /// Parses the query string (`None`: no query at all).
    pub fn parse(query: Option<&str>) -> Result<Option<ListQuery>, ApiError> {
        let Some(query) = query.filter(|q| !q.is_empty()) else {
            return Ok(None);
        };
        let mut q = ListQuery::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v)
                .ok_or_else(|| ApiError::bad_request(format!("{k}: bad percent-encoding")))?;
            let number = |field: &str| {
                v.parse::<usize>().map_err(|_| {
                    ApiError::bad_request(format!("{field} must be a whole number ≥ 0"))
                })
            };
            match k {
                "name" => q.name = Some(v.to_lowercase()),
                "enabled" => {
                    q.enabled = Some(match v.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => return Err(ApiError::bad_request("enabled must be true or false")),
                    })
                }
                "offset" => q.offset = number("offset")?,
                "limit" => q.limit = Some(number("limit")?),
                other => {
                    let shown: String = other.chars().take(40).collect();
                    return Err(ApiError::bad_request(format!(
                        "unknown query parameter {shown:?}; parameters: name, enabled, offset, limit"
                    )));
                }
            }
        }
        Ok(Some(q))
    }

    fn matches(&self, u: &User) -> bool {
        let name_ok = match &self.name {
            None => true,
            Some(want) => u
                .name
                .as_ref()
                .is_some_and(|n| n.to_lowercase().contains(want.as_str())),
        };
        name_ok && self.enabled.is_none_or(|e| u.settings.enabled == e)
    }
}

/// Decodes `%XX` and `+` (space) of a query value; `None` if malformed or not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        out.push(match b {
            b'+' => b' ',
            b'%' => {
                let hi = char::from(bytes.next()?).to_digit(16)?;
                let lo = char::from(bytes.next()?).to_digit(16)?;
                u8::try_from(hi * 16 + lo).ok()?
            }
            b => b,
        });
    }
    String::from_utf8(out).ok()
}

/// `GET /api/users`: every user in creation order, or with a query the matching ones from
/// `offset` (at most `limit`), plus `total` (how many match before paging).
pub fn list(ctx: &ApiContext, request: &Request) -> Result<Response, ApiError> {
    let query = request.head.target.split_once('?').map(|(_, q)| q);
    let filter = ListQuery::parse(query)?;
    #[derive(Serialize)]
    struct List {
        users: Vec<UserView>,
        #[serde(skip_serializing_if = "Option::is_none")]
        total: Option<usize>,
    }
    let t = lock_users(&ctx.users);
    let all = t.list();
    let answer = match filter {
        None => List {
            users: all.into_iter().map(UserView::of).collect(),
            total: None,
        },
        Some(q) => {
            let matching: Vec<&User> = all.into_iter().filter(|u| q.matches(u)).collect();
            let total = matching.len();
            List {
                users: matching
                    .into_iter()
                    .skip(q.offset)
                    .take(q.limit.unwrap_or(usize::MAX))
                    .map(UserView::of)
                    .collect(),
                total: Some(total),
            }
        }
    };
    drop(t);
    Ok(Response::json(200, &answer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_queries_parse() {
        assert_eq!(ListQuery::parse(None), Ok(None));
        assert_eq!(ListQuery::parse(Some("")), Ok(None));
        let q = ListQuery::parse(Some("name=Bob%20S+x&enabled=false&offset=5&limit=10"))
            .unwrap()
            .unwrap();
        assert_eq!(
            q,
            ListQuery {
                name: Some("bob s x".into()),
                enabled: Some(false),
                offset: 5,
                limit: Some(10),
            }
        );
        for bad in [
            "enabled=yes",
            "offset=-1",
            "limit=x",
            "nme=a",
            "name=%zz",
            "name=%ff",
        ] {
            assert_eq!(
                ListQuery::parse(Some(bad)).unwrap_err().status,
                400,
                "{bad}"
            );
        }
    }

    #[test]
    fn bulk_bodies_name_the_bad_entry() {
        let parse = |v: Value| bulk_changes(v.as_object().unwrap());
        let e = parse(serde_json::json!({"users": [{}, {"limit_bytes": -1}]})).unwrap_err();
        assert!(
            e.message.starts_with("users[1]: limit_bytes"),
            "{}",
            e.message
        );
        let e = parse(serde_json::json!({"users": [{}, {"nope": 1}]})).unwrap_err();
        assert!(
            e.message.starts_with("users[1]: unknown field"),
            "{}",
            e.message
        );
        let k = "k".repeat(20);
        let e = parse(serde_json::json!({"users": [{"key": k}, {"key": k}]})).unwrap_err();
        assert!(e.message.starts_with("users[1].key"), "{}", e.message);
        let e = parse(serde_json::json!({"count": 2, "key": k})).unwrap_err();
        assert!(
            e.message.starts_with("defaults: unknown field"),
            "{}",
            e.message
        );
        for bad in [
            serde_json::json!({"count": 0}),
            serde_json::json!({"count": 1001}),
            serde_json::json!({"users": []}),
            serde_json::json!({"count": 1, "users": [{}]}),
            serde_json::json!({}),
        ] {
            assert!(parse(bad.clone()).is_err(), "{bad}");
        }
        let ok = parse(serde_json::json!({"count": 3, "limit_bytes": 5})).unwrap();
        assert_eq!(ok.len(), 3);
        assert!(ok.iter().all(|(_, generated)| *generated));
    }
}
